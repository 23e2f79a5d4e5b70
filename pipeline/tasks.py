"""The tasks that pipeline/executor.py fans out: step 0's alpha training of one domain; step 3's joint optimization
of one domain, whole or (on Ray) in pieces: its rounds, each point of its epsilon sweep, then the assembly.  Each is a module-level function (shared job, domain id) that writes the domain's own artifacts
atomically and returns what the driver merges or prints; the job carries the resolved config and the inputs read
from the step's input artifacts, so a task on another node computes exactly what the local executor computes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from artifacts import ArtifactError, load_artifact, write_artifact
from config import Config

DOMAIN_HW_DIR = 'hyper_weights'


def domain_training_path(cfg: Config, d: int) -> Path:
    """Step 0's per-domain artifact (kind domain_training), merged by the driver into trained_hyper_weights.json
    and training_results.json."""
    return cfg.path(DOMAIN_HW_DIR, f'domain_{d}.json')


@dataclass(frozen=True)
class TrainJob:
    """What every step-0 domain task reads: the config, the partition, the base model and the fingerprint that
    names what the trained alpha depends on."""
    cfg: Config
    partition: Dict[str, Any]
    model: Any  # HyperRepVGG with the base weights (not modified by the tasks)
    fingerprint: str
    command: str


def train_domain_task(job: TrainJob, d: int) -> Dict[str, Any]:
    """Train domain d's alpha (accuracy.training.train_domain), save its BN statistics when adapted, write
    hyper_weights/domain_<d>.json; returns {'hyper_weights', 'results'}."""
    import torch

    from accuracy import training
    from pipeline.executor import task_threads
    cfg = job.cfg
    torch.set_num_threads(task_threads(cfg, cfg.train.threads))
    out = training.train_domain(cfg, job.partition, job.model, d)
    if out['bn_state'] is not None:
        rel = f'{DOMAIN_HW_DIR}/domain_{d}_bn.pt'
        training.save_state_dict(out['bn_state'], cfg.path(rel))
        out['hyper_weights']['bn_state_file'] = rel
    result = {'hyper_weights': out['hyper_weights'], 'results': out['results']}
    write_artifact(domain_training_path(cfg, d), 'domain_training',
                   {'domain': d, 'fingerprint': job.fingerprint, **result}, cfg, job.command)
    return result


def load_domain_training(cfg: Config, d: int, fingerprint: str) -> Optional[Dict[str, Any]]:
    """A finished step-0 task's result for domain d with this fingerprint ({'hyper_weights', 'results'}), else None
    (a task that finished after its driver stopped is merged on the next run instead of being redone)."""
    path = domain_training_path(cfg, d)
    if not path.is_file():
        return None
    try:
        obj = load_artifact(path, 'domain_training', {'fingerprint': str, 'hyper_weights': dict, 'results': dict})
    except ArtifactError as e:
        logging.getLogger('step0').info('ignoring %s (%s); domain %d is retrained', path, e, d)
        return None
    if obj['fingerprint'] != fingerprint:
        return None
    return {'hyper_weights': obj['hyper_weights'], 'results': obj['results']}


@dataclass(frozen=True)
class JointJob:
    """What every step-3 domain task reads: the shared inputs (pipeline.joint.prepare_inputs), the command line,
    --force, and in real mode the callable that deploys to the worker (then the tasks run in the driver)."""
    inp: Any  # pipeline.joint.Inputs
    command: str
    force: bool = False
    real_run: Optional[Any] = None


def joint_domain_task(job: JointJob, d: int) -> Dict[str, Any]:
    """Step 3 for domain d (pipeline.joint.run_domain, checkpointed rounds included) and its two artifacts;
    returns {'payload', 'skipped'}."""
    import torch

    from pipeline import joint
    from pipeline.executor import task_threads
    cfg = job.inp.cfg
    torch.set_num_threads(task_threads(cfg, cfg.joint.threads))
    out = joint.run_domain(job.inp, d, job.command, force=job.force, real_run=job.real_run)
    if not out['skipped']:
        write_artifact(joint.state_path(cfg, d), 'joint_state', out['state'], cfg, job.command)
        write_artifact(joint.joint_path(cfg.path(), d), 'joint_domain', out['payload'], cfg, job.command)
    return {'payload': out['payload'], 'skipped': out['skipped']}


def joint_rounds_task(job: JointJob, d: int) -> Dict[str, Any]:
    """Step 3's reference and rounds of domain d (checkpointed); returns {'skipped', 'pareto_todo'}: the indices of
    the epsilon sweep still to compute (none for a finished domain)."""
    import torch

    from pipeline import joint
    from pipeline.executor import task_threads
    torch.set_num_threads(task_threads(job.inp.cfg, job.inp.cfg.joint.threads))
    out = joint.run_domain(job.inp, d, job.command, force=job.force, phase='rounds')
    return {'skipped': out['skipped'], 'pareto_todo': out.get('pareto_todo', [])}


def joint_pareto_task(job: JointJob, d: int) -> Dict[str, Any]:
    """Domain d's epsilon sweep on the rounds' checkpoints, one point after another (each is solved after the
    earlier ones were measured: docs/design.md#pareto-sweep); writes their checkpoints and returns {'points'}."""
    import torch

    from pipeline import joint
    from pipeline.executor import task_threads
    torch.set_num_threads(task_threads(job.inp.cfg, job.inp.cfg.joint.threads))
    out = joint.run_domain(job.inp, d, job.command, phase='pareto')
    return {'points': out.get('points', [])}
