"""Pipeline wall time: each step of run_pipeline.sh on the embedded default, and step 3's growth with the problem.

Part 1 runs `bash run_pipeline.sh --results_dir DIR --fresh [pipeline flags]` (or, with --log FILE, reads the
stderr of a run_pipeline.sh run you already made) and takes each step's wall time from the lines the script
prints: '== step N (...) done in S s'; a step the script reused ('== step 1: reusing ...'), a failed step and
the steps never reached are listed as such, without a time.

Part 2, step 3's time growth (`step3_scaling`):
* with the number of blocks: the solve part of one step-3 round, optim.goal.solve(..., 'both') (relaxed GD with
  the config's optim.steps / restarts, and the lexicographic HiGHS MILP), timed on the real-size goal program of
  RepVGG-A0 (22 blocks) and RepVGG-B3 (28 blocks) at 224 px; their LUTs are modelled (`scaling_lut`, both sides
  from the TX2 profile, ethernet), the sensitivities seeded random (log-normal, only for the branches step 3
  measures: optim.goal.worth_measuring), epsilon = joint.epsilon; median of 3 seeds.  The training and accuracy
  evaluations of a round are not included (they scale with the data, not with the blocks);
* with the number of domains: step 3's wall time for the first 1, 2, 5, 10 domains, summed from the per-domain
  wall times step 3 recorded (`timing.wall_s` of joint_optimization/domain_<d>_joint.json) in the pipeline run's
  results directory (with --log: --results_dir, default results/); domains run one after another.

--quick runs the pipeline on the synthetic dataset with a tiny model and tiny settings (a minute or two).
Writes bench/results/pipeline.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

from bench import common  # noqa: E402
from config import REPO_ROOT, UserError, resolve_path, run_cli  # noqa: E402

log = logging.getLogger('bench_pipeline')
NAME = 'pipeline'
STEPS = ('0', '1', '2', '3', '4')
DONE_RE = re.compile(r'^== step (\S+) \((.*)\) done in (\d+) s$')
REUSE_RE = re.compile(r'^== step (\S+): reusing (.*)$')
FAIL_RE = re.compile(r'^run_pipeline\.sh: step (\S+) \((.*)\) failed')
QUICK_FLAGS = ['--dataset', 'synthetic', '--domains', '0',
               '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'model.input_size=16',
               '--set', 'data.num_domains=2', '--set', 'data.synthetic_samples=400',
               '--set', 'train.base_train_samples=200', '--set', 'train.base_epochs=1',
               '--set', 'train.alpha_epochs=1', '--set', 'lut.warmup=1', '--set', 'lut.repeats=3',
               '--set', 'lut.validation_samples=2', '--set', 'optim.steps=20', '--set', 'optim.restarts=1',
               '--set', 'joint.max_rounds=1', '--set', 'joint.epsilon_sweep=1.0']


class BenchPipelineError(UserError):
    """A run_pipeline.sh log that holds no step timings."""


def parse_log(text: str) -> Dict[str, Dict[str, Any]]:
    """Per step number: {'description', 'status': done | reused | failed, 'wall_s' (done only)} from the stderr
    of run_pipeline.sh."""
    steps: Dict[str, Dict[str, Any]] = {}
    for line in text.splitlines():
        line = line.strip()
        m = DONE_RE.match(line)
        if m:
            steps[m.group(1)] = {'description': m.group(2), 'status': 'done', 'wall_s': float(m.group(3))}
            continue
        m = REUSE_RE.match(line)
        if m:
            steps[m.group(1)] = {'description': m.group(2), 'status': 'reused', 'wall_s': None}
            continue
        m = FAIL_RE.match(line)
        if m:
            steps[m.group(1)] = {'description': m.group(2), 'status': 'failed', 'wall_s': None}
    return steps


def run_pipeline(results_dir: str, extra: Sequence[str], fresh: bool) -> Dict[str, Any]:
    """Run run_pipeline.sh, echo its stderr, return {'returncode', 'wall_s', 'log', 'command'}."""
    cmd = ['bash', str(REPO_ROOT / 'run_pipeline.sh'), '--results_dir', results_dir] + (['--fresh'] if fresh else [])
    cmd += list(extra)
    log.info('running %s', ' '.join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line)
    rc = proc.wait()
    return {'returncode': rc, 'wall_s': time.perf_counter() - t0, 'log': ''.join(lines), 'command': ' '.join(cmd)}


# ----------------------------------------------------------------------------------------------------------
# Step 3 scaling: solve time vs blocks (modelled LUTs) and whole-step time vs domains (recorded timings)
# ----------------------------------------------------------------------------------------------------------

def scaling_lut(arch: str, input_size: int, num_classes: int = 10, profile: str = 'jetson-tx2') -> Dict[str, Any]:
    """A hardware_lut_complete payload of architecture `arch` whose two sides are modelled from a device profile
    (no measurement): the LUT shape step 3 would see for that many blocks, cheap to build for any size."""
    from timing import lut as L
    from timing.profiles import get_profile
    model = {'name': arch, 'num_classes': num_classes, 'width_multiplier': None, 'small_input': False}
    prof = get_profile(profile)
    server = L.modelled_side(prof, model, input_size, [1], side='server')
    edge = L.modelled_side(prof, model, input_size, [1], side='edge')
    return L.merge(server, edge, L.LINK_PRESETS['ethernet'], 'fp32')


SCALING_DOMAINS = (1, 2, 5, 10)


def _solve_times(arch: str, input_size: int, quick: bool, seeds: int) -> Dict[str, Any]:
    """Median wall time of goal.solve's GD and MILP on the goal program of `arch` (modelled LUT)."""
    import numpy as np
    import torch

    from config import Config
    from optim import cost, goal
    from timing import lut as L
    from optim.exact import solve_exact
    cfg = Config()
    o, j = cfg.optim, cfg.joint
    lut = scaling_lut(arch, input_size)
    t = L.cost_tables(lut, 1)
    available = cost.measured_kept(t)
    scale = solve_exact(t, cost.valid_mask(available)).stages['period_ms']
    measured = goal.worth_measuring(t, available, j.min_saving_pct)
    kw = {'steps': 30 if quick else o.steps, 'restarts': 1 if quick else o.restarts, 'lr': o.lr,
          'tau_start': o.tau_start, 'tau_end': o.tau_end}
    gd_s, milp_s, gaps = [], [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        sens = rng.lognormal(-2.5, 1.0, (t.num_blocks, 3))
        sens[:, 0] *= 5.0
        sens = np.where(measured, sens, np.nan)
        p = goal.build_problem(t, sens, available, L.block_stats(lut), 90.0, j.epsilon, scale, j.roofline_weight)
        threads = torch.get_num_threads()
        sol = goal.solve(p, 'both', torch.Generator().manual_seed(seed), kw, j.milp_time_limit_s)
        torch.set_num_threads(threads)
        gd_s.append(sol['gd'].wall_s)
        milp_s.append(sol['milp'].wall_s)
        gaps.append(sol['gap']['objective_gap_pct'])
    return {'arch': arch, 'input_size': input_size, 'num_blocks': t.num_blocks, 'seeds': seeds,
            'gd_s': gd_s, 'milp_s': milp_s, 'gap_pct': gaps, 'median_gd_s': float(np.median(gd_s)),
            'median_milp_s': float(np.median(milp_s)), 'gd_kwargs': kw}


def domain_timings(results_dir: Path) -> List[Dict[str, Any]]:
    """[{'domain', 'num_blocks', 'wall_s', 'timing'}] from the domain_<d>_joint.json files, by domain id."""
    from artifacts import ArtifactError, load_artifact
    out = []
    for p in (results_dir / 'joint_optimization').glob('domain_*_joint.json'):
        try:
            obj = load_artifact(p, 'joint_domain', {'domain': int, 'timing': dict, 'gammas': list})
        except ArtifactError as e:
            log.warning('skipping %s: %s', p, e)
            continue
        if isinstance(obj['timing'].get('wall_s'), (int, float)):
            out.append({'domain': obj['domain'], 'num_blocks': len(obj['gammas']), 'wall_s': float(obj['timing'][
                'wall_s']), 'timing': obj['timing']})
    return sorted(out, key=lambda r: r['domain'])


def step3_scaling(quick: bool, results_dir: Path) -> Dict[str, Any]:
    """Step 3's wall time vs number of blocks (A0 = 22 vs B3 = 28, LUTs from `scaling_lut`; the solve part) and
    vs number of domains (summed per-domain wall times recorded in `results_dir`'s step-3 artifacts).
    Returns {'status', 'reason', 'rows': [[what, blocks, domains, wall_s], ...], 'solve', 'domains'}."""
    size, seeds = (32, 1) if quick else (224, 3)
    solve = [_solve_times(a, size, quick, seeds) for a in ('RepVGG-A0', 'RepVGG-B3')]
    rows: List[List[Any]] = []
    for r in solve:
        what = f'{r["arch"]} {size} px, one goal.solve (median of {seeds})'
        rows.append([f'{what}: gradient descent', r['num_blocks'], 1, r['median_gd_s']])
        rows.append([f'{what}: MILP', r['num_blocks'], 1, r['median_milp_s']])
    doms = domain_timings(results_dir)
    reason = ''
    for k in SCALING_DOMAINS:
        if k <= len(doms):
            rows.append([f'whole step 3, first {k} domain(s) of {results_dir.name}/ (sum of recorded per-domain '
                         'wall times)', doms[0]['num_blocks'], k, sum(d['wall_s'] for d in doms[:k])])
    if len(doms) < max(SCALING_DOMAINS):
        reason = (f'{results_dir}/joint_optimization has per-domain timings for {len(doms)} domain(s); '
                  f'rows for more domains are left out')
    return {'status': 'measured', 'reason': reason, 'rows': rows, 'solve': solve, 'domains': doms,
            'results_dir': str(results_dir)}


def step_rows(steps: Dict[str, Dict[str, Any]]) -> List[List[Any]]:
    rows = []
    for s in STEPS:
        st = steps.get(s, {'description': '', 'status': 'not reached', 'wall_s': None})
        rows.append([f'step {s}', st['description'], st['wall_s'], st['status']])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_pipeline: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--log', metavar='FILE', help='read the stderr of an earlier run_pipeline.sh run instead of '
                   'running it (default: none, run the pipeline)')
    p.add_argument('--results_dir', default=None, help='results directory of the pipeline run, relative to the '
                   'repository root; with --log, where step 3\'s per-domain timings are read (default: '
                   'results/_bench_pipeline, with --quick results/_bench_pipeline_quick, with --log results)')
    p.add_argument('--reuse', action='store_true', help='keep earlier work in --results_dir instead of passing '
                   '--fresh to run_pipeline.sh (then reused steps have no time) (default: off, fresh run)')
    p.add_argument('pipeline_args', nargs='*', help='further run_pipeline.sh flags, after `--`, e.g. -- --link wifi '
                   '(default: none, the embedded default)')
    args = p.parse_args(argv)
    machine = common.machine_info()
    if args.log:
        path = Path(args.log)
        if not path.is_file():
            raise BenchPipelineError(f'--log: file {path} does not exist')
        run = {'returncode': None, 'wall_s': None, 'log': path.read_text(), 'command': f'(log {path})'}
        rd = args.results_dir or 'results'
    else:
        rd = args.results_dir or ('results/_bench_pipeline_quick' if args.quick else 'results/_bench_pipeline')
        extra = (QUICK_FLAGS if args.quick else []) + list(args.pipeline_args)
        run = run_pipeline(rd, extra, fresh=not args.reuse)
    steps = parse_log(run['log'])
    if not steps:
        raise BenchPipelineError(f'{run["command"]}: no "== step N ... done in S s" lines in its output')
    scaling = step3_scaling(args.quick, resolve_path(rd))
    rows = step_rows(steps)
    done = [st['wall_s'] for st in steps.values() if st['status'] == 'done']
    headline = [[f'step {s} wall time', steps[s]['wall_s'], 's'] for s in STEPS
                if s in steps and steps[s]['status'] == 'done']
    headline.append(['steps 0-4 wall time (steps that ran)', sum(done), 's'])
    for r in scaling['solve']:
        headline.append([f'step 3 solve, {r["arch"]} ({r["num_blocks"]} blocks): GD / MILP',
                         f'{r["median_gd_s"]:.3g} / {r["median_milp_s"]:.3g}', 's'])
    if scaling['domains']:
        k = len(scaling['domains'])
        headline.append([f'whole step 3, {k} domain(s) (recorded per-domain times)',
                         sum(d['wall_s'] for d in scaling['domains']), 's'])
    tables = [common.table('Wall time per step of run_pipeline.sh' + (' (quick: synthetic, tiny)' if args.quick
                                                                      else ' on the embedded default'),
                           ['step', 'what', 'wall time (s)', 'status'], rows)]
    if scaling['rows']:
        tables.append(common.table('Step 3 wall time vs blocks and domains', ['what', 'blocks', 'domains',
                                                                              'wall time (s)'], scaling['rows']))
    payload = {'pipeline_command': run['command'], 'pipeline_returncode': run['returncode'],
               'pipeline_wall_s': run['wall_s'], 'steps': steps, 'step3_scaling': scaling}
    path = common.write_result(args.out_dir, NAME, payload, machine, args.quick, headline, tables, argv)
    print(common.render(['step', 'what', 'wall time (s)', 'status'], rows, markdown=False))
    print()
    print(common.render(['what', 'blocks', 'domains', 'wall time (s)'], scaling['rows'], markdown=False))
    if scaling['reason']:
        print(f'step 3 scaling: {scaling["reason"]}')
    print(f'-> {path}')
    failed = run['returncode'] not in (None, 0)
    return 1 if failed else 0


if __name__ == '__main__':
    run_cli(main)
