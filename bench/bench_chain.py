"""Chains of K devices (docs/design.md#device-chains): the exact chain solver against brute force, the relaxed
solver's gap, solver times for RepVGG-B3 with K = 3 and K = 4, and a MODELLED scenario where a 3-device chain
beats every 2-device split.  Writes bench/results/chain.json.

* exact vs brute force: seeded random K = 3 chains of 5 blocks (pipeline/throughput.random_chain), every objective
  in turn; optim.exact.solve_chain_exact (the split-vector scan) against optim.exact.brute_force_chain (every layout
  combination x every split vector); gap = (scan - brute force) / brute force.
* relaxed gap: seeded random B3-size chains (28 blocks, B3's identity pattern) with K = 3 and K = 4;
  optim.relax.solve_chain_relaxed with the config's optim.steps / restarts / step2_tau_end (step 2's settings), gap
  to the exact optimum after the local search and of the gradient descent alone.
* solver time: RepVGG-B3 at 224 px, batch 1, every device MODELLED from a profile (timing/lut.modelled_side), the
  chains rpi4:ethernet,jetson-tx2:ethernet,jetson-orin-nano (K = 3) and
  rpi4:ethernet,jetson-nano:ethernet,jetson-tx2:ethernet,jetson-orin-nano (K = 4): wall time of the exact scan and
  of the relaxed solver, median and p10-p90 over repeats, with the load average.
* scenario (MODELLED, predicted by the cost model from device profiles): camera rpi4 -ethernet-> edge box
  jetson-tx2 -ethernet-> edge server jetson-orin-nano for A0 and B3: the exact chain optimum against the best split
  that computes on at most two of the devices (the others only forward); then every ordered choice of 3 of the 4
  profiles x every pair of link presets: how often the chain wins, and by how much at most.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import common  # noqa: E402
from config import Config, OptimConfig, run_cli  # noqa: E402

log = logging.getLogger('bench_chain')
SCENARIO = 'rpi4:ethernet,jetson-tx2:ethernet,jetson-orin-nano'
TIMING_CHAINS = {3: SCENARIO, 4: 'rpi4:ethernet,jetson-nano:ethernet,jetson-tx2:ethernet,jetson-orin-nano'}
PROFILE_NAMES = ('rpi4', 'jetson-nano', 'jetson-tx2', 'jetson-orin-nano')


def _lut(arch: str, quick: bool) -> Dict[str, Any]:
    """A LUT skeleton (blocks, activation bytes) of RepVGG-<arch>; its edge / server sides are not used by the
    chains here, whose devices are all profiles."""
    from timing import lut as L
    from timing.profiles import get_profile
    model = {'name': f'RepVGG-{arch}', 'num_classes': 10 if quick else 1000,
             'width_multiplier': [0.25] * 4 if quick else None, 'small_input': False}
    size = 32 if quick else 224
    edge = L.modelled_side(get_profile('jetson-tx2'), model, size, [1], side='edge')
    server = L.modelled_side(get_profile('jetson-orin-nano'), model, size, [1], side='server')
    return L.merge(server, edge, L.LINK_PRESETS['ethernet'], 'fp32')


def _pct(a: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(a, dtype=np.float64), q))


def section_brute(count: int, seed: int) -> Tuple[Dict[str, Any], List[Any]]:
    from optim import cost as C
    from optim.exact import brute_force_chain, solve_chain_exact
    from pipeline.throughput import random_chain
    gaps, same, t_ex, t_bf = [], 0, [], []
    for i in tqdm(range(count), desc='exact vs brute force (K = 3)', file=sys.stderr):
        rng = np.random.default_rng(seed + i)
        c, valid = random_chain(rng, 5, 3)
        objective = C.OBJECTIVES[i % len(C.OBJECTIVES)]
        ex, bf = solve_chain_exact(c, valid, objective, 0.5), brute_force_chain(c, valid, objective, 0.5)
        gaps.append(C.gap_pct(ex.objective_ms, bf.objective_ms))
        same += ex.lams == bf.lams and ex.gammas == bf.gammas
        t_ex.append(ex.wall_s)
        t_bf.append(bf.wall_s)
    out = {'instances': count, 'num_blocks': 5, 'num_devices': 3, 'max_gap_pct': float(max(gaps)),
           'min_gap_pct': float(min(gaps)), 'same_configuration': int(same),
           'median_exact_s': float(np.median(t_ex)), 'median_brute_force_s': float(np.median(t_bf))}
    row = [count, 5, 3, out['max_gap_pct'], f'{same} / {count}', 1e3 * out['median_exact_s'],
           1e3 * out['median_brute_force_s']]
    return out, row


def section_gap(k: int, count: int, opt: OptimConfig, seed: int) -> Tuple[Dict[str, Any], List[Any]]:
    from hyper_repvgg import block_plan
    from optim import cost as C
    from optim.exact import solve_chain_exact
    from optim.relax import solve_chain_relaxed
    from pipeline.throughput import random_chain
    has_id = [s.has_identity for s in block_plan('B3')]
    rows = []
    for i in tqdm(range(count), desc=f'relaxed gap (K = {k})', file=sys.stderr):
        c, valid = random_chain(np.random.default_rng(seed + 1000 * k + i), len(has_id), k, has_id)
        r = solve_chain_relaxed(c, valid, opt.objective, opt.omega, steps=opt.steps, restarts=opt.restarts,
                                lr=opt.lr, tau_start=opt.tau_start, tau_end=opt.step2_tau_end,
                                rng=np.random.default_rng(seed + i))
        ex = solve_chain_exact(c, valid, opt.objective, opt.omega)
        rows.append({'gap_pct': C.gap_pct(r.objective_ms, ex.objective_ms),
                     'gd_gap_pct': C.gap_pct(r.gd_objective_ms, ex.objective_ms), 'relaxed_s': r.wall_s,
                     'exact_s': ex.wall_s, 'lams': r.lams, 'exact_lams': ex.lams})
    g = [r['gap_pct'] for r in rows]
    gd = [r['gd_gap_pct'] for r in rows]
    out = {'num_devices': k, 'instances': count, 'num_blocks': len(has_id), 'max_gap_pct': float(max(g)),
           'median_gap_pct': float(np.median(g)), 'share_within_1pct': float(np.mean(np.array(g) <= 1.0)),
           'gd_max_gap_pct': float(max(gd)), 'gd_median_gap_pct': float(np.median(gd)),
           'median_relaxed_s': float(np.median([r['relaxed_s'] for r in rows])), 'records': rows}
    row = [k, count, len(has_id), out['max_gap_pct'], out['median_gap_pct'],
           f'{100 * out["share_within_1pct"]:.0f} %', out['gd_max_gap_pct'], out['gd_median_gap_pct'],
           out['median_relaxed_s']]
    return out, row


def section_timing(lut: Dict[str, Any], opt: OptimConfig, seed: int, repeats: int) -> Tuple[List[Dict[str, Any]],
                                                                                                List[List[Any]]]:
    from optim.exact import solve_chain_exact
    from optim.relax import solve_chain_relaxed
    from pipeline import chain as CH
    from pipeline.throughput import unpruned_valid
    valid = unpruned_valid(lut)
    out, rows = [], []
    for k, spec in TIMING_CHAINS.items():
        c, _ = CH.chain_tables(lut, CH.parse_chain(spec), 1)
        load = common.load_average()
        t_ex, t_gd = [], []
        for i in tqdm(range(repeats), desc=f'solver time (K = {k})', file=sys.stderr):
            t_ex.append(solve_chain_exact(c, valid, opt.objective, opt.omega).wall_s)
            t_gd.append(solve_chain_relaxed(c, valid, opt.objective, opt.omega, steps=opt.steps,
                                            restarts=opt.restarts, lr=opt.lr, tau_start=opt.tau_start,
                                            tau_end=opt.step2_tau_end, rng=np.random.default_rng(seed + i)).wall_s)
        rec = {'num_devices': k, 'chain': spec, 'num_blocks': c.num_blocks, 'repeats': repeats,
               'exact_s': t_ex, 'relaxed_s': t_gd, 'load_average_start': load}
        out.append(rec)
        rows.append([k, spec, c.num_blocks, len(CH.C.split_vectors(c.num_blocks, k)), 1e3 * float(np.median(t_ex)),
                     f'{1e3 * _pct(t_ex, 10):.3g}-{1e3 * _pct(t_ex, 90):.3g}', float(np.median(t_gd)),
                     f'{_pct(t_gd, 10):.3g}-{_pct(t_gd, 90):.3g}', load[0] if load else None])
    return out, rows


def _chain_vs_two(lut: Dict[str, Any], spec: str, opt: OptimConfig) -> Dict[str, Any]:
    from optim.exact import solve_chain_exact
    from pipeline import chain as CH
    from pipeline.throughput import unpruned_valid
    c, _ = CH.chain_tables(lut, CH.parse_chain(spec), 1)
    valid = unpruned_valid(lut)
    ex = solve_chain_exact(c, valid, opt.objective, opt.omega)
    two = solve_chain_exact(c, valid, opt.objective, opt.omega, max_active=2)
    return {'chain': spec, 'chain_fps': ex.stages['throughput_fps'], 'chain_lams': ex.lams,
            'chain_bottleneck': ex.stages['bottleneck'], 'two_device_fps': two.stages['throughput_fps'],
            'two_device_lams': two.lams, 'two_device_bottleneck': two.stages['bottleneck'],
            'gain_pct': 100.0 * (ex.stages['throughput_fps'] / two.stages['throughput_fps'] - 1.0),
            'chain_stages_ms': ex.stages['stages_ms'], 'two_device_stages_ms': two.stages['stages_ms']}


def section_scenario(luts: Dict[str, Dict[str, Any]], opt: OptimConfig, quick: bool
                     ) -> Tuple[Dict[str, Any], List[List[Any]], List[List[Any]]]:
    from timing import lut as L
    named, sweep = [], []
    for arch, lut in luts.items():
        named.append(dict(_chain_vs_two(lut, SCENARIO, opt), model=arch))
        links = ('ethernet', 'wifi') if quick else tuple(L.LINK_PRESETS)
        specs = [f'{a}:{la},{b}:{lb},{c}' for a, b, c in itertools.permutations(PROFILE_NAMES, 3)
                 for la, lb in itertools.product(links, repeat=2)]
        for spec in tqdm(specs, desc=f'scenario sweep ({arch})', file=sys.stderr):
            sweep.append(dict(_chain_vs_two(lut, spec, opt), model=arch))
    rows = [[r['model'], r['chain'], r['chain_lams'], r['chain_fps'], r['two_device_lams'], r['two_device_fps'],
             r['gain_pct'], r['chain_bottleneck']] for r in named]
    best = max(sweep, key=lambda r: r['gain_pct'])
    wins = sum(r['gain_pct'] > 1e-9 for r in sweep)
    summary = {'scenarios': len(sweep), 'chain_wins': int(wins), 'max_gain_pct': best['gain_pct'],
               'max_gain_chain': best['chain'], 'max_gain_model': best['model'],
               'median_gain_pct_when_winning': float(np.median([r['gain_pct'] for r in sweep if r['gain_pct'] > 1e-9]))
               if wins else 0.0}
    top = sorted(sweep, key=lambda r: -r['gain_pct'])[:5]
    top_rows = [[r['model'], r['chain'], r['chain_lams'], r['chain_fps'], r['two_device_lams'], r['two_device_fps'],
                 r['gain_pct'], r['chain_bottleneck']] for r in top]
    return {'named': named, 'sweep_summary': summary, 'sweep': sweep}, rows, top_rows


SCENARIO_COLUMNS = ['model', 'chain', 'lambda (3 devices)', 'fps (3 devices)', 'lambda (best 2 computing)',
                    'fps (2 devices)', 'gain %', 'bottleneck (3 devices)']


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_chain: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--seed', type=int, default=0, help='seed of the random instances and solvers (default: 0)')
    p.add_argument('--instances', type=int, default=200, help='random K = 3 chains for exact vs brute force '
                   '(default: 200; --quick: 10)')
    p.add_argument('--gap_instances', type=int, default=20, help='random B3-size chains per K for the relaxed gap '
                   '(default: 20; --quick: 2)')
    p.add_argument('--repeats', type=int, default=5, help='solver-time repeats per chain (default: 5; --quick: 1)')
    args = p.parse_args(argv)
    machine = common.machine_info()
    t0 = time.perf_counter()
    quick = args.quick
    opt = OptimConfig(steps=40, restarts=2) if quick else Config().optim
    n_bf = 10 if quick else args.instances
    n_gap = 2 if quick else args.gap_instances
    repeats = 1 if quick else args.repeats
    brute, brute_row = section_brute(n_bf, args.seed)
    gaps = [section_gap(k, n_gap, opt, args.seed) for k in (3, 4)]
    luts = {'A0': _lut('A0', quick)} if quick else {'A0': _lut('A0', False), 'B3': _lut('B3', False)}
    timing, timing_rows = section_timing(luts['A0' if quick else 'B3'], opt, args.seed, repeats)
    scenario, sc_rows, top_rows = section_scenario(luts, opt, quick)
    model = 'A0 tiny (32 px)' if quick else 'B3 (224 px)'
    named_b3 = scenario['named'][-1]
    s = scenario['sweep_summary']
    headline = [
        [f'exact chain solver vs brute force, {n_bf} random K = 3 instances: max gap', brute['max_gap_pct'], '%'],
        [f'relaxed chain solver: max gap, {n_gap} random B3-size K = 3 / K = 4 instances',
         f'{gaps[0][0]["max_gap_pct"]:.3g} / {gaps[1][0]["max_gap_pct"]:.3g}', '%'],
        [f'exact chain solver time, {model}, K = 3 / K = 4 (median)',
         f'{1e3 * np.median(timing[0]["exact_s"]):.3g} / {1e3 * np.median(timing[1]["exact_s"]):.3g}', 'ms'],
        [f'relaxed chain solver time, {model}, K = 3 / K = 4 (median)',
         f'{np.median(timing[0]["relaxed_s"]):.3g} / {np.median(timing[1]["relaxed_s"]):.3g}', 's'],
        [f'MODELLED: {named_b3["model"]} on {SCENARIO}, 3-device chain over the best 2-device split',
         named_b3['gain_pct'], '% fps'],
        [f'MODELLED: scenario sweep, chain beats the best 2-device split in {s["chain_wins"]} of {s["scenarios"]}; '
         f'max ({s["max_gain_model"]}, {s["max_gain_chain"]})', s['max_gain_pct'], '% fps']]
    tables = [
        common.table('Chains: exact split-vector scan vs brute force (every layout x every split vector), random '
                     'K = 3 chains, the three objectives in turn',
                     ['instances', 'blocks', 'devices', 'max gap %', 'same configuration', 'median exact ms',
                      'median brute force ms'], [brute_row]),
        common.table(f'Chains: relaxed gradient descent (+ local search; {opt.steps} steps x {opt.restarts} restarts) '
                     'vs the exact optimum, random B3-size chains',
                     ['devices', 'instances', 'blocks', 'max gap %', 'median gap %', 'within 1 %',
                      'GD-only max gap %', 'GD-only median gap %', 'median GD s'], [g[1] for g in gaps]),
        common.table(f'Chains: solver time, {model}, batch 1, devices modelled from profiles',
                     ['devices', 'chain', 'blocks', 'split vectors', 'exact ms (median)', 'exact ms p10-p90',
                      'GD s (median)', 'GD s p10-p90', 'load (1 min)'], timing_rows),
        common.table('Chains, MODELLED (cost model on profile-modelled LUTs, predicted throughput): 3-device chain '
                     'vs the best split computing on at most 2 of its devices', SCENARIO_COLUMNS, sc_rows),
        common.table(f'Chains, MODELLED: the 5 largest gains of the scenario sweep ({s["scenarios"]} chains: 3 of '
                     f'{", ".join(PROFILE_NAMES)} in every order x link presets, per model)', SCENARIO_COLUMNS,
                     top_rows)]
    payload = {'settings': {'seed': args.seed, 'steps': opt.steps, 'restarts': opt.restarts,
                            'tau_end': opt.step2_tau_end, 'objective': opt.objective},
               'brute_force': brute, 'relaxed': [g[0] for g in gaps], 'timing': timing, 'scenario': scenario,
               'wall_s': time.perf_counter() - t0}
    path = common.write_result(args.out_dir, 'chain', payload, machine, quick, headline, tables, argv)
    common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
