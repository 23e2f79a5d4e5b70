"""Step 1 `--mode client` on the edge device: measure the device's side of the LUT and write it as the edge LUT.

DEVICE-SIDE module: Python 3.6 + torch 1.10 + numpy, no config.py, no dataclasses, no torchvision.  Run on the
Jetson from the repository copy, after the server's `step1_measure_lut.py --mode server` and with its
lut_server.json copied next to it:

    python3 step1_measure_lut.py --mode client [--results_dir results] [--device cuda] [--server_lut FILE]

The model, input size, batch sizes, warm-up, repeats, time budget, seed, timing method and torch threads are the
ones the server LUT recorded, so both sides are measured alike (timing.measure.measure_side, the code the worker
runs in real mode).  Writes <results_dir>/lut_edge.json (copy it back to the server's results directory, then
`step1_measure_lut.py --mode merge` there).  `lut_key` and `side_payload` (the side-LUT layout) live here so the
device writes exactly what timing/lut.py reads.
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time

SCHEMA_VERSION = 1  # artifacts.SCHEMA_VERSION (artifacts.py imports config.py: not available on the device)
SERVER_LUT = 'lut_server.json'
EDGE_SIDE = 'edge'  # the side name of the edge device in the LUT files
EDGE_LUT = 'lut_edge.json'


class EdgeLutError(Exception):
    """A missing or unusable server LUT; the message names the file and the field."""


def lut_key(block, layout, batch):
    # type: (object, object, int) -> str
    """The one place a LUT key is formed: 'k{block}_g{layout}_b{batch}', or 'head_b{batch}' for block='head'."""
    if block == 'head':
        return 'head_b{}'.format(int(batch))
    return 'k{}_g{}_b{}'.format(int(block), int(layout), int(batch))


def side_payload(side, model, input_size, measured):
    # type: (str, dict, int, dict) -> dict
    """A side LUT from timing.measure.measure_side()'s result (all entries 'measured')."""
    from nets import plan_of
    entries = {}
    for e in measured['entries']:
        row = dict(e)
        row['source'] = 'measured'
        entries[lut_key(e['block'], e['layout'], e['batch'])] = row
    head = {}
    for h in measured['head']:
        row = dict(h)
        row['source'] = 'measured'
        head[lut_key('head', None, h['batch'])] = row
    plan = plan_of(model)
    out = {'side': side, 'model': model, 'input_size': int(input_size), 'num_blocks': len(plan),
           'batch_sizes': measured['settings']['batch_sizes'], 'source': 'measured', 'profile': None,
           'entries': entries, 'head': head, 'roofline': measured['roofline'],
           'metadata': measured['metadata'], 'settings': measured['settings']}
    if measured.get('fit') is not None:
        out['fit'] = measured['fit']
        # per batch, block k's extra cost when it runs in an edge part (blocks [0, lam)) rather than a server part
        out['edge_part_offset_ms'] = {b: list(info['edge_part_offset_ms']) for b, info in measured['fit'].items()
                                      if info.get('edge_part_offset_ms') is not None}
    return out


def _field(obj, path, where):
    cur = obj
    for name in path.split('.'):
        if not isinstance(cur, dict) or name not in cur:
            raise EdgeLutError('{}: missing field {!r} (is it the lut_server.json of step 1 --mode server?)'.format(
                where, path))
        cur = cur[name]
    return cur


def read_server_lut(path):
    # type: (str) -> dict
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise EdgeLutError('{}: cannot read the server LUT ({}); run `step1_measure_lut.py --mode server` on the '
                           'server and copy its {} here (or pass --server_lut)'.format(path, e, SERVER_LUT))
    if obj.get('kind') != 'lut_server' or obj.get('schema_version') != SCHEMA_VERSION:
        raise EdgeLutError('{}: field "kind"/"schema_version" is {!r}/{!r}, expected lut_server/{}'.format(
            path, obj.get('kind'), obj.get('schema_version'), SCHEMA_VERSION))
    return obj


def measure_edge(server_lut_path, device='cuda', threads=None, progress=True):
    # type: (str, str, object, bool) -> dict
    """The edge LUT artifact (a dict ready for JSON): this device measured with the server LUT's settings."""
    import torch

    from timing import measure as M
    server = read_server_lut(server_lut_path)
    w = str(server_lut_path)
    st = _field(server, 'settings', w)
    if threads is None:
        threads = int(_field(server, 'config.lut.threads', w))
    if device.startswith('cuda') and not torch.cuda.is_available():
        device = 'cpu'
    t0 = time.time()
    res = M.measure_side(_field(server, 'model', w), int(_field(st, 'input_size', w + ': settings')),
                         [int(b) for b in _field(st, 'batch_sizes', w + ': settings')], device,
                         int(_field(st, 'warmup', w + ': settings')), int(_field(st, 'repeats', w + ': settings')),
                         int(threads), float(_field(st, 'max_entry_s', w + ': settings')),
                         int(_field(st, 'seed', w + ': settings')), progress=progress,
                         timing=str(_field(st, 'timing', w + ': settings')))
    payload = side_payload(EDGE_SIDE, server['model'], int(st['input_size']), res)
    payload['settings']['measure_wall_s'] = time.time() - t0
    payload['settings']['server_lut'] = os.path.basename(w)
    obj = {'schema_version': SCHEMA_VERSION, 'kind': 'lut_' + EDGE_SIDE,
           'created_at': datetime.datetime.utcnow().replace(microsecond=0).isoformat() + '+00:00',
           'command': ' '.join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:]),
           'config': server.get('config', {})}
    obj.update(payload)
    return obj


def write_json(path, obj):
    # type: (str, dict) -> None
    """Atomic write (temp file + os.replace) with a plain open()'s mode (0666 minus the umask)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        os.makedirs(d)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=d)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write('\n')
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=('client',), default='client', help='only client here: the other modes run '
                   'on the server (default: client)')
    p.add_argument('--results_dir', default='results', help='where lut_server.json is read and {} written, '
                   'relative to the current directory (default: results)'.format(EDGE_LUT))
    p.add_argument('--server_lut', default=None, help='the server LUT whose model and settings to measure (default: '
                   '<results_dir>/{})'.format(SERVER_LUT))
    p.add_argument('--device', default='cuda', help='torch device: cuda | cpu; cuda falls back to cpu when '
                   'unavailable (default: cuda)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads, 0 = torch default (default: the '
                   'server LUT\'s lut.threads)')
    p.add_argument('--no_progress', action='store_true', help='no progress bar (default: a tqdm bar if installed)')
    args = p.parse_args(argv)
    server_lut = args.server_lut or os.path.join(args.results_dir, SERVER_LUT)
    out = os.path.join(args.results_dir, EDGE_LUT)
    try:
        obj = measure_edge(server_lut, args.device, args.threads, not args.no_progress)
    except EdgeLutError as e:
        print('error: {}'.format(e), file=sys.stderr)  # noqa: T201 - entry point
        return 2
    write_json(out, obj)
    meta = obj['metadata']
    print('edge LUT: {} entries + head, {} on {} ({}), python {}, torch {}, {:.1f} s -> {}; copy it to the '  # noqa: T201
          'server\'s '
          'results directory and run `step1_measure_lut.py --mode merge` there'.format(
              len(obj['entries']), obj['model']['name'], meta['device_name'], meta['device'], meta['python_version'],
              meta['torch_version'], obj['settings']['measure_wall_s'], out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
