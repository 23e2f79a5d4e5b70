"""Pipeline wall time: each step of run_pipeline.sh on the embedded default, and step 3's growth with the problem.

Part 1 runs `bash run_pipeline.sh --results_dir DIR --fresh [pipeline flags]` (or, with --log FILE, reads the
stderr of a run_pipeline.sh run you already made) and takes each step's wall time from the lines the script
prints: '== step N (...) done in S s'; a step the script reused ('== step 1: reusing ...'), a failed step and
the steps never reached are listed as such, without a time.

Part 2 (step 3's time vs number of blocks, A0 = 22 vs B3 = 28, and vs number of domains) is a hook,
`step3_scaling`, to be filled once pipeline/step_3_joint.py exists; until then it is reported as not measured.

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
from config import REPO_ROOT, UserError, run_cli  # noqa: E402

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
# Step 3 scaling: inputs are built here; the timing call is a HOOK for the lead (see step3_scaling)
# ----------------------------------------------------------------------------------------------------------

def scaling_lut(arch: str, input_size: int, num_classes: int = 10, profile: str = 'jetson-tx2') -> Dict[str, Any]:
    """A hardware_lut_complete payload of architecture `arch` whose two sides are modelled from a device profile
    (no measurement): the LUT shape step 3 would see for that many blocks, cheap to build for any size."""
    from optim import lut as L
    from optim.profiles import get_profile
    model = {'name': arch, 'num_classes': num_classes, 'width_multiplier': None, 'small_input': False}
    prof = get_profile(profile)
    server = L.modelled_side(prof, model, input_size, [1], side='server')
    client = L.modelled_side(prof, model, input_size, [1], side='client')
    return L.merge(server, client, L.LINK_PRESETS['ethernet'], 'fp32')


def step3_scaling(quick: bool) -> Dict[str, Any]:
    """Step 3's wall time vs number of blocks (A0 = 22 vs B3 = 28, LUTs from `scaling_lut`) and vs number of
    domains.

    LEAD: HOOK, NOT FILLED.  Once pipeline/step_3_joint.py and optim/goal.py exist, time step 3's solve (or the
    whole step on a tiny dataset) for each LUT in `scaling_lut('RepVGG-A0', 224)`, `scaling_lut('RepVGG-B3', 224)`
    and for 1, 2, 4 domains, and return {'status': 'measured', 'rows': [[what, blocks, domains, wall_s], ...]}.
    Until then it reports that nothing was measured (no number is made up).
    """
    have = (REPO_ROOT / 'pipeline' / 'step_3_joint.py').is_file()
    why = ('pipeline/step_3_joint.py exists but the bench hook bench_pipeline.step3_scaling is not filled in yet'
           if have else 'pipeline/step_3_joint.py does not exist yet')
    return {'status': 'not measured', 'reason': why, 'rows': []}


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
                   'repository root (default: results/_bench_pipeline, with --quick results/_bench_pipeline_quick)')
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
    else:
        rd = args.results_dir or ('results/_bench_pipeline_quick' if args.quick else 'results/_bench_pipeline')
        extra = (QUICK_FLAGS if args.quick else []) + list(args.pipeline_args)
        run = run_pipeline(rd, extra, fresh=not args.reuse)
    steps = parse_log(run['log'])
    if not steps:
        raise BenchPipelineError(f'{run["command"]}: no "== step N ... done in S s" lines in its output')
    scaling = step3_scaling(args.quick)
    rows = step_rows(steps)
    done = [st['wall_s'] for st in steps.values() if st['status'] == 'done']
    headline = [[f'step {s} wall time', steps[s]['wall_s'], 's'] for s in STEPS
                if s in steps and steps[s]['status'] == 'done']
    headline.append(['steps 0-4 wall time (steps that ran)', sum(done), 's'])
    if not scaling['rows']:
        headline.append([f'step 3 scaling with blocks and domains ({scaling["reason"]})', scaling['status'], ''])
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
    print(f'step 3 scaling: {scaling["status"]} ({scaling.get("reason", "")})')
    print(f'-> {path}')
    failed = run['returncode'] not in (None, 0)
    return 1 if failed else 0


if __name__ == '__main__':
    run_cli(main)
