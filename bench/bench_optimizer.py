"""Optimizer quality and speed: the relaxed LUT gradient descent against the exact optimum, per pipeline step.

Section `step2` (docs/design.md#step-2-solvers; pipeline/throughput.solve_step2, the code step 2 runs):
* LUT cases: RepVGG-A0, RepVGG-B3 and the plain MobileNetV2 and ResNet-50 (torchvision's, issue 18) at 224 px, 1000
  classes, batch 1, both sides MODELLED from device profiles
  (timing/lut.modelled_side: edge = jetson-tx2; 'server' = jetson-orin-nano as a stand-in, since timing/profiles.py
  has no server-GPU profile), under each link preset.  Per case: gap of the chosen configuration and of the
  gradient descent alone (before the local search) to the exact optimum, wall time of both solvers, and the
  throughput of the choice and of the baselines (edge only, server only, best plain split).
* Random instances: >= 50 seeded B3-size instances (pipeline/throughput.random_tables with B3's identity pattern):
  max / median gap, share within 1 %, median wall time.
Writes bench/results/optimizer_step2.json.

Section `step3` (docs/design.md#goal-solvers; optim/goal.py, the goal program step 3 solves every round): the relaxed
gradient descent (+ repair, local search, split polish; optim.goal.solve_gd with the config's optim.steps /
restarts) against the lexicographic HiGHS MILP (optim.goal.solve_milp, joint.milp_time_limit_s), both through
optim.goal.solve(..., 'both').  Gap = the GD choice's throughput level (period / scale + tie-breakers) over the
MILP's, in %, and the throughput lost (1 - GD fps / MILP fps); GD's accuracy deviation is compared separately.
* Random instances: >= 50 seeded B3-size goal programs (28 blocks) built with optim.goal.build_problem from
  pipeline/throughput.random_tables (B3's identity pattern), extended to the pruned layouts (a layout without the
  3x3 branch 0.1-0.4x, other pruned layouts 0.9-1.3x the block's best unpruned time on that side), random branch
  sensitivities (log-normal, the 3x3 ~ 5x the others), random FLOPs / bytes for the roofline term, random
  epsilon 0.2-3 points, no progressive-step limit.
* Real domains (--results_dir, default results/): the LUT of that run (link and batch of the config defaults,
  as step 3 uses them) with each domain's measured sensitivities from `joint_optimization/domain_<d>_rounds/`
  (reference.json: the initial ones; the last round_<r>.json: the corrected ones), at epsilon = joint.epsilon and
  at the largest epsilon of joint.epsilon_sweep.  Domains without round files are skipped (and say so).
Writes bench/results/optimizer_step3.json.

Adding a section: write `section_<name>(quick, seed, results_dir) -> (payload, headline, tables)` and add it to
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
Section = Callable[[bool, int, str], Tuple[Dict[str, Any], List[List[Any]], List[Dict[str, Any]]]]
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
    names = {'A0': 'RepVGG-A0', 'B3': 'RepVGG-B3', 'MobileNetV2': 'mobilenet_v2', 'ResNet-50': 'resnet50'}
    return {f'{a} (224 px)': ({'name': n, 'num_classes': 1000, 'width_multiplier': None, 'small_input': False}, 224)
            for a, n in names.items()}


def _run_case(t, valid, opt: OptimConfig, seed: int) -> Dict[str, Any]:
    from pipeline.throughput import solve_step2
    p = solve_step2(t, valid, opt, seed)
    b = p['baselines']
    return {'lam': p['lam'], 'exact_lam': p['exact']['lam'], 'gap_pct': p['gap_pct'],
            'gd_gap_pct': p['gradient_descent']['gap_pct'], 'relaxed_s': p['wall_s']['relaxed'],
            'exact_s': p['wall_s']['exact'], 'chosen_fps': p['predicted']['throughput_fps'],
            'exact_fps': p['exact']['throughput_fps'], 'edge_only_fps': b['edge_only']['throughput_fps'],
            'server_only_fps': b['server_only']['throughput_fps'],
            'best_plain_split_fps': b['best_plain_split']['throughput_fps'],
            'best_plain_split_lam': b['best_plain_split']['lam'], 'bottleneck': p['predicted']['bottleneck']}


def section_step2(quick: bool, seed: int, results_dir: str = '') -> Tuple[Dict[str, Any], List[List[Any]],
                                                                          List[Dict[str, Any]]]:
    from hyper_repvgg import block_plan
    from timing import lut as L
    from timing.profiles import get_profile
    from pipeline.throughput import random_tables, unpruned_valid
    opt = Config().optim if not quick else OptimConfig(steps=60, restarts=2)
    cases, rows = [], []
    for name, (model, size) in _lut_cases(quick).items():
        edge = L.modelled_side(get_profile('jetson-tx2'), model, size, [1], side='edge')
        server = L.modelled_side(get_profile('jetson-orin-nano'), model, size, [1], side='server')
        lut = L.merge(server, edge, L.LINK_PRESETS['wifi'], 'fp32')
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


# ----------------------------------------------------------------------------------------------------------
# Step 3: the goal program, GD vs MILP
# ----------------------------------------------------------------------------------------------------------

STEP3_COLUMNS = ['instances', 'blocks', 'max gap %', 'median gap %', 'within 1 %', 'max throughput lost %',
                 'GD accuracy level worse', 'same configuration', 'MILP not optimal', 'median GD s', 'max GD s',
                 'median MILP s', 'max MILP s']


def random_goal_problem(rng: np.random.Generator, has_identity: Sequence[bool], roofline_weight: float):
    """A seeded random step-3 goal program of len(has_identity) blocks (module docstring: how it is drawn)."""
    import dataclasses

    from hyper_repvgg import LAYOUTS
    from optim import goal
    from optim.exact import solve_exact
    from pipeline.throughput import random_tables
    n = len(has_identity)
    t, valid = random_tables(rng, n, has_identity)
    have = [('D', 'O', 'I') if h else ('D', 'O') for h in has_identity]
    fits = np.array([[lay.branches <= set(h) for lay in LAYOUTS] for h in have])
    no_d = np.array(['D' not in lay.branches for lay in LAYOUTS])[None, :] & fits & ~valid
    with_d = fits & ~valid & ~no_d
    sides = []
    for a in (t.edge_ms, t.server_ms):
        a = a.copy()
        best = np.nanmin(np.where(valid, a, np.nan), 1)[:, None]
        a[no_d] = (best * rng.uniform(0.1, 0.4, a.shape))[no_d]
        a[with_d] = (best * rng.uniform(0.9, 1.3, a.shape))[with_d]
        sides.append(a)
    t = dataclasses.replace(t, edge_ms=sides[0], server_ms=sides[1])
    sens = rng.lognormal(-2.5, 1.0, (n, 3))
    sens[:, 0] *= 5.0  # the 3x3 branch matters most
    shape = (n, len(LAYOUTS))
    stats = {'flops': rng.uniform(1e6, 1e8, shape), 'weight_bytes': rng.uniform(1e4, 1e6, shape),
             'act_bytes': rng.uniform(1e4, 1e6, shape), 'knee_edge': float(rng.uniform(5, 30)),
             'knee_server': float(rng.uniform(20, 100))}
    eps = float(rng.uniform(0.2, 3.0))
    scale = solve_exact(t, valid).stages['period_ms']
    return goal.build_problem(t, sens, have, stats, a_ref=90.0, epsilon=eps, period_scale_ms=scale,
                              roofline_weight=roofline_weight), eps


def _solve_pair(p, seed: int, gd_kwargs: Dict[str, Any], time_limit_s: float) -> Dict[str, Any]:
    """Both solvers on one goal program: statuses, gaps, configurations, wall times."""
    import torch

    from optim import goal
    threads = torch.get_num_threads()
    sol = goal.solve(p, 'both', torch.Generator().manual_seed(int(seed)), gd_kwargs, time_limit_s)
    torch.set_num_threads(threads)
    gd, mi, gap = sol['gd'], sol['milp'], sol['gap']
    return {'gd_status': gd.status, 'milp_status': mi.status, 'gap_pct': gap['objective_gap_pct'],
            'throughput_lost_pct': 100.0 * (1.0 - gap['throughput_ratio']),
            'xi_accuracy_diff_pct': gap['xi_accuracy_diff_pct'], 'same_configuration': gap['same_configuration'],
            'gd_s': gd.wall_s, 'milp_s': mi.wall_s, 'gd_lam': gd.lam, 'milp_lam': mi.lam,
            'gd_fps': gd.evaluation['throughput_fps'], 'milp_fps': mi.evaluation['throughput_fps'],
            'gd_pruned': gd.evaluation['branches_pruned'], 'milp_pruned': mi.evaluation['branches_pruned'],
            'num_blocks': p.num_blocks}


def _step3_summary(recs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    from optim.goal import TOL
    g = np.array([r['gap_pct'] for r in recs])
    return {'instances': len(recs), 'max_gap_pct': float(g.max()), 'median_gap_pct': float(np.median(g)),
            'share_within_1pct': float((g <= 1.0).mean()),
            'max_throughput_lost_pct': float(max(r['throughput_lost_pct'] for r in recs)),
            'gd_accuracy_worse': int(sum(r['xi_accuracy_diff_pct'] > TOL for r in recs)),
            'same_configuration': int(sum(r['same_configuration'] for r in recs)),
            'milp_not_optimal': int(sum(r['milp_status'] not in ('optimal', 'infeasible') for r in recs)),
            'median_gd_s': float(np.median([r['gd_s'] for r in recs])), 'max_gd_s': float(max(r['gd_s'] for r in recs)),
            'median_milp_s': float(np.median([r['milp_s'] for r in recs])),
            'max_milp_s': float(max(r['milp_s'] for r in recs))}


def _step3_row(what: str, blocks: Any, s: Dict[str, Any]) -> List[Any]:
    n = s['instances']
    return [f'{what}: {n}', blocks, s['max_gap_pct'], s['median_gap_pct'], f'{100 * s["share_within_1pct"]:.0f} %',
            s['max_throughput_lost_pct'], f'{s["gd_accuracy_worse"]} / {n}', f'{s["same_configuration"]} / {n}',
            f'{s["milp_not_optimal"]} / {n}', s['median_gd_s'], s['max_gd_s'], s['median_milp_s'], s['max_milp_s']]


def _sens(rows: Sequence[Sequence[Optional[float]]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)


def real_domain_problems(results_dir: Path, quick: bool) -> Tuple[List[Tuple[str, Any]], str]:
    """[(label, GoalProblem)] from a finished run's LUT and step-3 round files, and a note on what was used."""
    from artifacts import ArtifactError, load_artifact
    from optim import cost, goal
    from timing import lut as L
    from optim.exact import solve_exact
    cfg = Config()
    j = cfg.joint
    lut_file = results_dir / 'hardware_lut_complete.json'
    jd = results_dir / 'joint_optimization'
    if not lut_file.is_file() or not jd.is_dir():
        return [], f'not measured: {lut_file} or {jd} absent'
    lut = L.load_lut(lut_file)
    link = L.resolve_link(cfg.lut)
    t = L.cost_tables(lut, cfg.optim.batch_size, link, cfg.lut.feature_dtype)
    available = cost.measured_kept(t)
    scale = solve_exact(t, cost.valid_mask(available)).stages['period_ms']
    stats = L.block_stats(lut)
    dirs = sorted(jd.glob('domain_*_rounds'), key=lambda p: int(p.name.split('_')[1]))
    eps_list = [j.epsilon] if quick else sorted({j.epsilon, max(j.epsilon_sweep)})
    out, skipped = [], []
    for rd in dirs[:1] if quick else dirs:
        d = rd.name.split('_')[1]
        try:
            ref = load_artifact(rd / 'reference.json', 'joint_reference', {'a_ref_val_pct': float,
                                                                            'sensitivity_pct': list})
        except ArtifactError:
            skipped.append(d)
            continue
        sets = [('initial', _sens(ref['sensitivity_pct']))]
        rounds = sorted(rd.glob('round_*.json'))
        if rounds and not quick:
            last = load_artifact(rounds[-1], 'joint_round', {'sensitivity_after_pct': list})
            sets.append((f'corrected after {rounds[-1].stem}', _sens(last['sensitivity_after_pct'])))
        for what, sens in sets:
            for eps in eps_list:
                p = goal.build_problem(t, np.clip(sens, 0.0, None), available, stats, ref['a_ref_val_pct'], eps,
                                       scale, j.roofline_weight, j.throughput_target, j.edge_memory_budget_mb * 1e6)
                out.append((f'domain {d}, {what} sensitivities, epsilon {eps}', p))
    note = (f'{len(out)} goal programs from {lut_file} (link {link.name}, batch {cfg.optim.batch_size}) and the '
            f'sensitivities in {jd}') + (f'; domains without reference.json skipped: {", ".join(skipped)}'
                                         if skipped else '')
    return out, note


def section_step3(quick: bool, seed: int, results_dir: str = 'results') -> Tuple[Dict[str, Any], List[List[Any]],
                                                                                 List[Dict[str, Any]]]:
    from tqdm import tqdm

    from config import resolve_path
    from hyper_repvgg import block_plan
    cfg = Config()
    o, j = cfg.optim, cfg.joint
    steps, restarts = (60, 2) if quick else (o.steps, o.restarts)
    gd_kwargs = {'steps': steps, 'restarts': restarts, 'lr': o.lr, 'tau_start': o.tau_start, 'tau_end': o.tau_end}
    has_id = [s.has_identity for s in block_plan('B3')]
    count = 3 if quick else 50
    rand = []
    for i in tqdm(range(count), desc='step 3: random B3-size goal programs', file=sys.stderr):
        p, eps = random_goal_problem(np.random.default_rng(seed + i), has_id, j.roofline_weight)
        r = _solve_pair(p, seed + i, gd_kwargs, j.milp_time_limit_s)
        r.update(instance=i, epsilon=eps)
        rand.append(r)
        log.info('random %d: gap %.3g %%, GD %.2f s, MILP %.2f s (%s)', i, r['gap_pct'], r['gd_s'], r['milp_s'],
                 r['milp_status'])
    rs = _step3_summary(rand)
    rows = [_step3_row('random B3-size', len(has_id), rs)]
    problems, note = real_domain_problems(resolve_path(results_dir), quick)
    real = []
    for k, (label, p) in enumerate(tqdm(problems, desc='step 3: real-domain goal programs', file=sys.stderr)):
        r = _solve_pair(p, seed + 1000 + k, gd_kwargs, j.milp_time_limit_s)
        r['instance'] = label
        real.append(r)
        log.info('%s: gap %.3g %%, GD %.2f s, MILP %.2f s (%s)', label, r['gap_pct'], r['gd_s'], r['milp_s'],
                 r['milp_status'])
    re_ = _step3_summary(real) if real else None
    if re_:
        rows.append(_step3_row(f'real domains ({results_dir})', real[0]['num_blocks'], re_))
    detail = [[r['instance'], r['gap_pct'], r['throughput_lost_pct'], f'{r["gd_lam"]} / {r["milp_lam"]}',
               f'{r["gd_pruned"]} / {r["milp_pruned"]}', r['gd_fps'], r['milp_fps'], r['gd_s'], r['milp_s'],
               r['milp_status']] for r in real]
    headline = [[f'step 3: max GD-MILP gap, {count} random B3-size goal programs', rs['max_gap_pct'], '%'],
                ['step 3: median GD time, random B3-size', rs['median_gd_s'], 's'],
                ['step 3: median MILP time, random B3-size', rs['median_milp_s'], 's']]
    if re_:
        headline += [[f'step 3: max GD-MILP gap, {re_["instances"]} real-domain goal programs', re_['max_gap_pct'],
                      '%'],
                     ['step 3: median GD / MILP time, real domains',
                      f'{re_["median_gd_s"]:.3g} / {re_["median_milp_s"]:.3g}', 's']]
    else:
        headline.append([f'step 3: real-domain goal programs ({note})', 'not measured', ''])
    tables = [common.table(f'Step 3: goal program, gradient descent (+ repair, local search; {steps} steps x '
                           f'{restarts} restarts) vs the lexicographic MILP (HiGHS); gap of the throughput level',
                           STEP3_COLUMNS, rows)]
    if detail:
        tables.append(common.table(f'Step 3: real-domain goal programs ({note})',
                                   ['instance', 'gap %', 'throughput lost %', 'lambda GD / MILP',
                                    'pruned GD / MILP', 'GD fps', 'MILP fps', 'GD s', 'MILP s', 'MILP status'],
                                   detail))
    settings = dict(gd_kwargs, milp_time_limit_s=j.milp_time_limit_s, roofline_weight=j.roofline_weight, seed=seed,
                    results_dir=results_dir, real_note=note)
    return ({'settings': settings, 'random': {'summary': rs, 'instances': rand},
             'real': {'summary': re_, 'instances': real, 'note': note}}, headline, tables)


SECTIONS: Dict[str, Section] = {'step2': section_step2, 'step3': section_step3}


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_optimizer: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--sections', default=None, help=f'comma-separated subset of {",".join(SECTIONS)} (default: all)')
    p.add_argument('--seed', type=int, default=0, help='seed of the solvers and random instances (default: 0)')
    p.add_argument('--results_dir', default='results', help='step 3: a finished run whose LUT and joint_optimization/'
                   'domain_<d>_rounds sensitivities give the real-domain goal programs, relative to the repository '
                   'root; read only (default: results)')
    args = p.parse_args(argv)
    keys = list(SECTIONS) if not args.sections else [k.strip() for k in args.sections.split(',') if k.strip()]
    bad = [k for k in keys if k not in SECTIONS]
    if bad or not keys:
        raise ConfigError(f'--sections {args.sections!r}: valid choices are {", ".join(SECTIONS)}')
    for key in keys:
        machine = common.machine_info()
        t0 = time.perf_counter()
        payload, headline, tables = SECTIONS[key](args.quick, args.seed, args.results_dir)
        payload['wall_s'] = time.perf_counter() - t0
        path = common.write_result(args.out_dir, f'optimizer_{key}', payload, machine, args.quick, headline, tables,
                                   argv)
        common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
