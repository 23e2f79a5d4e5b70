"""The executor switch: step 0 and step 3 through a local Ray cluster (2 CPUs) decide exactly what the local
executor decides; a killed task worker is retried; retries exhausted: the task is named, the other domains' artifacts
are kept and a rerun redoes only the missing one.  Same tiny synthetic setting as tests/test_step3.py."""
import dataclasses
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from config import ClusterConfig, Config, ConfigError
from pipeline import executor, joint, tasks
from test_step3 import FAST, SETS, _cfg, results  # noqa: F401 - `results`: step 0 + modelled LUT, module fixture

CHEAP = FAST + ['--max_rounds', '1', '--epsilon_sweep', '1,4', '--sensitivity', 'importance']


def _step3(argv):
    from pipeline import step_3_joint
    return step_3_joint.main(SETS + CHEAP + argv)


def _copy(results, tmp_path, name):  # noqa: F811
    out = tmp_path / name
    shutil.copytree(results, out, ignore=shutil.ignore_patterns('joint_optimization', 'logs'))
    return out


def _decisions(res, d):
    """What step 3 decided for domain d: split, layouts, kept branches, accuracies, rounds, Pareto, alphas."""
    cfg = _cfg(res)
    obj = json.loads(joint.joint_path(cfg.path(), d).read_text())
    state = json.loads(joint.state_path(cfg, d).read_text())
    keep = ('lam', 'gammas', 'branches_pruned', 'a_ref_pct', 'final_accuracy_pct', 'final_val_accuracy_pct',
            'chosen_round', 'stop_reason', 'predicted')
    return ({k: obj[k] for k in keep}, [b['kept'] for b in obj['blocks']],
            [(p['lam'], p['gammas'], p['accuracy_pct']) for p in obj['pareto']],
            [(r['gammas'], r['lam'], r['val_accuracy_pct']) for r in obj['rounds']], state['blocks'])


@pytest.fixture(scope='module')
def ray_cluster():
    """One local Ray cluster with 2 CPUs for the module (starting one takes seconds)."""
    with executor.ray_session(Config(cluster=ClusterConfig(executor='ray', local_cpus=2))) as ray:
        yield ray


@pytest.fixture(scope='module')
def local_run(results, tmp_path_factory):  # noqa: F811
    res = _copy(results, tmp_path_factory.mktemp('local'), 'res')
    assert _step3(['--results_dir', str(res), '--all_domains']) == 0
    return res


@pytest.mark.slow
def test_step0_and_step3_on_ray_decide_as_local(results, local_run, ray_cluster, tmp_path):  # noqa: F811
    from pipeline import step0_prepare
    res = _copy(results, tmp_path, 'ray')
    # step 0 again through Ray (base model reused): the same alphas as the local run of the fixture
    for f in ('trained_hyper_weights.json', 'training_results.json', 'hyper_weights/domain_0.json',
              'hyper_weights/domain_1.json'):
        (res / f).unlink()
    assert step0_prepare.main(SETS[:-2] + ['--num_domains', '2', '--epochs', '1', '--threads', '1', '--results_dir',
                                           str(res), '--executor', 'ray']) == 0
    local_hw = json.loads((results / 'trained_hyper_weights.json').read_text())
    ray_hw = json.loads((res / 'trained_hyper_weights.json').read_text())
    assert list(ray_hw['domains']) == ['0', '1'] and ray_hw['domains'] == local_hw['domains']
    assert (res / 'hyper_weights' / 'domain_1.json').is_file()
    assert 'attempt started' in executor.log_path(_cfg(res), 'step0', 'domain 1').read_text()
    # step 3 for both domains through Ray: the same per-domain decisions as the local executor
    assert _step3(['--results_dir', str(res), '--all_domains', '--executor', 'ray']) == 0
    for d in (0, 1):
        assert _decisions(res, d) == _decisions(local_run, d)
    log = executor.log_path(_cfg(res), 'step3', 'domain 0').read_text()
    assert 'attempt started' in log and 'round 1' in log
    # each domain's sweep was a task of its own (its points in order: each is solved after the earlier were measured)
    assert 'attempt started' in executor.log_path(_cfg(res), 'step3', 'domain 1 epsilon sweep').read_text()


def test_step3_in_pieces_decides_as_one_task(results, local_run, tmp_path):  # noqa: F811
    """The pieces Ray runs as tasks (rounds, each domain's sweep, the assembly from the checkpoints), run here one
    after another, the sweep of domain 1 interrupted after its first point and resumed: the same decisions as one
    task per domain."""
    from pipeline import step_3_joint
    res = _copy(results, tmp_path, 'pieces')
    args = step_3_joint.parse_args(SETS + CHEAP + ['--results_dir', str(res), '--all_domains'])
    cfg = step_3_joint.resolve_config(args, step_3_joint.FLAGS)
    job = tasks.JointJob(joint.prepare_inputs(cfg, cfg.path('hardware_lut_complete.json')), 'test')
    for d in (0, 1):
        todo = tasks.joint_rounds_task(job, d)['pareto_todo']
        assert todo == [0, 1] and not joint.joint_path(cfg.path(), d).exists()
        if d == 1:  # as if the task died after the first point: the second resumes from its checkpoint
            assert [p['epsilon'] for p in tasks.joint_pareto_task(job, d)['points']] == [1.0, 4.0]
            joint.pareto_path(cfg, d, 1).unlink()
            assert tasks.joint_rounds_task(job, d)['pareto_todo'] == [1]
        assert [p['epsilon'] for p in tasks.joint_pareto_task(job, d)['points']] == [1.0, 4.0]
        assert tasks.joint_rounds_task(job, d)['pareto_todo'] == []
        assert not tasks.joint_domain_task(job, d)['skipped']
        assert _decisions(res, d) == _decisions(local_run, d)


def _dies_on_first_attempt(job, d):
    """Step 3's task, except that domain 0's first attempt SIGKILLs its own worker process (as the OOM killer
    would) once it has started: deterministic, where a watcher thread raced a task that can finish in a second."""
    marker = Path(job.inp.cfg.path()) / f'.killed_domain_{d}'
    if d == 0 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return tasks.joint_domain_task(job, d)


def _run_with_kill(res, max_retries):
    from pipeline import step_3_joint
    args = step_3_joint.parse_args(SETS + CHEAP + ['--results_dir', str(res), '--all_domains'])
    cfg = step_3_joint.resolve_config(args, step_3_joint.FLAGS)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, executor='ray', max_retries=max_retries))
    inp = joint.prepare_inputs(cfg, cfg.path('hardware_lut_complete.json'))
    import sys

    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    return cfg, executor.map_tasks(_dies_on_first_attempt, [0, 1], cfg, shared=tasks.JointJob(inp, 'test'),
                                   names=['domain 0', 'domain 1'], step='step3')


@pytest.mark.slow
def test_killed_worker_is_retried_then_reported_and_resumed(results, local_run, ray_cluster, tmp_path):  # noqa: F811
    # one retry allowed: the killed attempt is rerun (resuming its checkpointed rounds) and decides as local
    res = _copy(results, tmp_path, 'retried')
    cfg, out = _run_with_kill(res, max_retries=1)
    assert sorted(out.results) == [0, 1]
    pids = re.findall(r'attempt started in pid (\d+)', executor.log_path(cfg, 'step3', 'domain 0').read_text())
    assert len(pids) == 2 and pids[0] != pids[1]
    for d in (0, 1):
        assert _decisions(res, d) == _decisions(local_run, d)
    # no retry allowed: domain 0 is reported by name, domain 1's artifacts are kept, a rerun redoes only domain 0
    res = _copy(results, tmp_path, 'failed')
    with pytest.raises(executor.TasksFailed, match=r'1 of 2 task\(s\) failed:\n  domain 0: .*worker process died'):
        _run_with_kill(res, max_retries=0)
    c = _cfg(res)
    assert not joint.joint_path(c.path(), 0).exists() and joint.joint_path(c.path(), 1).is_file()
    def work(d):  # the domain's result, less its provenance and the closed loop step 3's driver adds afterwards
        from pipeline.closed_loop import ARTIFACT_FIELDS
        obj = json.loads(joint.joint_path(c.path(), d).read_text())
        return {k: v for k, v in obj.items() if k not in ARTIFACT_FIELDS and k != 'closed_loop'}
    kept = work(1)
    assert _step3(['--results_dir', str(res), '--all_domains']) == 0
    assert work(1) == kept and _decisions(res, 0) == _decisions(local_run, 0)


def test_task_errors_are_collected_by_name_and_config_checked(tmp_path):
    cfg = Config(results_dir=str(tmp_path))
    seen = []
    with pytest.raises(executor.TasksFailed, match=r'1 of 3 task\(s\) failed:\n  item b: ValueError: bad b') as e:
        executor.map_tasks(_fails_on_b, ['a', 'b', 'c'], cfg, shared=10, names=['item a', 'item b', 'item c'],
                           step='unit', on_result=lambda item, r: seen.append((item, r)))
    assert seen == [('a', 'a10'), ('c', 'c10')] and list(e.value.failures) == ['item b']
    assert 'Traceback' in executor.log_path(cfg, 'unit', 'item b').read_text()
    for bad, match in (({'executor': 'slurm'}, 'cluster.executor'), ({'max_retries': -1}, 'max_retries'),
                       ({'executor': 'ray'}, 'use --device cuda')):
        c = dataclasses.replace(cfg, device='cuda:1', cluster=dataclasses.replace(cfg.cluster, **bad))
        with pytest.raises(ConfigError, match=match):
            executor.map_tasks(_fails_on_b, ['a'], c)


def _fails_on_b(shared, item):
    if item == 'b':
        raise ValueError('bad b')
    return f'{item}{shared}'


@pytest.mark.slow
def test_bench_accuracy_seeds_on_ray_give_the_local_cases(ray_cluster, tmp_path):
    """bench_accuracy's seed repetitions as Ray tasks (the tiny synthetic --quick setting, one seed, one domain):
    the same cases as the local executor."""
    from bench import bench_accuracy

    def cases(executor_name, work):
        out = tmp_path / f'out_{executor_name}'
        assert bench_accuracy.main(['--quick', '--seeds', '1', '--domains', '0', '--work_dir', str(work),
                                    '--out_dir', str(out), '--executor', executor_name]) == 0
        obj = json.loads((out / 'accuracy.json').read_text())
        assert obj['complete'] and obj['settings']['executor'] == executor_name
        return [r['cases'] for r in obj['runs']]
    local = cases('local', tmp_path / 'local')
    shutil.copytree(tmp_path / 'local' / '_quick_source', tmp_path / 'ray' / '_quick_source')  # built once
    assert cases('ray', tmp_path / 'ray') == local and len(local[0]) == 1
    assert 'attempt started' in (tmp_path / 'ray' / 'logs' / 'bench_accuracy' / 'seed_1.log').read_text()


def test_threads_follow_the_cores_this_process_may_use_not_the_machines():
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})  # pinned to one core (the local stand-in device's server)
        assert executor.usable_cpus() == 1
        assert executor.task_threads(Config(), 0) == 1 and executor.task_threads(Config(), 3) == 3
    finally:
        os.sched_setaffinity(0, cores)
    assert executor.usable_cpus() == len(cores)
