"""Timing of RepVGG blocks, layouts, the head and whole configurations on a torch device
(docs/design.md#lut-measurement).

DEVICE-SIDE module: the Jetson's client_worker imports it.  Python 3.6 + torch 1.10 + numpy, no dataclasses,
no torchvision, prints nothing; tqdm is used for progress only when importable.  Every function returns
plain dicts / lists (JSON-able).

What is timed is what the device runs: `hyper_repvgg.deploy_block(block, gamma)` (the precomputed kernels of
layout gamma) on an input of the block's true shape, the blocks built with random weights and random
BatchNorm statistics (the timing does not depend on the values).  A layout is measured for a block when its
branch set is a subset of the block's branches (blocks without identity: layouts 0, 1, 3, 4); the others are
absent from the result, never zero.
"""
import datetime
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from hyper_repvgg import (LAYOUTS, HyperRepVGG, HyperRepVGGBlock, SplitPart, block_plan, build_hyper_repvgg,
                          deploy_block, deploy_part)
from timing.flops import block_input_hw, measurable_layouts, out_hw

MIN_TIMED_RUNS = 3  # a time budget never cuts an entry below this many timed runs


def _now_iso():
    # type: () -> str
    return datetime.datetime.utcnow().replace(microsecond=0).isoformat() + 'Z'


def _percentile(sorted_values, q):
    # type: (Sequence[float], float) -> float
    """Linear-interpolated percentile (0..100) of an already sorted list."""
    if not sorted_values:
        raise ValueError('no values')
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(samples_ms):
    # type: (Sequence[float]) -> Dict[str, object]
    """{'median_ms', 'p10_ms', 'p90_ms', 'mean_ms', 'min_ms', 'n'} of a list of times in ms."""
    s = sorted(float(v) for v in samples_ms)
    return {'median_ms': _percentile(s, 50), 'p10_ms': _percentile(s, 10), 'p90_ms': _percentile(s, 90),
            'mean_ms': sum(s) / len(s), 'min_ms': s[0], 'n': len(s)}


def _sync(device):
    # type: (torch.device) -> None
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_callable(fn, device, warmup=5, repeats=20, max_time_s=0.0, min_sample_ms=0.2):
    # type: (Callable[[], object], torch.device, int, int, float, float) -> Dict[str, object]
    """Median / p10 / p90 of the time of one call of `fn` in ms, after `warmup` untimed calls.

    Calls shorter than `min_sample_ms` are repeated `inner` times per timed sample (the sample is the mean
    over them), so that timer resolution does not dominate.  GPU work is synchronized before and after every
    sample.  `max_time_s` > 0 stops repeating once that much time is spent (at least MIN_TIMED_RUNS samples).
    """
    device = torch.device(device)
    with torch.no_grad():
        for _ in range(max(0, int(warmup))):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        once = time.perf_counter() - t0
        inner = max(1, int(math.ceil(min_sample_ms / 1e3 / max(once, 1e-9)))) if min_sample_ms > 0 else 1
        samples = []
        start = time.perf_counter()
        for _ in range(max(1, int(repeats))):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
            if max_time_s > 0 and len(samples) >= MIN_TIMED_RUNS and time.perf_counter() - start > max_time_s:
                break
    out = summarize_ms(samples)
    out['inner'] = inner
    return out


def randomize_bn_(module, generator):
    # type: (nn.Module, torch.Generator) -> nn.Module
    """Random BatchNorm statistics and affine parameters (as RepVGG's verify.py does), in place."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
    return module


def random_model(arch, seed=0):
    # type: (Dict[str, object], int) -> HyperRepVGG
    """The HyperRepVGG of spec `arch` (hyper_repvgg.RepVGG.spec_dict()) with random weights and BN stats, eval."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = build_hyper_repvgg(arch['name'], num_classes=int(arch['num_classes']),
                                   width_multiplier=arch.get('width_multiplier'),
                                   small_input=bool(arch.get('small_input', False)))
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 1)
    return randomize_bn_(model, gen).eval()


def deployed_layout(block, gamma):
    # type: (HyperRepVGGBlock, int) -> nn.Module
    """deploy_block of `block` with its kept set made equal to layout gamma's branches (block left unchanged)."""
    saved = block.kept.clone()
    try:
        for i, b in enumerate(('D', 'O', 'I')):
            block.kept[i] = b in LAYOUTS[gamma].branches
        return deploy_block(block, gamma)
    finally:
        block.kept.copy_(saved)


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _fallback_layout(spec, gamma):
    # type: (object, int) -> int
    """gamma where the block can run it, else the block's deploy form (13, or 4 without identity)."""
    return gamma if gamma in measurable_layouts(spec) else (13 if spec.has_identity else 4)


def _time_chain(modules, x, device, warmup, repeats, budget_s):
    # type: (Sequence[nn.Module], torch.Tensor, torch.device, int, int, float) -> List[List[float]]
    """Run modules[0] .. modules[-1] as one forward pass, `repeats` times after `warmup` passes, timing every
    module inside the pass (device synchronized around each).  Returns per-module lists of times in ms."""
    samples = [[] for _ in modules]
    with torch.no_grad():
        for _ in range(max(0, int(warmup))):
            y = x
            for m in modules:
                y = m(y)
        _sync(device)
        start = time.perf_counter()
        for r in range(max(1, int(repeats))):
            y = x
            for i, m in enumerate(modules):
                _sync(device)
                t0 = time.perf_counter()
                y = m(y)
                _sync(device)
                samples[i].append((time.perf_counter() - t0) * 1e3)
            if budget_s > 0 and r + 1 >= MIN_TIMED_RUNS and time.perf_counter() - start > budget_s:
                break
    return samples


def measure_blocks(arch, input_size, batch_sizes=(1,), device='cpu', warmup=5, repeats=20, max_entry_s=0.0,
                   seed=0, progress=False, timing='chain'):
    # type: (Dict[str, object], int, Sequence[int], str, int, int, float, int, bool, str) -> Dict[str, object]
    """Time every block x measurable layout x batch size, and the head (pooling + classifier) per batch size.

    timing='chain' (default): for each layout gamma, a whole forward pass runs with every block in gamma (blocks
    that cannot run gamma use their deploy form and are not recorded) and each block is timed inside the pass,
    so weights arrive from memory as they do when the network really runs.  timing='isolated': each block runs
    alone in a loop on its input (weights stay in cache: faster than in a real forward pass on a CPU).
    Returns {'entries': [{'block', 'layout', 'batch', 'median_ms', 'p10_ms', 'p90_ms', 'mean_ms', 'n'}],
    'head': [{'batch', 'median_ms', ...}]}.
    """
    if timing not in ('chain', 'isolated'):
        raise ValueError("timing must be 'chain' or 'isolated', got {!r}".format(timing))
    device = torch.device(device)
    model = random_model(arch, seed)
    plan = model.plan
    in_hw = block_input_hw(plan, input_size)
    entries, head = [], []
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 2)
    n_entries = sum(len(measurable_layouts(s)) for s in plan)
    if timing == 'chain':
        total = len(batch_sizes) * len(LAYOUTS)
    else:
        total = len(batch_sizes) * (n_entries + 1)
    bar = _progress(total, progress, 'LUT {} ({})'.format(device, timing))
    try:
        for batch in batch_sizes:
            x = torch.randn(int(batch), 3, int(input_size), int(input_size), generator=gen).to(device)
            head_part = SplitPart([], (model.gap, model.linear)).to(device).eval()
            if timing == 'chain':
                head_samples = []
                for lay in LAYOUTS:
                    recorded = [s.index for s in plan if lay.gamma in measurable_layouts(s)]
                    modules = [deployed_layout(b, _fallback_layout(s, lay.gamma)).to(device).eval()
                               for s, b in zip(plan, model.blocks)] + [head_part]
                    samples = _time_chain(modules, x, device, warmup, repeats, max_entry_s * len(recorded))
                    for k in recorded:
                        row = {'block': k, 'layout': lay.gamma, 'batch': int(batch)}
                        row.update(summarize_ms(samples[k]))
                        entries.append(row)
                    head_samples.extend(samples[-1])
                    if bar is not None:
                        bar.update(1)
                row = {'batch': int(batch)}
                row.update(summarize_ms(head_samples))
                head.append(row)
                continue
            for spec, block, hw in zip(plan, model.blocks, in_hw):
                xb = torch.randn(int(batch), spec.in_channels, hw[0], hw[1], generator=gen).to(device)
                for gamma in measurable_layouts(spec):
                    deployed = deployed_layout(block, gamma).to(device).eval()
                    stats = time_callable(lambda d=deployed, v=xb: d(v), device, warmup, repeats, max_entry_s)
                    row = {'block': spec.index, 'layout': gamma, 'batch': int(batch)}
                    row.update(stats)
                    entries.append(row)
                    if bar is not None:
                        bar.update(1)
            last = plan[-1]
            ho, wo = out_hw(last, in_hw[-1])
            h = torch.randn(int(batch), last.out_channels, ho, wo, generator=gen).to(device)
            stats = time_callable(lambda p=head_part, v=h: p(v), device, warmup, repeats, max_entry_s)
            row = {'batch': int(batch)}
            row.update(stats)
            head.append(row)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    entries.sort(key=lambda e: (e['batch'], e['block'], e['layout']))
    return {'entries': entries, 'head': head}


def deploy_configuration(model, gammas, lam):
    # type: (HyperRepVGG, Sequence[int], int) -> tuple
    """(edge, server) deployed parts of `model` with block k's kept set = layout gammas[k]'s branches, split lam."""
    if len(gammas) != model.num_blocks:
        raise ValueError('need {} layouts, got {}'.format(model.num_blocks, len(gammas)))
    for k, g in enumerate(gammas):
        model.set_kept(k, LAYOUTS[int(g)].branches)
        model.set_layout(k, int(g))
    edge, server = model.split(int(lam))
    return deploy_part(edge), deploy_part(server)


def measure_configuration(model, input_size, gammas, lam, batch=1, device='cpu', warmup=5, repeats=20,
                          max_time_s=0.0, seed=0):
    # type: (HyperRepVGG, int, Sequence[int], int, int, str, int, int, float, int) -> Dict[str, object]
    """End-to-end time of one configuration on this device: the edge part (blocks [0, lam)) and the server part
    (blocks [lam, N) + head) each run as one module on a real input, with no timing inside.  Returns
    {'edge': stats | None, 'server': stats}; the edge is None when lam == 0.  `model` is changed (kept sets
    and layouts)."""
    device = torch.device(device)
    edge, server = deploy_configuration(model, gammas, lam)
    edge, server = edge.to(device).eval(), server.to(device).eval()
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 3)
    x = torch.randn(int(batch), 3, int(input_size), int(input_size), generator=gen).to(device)
    out = {'edge': None}
    with torch.no_grad():
        h = edge(x)
    if lam > 0:
        out['edge'] = time_callable(lambda: edge(x), device, warmup, repeats, max_time_s, min_sample_ms=0)
    out['server'] = time_callable(lambda: server(h), device, warmup, repeats, max_time_s, min_sample_ms=0)
    return out


def roofline_microbenchmark(device='cpu', matmul_n=None, copy_mb=None, repeats=10):
    # type: (str, Optional[int], Optional[float], int) -> Dict[str, object]
    """This device's own peak FLOP/s (large fp32 matmul) and memory bandwidth (large copy): the roofline knee.

    Copy bandwidth counts read + write bytes; both use the fastest of the repeats.  Returns peak_flops_per_s, mem_bandwidth_bytes_per_s,
    knee_flop_per_byte and the sizes used; all measured.
    """
    device = torch.device(device)
    cuda = device.type == 'cuda'
    n = int(matmul_n or (4096 if cuda else 1024))
    mb = float(copy_mb or (512.0 if cuda else 128.0))
    gen = torch.Generator()
    gen.manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    c = torch.empty(n, n, device=device)
    mm = time_callable(lambda: torch.mm(a, b, out=c), device, warmup=2, repeats=repeats)
    elems = int(mb * 1e6 / 4)
    src = torch.ones(elems, device=device)
    dst = torch.empty(elems, device=device)
    cp = time_callable(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    peak = 2.0 * n ** 3 / (mm['min_ms'] / 1e3)  # a peak is the best run, not the typical one
    bw = 2.0 * elems * 4 / (cp['min_ms'] / 1e3)
    return {'peak_flops_per_s': peak, 'mem_bandwidth_bytes_per_s': bw, 'knee_flop_per_byte': peak / bw,
            'matmul_n': n, 'copy_mb': mb, 'matmul_ms': mm['min_ms'], 'copy_ms': cp['min_ms'],
            'source': 'measured'}


def _power_mode():
    # type: () -> Optional[str]
    """Jetson power mode: `nvpmodel -q` output, else the default line of /etc/nvpmodel.conf, else None."""
    exe = shutil.which('nvpmodel')
    if exe is not None:
        try:
            res = subprocess.run([exe, '-q'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True, timeout=10)
            text = ' | '.join(line.strip() for line in res.stdout.splitlines() if line.strip())
            if text:
                return text
        except (OSError, subprocess.SubprocessError):
            pass
    conf = Path('/etc/nvpmodel.conf')
    if conf.is_file():
        try:
            for line in conf.read_text().splitlines():
                if 'PM_CONFIG' in line:
                    return 'nvpmodel.conf: ' + line.strip()
        except (OSError, UnicodeDecodeError):
            pass
        return 'nvpmodel.conf present, mode unknown'
    return None


def cpu_name():
    # type: () -> str
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.lower().startswith(('model name', 'hardware')):
                return line.split(':', 1)[1].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return platform.processor() or platform.machine()


def device_metadata(device='cpu'):
    # type: (str) -> Dict[str, object]
    """Device name, torch / python versions, threads, timestamp, host and Jetson power mode (None elsewhere)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()
    return {'device': str(device), 'device_name': name, 'torch_version': torch.__version__,
            'python_version': platform.python_version(), 'threads': torch.get_num_threads(),
            'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'host': platform.node(),
            'timestamp': _now_iso(), 'power_mode': _power_mode()}


def set_threads(threads):
    # type: (int) -> int
    """torch.set_num_threads(threads) when threads > 0; returns the number of threads in use."""
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def measure_side(arch, input_size, batch_sizes=(1,), device='cpu', warmup=5, repeats=20, threads=0,
                 max_entry_s=0.0, seed=0, progress=False, microbenchmark=True, timing='chain'):
    # type: (Dict[str, object], int, Sequence[int], str, int, int, int, float, int, bool, bool, str) -> Dict[str, object]
    """Everything one side contributes to the LUT, measured here: block entries, head, roofline, metadata."""
    used = set_threads(threads)
    plan = block_plan(arch['name'], arch.get('width_multiplier'), bool(arch.get('small_input', False)))
    result = measure_blocks(arch, input_size, batch_sizes, device, warmup, repeats, max_entry_s, seed, progress,
                            timing)
    result['roofline'] = roofline_microbenchmark(device) if microbenchmark else None
    meta = device_metadata(device)
    meta['threads'] = used
    result['metadata'] = meta
    result['settings'] = {'warmup': int(warmup), 'repeats': int(repeats), 'max_entry_s': float(max_entry_s),
                          'batch_sizes': [int(b) for b in batch_sizes], 'input_size': int(input_size),
                          'num_blocks': len(plan), 'seed': int(seed), 'timing': timing}
    return result
