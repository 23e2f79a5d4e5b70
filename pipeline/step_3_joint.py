"""Step 3: per-domain joint optimization of pruning (alpha), layouts (gamma) and split (lambda) as a goal program
(accuracy floor A_ref - eps first, then throughput, optional edge memory; roofline tie-breaker), closed by
progressive pruning rounds (prune, fine-tune alpha, measure, correct the surrogate, re-solve), plus a Pareto sweep
over eps on the corrected surrogate.  Branch pruning is RepVGG's: for a plain network (mobilenet_v2, resnet18/50) it
prints one line saying so, with step 2's split as the result, and exits 0.

    python pipeline/step_3_joint.py --domain_id 3 --mode pseudo
    python pipeline/step_3_joint.py --all_domains [--epsilon 1] [--solver both] [--link wifi]
    python pipeline/step_3_joint.py --all_domains --executor ray [--ray_address HEAD:6379]
    python pipeline/step_3_joint.py --all_domains --chain rpi4:wifi,jetson-orin-nano:ethernet,server

Writes <results_dir>/joint_optimization/domain_<d>_joint.json and domain_<d>_state.json (alpha, masks, gamma,
lambda: HyperRepVGG.load_hyper_weights reads it); rounds are checkpointed in domain_<d>_rounds/ and resumed.
A finished domain is skipped on rerun unless --force.  --mode real also deploys the result to the worker and
measures it on the domain's test split.  Each domain is one task of pipeline/executor.py in this process; with
--executor ray the tasks run on a Ray cluster: each domain's rounds, then each (domain, epsilon) point of the sweep,
then each domain's result from their checkpoints (logs in <results_dir>/logs/step3/).
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, Optional, Sequence  # noqa: E402

from artifacts import write_artifact  # noqa: E402
from config import (EXECUTOR_FLAGS, LINK_FLAGS, Config, ConfigError, add_common_args,  # noqa: E402
                    add_executor_args, add_link_args, command_line, resolve_config, resolve_path, run_cli)

FLAGS = {'epsilon': 'joint.epsilon', 'epsilon_sweep': 'joint.epsilon_sweep', 'solver': 'joint.solver',
         'sensitivity': 'joint.sensitivity', 'max_rounds': 'joint.max_rounds',
         'epochs_per_round': 'joint.epochs_per_round', 'edge_profile': 'lut.edge_profile', 'port': 'real.port',
         'chain': 'optim.chain',
         **LINK_FLAGS, **EXECUTOR_FLAGS}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    c = Config()
    j, lu = c.joint, c.lut
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--domain_id', type=int, help='one domain id (0-based)')
    which.add_argument('--domains', help='comma-separated domain ids, e.g. 0,3')
    which.add_argument('--all_domains', action='store_true', help='every domain of the partition')
    p.add_argument('--mode', choices=('pseudo', 'real'), default='pseudo',
                   help='pseudo: the closed loop measures the server part of each domain\'s chosen configuration, '
                   'its baselines and the loop.top_k best-predicted here (edge part from the LUT); real: deploys the '
                   'result to the worker (accuracy on the test split) and measures those configurations end to end '
                   'through the worker and the link (default: pseudo)')
    p.add_argument('--epsilon', help=f'allowed accuracy drop below A_ref, accuracy points (default: {j.epsilon})')
    p.add_argument('--epsilon_sweep', help='comma-separated epsilons (points) of the Pareto front, solved on the '
                   f'corrected surrogate (default: {",".join(map(str, j.epsilon_sweep))})')
    p.add_argument('--solver', help=f'gd | milp | both (default: {j.solver})')
    p.add_argument('--sensitivity', help=f'measured (one val evaluation per branch) | importance (|alpha|/GFLOPs, one '
                   f'calibration evaluation) (default: {j.sensitivity})')
    p.add_argument('--max_rounds', help=f'progressive pruning rounds at most (default: {j.max_rounds})')
    p.add_argument('--epochs_per_round', help=f'alpha fine-tuning epochs per round (default: {j.epochs_per_round})')
    add_link_args(p, reevaluate=True)
    p.add_argument('--edge_profile', help='edge device profile the LUT must have been modelled with; an error if '
                   "it was not (re-run step 1 then) (default: none asked, the LUT's own edge side is used; step 1 "
                   f'default {lu.edge_profile})')
    p.add_argument('--chain', help='also solve each domain\'s goal program over a chain of devices, e.g. '
                   'rpi4:wifi,jetson-orin-nano:ethernet,server (the syntax of step 2 --chain; a JSON file too): '
                   'pruning per branch, split vector and layout per block on its device, predicted, in the '
                   'artifact\'s "chain" field; a chain of two devices (edge:<link>,server) is the two-device '
                   'program under that link (default: none)')
    p.add_argument('--lut_file', help='hardware LUT (default: <results_dir>/hardware_lut_complete.json)')
    p.add_argument('--port', help=f'real mode: port the session listens on, on {c.real.host} (default: {c.real.port})')
    p.add_argument('--force', action='store_true', help='redo finished domains and rounds (default: off)')
    add_executor_args(p)
    add_common_args(p)
    return p.parse_args(argv)


def domain_ids(args: argparse.Namespace, k: int) -> list:
    from pipeline.step0_prepare import parse_domains
    if args.domain_id is not None:
        return parse_domains(str(args.domain_id), k)
    return parse_domains(None if args.all_domains else args.domains, k)


def summary_line(p: dict) -> str:
    plain = p['baselines']['unpruned']['best_plain_split']
    s = p['solvers'] or {}
    gap = (s.get('gap') or {}).get('objective_gap_pct')
    ci = p.get('accuracy_drop_ci95_pct') or [float('nan')] * 2
    return (f'domain {p["domain"]}: A_ref {p["a_ref_pct"]:.2f} % -> {p["final_accuracy_pct"]:.2f} % (test; drop '
            f'{p["accuracy_drop_pct"]:.2f} points, 95 % interval [{ci[0]:.2f}, {ci[1]:.2f}]), '
            f'lambda {p["lam"]}, {p["branches_pruned"]} branches pruned, {p["predicted"]["throughput_fps"]:.1f} fps '
            f'vs best plain split {plain["throughput_fps"]:.1f} fps (lambda {plain["lam"]}): '
            f'x{p["predicted"]["throughput_fps"] / plain["throughput_fps"]:.3f}; GD-MILP gap '
            f'{"n/a" if gap is None else f"{gap:.2f} %"}; {len(p["rounds"])} rounds ({p["stop_reason"]}); '
            f'{p["timing"]["wall_s"]:.1f} s (predicted throughputs; measured: the closed-loop lines)')


def fan_out(job: Any, domains: Sequence[int], cfg: Config, on_result: Any) -> None:
    """Step 3's tasks.  Local executor: one task per domain.  Ray: the domains' rounds, then one task per domain for
    its epsilon sweep (the points in order: each is solved after the earlier ones were measured), then each domain's
    result assembled from the checkpoints; a domain whose task failed is left out of the later stages and every failure is reported at the
    end (tasks.py; the results equal the local executor's, as every stage resumes the same checkpoints)."""
    import dataclasses

    from pipeline import executor, tasks
    names = [f'domain {d}' for d in domains]
    if cfg.cluster.executor == 'local' or not cfg.joint.epsilon_sweep:
        executor.map_tasks(tasks.joint_domain_task, domains, cfg, shared=job, names=names, step='step3',
                           desc='step 3 domains', on_result=on_result)
        return
    failed: Dict[str, str] = {}

    def stage(fn: Any, items: list, item_names: list, desc: str, shared: Any, done: Any) -> None:
        try:
            executor.map_tasks(fn, items, cfg, shared=shared, names=item_names, step='step3', desc=desc,
                               on_result=done)
        except executor.TasksFailed as e:
            failed.update(e.failures)

    todo: Dict[int, list] = {}
    stage(tasks.joint_rounds_task, list(domains), names, 'step 3 rounds', job,
          lambda d, out: todo.__setitem__(d, out['pareto_todo']))
    again = dataclasses.replace(job, force=False)  # --force redid the rounds; the later stages resume them
    sweeps = [d for d in domains if todo.get(d)]
    finished: set = set()
    stage(tasks.joint_pareto_task, sweeps, [f'domain {d} epsilon sweep' for d in sweeps], 'step 3 epsilon sweeps',
          again, lambda d, out: finished.add(d))
    ready = [d for d in domains if d in todo and (not todo[d] or d in finished)]
    stage(tasks.joint_domain_task, ready, [f'domain {d}' for d in ready], 'step 3 domains', again, on_result)
    if failed:
        raise executor.TasksFailed('step3', failed, len(domains) + len(sweeps))


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='step3: %(message)s', stream=sys.stderr)
    args = parse_args(argv)
    cfg = resolve_config(args, FLAGS)
    from pipeline import joint
    plain = joint.plain_split_only(cfg)
    if plain is not None:  # MobileNetV2 / ResNet: no branches to prune
        print(plain, flush=True)
        return 0
    import torch

    from pipeline import closed_loop as CL
    from pipeline import executor, tasks
    executor.check_cluster_config(cfg)
    if args.mode == 'real' and cfg.cluster.executor != 'local':
        raise ConfigError('--mode real with --executor ray: the real-mode worker session is held by this process, '
                          'so real mode runs its domains here, one after another; use --executor local')
    torch.set_num_threads(cfg.joint.threads or executor.usable_cpus())
    lut_file = resolve_path(args.lut_file) if args.lut_file else cfg.path('hardware_lut_complete.json')
    inp = joint.prepare_inputs(cfg, lut_file, edge_profile_explicit=args.edge_profile is not None,
                               link_flag_given=args.link is not None)
    domains = domain_ids(args, inp.partition['num_domains'])
    cmd = command_line(argv)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        real_run, session, worker = None, None, None
        if args.mode == 'real':
            session, worker = CL.open_session(cfg, stack, inp.lut, lut_file, 'step 3')
            logging.getLogger('step3').info('worker connected: %s', worker)
            real_run = joint.real_runner(session, cfg, inp.mean, inp.std, CL.edge_threads(inp.lut) or 0)
        job = tasks.JointJob(inp, cmd, force=args.force, real_run=real_run)
        outs: Dict[int, Dict[str, Any]] = {}
        fan_out(job, domains, cfg, lambda d, out: outs.__setitem__(d, out))
        for d in domains:  # the closed loop measures here, after the tasks, so no task's load distorts it
            out = outs[d]
            payload = CL.domain_closed_loop(inp, out, args.mode, session, worker)  # None: nothing new to write
            if payload is not None and joint.adopt_measured(inp, out['payload']):  # a faster one, confirmed
                payload = {k: v for k, v in out['payload'].items() if k not in CL.ARTIFACT_FIELDS}
            if payload is not None:
                write_artifact(joint.joint_path(cfg.path(), d), 'joint_domain', payload, cfg, cmd)
            print(summary_line(out['payload']), flush=True)
            if 'chain' in out['payload']:
                from pipeline.chain import goal_text
                print(goal_text(d, out['payload']['chain']), flush=True)
            for line in CL.closed_loop_lines(out['payload']['closed_loop'], table=False):
                print(f'domain {d}: {line}', flush=True)
    print(f'step 3 done for {len(domains)} domain(s) in {time.time() - t0:.1f} s -> {cfg.path(joint.JOINT_DIR)}')
    return 0


if __name__ == '__main__':
    run_cli(main)
