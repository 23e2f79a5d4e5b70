"""Optimizer quality and speed: the relaxed LUT gradient descent against the exact optimum, per pipeline step.

Section `step2` (DESIGN.md section 6; optim/throughput.solve_step2, the code step 2 runs):
* LUT cases: RepVGG-A0 and RepVGG-B3 at 224 px, 1000 classes, batch 1, both sides MODELLED from device profiles
  (optim/lut.modelled_side: edge = jetson-tx2; 'server' = jetson-orin-nano as a stand-in, since optim/profiles.py
  has no server-GPU profile), under each link preset.  Per case: gap of the chosen configuration and of the
  gradient descent alone (before the local search) to the exact optimum, wall time of both solvers, and the
  throughput of the choice and of the baselines (edge only, server only, best plain split).
* Random instances: >= 50 seeded B3-size instances (optim/throughput.random_tables with B3's identity pattern):
  max / median gap, share within 1 %, median wall time.
Writes bench/results/optimizer_step2.json.

Adding a section (e.g. step 3): write `section_step3(quick, seed) -> (payload, headline, tables)` and add it to
SECTIONS; each section writes its own bench/results/optimizer_<section>.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from config import Config, ConfigError, OptimConfig, run_cli  # noqa: E402

log = logging.getLogger('bench_optimizer')
Section = Callable[[bool, int], Tuple[Dict[str, Any], List[List[Any]], List[Dict[str, Any]]]]
LINKS = ('3g', '4g', 'wifi', 'ethernet')
CASE_COLUMNS = ['model', 'link', 'lambda (chosen / exact)', 'gap %', 'GD-only gap %', 'GD s', 'exact ms',
                'chosen fps', 'edge-only fps', 'server-only fps', 'best plain split fps']
RANDOM_COLUMNS = ['instances', 'blocks', 'max gap %', 'median gap %', 'within 1 %', 'GD-only max gap %',
                  'GD-only within 1 %', 'median GD s', 'median exact ms']


def _lut_cases(quick: bool) -> Dict[str, Tuple[Dict[str, Any], int]]:
    """name -> (model spec, input size)."""
    if quick:
        return {'A0 tiny (32 px)': ({'name': 'RepVGG-A0', 'num_classes': 10, 'width_multiplier': [0.25] * 4,
                                     'small_input': False}, 32)}
    return {f'{a} (224 px)': ({'name': f'RepVGG-{a}', 'num_classes': 1000, 'width_multiplier': None,
                               'small_input': False}, 224) for a in ('A0', 'B3')}


def _run_case(t, valid, opt: OptimConfig, seed: int) -> Dict[str, Any]:
    from optim.throughput import solve_step2
    p = solve_step2(t, valid, opt, seed)
    b = p['baselines']
    return {'lam': p['lam'], 'exact_lam': p['exact']['lam'], 'gap_pct': p['gap_pct'],
            'gd_gap_pct': p['gradient_descent']['gap_pct'], 'relaxed_s': p['wall_s']['relaxed'],
            'exact_s': p['wall_s']['exact'], 'chosen_fps': p['predicted']['throughput_fps'],
            'exact_fps': p['exact']['throughput_fps'], 'edge_only_fps': b['edge_only']['throughput_fps'],
            'server_only_fps': b['server_only']['throughput_fps'],
            'best_plain_split_fps': b['best_plain_split']['throughput_fps'],
            'best_plain_split_lam': b['best_plain_split']['lam'], 'bottleneck': p['predicted']['bottleneck']}


def section_step2(quick: bool, seed: int) -> Tuple[Dict[str, Any], List[List[Any]], List[Dict[str, Any]]]:
    from hyper_repvgg import block_plan
    from optim import lut as L
    from optim.profiles import get_profile
    from optim.throughput import random_tables, unpruned_valid
    opt = Config().optim if not quick else OptimConfig(steps=60, restarts=2)
    cases, rows = [], []
    for name, (model, size) in _lut_cases(quick).items():
        client = L.modelled_side(get_profile('jetson-tx2'), model, size, [1], side='client')
        server = L.modelled_side(get_profile('jetson-orin-nano'), model, size, [1], side='server')
        lut = L.merge(server, client, L.LINK_PRESETS['wifi'], 'fp32')
        valid = unpruned_valid(lut)
        for link in LINKS:
            r = _run_case(L.cost_tables(lut, 1, L.LINK_PRESETS[link]), valid, opt, seed)
            r.update(model=name, link=link, num_blocks=lut['num_blocks'])
            cases.append(r)
            rows.append([name, link, f'{r["lam"]} / {r["exact_lam"]}', r['gap_pct'], r['gd_gap_pct'],
                         r['relaxed_s'], 1e3 * r['exact_s'], r['chosen_fps'], r['edge_only_fps'],
                         r['server_only_fps'], r['best_plain_split_fps']])
            log.info('%s %s: gap %.3g %%, GD %.2f s', name, link, r['gap_pct'], r['relaxed_s'])
    count = 5 if quick else 60
    has_id = [s.has_identity for s in block_plan('B3')]
    rand = []
    for i in range(count):
        t, valid = random_tables(np.random.default_rng(seed + i), len(has_id), has_id)
        rand.append(_run_case(t, valid, opt, seed + i))
    g = np.array([r['gap_pct'] for r in rand])
    gd = np.array([r['gd_gap_pct'] for r in rand])
    summary = {'instances': count, 'num_blocks': len(has_id), 'max_gap_pct': float(g.max()),
               'median_gap_pct': float(np.median(g)), 'share_within_1pct': float((g <= 1.0).mean()),
               'gd_max_gap_pct': float(gd.max()), 'gd_share_within_1pct': float((gd <= 1.0).mean()),
               'median_relaxed_s': float(np.median([r['relaxed_s'] for r in rand])),
               'median_exact_s': float(np.median([r['exact_s'] for r in rand]))}
    random_row = [count, len(has_id), summary['max_gap_pct'], summary['median_gap_pct'],
                  f'{100 * summary["share_within_1pct"]:.0f} %', summary['gd_max_gap_pct'],
                  f'{100 * summary["gd_share_within_1pct"]:.0f} %', summary['median_relaxed_s'],
                  1e3 * summary['median_exact_s']]
    headline = [['step 2: max gap to the exact optimum, LUT cases', max(c['gap_pct'] for c in cases), '%'],
                [f'step 2: max gap, {count} random B3-size instances', summary['max_gap_pct'], '%'],
                ['step 2: max gradient-descent time, LUT cases', max(c['relaxed_s'] for c in cases), 's'],
                ['step 2: max exact-solver time, LUT cases', 1e3 * max(c['exact_s'] for c in cases), 'ms']]
    tables = [common.table('Step 2: gradient descent (+ local search) vs the exact optimum; modelled LUTs (edge '
                           'jetson-tx2, server jetson-orin-nano profile), batch 1', CASE_COLUMNS, rows),
              common.table(f'Step 2: {count} seeded random B3-size instances', RANDOM_COLUMNS, [random_row])]
    settings = {'steps': opt.steps, 'restarts': opt.restarts, 'lr': opt.lr, 'tau_start': opt.tau_start,
                'tau_end': opt.step2_tau_end, 'seed': seed}
    return {'settings': settings, 'cases': cases, 'random': {'summary': summary, 'instances': rand}}, headline, tables


SECTIONS: Dict[str, Section] = {'step2': section_step2}


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_optimizer: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--sections', default=None, help=f'comma-separated subset of {",".join(SECTIONS)} (default: all)')
    p.add_argument('--seed', type=int, default=0, help='seed of the solvers and random instances (default: 0)')
    args = p.parse_args(argv)
    keys = list(SECTIONS) if not args.sections else [k.strip() for k in args.sections.split(',') if k.strip()]
    bad = [k for k in keys if k not in SECTIONS]
    if bad or not keys:
        raise ConfigError(f'--sections {args.sections!r}: valid choices are {", ".join(SECTIONS)}')
    for key in keys:
        machine = common.machine_info()
        t0 = time.perf_counter()
        payload, headline, tables = SECTIONS[key](args.quick, args.seed)
        payload['wall_s'] = time.perf_counter() - t0
        path = common.write_result(args.out_dir, f'optimizer_{key}', payload, machine, args.quick, headline, tables,
                                   argv)
        for t in tables:
            print(t['title'])
            print(common.render(t['columns'], t['rows'], markdown=False))
            print()
        print(f'-> {path}')
    return 0


if __name__ == '__main__':
    run_cli(main)
