"""Part files: a split model's edge part and server part on disk, in the deployed (fused) form, and their memory.

DEVICE-SIDE module (Python 3.6 + torch 1.10 + numpy, no torchvision, no config.py, prints nothing but the probe's
JSON line).  A part file is a NumPy `.npz` archive of plain numeric arrays, read with `allow_pickle=False`, so
loading one never unpickles anything (a copied file, or bytes that came over the link, are equally safe):

    __meta__            uint8: UTF-8 JSON {format, version, part ('edge' | 'server' | 'stage'), arch
                        (RepVGG.spec_dict() / ChainNet.spec_dict()), lam, lo, hi, num_blocks, blocks: [{index, name, layout, kinds}], head,
                        input_size, mean, std, feature_dtype}; the part holds blocks lo..hi-1 (edge: 0..lam-1,
                        server: lam..N-1, stage: one hop's range of a chain, lam = hi; files without lo/hi are read
                        by their part and lam)
    block<k>.w<i>       float32: kernel (conv: (out, in / groups, k, k)) or scale (affine: (C,)) of part i of block k
    block<k>.b<i>       float32: bias of part i of block k, (out,)
    block<k>.<key>      a plain network's block (chain_nets: MobileNetV2, ResNet; kinds [its kind], layout 0): each
                        tensor of the block module under its key inside the block (`conv.0.0.weight`, `bn1.running_var`;
                        float32, num_batches_tracked int64), loaded strictly into chain_nets.make_block
    linear.weight/bias  float32: the classifier (in the server part; in the edge part when lam == N, and then the
                        server part is empty)

`part_bytes(model, lam, 'edge' | 'server', ...)` makes the bytes of one part from a HyperRepVGG in its current
configuration (or a plain chain_nets.ChainNet) (kept sets and layouts), `stage_bytes(model, lo, hi, ...)` those of one hop's blocks lo..hi-1 in a
chain of devices (the classifier with the stage that ends at N), `chain_bytes(model, splits, ...)` all K parts of a
split vector; `load_part(path_or_bytes)` rebuilds a `hyper_repvgg.SplitPart` of
`DeployedBlock`s straight from the arrays and the block plan, allocating only that part's blocks (never the full
model).  `memory_probe(...)` / `python -m comm.parts --probe FILE [FILE ...]` loads part files in a fresh process,
runs one forward pass and reports its peak RSS (resource.getrusage) and, on a GPU, torch.cuda.max_memory_allocated.
"""
import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple, Union  # noqa: F401 - used in type comments

import numpy as np
import torch
import torch.nn as nn

import chain_nets as CN
import hyper_repvgg as H
import nets

FORMAT = 'hyperrepvgg-part'
VERSION = 1
META = '__meta__'
PARTS = ('edge', 'server')  # the two part files of a split at lambda
PART_KINDS = PARTS + ('stage',)  # meta 'part': also one hop's range of a chain


class PartFileError(ValueError):
    """A part file that is not one, or does not fit its own description; the message names the file and key."""


def _deployed_blocks(model, lo, hi):
    # type: (H.HyperRepVGG, int, int) -> List[H.DeployedBlock]
    return [H.deploy_block(b) for b in model.blocks[lo:hi]]


def part_arrays(model, lam, part, input_size, mean=None, std=None, feature_dtype='fp32'):
    # type: (H.HyperRepVGG, int, str, int, Optional[Sequence[float]], Optional[Sequence[float]], str) -> Dict[str, np.ndarray]
    """The arrays of one part file (meta included) for `model` split at `lam`, in its current layouts."""
    if part not in PARTS:
        raise ValueError('part must be one of {}, got {!r}'.format(PARTS, part))
    n = model.num_blocks
    if not 0 <= int(lam) <= n:
        raise ValueError('split lambda={} out of range 0..{}'.format(lam, n))
    lam = int(lam)
    lo, hi = (0, lam) if part == 'edge' else (lam, n)
    return _range_arrays(model, lo, hi, part, lam, input_size, mean, std, feature_dtype)


def stage_arrays(model, lo, hi, input_size, mean=None, std=None, feature_dtype='fp32'):
    # type: (H.HyperRepVGG, int, int, int, Optional[Sequence[float]], Optional[Sequence[float]], str) -> Dict[str, np.ndarray]
    """The arrays of the part file of one hop of a chain: blocks lo..hi-1 (the classifier too when hi == N and the
    stage is not empty; an empty stage passes on what it receives)."""
    n = model.num_blocks
    if not 0 <= int(lo) <= int(hi) <= n:
        raise ValueError('stage blocks {}..{} out of range: need 0 <= lo <= hi <= {}'.format(lo, hi, n))
    return _range_arrays(model, int(lo), int(hi), 'stage', int(hi), input_size, mean, std, feature_dtype)


def _range_arrays(model, lo, hi, part, lam, input_size, mean, std, feature_dtype):
    # type: (H.HyperRepVGG, int, int, str, int, int, Optional[Sequence[float]], Optional[Sequence[float]], str) -> Dict[str, np.ndarray]
    n = model.num_blocks
    head = hi == n and lo < hi  # the classifier runs wherever block N-1's output is
    arrays = {}
    blocks = []
    with torch.no_grad():
        for block in _deployed_blocks(model, lo, hi):
            k = block.spec.index
            if getattr(block.spec, 'plain', False):  # a plain network's block: its own tensors under their keys
                for key, t in block.state_dict().items():
                    t = t.detach().cpu()
                    arrays['block{}.{}'.format(k, key)] = (t.float() if t.is_floating_point() else t).numpy()
                kinds = [block.spec.kind]
            else:
                for i in range(len(block.kinds)):
                    arrays['block{}.w{}'.format(k, i)] = getattr(block, 'w{}'.format(i)).detach().cpu().float().numpy()
                    arrays['block{}.b{}'.format(k, i)] = getattr(block, 'b{}'.format(i)).detach().cpu().float().numpy()
                kinds = block.kinds
            blocks.append({'index': k, 'name': block.spec.name, 'layout': int(block.layout), 'kinds': kinds})
        if head:
            arrays['linear.weight'] = model.linear.weight.detach().cpu().float().numpy()
            arrays['linear.bias'] = model.linear.bias.detach().cpu().float().numpy()
    meta = {'format': FORMAT, 'version': VERSION, 'part': part, 'arch': model.spec_dict(), 'lam': lam, 'lo': lo,
            'hi': hi, 'num_blocks': n, 'blocks': blocks, 'head': head, 'input_size': int(input_size),
            'mean': None if mean is None else [float(v) for v in mean],
            'std': None if std is None else [float(v) for v in std], 'feature_dtype': str(feature_dtype)}
    arrays[META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode('utf-8'), dtype=np.uint8)
    return arrays


def _npz_bytes(arrays):
    # type: (Dict[str, np.ndarray]) -> bytes
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: the weights are what they are, and loading stays fast
    return buf.getvalue()


def part_bytes(model, lam, part, input_size, mean=None, std=None, feature_dtype='fp32'):
    # type: (H.HyperRepVGG, int, str, int, Optional[Sequence[float]], Optional[Sequence[float]], str) -> bytes
    """The .npz bytes of one part file."""
    return _npz_bytes(part_arrays(model, lam, part, input_size, mean, std, feature_dtype))


def stage_bytes(model, lo, hi, input_size, mean=None, std=None, feature_dtype='fp32'):
    # type: (H.HyperRepVGG, int, int, int, Optional[Sequence[float]], Optional[Sequence[float]], str) -> bytes
    """The .npz bytes of the part file of one chain hop (stage_arrays)."""
    return _npz_bytes(stage_arrays(model, lo, hi, input_size, mean, std, feature_dtype))


def chain_bytes(model, splits, input_size, mean=None, std=None, feature_dtype='fp32'):
    # type: (H.HyperRepVGG, Sequence[int], int, Optional[Sequence[float]], Optional[Sequence[float]], str) -> List[bytes]
    """The K part files of a chain split at lambda_1 <= ... <= lambda_{K-1} (`splits`): hop k holds blocks
    lambda_{k-1}..lambda_k - 1, with lambda_0 = 0 and lambda_K = N."""
    cuts = [0] + [int(s) for s in splits] + [model.num_blocks]
    if any(a > b for a, b in zip(cuts, cuts[1:])):
        raise ValueError('chain splits {} must be non-decreasing within 0..{}'.format(list(splits), model.num_blocks))
    return [stage_bytes(model, lo, hi, input_size, mean, std, feature_dtype) for lo, hi in zip(cuts, cuts[1:])]


def part_range(meta):
    # type: (Dict[str, object]) -> Tuple[int, int]
    """(lo, hi): the part holds blocks lo..hi-1 (read from lo/hi, or from part and lam in files without them)."""
    if 'lo' in meta or 'hi' in meta:
        return int(meta['lo']), int(meta['hi'])
    lam, n = int(meta['lam']), int(meta['num_blocks'])
    return (0, lam) if meta['part'] == 'edge' else (lam, n)


def sha256_hex(data):
    # type: (bytes) -> str
    return hashlib.sha256(data).hexdigest()


def _expected_shape(spec, kind, which):
    # type: (H.BlockSpec, str, str) -> Tuple[int, ...]
    if which == 'b' or kind == 'affine':
        return (spec.out_channels,)
    k = 3 if kind == 'conv3' else 1
    return (spec.out_channels, spec.in_channels // spec.groups, k, k)


def _read(source):
    # type: (Union[str, bytes]) -> Tuple[Dict[str, np.ndarray], str]
    where = '<bytes>' if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        handle = np.load(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source,
                         allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise PartFileError('{}: not a part file (.npz of plain arrays): {}'.format(where, e))
    try:
        with handle as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # an object array would need pickle: refused
        raise PartFileError('{}: unreadable array ({})'.format(where, e))
    return arrays, where


def read_meta(arrays, where):
    # type: (Dict[str, np.ndarray], str) -> Dict[str, object]
    if META not in arrays or arrays[META].dtype != np.uint8:
        raise PartFileError('{}: no {} entry (uint8 JSON): not a part file'.format(where, META))
    try:
        meta = json.loads(arrays[META].tobytes().decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
        raise PartFileError('{}: {} is not UTF-8 JSON ({})'.format(where, META, e))
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise PartFileError('{}: {}.format is {!r}, expected {!r}'.format(where, META, (meta or {}).get('format')
                                                                          if isinstance(meta, dict) else meta, FORMAT))
    if meta.get('version') != VERSION:
        raise PartFileError('{}: {}.version is {!r}, this code reads {}; export the parts again'.format(
            where, META, meta.get('version'), VERSION))
    if meta.get('part') not in PART_KINDS:
        raise PartFileError('{}: {}.part is {!r}, expected one of {}'.format(where, META, meta.get('part'),
                                                                           PART_KINDS))
    try:
        lo, hi = part_range(meta)
        n = int(meta['num_blocks'])
        indices = [int(b['index']) for b in meta['blocks']]
    except (KeyError, TypeError, ValueError) as e:
        raise PartFileError('{}: {} needs integer lam / lo / hi / num_blocks and blocks[].index ({!r})'.format(
            where, META, e))
    if not 0 <= lo <= hi <= n or indices != list(range(lo, hi)):
        raise PartFileError('{}: {} describes blocks {} but the range {}..{} of {} blocks'.format(
            where, META, indices, lo, hi - 1, n))
    if bool(meta.get('head')) != (hi == n and lo < hi):
        raise PartFileError('{}: {}.head is {!r}; the classifier belongs exactly to the non-empty part ending at '
                            'block N-1'.format(where, META, meta.get('head')))
    return meta


def load_part(source):
    # type: (Union[str, bytes]) -> Tuple[H.SplitPart, Dict[str, object]]
    """(deployed SplitPart, meta) of a part file (a path or its bytes); only that part's blocks are built."""
    arrays, where = _read(source)
    meta = read_meta(arrays, where)
    arch = meta['arch']
    try:
        plan = nets.plan_of(arch)
    except (KeyError, ValueError, TypeError) as e:
        raise PartFileError('{}: {}.arch does not describe a network this code builds: {}'.format(where, META, e))
    used = {META}
    blocks = []
    for entry in meta['blocks']:
        k = int(entry['index'])
        if not 0 <= k < len(plan):
            raise PartFileError('{}: block index {} outside 0..{}'.format(where, k, len(plan) - 1))
        spec, layout = plan[k], int(entry['layout'])
        if getattr(spec, 'plain', False):
            if layout != CN.PLAIN_LAYOUT or list(entry['kinds']) != [spec.kind]:
                raise PartFileError('{}: block {} ({}) of a plain network is layout {} of kind {}, the file says '
                                    'layout {} kinds {}'.format(where, k, spec.name, CN.PLAIN_LAYOUT, spec.kind,
                                                                layout, entry['kinds']))
            blocks.append(_plain_block(spec, arrays, where, used))
            continue
        kinds = [H.part_kind(p) for p in H.LAYOUTS[layout].parts]
        if kinds != list(entry['kinds']):
            raise PartFileError('{}: block {} layout {} has parts {}, the file says {}'.format(
                where, k, layout, kinds, entry['kinds']))
        tensors = []
        for i, kind in enumerate(kinds):
            pair = []
            for which in ('w', 'b'):
                key = 'block{}.{}{}'.format(k, which, i)
                if key not in arrays:
                    raise PartFileError('{}: missing array {}'.format(where, key))
                a = arrays[key]
                want = _expected_shape(spec, kind, which)
                if a.dtype != np.float32 or tuple(a.shape) != want:
                    raise PartFileError('{}: array {} is {} {}, block {} ({}) needs float32 {}'.format(
                        where, key, a.dtype, tuple(a.shape), k, spec.name, want))
                pair.append(torch.from_numpy(np.ascontiguousarray(a)))
                used.add(key)
            tensors.append(tuple(pair))
        blocks.append(H.DeployedBlock(spec, layout, tensors))
    head = None
    if meta.get('head'):
        for key in ('linear.weight', 'linear.bias'):
            if key not in arrays:
                raise PartFileError('{}: missing array {}'.format(where, key))
            used.add(key)
        w, b = arrays['linear.weight'], arrays['linear.bias']
        if w.shape != (arch['num_classes'], plan[-1].out_channels) or b.shape != (arch['num_classes'],):
            raise PartFileError('{}: classifier is {} / {}, expected ({}, {}) / ({},)'.format(
                where, w.shape, b.shape, arch['num_classes'], plan[-1].out_channels, arch['num_classes']))
        linear = nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({'weight': torch.from_numpy(w.copy()), 'bias': torch.from_numpy(b.copy())})
        head = (nn.AdaptiveAvgPool2d(1), linear)
    extra = sorted(set(arrays) - used)
    if extra:
        raise PartFileError('{}: arrays {} are not described by {}'.format(where, extra[:5], META))
    return H.SplitPart(blocks, head).eval(), meta


def _plain_block(spec, arrays, where, used):
    # type: (CN.ChainBlockSpec, Dict[str, np.ndarray], str, set) -> nn.Module
    """Block `spec` of a plain network from its arrays block<k>.<key>: every key of chain_nets.make_block's module,
    with its dtype and shape, loaded strictly; the keys read are added to `used`."""
    block = CN.make_block(spec)
    state = {}
    for key, t in block.state_dict().items():
        name = 'block{}.{}'.format(spec.index, key)
        if name not in arrays:
            raise PartFileError('{}: missing array {}'.format(where, name))
        a, want = arrays[name], t.numpy()
        if a.dtype != want.dtype or a.shape != want.shape:
            raise PartFileError('{}: array {} is {} {}, block {} ({}) needs {} {}'.format(
                where, name, a.dtype, tuple(a.shape), spec.index, spec.name, want.dtype, tuple(want.shape)))
        state[key] = torch.from_numpy(np.ascontiguousarray(a))
        used.add(name)
    block.load_state_dict(state, strict=True)
    block.spec, block.layout = spec, CN.PLAIN_LAYOUT
    return block.eval()


def part_input(meta, batch=1):
    # type: (Dict[str, object], int) -> torch.Tensor
    """A random input of the shape the part takes: normalized images (first block 0) or block lo-1's features."""
    arch = meta['arch']
    plan = nets.plan_of(arch)
    size = int(meta['input_size'])
    lo = part_range(meta)[0]
    if lo == 0:
        return torch.randn(int(batch), 3, size, size)
    from timing.flops import block_shapes
    c, h, w = block_shapes(plan, size)[lo - 1]['output_shape']
    return torch.randn(int(batch), c, h, w)


# ----------------------------------------------------------------------------------------------------------
# Memory: peak RSS of a fresh process holding the part(s)
# ----------------------------------------------------------------------------------------------------------

def _peak_rss_bytes():
    # type: () -> int
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == 'darwin' else 1024)  # Linux reports KiB, macOS bytes


def _current_rss_bytes():
    # type: () -> Optional[int]
    """Resident set size now (Linux /proc/self/statm), or None where there is no /proc."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return None


def probe_here(paths, batch=1, device='cpu'):
    # type: (Sequence[str], int, str) -> Dict[str, object]
    """Load the part files in order into this process, run them chained on one batch; peak RSS before / after."""
    dev = torch.device(device)
    torch.ones(1).to(dev) + 1  # torch (and CUDA) initialized before the baseline
    base, base_now = _peak_rss_bytes(), _current_rss_bytes()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    parts, metas = [], []
    for p in paths:
        part, meta = load_part(p)
        parts.append(part.to(dev))
        metas.append(meta)
    loaded = _peak_rss_bytes()
    with torch.no_grad():
        x = part_input(metas[0], batch).to(dev)
        for part in parts:
            x = part(x)
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
    out = {'files': [os.path.basename(str(p)) for p in paths], 'device': str(dev), 'batch': int(batch),
           'weight_bytes': int(sum(t.numel() * t.element_size() for part in parts for t in
                                   list(part.parameters()) + list(part.buffers()))),
           'blocks': int(sum(len(part.blocks) for part in parts)),
           'baseline_peak_rss_bytes': base, 'loaded_peak_rss_bytes': loaded, 'peak_rss_bytes': _peak_rss_bytes(),
           'cuda_max_memory_allocated_bytes': int(torch.cuda.max_memory_allocated(dev)) if dev.type == 'cuda'
           else None, 'torch_version': torch.__version__}
    now = _current_rss_bytes()
    out['baseline_rss_bytes'], out['rss_bytes'] = base_now, now
    # the peak after importing torch can exceed what a small part adds on top of the steady state: the part's own
    # share is the growth of the resident set (None without /proc)
    out['part_rss_bytes'] = None if now is None or base_now is None else now - base_now
    return out


def memory_probe(paths, batch=1, device='cpu', python=None, timeout_s=600.0):
    # type: (Sequence[str], int, str, Optional[str], float) -> Dict[str, object]
    """probe_here in a fresh interpreter (`python`, default this one), so that the high-water mark is this part's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [python or sys.executable, '-m', 'comm.parts', '--probe'] + [os.path.abspath(str(p)) for p in paths] + \
        ['--batch', str(int(batch)), '--device', str(device)]
    res = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                         timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError('memory probe {} failed ({}): {}'.format(' '.join(cmd), res.returncode,
                                                                    res.stderr.strip()[-1500:]))
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare_memory(edge_path, server_path, batch=1, device='cpu', python=None):
    # type: (str, str, int, str, Optional[str]) -> Dict[str, object]
    """Peak RSS (and CUDA peak) of a fresh process holding the edge part alone against the full model (edge +
    server parts chained: the same deployed network unsplit), each in its own process."""
    part = memory_probe([edge_path], batch, device, python)
    full = memory_probe([edge_path, server_path], batch, device, python)
    out = {'edge_part': part, 'full_model': full, 'device': str(device), 'batch': int(batch),
           'method': 'fresh process per case: resource.getrusage ru_maxrss (peak) and /proc/self/statm (resident now) '
                     'after importing torch (baseline) and after loading the part file(s) and one forward pass; '
                     'torch.cuda.max_memory_allocated on a GPU',
           'saved_peak_rss_bytes': full['peak_rss_bytes'] - part['peak_rss_bytes'],
           'saved_weight_bytes': full['weight_bytes'] - part['weight_bytes'],
           'saved_rss_bytes': None if part['part_rss_bytes'] is None or full['part_rss_bytes'] is None
           else full['part_rss_bytes'] - part['part_rss_bytes']}
    if part['cuda_max_memory_allocated_bytes'] is not None:
        out['saved_cuda_bytes'] = full['cuda_max_memory_allocated_bytes'] - part['cuda_max_memory_allocated_bytes']
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description='Memory probe of part files (run in a fresh process): loads them, runs '
                                'one forward pass, prints one JSON line with the peak RSS.')
    p.add_argument('--probe', nargs='+', required=True, metavar='FILE', help='part files, chained in this order')
    p.add_argument('--batch', type=int, default=1, help='batch of the forward pass, samples (default: 1)')
    p.add_argument('--device', default='cpu', help='torch device: cpu | cuda (default: cpu)')
    args = p.parse_args(argv)
    print(json.dumps(probe_here(args.probe, args.batch, args.device)))  # noqa: T201 - the probe's output
    return 0


if __name__ == '__main__':
    sys.exit(main())
