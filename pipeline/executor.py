"""Where per-domain work runs: one after another in this process (`local`, the default, needs no Ray) or as tasks
on a Ray cluster (`ray`: a local one started here, or the cluster at `cluster.ray_address`).

    outcome = map_tasks(fn, items, cfg, shared=job, names=[f'domain {d}' for d in items], step='step3',
                        on_result=merge)

`fn(shared, item)` is a module-level function (Ray imports it by name on the workers) that writes its own
artifacts atomically and returns a small picklable result; `shared` is the read-only input every task gets (sent
to the cluster once, with ray.put).  The driver receives each result as its task finishes (`on_result(item,
result)`, e.g. to rewrite a merged artifact), in completion order; merged artifacts must therefore be written in
item order to stay byte-for-byte the same as the local executor's.

Faults: a task whose worker process dies (killed, out of memory, node lost) is rerun by Ray up to
`cluster.max_retries` times; an exception raised by the task itself is not retried (it would repeat).  Either
way the other tasks run on, their results reach `on_result`, and `map_tasks` then raises `TasksFailed` naming
every failed task; a rerun of the step redoes only what has no finished artifact.

Progress: one tqdm bar over the tasks (stderr, shown on a terminal).  Each task's log records (its `logging`
output, its attempts with pid and host, the traceback of a failure) go to <results_dir>/logs/<step>/<name>.log on
the node that ran it (the same file on a shared results directory) and, with Ray, also to the driver's console
prefixed by Ray with the worker's pid; Ray's own worker logs are in /tmp/ray/session_latest/logs on each node.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from config import REPO_ROOT, Config, ConfigError, UserError

log = logging.getLogger('executor')
EXECUTORS = ('local', 'ray')
LOG_DIR = 'logs'


class TasksFailed(UserError, RuntimeError):
    """One or more tasks failed (after Ray's retries); the message names each with its error and log file."""

    def __init__(self, step: str, failures: Dict[str, str], total: int):
        self.failures = dict(failures)
        lines = '\n'.join(f'  {name}: {why}' for name, why in failures.items())
        super().__init__(f'{step}: {len(failures)} of {total} task(s) failed:\n{lines}\nthe finished tasks\' '
                         'artifacts are kept; rerun the step to redo only the failed ones')


@dataclass
class Outcome:
    """What map_tasks did: the results of the tasks that finished, by item, in item order."""
    results: Dict[Any, Any] = field(default_factory=dict)
    executor: str = 'local'


def check_cluster_config(cfg: Config) -> None:
    c = cfg.cluster
    if c.executor not in EXECUTORS:
        raise ConfigError(f'--executor / cluster.executor: expected local or ray, got {c.executor!r}')
    if c.cpus_per_task < 1 or c.local_cpus < 0 or c.max_retries < 0 or not c.gpus_per_task > 0:
        raise ConfigError('cluster.cpus_per_task >= 1, cluster.local_cpus >= 0, cluster.max_retries >= 0 and '
                          f'cluster.gpus_per_task > 0 expected, got {c.cpus_per_task}, {c.local_cpus}, '
                          f'{c.max_retries}, {c.gpus_per_task}')
    if c.executor == 'ray' and re.fullmatch(r'cuda:\d+', cfg.device):
        raise ConfigError(f'--device {cfg.device} with --executor ray: Ray gives each task its own GPU(s) '
                          '(CUDA_VISIBLE_DEVICES); use --device cuda')


def usable_cpus() -> int:
    """The cores this process may run on (its affinity; os.cpu_count() counts the machine's): a step pinned to one
    core (the local stand-in device's server) that starts a torch thread per machine core runs two OpenMP threads
    on one core.  (Suspected, 2026-12-07, of real-mode streams flipping between ~1100 and ~1800 frames/s; a rerun
    with one thread showed the same flips: they are the machine's slow episodes, docs/design.md "Closed loop".)"""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this OS
        return os.cpu_count() or 1


def task_threads(cfg: Config, configured: int) -> int:
    """torch CPU threads of a task: the step's own threads key if set, else the task's CPUs (ray) or every core it
    may use."""
    if configured:
        return configured
    return cfg.cluster.cpus_per_task if cfg.cluster.executor == 'ray' else usable_cpus()


def task_gpus(cfg: Config) -> float:
    return cfg.cluster.gpus_per_task if cfg.device.startswith('cuda') else 0.0


def log_path(cfg: Config, step: str, name: str) -> Path:
    """A task's log file: <results_dir>/logs/<step>/<name with spaces as underscores>.log."""
    return cfg.path(LOG_DIR, step, re.sub(r'[^A-Za-z0-9_.=-]+', '_', name) + '.log')


@contextlib.contextmanager
def _task_logging(path: Path, prefix: str) -> Iterator[None]:
    """Route the root logger's records to `path` (appended: one file keeps every attempt) while a task runs; in a
    process without logging set up (a Ray worker) also to stderr, which Ray forwards to the driver."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers: List[logging.Handler] = [logging.FileHandler(path)]
    handlers[0].setFormatter(logging.Formatter('%(asctime)s %(name)s: %(message)s'))
    if not root.handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[1].setFormatter(logging.Formatter(f'{prefix}: %(message)s'))
    old_level = root.level
    for h in handlers:
        root.addHandler(h)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(old_level)


def run_task(fn: Callable[[Any, Any], Any], shared: Any, item: Any, name: str, step: str, cfg: Config) -> Any:
    """One task, on either executor: its log file, the attempt line (pid, host) and, on failure, the traceback."""
    path = log_path(cfg, step, name)
    with _task_logging(path, step):
        tlog = logging.getLogger(step)
        tlog.info('%s: attempt started in pid %d on %s', name, os.getpid(), socket.gethostname())
        try:
            out = fn(shared, item)
        except Exception:
            tlog.error('%s failed:\n%s', name, traceback.format_exc())
            raise
        tlog.info('%s: finished', name)
        return out


def _why(e: BaseException, cfg: Config, step: str, name: str) -> str:
    where = f'(log: {log_path(cfg, step, name)})'
    try:
        import ray.exceptions as rex
    except ImportError:  # local executor without Ray installed
        rex = None
    if rex is not None and isinstance(e, rex.RayTaskError):
        cause = e.cause if getattr(e, 'cause', None) is not None else e
        return f'{type(cause).__name__}: {cause} {where}'
    if rex is not None and isinstance(e, rex.RayError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        n = cfg.cluster.max_retries
        return (f'{type(e).__name__} after {n} retr{"y" if n == 1 else "ies"} (the worker process died: killed, out '
                f'of memory or its node lost): {first} {where}')
    return f'{type(e).__name__}: {e} {where}'


@contextlib.contextmanager
def ray_session(cfg: Config) -> Iterator[Any]:
    """Ray initialised for this process: an already initialised one is used as it is (and left running); else the
    cluster at cluster.ray_address is joined, or a local one with cluster.local_cpus CPUs started, and shut down
    at the end.  Workers find this repository through PYTHONPATH (a multi-node cluster needs it at the same path
    on every node, e.g. on a shared filesystem that also holds results_dir and data_root)."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--executor ray: the ray package is not installed (pip install -r requirements.txt)') \
            from None
    if ray.is_initialized():
        yield ray
        return
    c = cfg.cluster
    kwargs: Dict[str, Any] = {'include_dashboard': False, 'log_to_driver': True, 'logging_level': logging.WARNING,
                              'runtime_env': {'env_vars': {'PYTHONPATH': os.pathsep.join(
                                  [str(REPO_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
                                                      if p])}}}
    if c.ray_address:
        kwargs['address'] = c.ray_address
    else:
        kwargs['num_cpus'] = c.local_cpus or usable_cpus()
        kwargs['_node_ip_address'] = '127.0.0.1'  # a local cluster stays on loopback
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise ConfigError(f'--ray_address {c.ray_address}: cannot join that Ray cluster ({e}); start it with '
                          '`ray start --head`, export RAY_AUTH_MODE=token (and its token, see the README) or leave '
                          '--ray_address out for a local one') from None
    try:
        yield ray
    finally:
        ray.shutdown()


def map_tasks(fn: Callable[[Any, Any], Any], items: Sequence[Any], cfg: Config, shared: Any = None,
              names: Optional[Sequence[str]] = None, step: str = 'tasks', desc: Optional[str] = None,
              on_result: Optional[Callable[[Any, Any], None]] = None) -> Outcome:
    """Run fn(shared, item) for every item on cfg.cluster.executor; see the module docstring.  Raises TasksFailed
    after every other task has finished when any task failed; KeyboardInterrupt stops at once (Ray tasks still
    running are cancelled)."""
    from tqdm.auto import tqdm
    check_cluster_config(cfg)
    items = list(items)
    names = list(names) if names is not None else [str(i) for i in items]
    if len(set(names)) != len(names) or len(names) != len(items):
        raise ValueError(f'map_tasks: {len(items)} items need as many distinct names, got {names}')
    out = Outcome(executor=cfg.cluster.executor)
    if not items:  # nothing to do: no Ray start-up either
        return out
    failures: Dict[str, str] = {}
    done: Dict[int, Any] = {}
    bar = tqdm(total=len(items), desc=desc or step, unit='task', disable=None, file=sys.stderr)

    def finished(i: int, result: Any) -> None:
        done[i] = result
        if on_result is not None:
            on_result(items[i], result)
        bar.update(1)

    try:
        if cfg.cluster.executor == 'local':
            for i, (item, name) in enumerate(zip(items, names)):
                try:
                    result = run_task(fn, shared, item, name, step, cfg)
                except Exception as e:  # noqa: BLE001 - reported by name once the others have run
                    failures[name] = _why(e, cfg, step, name)
                    bar.update(1)
                    continue
                finished(i, result)
        else:
            _map_ray(fn, items, names, cfg, shared, step, finished, failures, bar)
    finally:
        bar.close()
    out.results = {items[i]: done[i] for i in sorted(done)}
    if failures:
        raise TasksFailed(step, {n: failures[n] for n in names if n in failures}, len(items))
    return out


def _map_ray(fn: Callable[[Any, Any], Any], items: List[Any], names: List[str], cfg: Config, shared: Any,
             step: str, finished: Callable[[int, Any], None], failures: Dict[str, str], bar: Any) -> None:
    c = cfg.cluster
    with ray_session(cfg) as ray:
        remote = ray.remote(run_task)
        opts = {'num_cpus': c.cpus_per_task, 'num_gpus': task_gpus(cfg), 'max_retries': c.max_retries,
                'retry_exceptions': False}
        shared_ref = ray.put(shared)
        pending = {}
        for i, (item, name) in enumerate(zip(items, names)):
            ref = remote.options(name=f'{step} {name}', **opts).remote(fn, shared_ref, item, name, step, cfg)
            pending[ref] = i
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        failures[names[i]] = _why(e, cfg, step, names[i])
                        log.error('%s: %s failed: %s', step, names[i], failures[names[i]])
                        bar.update(1)
                        continue
                    finished(i, result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
