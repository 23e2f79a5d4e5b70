"""Executor scaling: steps 0 and 3 per domain, local executor vs Ray with N workers, and a GPU-cluster projection.

Part 1 (measured).  The inputs of the per-domain work are copied from --source (default results/, only read:
partition_info.json, base_model/, hardware_lut_complete.json and, when present, initial_throughput_config.json) into
two work directories, results/_bench_executor/local and .../ray.  In each, `pipeline/step0_prepare.py --domains D`
(alpha training; the base model is reused, so no base training is timed) and `pipeline/step_3_joint.py --domains D`
run once, with `--executor local` (the default settings: step 0 with one torch thread per core, step 3 with
joint.threads = 1) and with `--executor ray --set cluster.local_cpus=N` (a local Ray cluster of N CPUs, one CPU and
one torch thread per task).  Each step's process is timed from start to exit (Python and Ray start-up included).
Speedup = local wall / Ray wall; parallel efficiency = speedup / N.  The load average before and after each run is
recorded: on a shared machine the figures are one pass on a loaded machine, not properties.  The per-domain
decisions of the two runs (split, layouts, branches pruned) are compared.

Part 2 (projection, modelled: nothing here ran on a GPU).  The makespan of K domains x S seeds on a Ray cluster of
G GPUs, one GPU per task, tasks submitted in order and started as GPUs free up (Ray's FIFO dispatch), under stated
assumptions: a mean per-task time (--proj_task_hours, RepVGG-B3 on an ImageNet-sized domain: alpha training plus
progressive pruning; default 2 h = about 120 PFLOP at ~15 TFLOP/s sustained fp32: 26 GFLOP per image forward, x3
with the backward pass, for 3 alpha epochs and 5 fine-tuning epochs over 128k train images plus ~80 sensitivity
evaluations over 20k val images), the relative spread of per-domain times measured in part 1's local run, a serial
part that does not fan out (--proj_serial_hours: LUT measurement on the device, step 2, the driver) and part 1's
measured Ray overhead (cluster start-up and dispatch) per run.

--quick runs part 1 on a tiny synthetic setting (2 domains, built in the work directory) in a minute or two.
Writes bench/results/executor.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import heapq  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_quality import QUICK_CONFIG, QUICK_STEP3, _run, build_quick  # noqa: E402
from config import REPO_ROOT, UserError, resolve_path, run_cli  # noqa: E402

log = logging.getLogger('bench_executor')
NAME = 'executor'
INPUTS = ('partition_info.json', 'base_model', 'hardware_lut_complete.json')
OPTIONAL = ('initial_throughput_config.json',)
PROJ_GPUS = (1, 2, 4, 8, 16, 32)


class BenchExecutorError(UserError):
    """A source directory without the inputs of the per-domain work."""


def copy_inputs(src: Path, dst: Path, modelled_lut: bool) -> None:
    need = [n for n in INPUTS if not (modelled_lut and n == 'hardware_lut_complete.json')]
    missing = [n for n in need if not (src / n).exists()]
    if missing:
        raise BenchExecutorError(f'--source {src}: missing {", ".join(missing)}; run steps 0-2 there first '
                                 '(bash run_pipeline.sh)')
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for n in need + ([] if modelled_lut else list(OPTIONAL)):
        if (src / n).is_dir():
            shutil.copytree(src / n, dst / n)
        elif (src / n).is_file():
            shutil.copy2(src / n, dst / n)


def run_steps(work: Path, domains: str, executor: str, workers: int, extra: Sequence[str],
              step3_extra: Sequence[str]) -> Dict[str, Any]:
    """Step 0 and step 3 for `domains` in `work` on one executor; wall seconds and load averages."""
    py = sys.executable
    ex = ['--executor', executor] + (['--set', f'cluster.local_cpus={workers}'] if executor == 'ray' else [])
    common_args = list(extra) + ['--domains', domains, '--results_dir', str(work)] + ex
    load_before = common.load_average()
    t0 = _run([py, str(REPO_ROOT / 'pipeline' / 'step0_prepare.py'), *common_args], f'step 0 ({executor})')
    t3 = _run([py, str(REPO_ROOT / 'pipeline' / 'step_3_joint.py'), *common_args, *step3_extra], f'step 3 ({executor})')
    return {'executor': executor, 'workers': workers if executor == 'ray' else 1, 'step0_s': t0, 'step3_s': t3,
            'total_s': t0 + t3, 'load_average_before': load_before, 'load_average_after': common.load_average()}


def per_domain(work: Path) -> Dict[int, Dict[str, Any]]:
    """Per domain: step 0's and step 3's own recorded times and step 3's decision."""
    tr = json.loads((work / 'training_results.json').read_text())['domains']
    out = {}
    for d, r in tr.items():
        j = json.loads((work / 'joint_optimization' / f'domain_{d}_joint.json').read_text())
        out[int(d)] = {'step0_s': r['time_s'], 'step3_s': j['timing']['wall_s'],
                       'decision': [j['lam'], j['gammas'], j['branches_pruned']]}
    hw = json.loads((work / 'trained_hyper_weights.json').read_text())['domains']
    for d in out:
        out[d]['alpha'] = hw[str(d)]
    return out


def makespan(durations: Sequence[float], slots: int) -> float:
    """Tasks started in order on the first free of `slots` identical workers (FIFO list scheduling)."""
    free = [0.0] * slots
    for t in durations:
        heapq.heappush(free, heapq.heappop(free) + t)
    return max(free)


def projection(rel: Sequence[float], domains: int, seeds: int, task_h: float, serial_h: float,
               overhead_s: float) -> List[List[Any]]:
    """Rows [GPUs, tasks, makespan h, speedup, efficiency] of the modelled B3 / ImageNet-sized run (see docstring)."""
    tasks = [task_h * rel[(i % domains) % len(rel)] for i in range(domains * seeds)]
    serial = serial_h + overhead_s / 3600.0
    one = serial_h + sum(tasks)  # the local executor: one GPU, no Ray
    rows = []
    for g in PROJ_GPUS:
        span = serial + makespan(tasks, g)
        rows.append([g, len(tasks), span, one / span, one / span / g])
    return rows


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--source', default='results', help='results directory with finished steps 0-2 whose inputs are '
                   'copied (only read), relative to the repository root (default: results)')
    p.add_argument('--domains', default=None, help='comma-separated domain ids to time (default: all domains of '
                   'the source partition; with --quick 0,1)')
    p.add_argument('--modelled_lut', action='store_true', help='step 3 reads a LUT modelled from device profiles '
                   '(TX2 edge, Orin Nano server) instead of the source\'s measured one, which then need not exist; '
                   'step 3\'s decisions differ, its work per domain (training, evaluations) does not (default: off)')
    p.add_argument('--workers', type=int, default=2, help='CPUs of the local Ray cluster = tasks at once (default: 2)')
    p.add_argument('--proj_domains', type=int, default=10, help='projection: domains K (default: 10)')
    p.add_argument('--proj_seeds', type=int, default=3, help='projection: seeds per domain S (default: 3)')
    p.add_argument('--proj_task_hours', type=float, default=2.0, help='projection, assumed: mean GPU hours of one '
                   'domain task (alpha training + progressive pruning of RepVGG-B3 on an ImageNet-sized domain) '
                   '(default: 2.0)')
    p.add_argument('--proj_serial_hours', type=float, default=0.5, help='projection, assumed: hours that do not fan '
                   'out (LUT measurement on the device, step 2, the driver; base model given) (default: 0.5)')
    p.add_argument('step_args', nargs='*', help='further step flags, after `--`, that the source was made with '
                   '(default: none, the embedded default)')
    return p.parse_args(argv)


def _source_and_domains(args: argparse.Namespace, root: Path):
    """The source directory, domain ids and extra step flags: (src, domains, extra, step3_extra)."""
    extra, step3_extra = list(args.step_args), []
    if args.quick:
        src = root / 'source'
        if src.exists():
            shutil.rmtree(src)
        build_quick(src)
        extra, step3_extra = QUICK_CONFIG + ['--set', 'train.alpha_epochs=1'] + extra, QUICK_STEP3
        domains = args.domains or '0,1'
    else:
        src = resolve_path(args.source)
        if args.domains:
            domains = args.domains
        else:
            part = json.loads((src / 'partition_info.json').read_text()) if (src / 'partition_info.json').is_file() \
                else {'num_domains': 0}
            domains = ','.join(str(d) for d in range(part['num_domains']))
    return src, domains, extra, step3_extra


def _run_both(args: argparse.Namespace, root: Path, src: Path, domains: str, extra: List[str],
              step3_extra: List[str]):
    """Steps 0 and 3 on the local executor, then on Ray: (runs, per-domain details by executor)."""
    runs, details = [], {}
    for executor in ('local', 'ray'):
        work = root / executor
        copy_inputs(src, work, args.modelled_lut)
        if args.modelled_lut:
            from pipeline import step_3_joint
            cfg = step_3_joint.resolve_config(step_3_joint.parse_args(['--all_domains', *extra, '--results_dir',
                                                                       str(work)]), step_3_joint.FLAGS)
            common.write_modelled_lut(cfg, 'bench_executor.py --modelled_lut')
        runs.append(run_steps(work, domains, executor, args.workers, extra, step3_extra))
        details[executor] = per_domain(work)
    return runs, details


def _analyse(args: argparse.Namespace, runs: List[Dict[str, Any]], details: Dict[str, Any]) -> Dict[str, Any]:
    """Speedup, efficiency, Ray overhead, local-vs-Ray agreement and the projection."""
    local, ray = runs
    ids = sorted(details['local'])
    same_decision = [d for d in ids if details['local'][d]['decision'] == details['ray'][d]['decision']]
    same_alpha = [d for d in ids if details['local'][d]['alpha'] == details['ray'][d]['alpha']]
    speedup = {k: local[k] / ray[k] for k in ('step0_s', 'step3_s', 'total_s')}
    eff = {k: v / args.workers for k, v in speedup.items()}
    # Ray's overhead: its wall time minus the makespan of its own recorded per-domain task times on N workers
    ray_busy = {k: makespan([details['ray'][d][k] for d in ids], args.workers) for k in ('step0_s', 'step3_s')}
    overhead_s = ray['total_s'] - sum(ray_busy.values())
    per = [details['local'][d]['step0_s'] + details['local'][d]['step3_s'] for d in ids]
    rel = [t / (sum(per) / len(per)) for t in per]
    proj = projection(rel, args.proj_domains, args.proj_seeds, args.proj_task_hours, args.proj_serial_hours,
                      overhead_s)
    return {'ids': ids, 'same_decision': same_decision, 'same_alpha': same_alpha, 'speedup': speedup, 'eff': eff,
            'overhead_s': overhead_s, 'rel': rel, 'proj': proj}


def _report(args: argparse.Namespace, src: Path, domains: str, runs: List[Dict[str, Any]], details: Dict[str, Any],
            st: Dict[str, Any]):
    """The headline rows and the three tables: (headline, tables)."""
    local, ray = runs
    ids, same_alpha, same_decision = st['ids'], st['same_alpha'], st['same_decision']
    speedup, eff, overhead_s, proj = st['speedup'], st['eff'], st['overhead_s'], st['proj']
    n = len(ids)
    la = [f'{r["load_average_before"][0]} -> {r["load_average_after"][0]}' if r['load_average_before'] else 'n/a'
          for r in runs]
    rows = [['local (one process)', 1, local['step0_s'], local['step3_s'], local['total_s'], 1.0, 1.0, la[0]],
            [f'ray, local cluster of {args.workers} CPUs', args.workers, ray['step0_s'], ray['step3_s'],
             ray['total_s'], speedup['total_s'], eff['total_s'], la[1]]]
    dom_rows = [[d, details['local'][d]['step0_s'], details['ray'][d]['step0_s'], details['local'][d]['step3_s'],
                 details['ray'][d]['step3_s'], d in same_alpha, d in same_decision] for d in ids]
    what = f'{n} domain(s) ({domains})' + (' of the quick synthetic setting' if args.quick else f' of {src.name}/') \
        + (', step 3 on a modelled LUT' if args.modelled_lut else '')
    tables = [
        common.table(f'Measured: step 0 (alpha training) + step 3 wall time, {what}; one pass each on this machine '
                     '(load average: 1-minute, before -> after the run)',
                     ['executor', 'workers', 'step 0 (s)', 'step 3 (s)', 'steps 0 + 3 (s)', 'speedup',
                      'parallel efficiency', 'load average'], rows),
        common.table('Measured: per-domain task times as the steps recorded them (s), and whether the Ray run '
                     'reproduced the local one (alpha: trained hyper-weights equal; decision: split, layouts, '
                     'branches pruned equal)',
                     ['domain', 'step 0 local', 'step 0 ray', 'step 3 local', 'step 3 ray', 'alpha equal',
                      'decision equal'], dom_rows),
        common.table(f'PROJECTION (modelled, not measured): {args.proj_domains} domains x {args.proj_seeds} seeds of '
                     f'RepVGG-B3 on ImageNet-sized domains, one GPU per task; assumed {args.proj_task_hours} GPU-h per '
                     f'task (spread across domains as measured here), {args.proj_serial_hours} h serial, Ray overhead '
                     f'{overhead_s:.0f} s per run (measured here); shared filesystem for data and results',
                     ['GPUs', 'tasks', 'makespan (h)', 'speedup vs 1 GPU', 'parallel efficiency'], proj)]
    headline = [[f'steps 0 + 3, {n} domains: local', local['total_s'], 's'],
                [f'steps 0 + 3, {n} domains: ray with {args.workers} workers', ray['total_s'], 's'],
                [f'speedup ray / local ({args.workers} workers; step 0 {speedup["step0_s"]:.2f}, step 3 '
                 f'{speedup["step3_s"]:.2f})', speedup['total_s'], 'x'],
                [f'parallel efficiency ({args.workers} workers)', eff['total_s'], ''],
                ['domains with the same decision local vs ray', f'{len(same_decision)} of {n}', ''],
                [f'projection (modelled): {args.proj_domains}x{args.proj_seeds} B3 tasks on 8 GPUs, efficiency',
                 next(r[4] for r in proj if r[0] == 8), '']]
    return headline, tables


def _payload(args: argparse.Namespace, domains: str, runs: List[Dict[str, Any]], details: Dict[str, Any],
             st: Dict[str, Any]) -> Dict[str, Any]:
    speedup, eff, overhead_s, same_decision, same_alpha, rel, proj = (
        st['speedup'], st['eff'], st['overhead_s'], st['same_decision'], st['same_alpha'], st['rel'], st['proj'])
    return {'domains': domains, 'modelled_lut': args.modelled_lut, 'workers': args.workers, 'runs': runs,
               'per_domain': {
        ex: {str(d): {k: v for k, v in rec.items() if k != 'alpha'} for d, rec in det.items()}
        for ex, det in details.items()}, 'speedup': speedup, 'parallel_efficiency': eff,
        'ray_overhead_s': overhead_s, 'same_decision_domains': same_decision, 'same_alpha_domains': same_alpha,
        'projection': {'assumptions': {'task_hours': args.proj_task_hours, 'serial_hours': args.proj_serial_hours,
                                       'domains': args.proj_domains, 'seeds': args.proj_seeds,
                                       'relative_task_times': rel, 'ray_overhead_s': overhead_s},
                       'rows': proj, 'status': 'projection (modelled)'}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_executor: %(message)s', stream=sys.stderr)
    args = parse_args(argv)
    if args.workers < 1:
        raise BenchExecutorError(f'--workers: expected >= 1, got {args.workers}')
    machine = common.machine_info()
    root = resolve_path('results/_bench_executor_quick' if args.quick else 'results/_bench_executor')
    src, domains, extra, step3_extra = _source_and_domains(args, root)
    runs, details = _run_both(args, root, src, domains, extra, step3_extra)
    st = _analyse(args, runs, details)
    headline, tables = _report(args, src, domains, runs, details, st)
    payload = _payload(args, domains, runs, details, st)
    path = common.write_result(args.out_dir, NAME, payload, machine, args.quick, headline, tables, argv)
    common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
