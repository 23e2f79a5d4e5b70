"""Accuracy that holds on unseen data: step 3's test drop against epsilon over domains x seeds, the surrogate's
error on configurations it was not fitted to, and the throughput gain the confidence-bounded acceptance keeps.

For each seed (default 0, 1, 2) a work directory gets the LUT and step 2's configuration of a finished default run
(--results_dir, default results/; only read) and its base model as `model.checkpoint` (one base model for every
seed: the base-training subset is seeded by train.base_split_seed, not by --seed, so no domain holds an image the
base model trained on); step 0 then cuts that seed's domains and trains their alpha, and step 3 runs on every
domain at --epsilon (default 1).  Per domain-seed case: the test drop (A_ref - final, points) with its 95 %
paired interval, whether it is <= epsilon, the LUT-predicted throughput gain over the best plain split of the goal
program's pick and, where the closed loop's race adopted a measured-faster layout / split of the same pruning
(`optimizer_choice` in the domain's artifact), of the adopted one (predicted too, so load-dependent only through
the race's adoption); pooled over
the cases: the surrogate's |predicted - measured val drop| on held-out configurations (each round's, predicted
before it was measured, and each newly deployed Pareto point).  Today's method is the step-3 result already in
--results_dir (its method, whatever it was, on seed 0), read for its gains and test drops.

Results are written after every seed (`complete` false until the last), so an interrupted run leaves its
finished cases; a rerun with the same --work_dir resumes finished domains, and --collect_only reports the domains
finished so far without running anything.  Each seed is one task of pipeline/executor.py: one after another here
(--executor local), or on a Ray cluster (--executor ray: a local one of --workers CPUs, or --ray_address), where a
task runs its seed's steps 0 and 3 with one torch thread per CPU it holds; the cases are those of the local
executor.  --quick: the tiny synthetic setting of bench_quality.py (2 domains, 2 seeds; numbers not meant for
reading).  Writes bench/results/accuracy.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_quality import QUICK_CONFIG, QUICK_STEP3, BenchQualityError, _run, build_quick  # noqa: E402
from config import REPO_ROOT, ClusterConfig, Config, ConfigError, resolve_path, run_cli  # noqa: E402
from pipeline.executor import EXECUTORS  # noqa: E402

log = logging.getLogger('bench_accuracy')
NAME = 'accuracy'
COPIED = ('hardware_lut_complete.json', 'initial_throughput_config.json')
CASE_COLUMNS = ['seed', 'domain', 'A_ref test (%)', 'final test (%)', 'test drop (points)', 'drop 95 % interval',
                'drop <= eps', 'branches pruned', 'gain over best plain, goal program\'s pick (x, LUT-predicted)',
                'after the closed loop\'s race (x, LUT-predicted; blank: it kept the pick)', 'chosen round',
                'held-out surrogate points', 'median |surrogate error| (points)']


def base_checkpoint(src: Path) -> Path:
    """The one trained base model of a finished run (base_model/*.pt)."""
    found = sorted((src / 'base_model').glob('*.pt'))
    if len(found) != 1:
        raise BenchQualityError(f'--results_dir {src}: expected one base model in base_model/, found '
                                f'{[p.name for p in found]}; run the default pipeline there first')
    return found[0]


def read_cases(rd: Path, seed: int, eps: float) -> List[Dict[str, Any]]:
    """One record per domain_<d>_joint.json of a step-3 run of this method."""
    from artifacts import load_artifact
    out = []
    for p in sorted((rd / 'joint_optimization').glob('domain_*_joint.json'), key=lambda p: int(p.name.split('_')[1])):
        obj = load_artifact(p, 'joint_domain', {'domain': int, 'accuracy_drop_pct': float, 'surrogate': dict,
                                                'accuracy_drop_ci95_pct': list, 'predicted': dict})
        plain = obj['baselines']['unpruned']['best_plain_split']['throughput_fps']
        pick = (obj.get('optimizer_choice') or obj)['predicted']  # the goal program's own pick (before any adoption)
        pts = [q for q in obj['surrogate']['points'] if q['held_out'] and q['error_pct'] is not None]
        held = [q['error_pct'] for q in pts]
        lo, hi = obj['accuracy_drop_ci95_pct']
        out.append({'seed': seed, 'domain': obj['domain'], 'a_ref_test_pct': obj['a_ref_pct'],
                    'final_test_pct': obj['final_accuracy_pct'], 'drop_pct': obj['accuracy_drop_pct'],
                    'drop_ci95_pct': [lo, hi], 'holds': obj['accuracy_drop_pct'] <= eps + 1e-9,
                    'violation_within_interval': lo <= eps + 1e-9, 'branches_pruned': obj['branches_pruned'],
                    'gain_x': obj['predicted']['throughput_fps'] / plain,
                    'gain_goal_x': pick['throughput_fps'] / plain, 'adopted': 'optimizer_choice' in obj,
                    'chosen_round': obj['chosen_round'], 'held_out_errors_pct': held,
                    'held_out_points': [{'where': q['where'], 'error_pct': q['error_pct'],
                                         'val_drop_pct': q['measured_val_drop_pct'],
                                         'test_drop_pct': q.get('measured_test_drop_pct'),
                                         'centre_distance': q.get('centre_distance')} for q in pts],
                    'val_images': obj['data_roles']['val']['images'],
                    'test_images': obj['data_roles']['test']['images']})
    return out


def read_today(src: Path) -> List[Dict[str, Any]]:
    """Gains and test drops of the step-3 result already in the source run (today's method), per domain."""
    import json
    out = []
    for p in sorted((src / 'joint_optimization').glob('domain_*_joint.json'), key=lambda p: int(p.name.split('_')[1])):
        obj = json.loads(p.read_text())
        plain = obj['baselines']['unpruned']['best_plain_split']['throughput_fps']
        out.append({'domain': obj['domain'], 'drop_pct': obj['accuracy_drop_pct'],
                    'gain_x': obj['predicted']['throughput_fps'] / plain, 'epsilon': obj.get('epsilon'),
                    'a_ref_test_pct': obj.get('a_ref_pct'),
                    'acceptance': ((obj.get('config') or {}).get('joint') or {}).get('acceptance', 'bound')})
    return out


def summarize(cases: Sequence[Dict[str, Any]], today: Sequence[Dict[str, Any]], eps: float) -> Dict[str, Any]:
    """Share of cases within epsilon, mean drop (95 % interval: bootstrap over cases, seeded), worst drop with its
    own interval, violations outside their interval, pooled held-out surrogate error, geometric-mean gains."""
    drops = np.array([c['drop_pct'] for c in cases])
    rng = np.random.default_rng(0)
    boot = drops[rng.integers(0, drops.size, size=(20000, drops.size))].mean(1)
    worst = max(cases, key=lambda c: c['drop_pct'])
    errs = np.abs(np.concatenate([np.array(c['held_out_errors_pct'], dtype=float) for c in cases]))
    gains = np.array([c['gain_x'] for c in cases])
    s0 = [c for c in cases if c['seed'] == 0]
    out = {'cases': len(cases), 'seeds': sorted({c['seed'] for c in cases}), 'epsilon': eps,
           'share_within_epsilon': float(np.mean(drops <= eps + 1e-9)),
           'violations': int(np.sum(drops > eps + 1e-9)),
           'violations_outside_interval': int(sum(not c['violation_within_interval'] for c in cases)),
           'mean_drop_pct': float(drops.mean()), 'mean_drop_ci95_pct': [float(np.quantile(boot, 0.025)),
                                                                        float(np.quantile(boot, 0.975))],
           'worst_drop_pct': worst['drop_pct'], 'worst_drop_ci95_pct': worst['drop_ci95_pct'],
           'worst_case': f'seed {worst["seed"]} domain {worst["domain"]}',
           'surrogate_held_out_points': int(errs.size),
           'surrogate_median_abs_error_pct': float(np.median(errs)) if errs.size else None,
           'surrogate_p90_abs_error_pct': float(np.quantile(errs, 0.9)) if errs.size else None,
           'geomean_gain_x': float(np.exp(np.log(gains).mean())),
           # the goal program's own picks (LUT-predicted): what the surrogate's decisions gain before the closed loop's
           # race adopts measured-faster layouts / splits of the same pruning (gain_x, predicted too, is after it)
           'geomean_gain_goal_x': float(np.exp(np.mean([np.log(c.get('gain_goal_x', c['gain_x'])) for c in cases]))),
           'adopted_cases': int(sum(bool(c.get('adopted')) for c in cases)),
           'geomean_gain_seed0_x': float(np.exp(np.mean([np.log(c['gain_x']) for c in s0]))) if s0 else None}
    pts = [q for c in cases for q in c.get('held_out_points') or []]
    floor = [abs(q['val_drop_pct'] - q['test_drop_pct']) for q in pts if q['test_drop_pct'] is not None]
    out['surrogate_noise_floor_pct'] = float(np.median(floor)) if floor else None
    for part, keep in (('rounds', lambda q: q['where'].startswith('round')),
                       ('pareto', lambda q: q['where'].startswith('pareto')),
                       # pruned sets no configuration measured before had (a round may re-deploy a rejected one)
                       ('new_sets', lambda q: q.get('centre_distance') is not None and q['centre_distance'] > 0)):
        e = [abs(q['error_pct']) for q in pts if keep(q)]
        out[f'surrogate_median_abs_error_{part}_pct'] = float(np.median(e)) if e else None
        out[f'surrogate_held_out_{part}_points'] = len(e)
    if today:
        td = np.array([t['drop_pct'] for t in today])
        out.update(today_domains=len(today), today_geomean_gain_x=float(np.exp(np.mean([np.log(t['gain_x'])
                                                                                       for t in today]))),
                   today_share_within_epsilon=float(np.mean(td <= eps + 1e-9)), today_worst_drop_pct=float(td.max()))
        if out['geomean_gain_seed0_x'] is not None and out['today_geomean_gain_x'] > 1 + 1e-9:
            out['gain_kept_share'] = (out['geomean_gain_seed0_x'] - 1) / (out['today_geomean_gain_x'] - 1)
        out.update(paired_comparison(s0, today))
    return out


def paired_comparison(s0: Sequence[Dict[str, Any]], today: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """This method's seed-0 cases against today's result domain by domain, where both have the same reference
    accuracy on test (the same base model, domain model and test images): the geometric mean of the per-domain gain
    ratios and both methods' test drops.  {'today_paired': False} when no domain pairs."""
    by = {t['domain']: t for t in today}
    pairs = [(c, by[c['domain']]) for c in s0 if c['domain'] in by and by[c['domain']].get('a_ref_test_pct') is not None
             and abs(by[c['domain']]['a_ref_test_pct'] - c['a_ref_test_pct']) < 1e-9]
    if not pairs:
        return {'today_paired': False}
    ratio = [c['gain_x'] / t['gain_x'] for c, t in pairs]
    return {'today_paired': True, 'paired_domains': len(pairs),
            'today_acceptance': sorted({t.get('acceptance', 'bound') for _, t in pairs}),
            'paired_gain_ratio_geomean': float(np.exp(np.mean(np.log(ratio)))),
            'paired_gain_ratio_min': float(min(ratio)), 'paired_gain_ratio_max': float(max(ratio)),
            'paired_drops_pct': [[int(c['domain']), float(c['drop_pct']), float(t['drop_pct'])] for c, t in pairs]}


@dataclass(frozen=True)
class SeedJob:
    """What every seed task reads (pipeline/executor.py's shared input)."""
    work: Path
    src: Path
    ckpt: Path
    eps: float
    quick: bool
    domains: Optional[str]
    extra: Tuple[str, ...]
    threads: int  # torch threads of step 0 (0: every core)
    sets: Tuple[str, ...]


def seed_task(job: SeedJob, seed: int) -> Dict[str, Any]:
    """One seed as a task of pipeline/executor.py (run_seed with the job's settings)."""
    return run_seed(seed, job.work, job.src, job.ckpt, job.eps, job.quick, job.domains, job.extra, job.threads,
                    job.sets)


def run_seed(seed: int, work: Path, src: Path, ckpt: Path, eps: float, quick: bool, domains: Optional[str],
             extra: Sequence[str], threads: int = 0, sets: Sequence[str] = ()) -> Dict[str, Any]:
    """Steps 0 and 3 for one seed in work/seed_<s>; the cases and the wall times."""
    rd = work / f'seed_{seed}'
    rd.mkdir(parents=True, exist_ok=True)
    flags = (list(QUICK_CONFIG) if quick else []) + ['--results_dir', str(rd), '--seed', str(seed),
                                                     '--set', f'model.checkpoint={ckpt}']
    for kv in sets:  # config overrides of both steps (those that made the source run, e.g. its base-training cap)
        flags += ['--set', kv]
    t0 = _run([sys.executable, str(REPO_ROOT / 'pipeline' / 'step0_prepare.py'), *flags]
              + (['--domains', domains] if domains else []) + (['--epochs', '1'] if quick else [])
              + (['--threads', str(threads)] if threads else []),
              f'step 0 (seed {seed})')
    which = ['--domains', domains] if domains else ['--all_domains']
    if not (src / COPIED[0]).is_file():
        raise BenchQualityError(f'--results_dir {src}: no {COPIED[0]}; run step 1 there first')
    for name in COPIED:  # copied now, not before step 0: a run may start while step 1 of the source still runs
        if (src / name).is_file():
            shutil.copy2(src / name, rd / name)
    t3 = _run([sys.executable, str(REPO_ROOT / 'pipeline' / 'step_3_joint.py'), *which, *flags,
               '--epsilon', str(eps), *(QUICK_STEP3 if quick else []), *extra], f'step 3 (seed {seed})')
    return {'seed': seed, 'step0_wall_s': t0, 'step3_wall_s': t3, 'cases': read_cases(rd, seed, eps)}


def tables_for(runs: Sequence[Dict[str, Any]], s: Dict[str, Any], where: str) -> List[Dict[str, Any]]:
    f = common.fmt
    rows = [[c['seed'], c['domain'], c['a_ref_test_pct'], c['final_test_pct'], c['drop_pct'],
             f'[{f(c["drop_ci95_pct"][0])}, {f(c["drop_ci95_pct"][1])}]', c['holds'], c['branches_pruned'],
             c.get('gain_goal_x', c['gain_x']), c['gain_x'] if c.get('adopted') else '', c['chosen_round'], len(c['held_out_errors_pct']),
             float(np.median(np.abs(c['held_out_errors_pct']))) if c['held_out_errors_pct'] else None]
            for r in runs for c in r['cases']]
    summary = [[s['cases'], ','.join(map(str, s['seeds'])), 100 * s['share_within_epsilon'],
                f'{f(s["mean_drop_pct"])} [{f(s["mean_drop_ci95_pct"][0])}, {f(s["mean_drop_ci95_pct"][1])}]',
                f'{f(s["worst_drop_pct"])} [{f(s["worst_drop_ci95_pct"][0])}, {f(s["worst_drop_ci95_pct"][1])}] '
                f'({s["worst_case"]})', s['violations_outside_interval'], s['surrogate_median_abs_error_pct'],
                s.get('surrogate_noise_floor_pct'), s['surrogate_held_out_points'], s['geomean_gain_goal_x'],
                f'{f(s["geomean_gain_x"])} ({s["adopted_cases"]} adopted)', s['geomean_gain_seed0_x'],
                s.get('today_geomean_gain_x'), s.get('today_share_within_epsilon')]]
    cols = ['cases', 'seeds', 'test drop <= eps (%)', 'mean drop [95 %] (points)', 'worst drop [its 95 %]',
            'violations outside their interval', 'surrogate median |err| held-out (points)',
            'noise floor: median |val - test drop| (points)', 'held-out points',
            'gain, goal program (geomean x, LUT-predicted)', 'gain after the race (geomean x, LUT-predicted)',
            'gain seed 0, after the race (x)', "today's gain seed 0 (x)", "today's share <= eps"]
    return [common.table(f'Step 3 at epsilon {s["epsilon"]} points, one-sided 95 % paired acceptance ({where})',
                         cols, summary),
            common.table('Per domain-seed case (drop and interval on test, paired bootstrap)', CASE_COLUMNS, rows)]


def headline_for(s: Dict[str, Any]) -> List[List[Any]]:
    f = common.fmt
    eps = s['epsilon']
    rows = [[f'eps={eps:g}: domain-seed cases with test drop <= eps ({s["cases"]} cases)',
             100 * s['share_within_epsilon'], '%'],
            [f'eps={eps:g}: mean test drop [95 % interval]',
             f'{f(s["mean_drop_pct"])} [{f(s["mean_drop_ci95_pct"][0])}, {f(s["mean_drop_ci95_pct"][1])}]', 'points'],
            [f'eps={eps:g}: worst test drop [its 95 % interval]',
             f'{f(s["worst_drop_pct"])} [{f(s["worst_drop_ci95_pct"][0])}, {f(s["worst_drop_ci95_pct"][1])}]',
             'points'],
            [f'eps={eps:g}: violations outside their own 95 % interval', s['violations_outside_interval'], 'cases'],
            [f'surrogate median |error|, {s["surrogate_held_out_points"]} held-out configurations',
             s['surrogate_median_abs_error_pct'], 'points'],
            ['surrogate median |error|: rounds / Pareto points',
             f'{f(s.get("surrogate_median_abs_error_rounds_pct"))} / {f(s.get("surrogate_median_abs_error_pareto_pct"))}',
             'points'],
            [f'surrogate median |error|, the {s.get("surrogate_held_out_new_sets_points")} whose pruned set was '
             'never measured before', s.get('surrogate_median_abs_error_new_sets_pct'), 'points'],
            ['measurement noise floor: median |val drop - test drop| of the same held-out configurations',
             s.get('surrogate_noise_floor_pct'), 'points'],
            [f'gain over best plain split, geometric mean of {s["cases"]} cases (LUT-predicted): the goal '
             f'program\'s picks / after the closed loop\'s race ({s["adopted_cases"]} adopted)',
             f'{f(s["geomean_gain_goal_x"])} / {f(s["geomean_gain_x"])}', 'x'],
            ['gain over best plain split, seed 0: this method / today\'s',
             f'{f(s["geomean_gain_seed0_x"])} / {f(s.get("today_geomean_gain_x"))}', 'x']]
    if s.get('today_paired'):
        rows.append([f'paired, {s["paired_domains"]} domains (same test images): gain this method / today\'s '
                     f'({"/".join(s["today_acceptance"])} acceptance), geometric mean [min, max]',
                     f'{f(s["paired_gain_ratio_geomean"])} [{f(s["paired_gain_ratio_min"])}, '
                     f'{f(s["paired_gain_ratio_max"])}]', 'x'])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_accuracy: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--results_dir', default='results', help='finished default run whose base model, LUT and step-2 '
                   'configuration are reused, and whose step-3 result is today\'s method (read only; default: '
                   'results; ignored with --quick)')
    p.add_argument('--today_dir', default=None, help='step-3 result of today\'s method to compare with (read '
                   'only; default: --results_dir)')
    p.add_argument('--seeds', default=None, help='comma-separated seeds (default: 0,1,2; --quick: 0,1)')
    p.add_argument('--domains', default=None, help='comma-separated domain ids (default: all domains)')
    p.add_argument('--epsilon', type=float, default=Config().joint.epsilon,
                   help=f'allowed test drop, points (default: {Config().joint.epsilon})')
    p.add_argument('--work_dir', default='results/_bench_accuracy', help='per-seed work directories; kept, and a '
                   'rerun resumes finished domains (default: results/_bench_accuracy)')
    p.add_argument('--executor', choices=EXECUTORS, default='local', help='local: the seeds one after another here, '
                   'step 0 with one torch thread per core | ray: each seed a task on a Ray cluster, step 0 with '
                   'cluster.cpus_per_task threads (default: local)')
    p.add_argument('--ray_address', default=None, help='with --executor ray: a running cluster to join, e.g. '
                   'HEAD:6379 (default: none, start a local one of --workers CPUs)')
    p.add_argument('--workers', type=int, default=2, help='with --executor ray and no --ray_address: CPUs of the '
                   'local Ray cluster = seeds at the same time (default: 2)')
    p.add_argument('--set', action='append', metavar='SECTION.KEY=VALUE', help='config override for steps 0 and 3, '
                   'repeatable: the overrides the source run was made with (default: none)')
    p.add_argument('--collect_only', action='store_true', help='run nothing: read the domains that the seeds\' '
                   'step 3 wrote so far in --work_dir and write the (partial) result (default: off)')
    p.add_argument('step_args', nargs='*', help='further flags for step 3, after `--` (default: none)')
    args = p.parse_args(argv)
    try:
        seeds = [int(x) for x in (args.seeds or ('0,1' if args.quick else '0,1,2')).split(',') if x.strip()]
    except ValueError:
        raise ConfigError(f'--seeds {args.seeds!r}: expected comma-separated integers') from None
    machine = common.machine_info()
    t0 = time.perf_counter()
    work = resolve_path(args.work_dir)
    if args.quick:
        src = work / '_quick_source'
        if not (src / 'hardware_lut_complete.json').exists():
            build_quick(src)
    else:
        src = resolve_path(args.results_dir)
    ckpt = base_checkpoint(src)
    where = 'quick: synthetic, tiny' if args.quick else f'base model, LUT and step 2 of {args.results_dir}'
    runs: List[Dict[str, Any]] = []
    written: List[Path] = []
    tables: List[Dict[str, Any]] = []

    def finished(seed: int, done: Dict[str, Any]) -> None:  # after every seed: the result so far
        runs.append(done)
        runs.sort(key=lambda r: r['seed'])
        today = [] if args.quick else read_today(resolve_path(args.today_dir) if args.today_dir else src)
        if not any(r['cases'] for r in runs):
            return
        s = summarize([c for r in runs for c in r['cases']], today, args.epsilon)
        payload = {'settings': {'seeds': seeds, 'domains': args.domains, 'epsilon': args.epsilon, 'source': where,
                                'set': list(args.set or []), 'executor': args.executor,
                                'workers': args.workers if args.executor == 'ray' else 1,
                                'base_checkpoint': str(ckpt), 'step_args': list(args.step_args)},
                   'complete': len(runs) == len(seeds) and not args.collect_only, 'summary': s, 'runs': runs,
                   'today': today, 'wall_s': time.perf_counter() - t0}
        tables[:] = tables_for(runs, s, where)
        written.append(common.write_result(args.out_dir, NAME, payload, machine, args.quick, headline_for(s),
                                           tables, argv))
        log.info('seed %d done: %d cases so far -> %s', seed, s['cases'], written[-1])

    if args.collect_only:  # whatever finished: the domains each seed's step 3 has written so far
        for seed in seeds:
            if (work / f'seed_{seed}' / 'joint_optimization').is_dir():
                finished(seed, {'seed': seed, 'partial': True, 'cases': read_cases(work / f'seed_{seed}', seed,
                                                                                 args.epsilon)})
    else:
        from bench import bench_accuracy as this  # by its package name: Ray's workers import the task from there
        from pipeline.executor import map_tasks
        cluster = ClusterConfig(executor=args.executor, ray_address=args.ray_address, local_cpus=args.workers)
        job = SeedJob(work, src, ckpt, args.epsilon, args.quick, args.domains, tuple(args.step_args),
                      1 if args.executor == 'ray' or args.quick else 0, tuple(args.set or []))
        map_tasks(this.seed_task, seeds, Config(results_dir=str(work), cluster=cluster), shared=job,
                  names=[f'seed {s}' for s in seeds], step='bench_accuracy', desc='bench_accuracy seeds',
                  on_result=finished)
    path = written[-1] if written else None
    if path is None:
        raise BenchQualityError(f'--work_dir {work}: no seed has step-3 results yet')
    common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
