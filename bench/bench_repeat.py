"""Decision stability: steps 1-2 run again and again on the same machine, does the LUT hold and the split stay?

Runs `pipeline/step1_measure_lut.py --mode pseudo` then `pipeline/step2_initial_throughput_opt.py --mode pseudo`
--runs times (default 3), one after the other, each in a fresh work directory (results/_bench_repeat/run_<i>;
step 1 measures a new LUT every time), on the embedded default of config.py.  From each run's artifacts:

* step 1's validation (lut_validation.json): share of the unseen configurations within +/-10 %, median |error|,
  median signed error, the pass-to-pass noise floor and the LUT's error against pass 2, all of configurations
  timed in the fit's own rounds; and from its later window (`later`: the same configurations timed again after
  the LUT) the median signed error as measured and re-anchored to that window's speed (docs/design.md
  "Measurement protocol"), with the speed factor: how far the machine moved;
* step 2's decision (initial_throughput_config.json): the chosen split lambda, its predicted throughput, whether
  it was a coin toss on the LUT, and its closed loop (pseudo mode: server part measured here, edge part and link
  modelled): its measured throughput and its share of the best measured among the 10 best-predicted.

Then issue 13's checks over the runs: the LUT's median |error| <= the noise floor of the same run (the issue's
wording) and the stricter LUT's error against pass 2 alone <= that floor (a pass against a pass), the
median signed error <= 3 % in magnitude, the same lambda in every run or lambdas whose measured throughputs differ
by < 3 % (read in one run's closed loop, where both were measured in the same interleaved rounds), and the chosen
configuration >= 95 % of the best measured.  The load average before and after every run is recorded and a
loaded machine flagged: no check is claimed on it.  --quick: 2 runs on a tiny synthetic model (seconds).
Writes bench/results/decision_stability.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

from bench import common  # noqa: E402
from config import REPO_ROOT, UserError, resolve_path, run_cli  # noqa: E402

NAME = 'decision_stability'
QUICK = ['--dataset', 'synthetic', '--set', 'model.input_size=16', '--set',
         'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'lut.fit_configurations=30',
         '--set', 'lut.validation_samples=6', '--set', 'loop.top_k=3']
SAME_LAMBDA_PCT = 3.0
COLUMNS = ['run', 'within +/-10 % (%)', 'median |err| (%)', 'median signed (%)', 'noise floor (%)',
           'LUT vs pass 2 (%)', 'later window: signed as measured / re-anchored (%)', 'later window: speed factor',
           'lambda', 'predicted fps', 'coin toss', 'measured fps (p10-p90)', 'chosen / best measured (%)',
           'load avg before / after']


class BenchRepeatError(UserError):
    """A step that failed, or a run without the artifacts it should have written."""


def run_once(work: Path, extra: Sequence[str]) -> Dict[str, Any]:
    """Steps 1 and 2 in pseudo mode in `work` (made fresh); their artifacts' figures."""
    from artifacts import load_artifact
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    before = common.load_average()
    common_args = ['--results_dir', str(work), *extra]
    for script in ('pipeline/step1_measure_lut.py', 'pipeline/step2_initial_throughput_opt.py'):
        cmd = [sys.executable, script, '--mode', 'pseudo', *common_args]
        if subprocess.call(cmd, cwd=str(REPO_ROOT)) != 0:
            raise BenchRepeatError(f'failed: {" ".join(cmd)} (see its message above)')
    after = common.load_average()
    val = load_artifact(work / 'lut_validation.json', 'lut_validation', {'summary': dict})
    s2 = load_artifact(work / 'initial_throughput_config.json')
    loop = s2.get('closed_loop') or {}
    if 'report' not in loop:
        raise BenchRepeatError(f'{work / "initial_throughput_config.json"}: no closed_loop report '
                               f'({loop.get("skipped", "field missing")})')
    measured = {int(m['lam']): m['measured'] for m in loop.get('measurements') or [] if m.get('measured')}
    later = val.get('later') or {}
    return {'validation': {'summary': val['summary'], 'window': val.get('window', 'later'),
                           'later': later.get('summary'), 'anchored': later.get('anchored'),
                           'speed': later.get('speed')},
            'decision': loop['decision'], 'report': loop['report'],
            'measured_fps_by_lambda': {lam: m.get('throughput_fps') for lam, m in measured.items()},
            'load_average_before': before, 'load_average_after': after}


def _noise(summary: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return (summary or {}).get('noise') or {}


def row(i: int, r: Dict[str, Any]) -> List[Any]:
    v = r['validation']
    t, n = v['summary']['total'], _noise(v['summary'])
    a = (v.get('anchored') or {}).get('total') or {}
    w = (v.get('later') or {}).get('total') or {}
    c = r['report']['chosen']
    la = [common.fmt((x or [None])[0]) for x in (r['load_average_before'], r['load_average_after'])]
    return [i, 100 * t['share_within_tol'], t['median_abs_error_pct'], t['median_signed_error_pct'],
            n.get('pass_to_pass_pct'), n.get('lut_vs_pass2_median_abs_pct'),
            f'{common.fmt(w.get("median_signed_error_pct"))} / {common.fmt(a.get("median_signed_error_pct"))}',
            (v.get('speed') or {}).get('factor'), c['lam'], c['predicted_fps'],
            'yes' if r['decision']['coin_toss'] else 'no',
            f'{c["measured_fps"]:.1f} ({c["measured_p10_fps"]:.1f}-{c["measured_p90_fps"]:.1f})',
            r['report']['chosen_over_best_measured_pct'], ' / '.join(la)]


def lambda_spread(runs: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Largest % difference between the measured throughputs of two chosen lambdas, read in one run's closed loop
    where both were measured (0 when every run chose the same lambda; None when no run measured both)."""
    lams = sorted({int(r['report']['chosen']['lam']) for r in runs})
    if len(lams) == 1:
        return 0.0
    worst = None
    for a in lams:
        for b in lams:
            if a >= b:
                continue
            for r in runs:
                m = r['measured_fps_by_lambda']
                if m.get(a) and m.get(b):
                    d = 100.0 * abs(m[a] - m[b]) / max(m[a], m[b])
                    worst = d if worst is None else max(worst, d)
    return worst


def checks(runs: Sequence[Dict[str, Any]]) -> List[List[Any]]:
    import numpy as np
    out = []
    for name, key in (('timed in the fit\'s rounds', 'summary'), ('a later window, as measured', 'later'),
                      ('a later window, re-anchored', 'anchored')):
        vals = [r['validation'].get(key) for r in runs]
        if any(v is None for v in vals):
            continue
        ok = [(_noise(v).get('lut_vs_pass2_median_abs_pct') or 0) <= (_noise(v).get('pass_to_pass_pct') or 0)
              for v in vals]
        # the wording: the LUT's median |error| (against both passes) <= the noise floor of the same run
        ok_abs = [(v['total']['median_abs_error_pct'] or 0) <= (_noise(v).get('pass_to_pass_pct') or 0) for v in vals]
        signed = [v['total']['median_signed_error_pct'] for v in vals]
        out += [[f'LUT ({name}) median |error| <= noise floor of the same run', f'{sum(ok_abs)} of {len(ok_abs)}',
                 'runs'],
                [f'LUT ({name}) vs pass 2 <= noise floor of the same run', f'{sum(ok)} of {len(ok)}', 'runs'],
                [f'LUT ({name}) median signed error per run', ' / '.join(f'{s:+.2f}' for s in signed), '%'],
                [f'LUT ({name}) median signed error, median over runs', float(np.median(signed)), '%']]
    lams = [int(r['report']['chosen']['lam']) for r in runs]
    spread = lambda_spread(runs)
    out += [['step 2 chosen lambda per run', ' / '.join(str(v) for v in lams), ''],
            [f'measured throughput difference between the chosen lambdas (target < {SAME_LAMBDA_PCT:g} %)',
             spread, '%'],
            ['step 2 chosen / best measured of the top 10, worst run',
             min(r['report']['chosen_over_best_measured_pct'] for r in runs), '%']]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--runs', type=int, default=None, help='runs of steps 1-2 (default: 3; --quick: 2)')
    p.add_argument('--work_dir', default='results/_bench_repeat', help='where the runs go, one directory each; '
                   'replaced (default: results/_bench_repeat)')
    p.add_argument('step_args', nargs='*', help='further flags for steps 1 and 2, after `--` (default: none)')
    args = p.parse_args(argv)
    runs_n = args.runs if args.runs is not None else (2 if args.quick else 3)
    if runs_n < 2:
        raise UserError(f'--runs {runs_n}: expected at least 2 (stability needs a second run)')
    machine = common.machine_info()
    work = Path(args.out_dir) / '_repeat_quick' if args.quick else resolve_path(args.work_dir)
    extra = [*(QUICK if args.quick else []), *args.step_args]
    runs = [run_once(work / f'run_{i + 1}', extra) for i in range(runs_n)]
    # before the first run the load is other work's; before a later one it includes this bench's previous run
    loaded = any(common.is_loaded(r['load_average_before'], own=1.0 if i else 0.0) or
                 common.is_loaded(r['load_average_after'], own=1.0) for i, r in enumerate(runs))
    head = [[f'{m}{" (LOADED: not claimed)" if loaded and i == 0 else ""}', v, u]
            for i, (m, v, u) in enumerate(checks(runs))]
    head.append(['load average (1 min) before the runs, max', max((r['load_average_before'] or [0])[0]
                                                               for r in runs), ''])
    table = common.table(f'Steps 1-2 run {runs_n} times on the embedded default, one after the other (pseudo mode: '
                         'server measured here, edge and link modelled); measured on this machine under its load',
                         COLUMNS, [row(i + 1, r) for i, r in enumerate(runs)])
    path = common.write_result(args.out_dir, NAME, {'runs': runs, 'loaded': loaded}, machine, args.quick, head,
                               [table], argv)
    common.print_tables([table], path)
    return 0


if __name__ == '__main__':
    run_cli(main)
