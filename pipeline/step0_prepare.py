"""Step 0: Non-IID domains, the base model, per-domain hyper-weights alpha, branch FLOPs and importance.

    python pipeline/step0_prepare.py [--num_domains 10] [--partition class-slices|dirichlet] [--checkpoint FILE]
                                     [--epochs 3] [--domains 0,3] [--force] [--retrain_base] [--executor ray]

Writes under <results_dir>: partition_info.json, base_model/<name>.pt (+ .json; only when no --checkpoint); for a
RepVGG also trained_hyper_weights.json, training_results.json, branch_flops.json, importance_scores.json,
importance_rankings.json, hyper_weights_heatmap.png and importance_heatmap.png.  Resumable: a domain
already trained with the same partition, base model and training settings is skipped unless --force.  Each
domain's alpha training is one task of pipeline/executor.py (in this process, or on a Ray cluster with --executor
ray), which also writes hyper_weights/domain_<d>.json; its log is <results_dir>/logs/step0/domain_<d>.log.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import List, Optional, Sequence  # noqa: E402

from artifacts import COMMON_FIELDS, ArtifactError, load_artifact, write_artifact  # noqa: E402
from config import (EXECUTOR_FLAGS, ConfigError, add_common_args, add_executor_args, command_line,  # noqa: E402
                    default_of, resolve_config, run_cli)

log = logging.getLogger('step0')
FLAG_KEYS = {'num_domains': 'data.num_domains', 'partition': 'data.partition',
             'dirichlet_alpha': 'data.dirichlet_alpha',
             'checkpoint': 'model.checkpoint', 'epochs': 'train.alpha_epochs', 'lr': 'train.alpha_lr',
             'base_epochs': 'train.base_epochs', 'base_train_samples': 'train.base_train_samples',
             'adapt_bn': 'model.adapt_bn', 'threads': 'train.threads', **EXECUTOR_FLAGS}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_common_args(p)
    d = {flag: default_of(key) for flag, key in FLAG_KEYS.items()}
    p.add_argument('--num_domains', help=f'number of Non-IID domains K, integer >= 1 (default: {d["num_domains"]})')
    p.add_argument('--partition', help=f'class-slices | dirichlet (default: {d["partition"]})')
    p.add_argument('--dirichlet_alpha', help='Dirichlet concentration for --partition dirichlet, > 0 (default: '
                   f'{d["dirichlet_alpha"]})')
    p.add_argument('--checkpoint', metavar='FILE', help='base checkpoint: a RepVGG in the official train-time layout, '
                   'a plain network (mobilenet_v2, resnet18, resnet50) as a torchvision state dict; '
                   f'given, no base model is trained (default: {d["checkpoint"] or "none, train or reuse our own"})')
    p.add_argument('--epochs', help=f'epochs of per-domain alpha training (default: {d["epochs"]})')
    p.add_argument('--lr', help=f'Adam learning rate of alpha training (default: {d["lr"]})')
    p.add_argument('--base_epochs', help=f'epochs of base-model training (default: {d["base_epochs"]})')
    p.add_argument('--base_train_samples', help='train samples the base model trains on, 0 = all; the rest of the '
                   f'train set joins the domain pool (default: {d["base_train_samples"]})')
    p.add_argument('--adapt_bn', action='store_const', const='true', help='adapt BN statistics per domain and save '
                   f'them with alpha (default: {"on" if d["adapt_bn"] else "off, BN frozen"})')
    p.add_argument('--threads', help='torch CPU threads, 0 = one per core (with --executor ray: '
                   f'cluster.cpus_per_task) (default: {d["threads"]})')
    p.add_argument('--domains', help='comma-separated domain ids to train (default: all)')
    p.add_argument('--force', action='store_true', help='retrain domains that are already done (default: off)')
    p.add_argument('--retrain_base', action='store_true', help='retrain our base model even if cached (default: off)')
    add_executor_args(p)
    return p.parse_args(argv)


def parse_domains(text: Optional[str], k: int) -> List[int]:
    if not text:
        return list(range(k))
    try:
        ids = sorted({int(t) for t in text.split(',') if t.strip()})
    except ValueError:
        raise ConfigError(f'--domains {text!r}: expected comma-separated integers') from None
    bad = [d for d in ids if not 0 <= d < k]
    if not ids or bad:
        raise ConfigError(f'--domains {text!r}: domain ids must lie in 0..{k - 1}')
    return ids


def _write_partition(cfg, partition: dict, cmd: str) -> None:
    """Write partition_info.json, unless an unchanged partition already has it (kept byte for byte)."""
    from data.domains import partition_json
    part_path = cfg.path('partition_info.json')
    try:
        old = load_artifact(part_path, 'partition_info')
        same = partition_json({k: v for k, v in old.items() if k not in COMMON_FIELDS}) == partition_json(partition)
    except ArtifactError:
        same = False
    if not same:
        write_artifact(part_path, 'partition_info', partition, cfg, cmd)


def _prepare_base(cfg, retrain: bool):
    """Train, reuse or load the base model and measure it on the clean test set: (model, base_info)."""
    import torch
    from data.datasets import dataset_stats
    from accuracy import training
    base = training.prepare_base(cfg, force=retrain)
    model, base_info = base['model'], base['info']
    _, test_loader = training.base_loaders(cfg, torch.Generator())
    mean, std = dataset_stats(cfg)
    base_info['test_acc_pct'] = training.evaluate_accuracy(model, test_loader, mean, std, cfg.device, 'base test')
    log.info('base model (%s): %.2f %% on the clean %s test set', base_info['source'], base_info['test_acc_pct'],
             cfg.data.dataset)
    return model, base_info


def _train_domains(cfg, args: argparse.Namespace, domains: List[int], partition: dict, model, base_info: dict,
                   cmd: str) -> dict:
    """Train alpha for every domain not yet done, merging each result into the two artifacts as it lands.

    Returns the trained hyper-weights of all done domains, keyed by domain id as a string."""
    from data.domains import partition_json
    from accuracy import training
    from pipeline import executor, tasks
    fingerprint = training.domain_fingerprint(cfg, partition_json(partition), model, Path(base_info['file']))
    hw_path, res_path = training.hyper_weights_path(cfg), cfg.path('training_results.json')
    done_hw = training.load_done_domains(hw_path, 'trained_hyper_weights', fingerprint)
    done_res = training.load_done_domains(res_path, 'training_results', fingerprint)
    common = {'fingerprint': fingerprint, 'arch': model.spec_dict(), 'base': base_info,
              'dataset': cfg.data.dataset, 'input_size_px': cfg.model.input_size}

    def merge(d: int, out: dict) -> None:
        done_hw[str(d)], done_res[str(d)] = out['hyper_weights'], out['results']
        r = out['results']
        log.info('domain %d (%s): val %.2f -> %.2f %%, test %.2f -> %.2f %% in %.1f s', d, r['corruption']['name'],
                 r['initial_val_acc_pct'], r['final_val_acc_pct'], r['initial_test_acc_pct'],
                 r['final_test_acc_pct'], r['time_s'])
        order = sorted(done_hw, key=int)  # in domain order, whatever order the tasks finish in
        write_artifact(hw_path, 'trained_hyper_weights', {**common, 'domains': {k: done_hw[k] for k in order}},
                       cfg, cmd)
        write_artifact(res_path, 'training_results', {**common, 'domains': {k: done_res[k] for k in order}}, cfg,
                       cmd)

    todo = []
    for d in domains:
        if str(d) in done_hw and str(d) in done_res and not args.force:
            log.info('domain %d: already trained, skipped (--force retrains it)', d)
            continue
        found = None if args.force else tasks.load_domain_training(cfg, d, fingerprint)
        if found is not None:  # a task that finished after its driver stopped
            log.info('domain %d: trained earlier (%s), merged', d, tasks.domain_training_path(cfg, d))
            merge(d, found)
        else:
            todo.append(d)

    job = tasks.TrainJob(cfg, partition, model, fingerprint, cmd)
    executor.map_tasks(tasks.train_domain_task, todo, cfg, shared=job, names=[f'domain {d}' for d in todo],
                       step='step0', desc='step 0 alpha training', on_result=merge)
    return done_hw


def _write_importance(cfg, model, done_hw: dict, cmd: str) -> None:
    """Branch FLOPs, importance scores and rankings of every trained domain, and the two heatmaps."""
    from accuracy import importance
    from viz import heatmaps
    flops = importance.branch_flops_table(model.plan, cfg.model.input_size)
    flops['fvcore_check'] = importance.fvcore_check(model, flops)
    write_artifact(cfg.path('branch_flops.json'), 'branch_flops', flops, cfg, cmd)
    trained = {int(d): done_hw[d] for d in sorted(done_hw, key=int)}
    scores = {d: importance.importance_scores(hw, flops) for d, hw in trained.items()}
    write_artifact(cfg.path('importance_scores.json'), 'importance_scores',
                   {'formula': importance.FORMULA, 'domains': {str(d): s for d, s in scores.items()}}, cfg, cmd)
    write_artifact(cfg.path('importance_rankings.json'), 'importance_rankings',
                   {'formula': importance.FORMULA, 'order': 'ascending (prune first = lowest importance first)',
                    'domains': {str(d): importance.rank_ascending(s) for d, s in scores.items()}}, cfg, cmd)
    heatmaps.write_heatmaps(cfg.path(), model, {d: hw['blocks'] for d, hw in trained.items()},
                               {d: importance.scores_by_block(s) for d, s in scores.items()},
                               f'{model.arch}, {cfg.data.dataset}, {cfg.model.input_size} px')


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='step0: %(message)s', stream=sys.stderr)
    args = parse_args(argv)
    cfg = resolve_config(args, FLAG_KEYS)
    import torch
    from data.domains import check_partition_config, make_partition
    from accuracy import training
    from pipeline import executor

    executor.check_cluster_config(cfg)
    check_partition_config(cfg)  # dataset, data root and partition settings: before anything is written
    if cfg.model.checkpoint:  # a missing, refused or wrong-shape checkpoint fails here, before anything is written
        training.load_base_model(cfg)
    domains = parse_domains(args.domains, cfg.data.num_domains)
    torch.set_num_threads(cfg.train.threads or executor.usable_cpus())
    cmd = command_line(argv)
    partition = make_partition(cfg)
    _write_partition(cfg, partition, cmd)
    model, base_info = _prepare_base(cfg, args.retrain_base)
    if getattr(model, 'plain', False):
        log.info('no alpha training for %s: a plain network has no branches to weight or prune (steps 1-2 choose '
                 'its split; step 3 reports that split)', model.arch)
        log.info('artifacts in %s', cfg.path())
        return 0
    done_hw = _train_domains(cfg, args, domains, partition, model, base_info, cmd)
    _write_importance(cfg, model, done_hw, cmd)
    log.info('artifacts in %s', cfg.path())
    return 0


if __name__ == '__main__':
    run_cli(main)
