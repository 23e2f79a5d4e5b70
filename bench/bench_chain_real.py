"""Real mode over a chain of three devices on loopback: measured throughput against the prediction.

Two client_worker.py processes and this server (comm.localdevice.LocalChain: hop 0 computes on the images, hop 1
listens for hop 0, relays to the server on its session), a link emulator on each data link (--rates_mbps, 2 ms one
way), a tiny HyperRepVGG (RepVGG-A0, width 0.25, 32 px, small input, 10 classes) split at --splits, run with
comm.session.run_chain in --passes passes.  Per pass: the steady-state throughput (after the first batch) measured,
and the predicted one from that pass's measured per-hop stage times and the link model: period = max(stage medians,
frame bytes / configured rate).  Everything (three processes, two emulators) shares this machine's cores: the
figures are this machine's under its load, which is recorded per pass.

Writes bench/results/chain_real.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from config import run_cli  # noqa: E402

log = logging.getLogger('bench_chain_real')
NAME = 'chain_real'
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
INPUT = 32


def spread(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {'median': float(np.median(v)), 'min': float(v.min()), 'max': float(v.max()),
            'p10': float(np.percentile(v, 10)), 'p90': float(np.percentile(v, 90))}


def bench_chain(splits: Sequence[int], rates: Sequence[float], batch: int, samples: int,
                passes: int) -> Dict[str, Any]:
    import hyper_repvgg as H
    from comm import parts
    from comm.localdevice import LocalChain
    from comm.session import run_chain
    torch.manual_seed(0)
    model = H.build_hyper_repvgg('A0', num_classes=10, width_multiplier=(0.25,) * 4, small_input=True).eval()
    files = parts.chain_bytes(model, splits, INPUT, MEAN, STD)
    images = torch.randint(0, 256, (samples, 3, INPUT, INPUT), dtype=torch.uint8)
    labels = torch.zeros(samples, dtype=torch.long)
    with torch.no_grad():
        ref = model((images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix='bench-chain-') as tmp, \
            LocalChain(2, list(rates), 2.0, 'bench-chain', log_dir=Path(tmp), io_timeout_s=120) as chain:
        for p in range(passes):
            load = common.load_average()
            res = run_chain(files, chain.hops, images, labels, batch, links=[{'bandwidth_mbps': r} for r in rates])
            pred = res['predicted']
            rows.append({'pass': p, 'load_average_1m': load[0] if load else None,
                         'measured_steady_fps': res['steady_throughput_fps'], 'measured_wall_fps': res['throughput_fps'],
                         'predicted_fps': pred['throughput_fps'], 'predicted_bottleneck': pred['bottleneck'],
                         'measured_period_ms': res['measured_period_ms'], 'predicted_period_ms': pred['period_ms'],
                         'stage_ms': [s['compute_ms'] for s in res['stages']],
                         'link_ms': [li['link_ms'] for li in res['links']],
                         'link_occupancy_ms': pred['link_occupancy_ms'],
                         'frame_bytes': [li['frame_bytes'] for li in res['links']],
                         'latency_ms': res['latency_ms'],
                         'max_abs_output_diff': float((res['outputs'] - ref).abs().max())})
            log.info('pass %d: %.1f samples/s measured, %.1f predicted (%s), load %s', p,
                     rows[-1]['measured_steady_fps'], rows[-1]['predicted_fps'], pred['bottleneck'], load)
    ratio = [r['measured_steady_fps'] / r['predicted_fps'] for r in rows]
    return {'splits': list(splits), 'rates_mbps': list(rates), 'delay_ms': 2.0, 'batch': batch, 'samples': samples,
            'cores': sorted(os.sched_getaffinity(0)),  # every process of the chain shares these (taskset)
            'passes': rows, 'measured_steady_fps': spread([r['measured_steady_fps'] for r in rows]),
            'predicted_fps': spread([r['predicted_fps'] for r in rows]), 'measured_over_predicted': spread(ratio)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_chain_real: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--splits', default='3,10', help='lambda_1,lambda_2: hop 0 runs blocks 0..l1-1, hop 1 l1..l2-1, '
                   'the server the rest (default: 3,10)')
    p.add_argument('--rates_mbps', default='20,10', help='emulated rate of link 0 (hop 0 -> hop 1) and link 1 (hop 1 '
                   '-> server) in Mbit/s (default: 20,10)')
    p.add_argument('--batch', type=int, default=4, help='batch size, samples (default: 4)')
    p.add_argument('--samples', type=int, default=160, help='images per pass (default: 160)')
    p.add_argument('--passes', type=int, default=5, help='passes (default: 5)')
    args = p.parse_args(argv)
    splits = [int(v) for v in args.splits.split(',')]
    rates = [float(v) for v in args.rates_mbps.split(',')]
    if len(splits) != 2 or len(rates) != 2:
        p.error('--splits and --rates_mbps take two values each (three hops, two links)')
    machine = common.machine_info()
    torch.set_num_threads(1)
    q = args.quick
    res = bench_chain(splits, rates, args.batch, 16 if q else args.samples, 1 if q else args.passes)
    cols = ['pass', 'load 1m', 'measured fps (steady)', 'predicted fps', 'predicted bottleneck',
            'stage ms measured (hop0/hop1/server)', 'link ms measured', 'link ms predicted (occupancy)']
    rows = [[r['pass'], r['load_average_1m'], r['measured_steady_fps'], r['predicted_fps'], r['predicted_bottleneck'],
             '/'.join(common.fmt(v) for v in r['stage_ms']), '/'.join(common.fmt(v) for v in r['link_ms']),
             '/'.join(common.fmt(v) for v in r['link_occupancy_ms'])] for r in res['passes']]
    m, pr, ratio = res['measured_steady_fps'], res['predicted_fps'], res['measured_over_predicted']
    loads = [r['load_average_1m'] for r in res['passes'] if r['load_average_1m'] is not None]
    load = f'load 1m {common.fmt(min(loads))}..{common.fmt(max(loads))}' if loads else 'load not available'
    n = len(res['passes'])

    def span(s: Dict[str, float]) -> str:
        return f'median of {n} passes, min..max {common.fmt(s["min"])}..{common.fmt(s["max"])}; {load}'
    headline = [[f'three hops: MEASURED steady throughput ({span(m)})', m['median'], 'samples/s'],
                [f'three hops: PREDICTED throughput from the measured stage times and the emulated rates '
                 f'({span(pr)})', pr['median'], 'samples/s'],
                [f'three hops: measured / predicted ({span(ratio)})', ratio['median'], 'x']]
    tables = [common.table(f'Three hops over emulated links {res["rates_mbps"]} Mbit/s, splits {res["splits"]}, '
                           f'batch {res["batch"]}, {res["samples"]} samples per pass; the three processes and two '
                           f'emulators all on cores {res["cores"]}', cols, rows)]
    path = common.write_result(args.out_dir, NAME, res, machine, q, headline, tables, argv)
    common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
