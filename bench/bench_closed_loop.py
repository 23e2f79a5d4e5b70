"""Closed loop on the local stand-in device: is the chosen configuration the fastest one when measured?

The pipeline runs in real mode around comm/localdevice.py (client_worker.py on one core, the server on the other,
the link emulator between): `bash run_pipeline.sh --local_device --results_dir WORK`, with step 0's finished work
copied from --results_dir (default results/; only read) so that only steps 1-4 run.  Then, for step 2 and every
step-3 domain, from the artifacts' `closed_loop` records (pipeline/closed_loop.py): the chosen configuration's
measured throughput (p10-p90) beside its prediction, the best measured among the loop.top_k best-predicted, the
share the chosen one reaches of it, the measured gain over the measured best plain split beside the predicted one,
whether the choice was a coin toss on the LUT (runners-up inside its uncertainty band), and the load average at the
time.  The target (>= 95 %) is judged on the evaluation (`loop.evaluate_passes`, --evaluate_passes): the chosen
configuration, the optimizer's pick and the top-k measured again together in fresh passes that no decision saw, so
that the passes which chose a configuration cannot also flatter it; the best of them is picked on one half of those
passes and valued, with the chosen one, on the other half (both ways round; pipeline.closed_loop.crossfit_share_pct),
because the max over the same passes is biased up among near-ties.  The share of that max is shown beside it, and
the cross-fitted share's 95 % interval over the passes (pipeline.closed_loop.crossfit_interval_pct: the judge's own
noise), so that a step below 95 % says whether its miss lies beyond that noise.  Every figure is of this machine
under its load: not a property of the method.

--from_run DIR reads a finished local-device run instead of running one.  --quick runs steps 1-2 only on a tiny
synthetic model (about a minute; numbers not meant for reading).  Writes bench/results/closed_loop.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

from bench import common  # noqa: E402
from config import REPO_ROOT, UserError, resolve_path, run_cli  # noqa: E402

NAME = 'closed_loop'
STEP0 = ('partition_info.json', 'trained_hyper_weights.json', 'training_results.json', 'base_model',
         'branch_flops.json', 'importance_scores.json', 'importance_rankings.json')
QUICK = ['--dataset', 'synthetic', '--set', 'model.input_size=16', '--set',
         'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'loop.top_k=3', '--set', 'loop.real_samples=32',
         '--set', 'loop.evaluate_passes=2']
COLUMNS = ['step', 'mode', 'coin toss (splits in band)', 'chosen lambda', 'predicted fps', 'measured fps (p10-p90)',
           'best measured of top-k (lambda)', 'chosen / best measured %', 'measured gain over best plain split',
           'predicted gain', 'passes disagree %', 'load avg', 'decision source',
           "optimizer's pick: measured fps (lambda)", "optimizer's pick / best measured %",
           'evaluation: chosen / best %', 'evaluation: best lambda', "evaluation: optimizer's pick / best %",
           'evaluation: chosen / best picked on the other half %',
           'evaluation: chosen / best picked on the other half, 95 % interval over the passes',
           "evaluation: optimizer's pick / best picked on the other half %", 'evaluation: passes disagree %',
           'evaluation: percentile of the passes read',
           'evaluation: chosen / best picked on the other half, read at the median of the passes %']


def cell(row: Sequence[Any], column: str) -> Any:
    """A row's cell by its column name."""
    return row[COLUMNS.index(column)]


class BenchLoopError(UserError):
    """A run without closed-loop records, or a pipeline step that failed."""


def _run(cmd: Sequence[str]) -> None:
    if subprocess.call(list(cmd), cwd=str(REPO_ROOT)) != 0:
        raise BenchLoopError(f'failed: {" ".join(cmd)} (see its message above)')


def run_full(source: Path, work: Path, evaluate_passes: int) -> None:
    """Step 0 of `source` copied into `work`, then the pipeline in real mode around the local device."""
    missing = [n for n in STEP0[:4] if not (source / n).exists()]
    if missing:
        raise BenchLoopError(f'{source}: no finished step 0 ({", ".join(missing)} missing); run bash run_pipeline.sh '
                             'first, or give --from_run with a finished local-device run')
    work.mkdir(parents=True, exist_ok=True)
    for n in STEP0:
        if (source / n).is_dir():
            shutil.copytree(source / n, work / n, dirs_exist_ok=True)
        elif (source / n).is_file():
            shutil.copy2(source / n, work / n)
    _run(['bash', 'run_pipeline.sh', '--local_device', '--results_dir', str(work), '--set',
          f'loop.evaluate_passes={int(evaluate_passes)}'])


def run_quick(work: Path) -> None:
    py = sys.executable
    step = ['--port', '{port}', '--results_dir', str(work), *QUICK, '--set', 'real.connect_timeout_s=60']
    ld = [py, '-m', 'comm.localdevice', '--log_dir', str(work / 'local_device'), '--']
    _run(ld + [py, 'pipeline/step1_measure_lut.py', '--mode', 'real', '--repeats', '3', '--warmup', '1',
               '--no_validate', '--set', 'lut.timing=chain', '--set', 'real.probe_sizes_kb=4,256,1024', *step])
    _run(ld + [py, 'pipeline/step2_initial_throughput_opt.py', '--mode', 'real', '--steps', '60', '--restarts', '1',
               *step])


def _fmt_load(rep: Dict[str, Any]) -> Optional[float]:
    la = (rep.get('load_average') or {}).get('before')
    return la[0] if la else None


def loop_row(label: str, loop: Optional[Dict[str, Any]], where: str) -> List[Any]:
    """One table row from a closed-loop record; BenchLoopError naming the file when it has none."""
    if not isinstance(loop, dict) or 'report' not in loop:
        why = (loop or {}).get('skipped', 'no closed_loop field (an artifact from before it)')
        raise BenchLoopError(f'{where}: nothing measured ({why})')
    rep, dec = loop['report'], loop['decision']
    c, b = rep['chosen'], rep['best_measured_of_top_k']
    pick = rep.get('predicted_choice') or c  # the optimizer's own pick (the chosen one unless the loop adopted another)
    g = rep.get('gain_over_best_plain_split') or {}
    toss = 'yes (' + ', '.join(str(r['lam']) for r in dec['runners_up']) + ')' if dec['coin_toss'] else 'no'
    return [label, rep['mode'], toss, c['lam'], c['predicted_fps'],
            f'{c["measured_fps"]:.1f} ({c["measured_p10_fps"]:.1f}-{c["measured_p90_fps"]:.1f})',
            f'{b["measured_fps"]:.1f} ({b["lam"]})', rep['chosen_over_best_measured_pct'], g.get('measured_x'),
            g.get('predicted_x'), rep.get('pass_to_pass_median_pct'), _fmt_load(rep),
            rep.get('decision_source', 'predicted'),
            f'{pick["measured_fps"]:.1f} ({pick["lam"]})', 100.0 * pick['measured_fps'] / b['measured_fps'],
            *_evaluation_cells(rep.get('evaluation'))]


def _evaluation_cells(ev: Optional[Dict[str, Any]]) -> List[Any]:
    if not ev:
        return [None] * 9
    from pipeline.closed_loop import evaluation_interval
    ci = ev.get('chosen_over_best_crossfit_ci95_pct') or evaluation_interval(ev)  # older records: from their passes
    return [ev['chosen_over_best_pct'], ev['best']['lam'], ev['optimizer_pick_over_best_pct'],
            ev.get('chosen_over_best_crossfit_pct'), [round(ci[0], 1), round(ci[1], 1)] if ci else None,
            ev.get('optimizer_pick_over_best_crossfit_pct'), ev.get('pass_to_pass_median_pct'),
            float(ev.get('pace_quantile', 50.0)), crossfit_at(ev, 50.0)]


def crossfit_at(ev: Dict[str, Any], quantile: float) -> Optional[float]:
    """The evaluation's cross-fitted share of the chosen configuration (pipeline.closed_loop.crossfit_share_pct)
    with every configuration read at the `quantile` percentile of its passes in each half; None with < 2 passes.
    The same passes read at the median: how much the judge's reading decides."""
    import numpy as np

    from pipeline.closed_loop import crossfit_share_pct
    rows = ev.get('configurations') or []
    x = np.array([r['passes_fps'] for r in rows], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        return None
    i = next(k for k, r in enumerate(rows) if 'chosen' in r['roles'])
    return crossfit_share_pct([np.percentile(x[:, h::2], quantile, axis=1).tolist() for h in (0, 1)], i)


def read_run(run: Path) -> List[List[Any]]:
    """Rows for step 2 and each step-3 domain of a finished run."""
    from artifacts import load_artifact
    rows = []
    s2 = run / 'initial_throughput_config.json'
    if s2.is_file():
        rows.append(loop_row('step 2', load_artifact(s2).get('closed_loop'), str(s2)))
    domains = sorted((run / 'joint_optimization').glob('domain_*_joint.json'),
                     key=lambda p: int(p.name.split('_')[1]) if p.name.split('_')[1].isdigit() else 0)
    for p in domains:
        obj = load_artifact(p)
        rows.append(loop_row(f'step 3 domain {obj["domain"]}', obj.get('closed_loop'), str(p)))
    if not rows:
        raise BenchLoopError(f'{run}: no step-2 or step-3 result')
    return rows


def _reaches(interval: Optional[Sequence[float]], level: float) -> bool:
    """Whether an interval cell's ([low, high]) upper end reaches `level` (no interval: False)."""
    return interval is not None and float(interval[1]) >= level


def headline(rows: Sequence[Sequence[Any]]) -> List[List[Any]]:
    share = [cell(r, 'chosen / best measured %') for r in rows]
    doms = [r for r in rows if r[0].startswith('step 3')]
    ev = [cell(r, 'evaluation: chosen / best %') for r in rows]
    cross = [cell(r, 'evaluation: chosen / best picked on the other half %') for r in rows]
    out = []
    if all(v is not None for v in cross):
        out += [['evaluation (fresh passes no decision saw), best picked on one half of them and valued on the '
                 'other: chosen / best, worst step', min(cross), '%'],
                ['evaluation, best picked on the other half: steps whose choice reached >= 95 %',
                 sum(v >= 95.0 for v in cross), f'of {len(cross)}'],
                ['evaluation, best picked on the other half: steps below 95 % whose 95 % interval over the passes '
                 'does not reach 95 % (a miss beyond the judge\'s own noise)',
                 sum(v < 95.0 and not _reaches(cell(r, 'evaluation: chosen / best picked on the other half, 95 % '
                                                      'interval over the passes'), 95.0)
                     for v, r in zip(cross, rows)), f'of {len(cross)}'],
                ['evaluation, best picked on the other half, the same passes read at their median: steps whose '
                 'choice reached >= 95 %',
                 sum(v is not None and v >= 95.0 for v in (cell(r, 'evaluation: chosen / best picked on the other '
                                                                'half, read at the median of the passes %')
                                                           for r in rows)), f'of {len(rows)}'],
                ["evaluation, best picked on the other half: steps whose optimizer's own pick reached >= 95 %",
                 sum(cell(r, "evaluation: optimizer's pick / best picked on the other half %") >= 95.0 for r in rows),
                 f'of {len(rows)}']]
    if all(v is not None for v in ev):
        out += [['evaluation: chosen / the max over the same passes (biased up among near-ties), worst step',
                 min(ev), '%'],
                ['evaluation: steps whose choice reached >= 95 % of that max', sum(v >= 95.0 for v in ev),
                 f'of {len(ev)}'],
                ["evaluation: steps whose optimizer's own pick reached >= 95 % of that max",
                 sum(cell(r, "evaluation: optimizer's pick / best %") >= 95.0 for r in rows), f'of {len(rows)}']]
    out += [['chosen / best measured of top-k (the deciding passes), worst step', min(share), '%'],
           ['steps reaching >= 95 % of the best measured', sum(s >= 95.0 for s in share), f'of {len(share)}'],
           ['steps decided on measurement (another top-k configuration won the race on fresh passes)',
            sum(cell(r, 'decision source') == 'measured' for r in rows), f'of {len(rows)}'],
           ["the optimizer's own pick >= 95 % of the best measured",
            sum(cell(r, "optimizer's pick / best measured %") >= 95.0 for r in rows), f'of {len(rows)}']]
    gains = [g for g in (cell(r, 'measured gain over best plain split') for r in doms)
             if isinstance(g, (int, float)) and g > 0]
    if gains:
        out.append(['step 3 measured gain over the measured best plain split, geometric mean',
                    math.exp(sum(math.log(x) for x in gains) / len(gains)), 'x'])
    loads = [cell(r, 'load avg') for r in rows if cell(r, 'load avg') is not None]
    if loads:
        out.append(['load average (1 min) during the measurements, max', max(loads), ''])
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--results_dir', default='results', help='finished step 0 to copy (read only) (default: results)')
    p.add_argument('--work_dir', default='results/_bench_closed_loop', help='where the local-device run goes '
                   '(default: results/_bench_closed_loop)')
    p.add_argument('--evaluate_passes', type=int, default=10, help='fresh passes of the evaluation that judges each '
                   'decision (loop.evaluate_passes; the best is picked on one half (even passes) and valued on the '
                   'other (odd passes), and the other way round; default: 10)')
    p.add_argument('--from_run', default=None, help='read this finished local-device run instead of running one '
                   '(default: run one)')
    args = p.parse_args(argv)
    machine = common.machine_info()
    work = resolve_path(args.from_run or args.work_dir)
    if args.from_run is None:
        if args.quick:
            work = Path(args.out_dir) / '_closed_loop_quick'
            run_quick(work)
        else:
            run_full(resolve_path(args.results_dir), work, args.evaluate_passes)
    rows = read_run(work)
    head = headline(rows)
    table = common.table('Closed loop on the local stand-in device (real mode: worker on one core, server on the '
                         'other, emulated link); measured on this machine under its load', COLUMNS, rows)
    common.print_tables([table], common.write_result(args.out_dir, NAME, {'run': str(work), 'rows': rows}, machine,
                                                     args.quick, head, [table], argv))
    return 0


if __name__ == '__main__':
    run_cli(main)
