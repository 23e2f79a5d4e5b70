"""Training and evaluation: the base RepVGG, per-domain hyper-weights alpha, and loading trained models.

Loaders deliver uint8 images (B, 3, S, S); `data.datasets.normalize_batch` turns them into model input.
No prints: progress goes to tqdm bars on stderr (hidden when stderr is not a terminal), results are returned.
"""
from __future__ import annotations

import copy
import hashlib
import io
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from artifacts import file_sha256, fingerprint
from config import Config, UserError, one_line, resolve_path
from hyper_repvgg import HyperRepVGG, RepVGG, build_hyper_repvgg
from nets import canonical_name, is_plain

HYPER_WEIGHTS_FILE = 'trained_hyper_weights.json'
BASE_DIR = 'base_model'


class CheckpointError(UserError, ValueError):
    """A checkpoint or hyper-weight file that is missing or does not fit the model; names the file."""


def _stats(loader: Any, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    if mean is not None and std is not None:
        return mean, std
    ds = getattr(loader, 'dataset', None)
    if getattr(ds, 'mean', None) is None:
        raise ValueError('normalization mean/std not given and the loader\'s dataset has no .mean/.std')
    return ds.mean, ds.std


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: str) -> torch.Tensor:
    from data.datasets import normalize_batch
    return normalize_batch(x.to(device, non_blocking=True), mean, std)


def evaluate_accuracy(model: nn.Module, loader: Any, mean: Sequence[float], std: Sequence[float],
                      device: str = 'cpu', desc: str = 'eval') -> float:
    """Top-1 accuracy in percent of `model` on `loader` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for x, y in tqdm(loader, desc=desc, leave=False, disable=None):
            logits = model(_normalize(x, mean, std, device))
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += int(y.numel())
    model.train(was_training)
    if total == 0:
        raise ValueError('evaluate_accuracy: the loader is empty')
    return 100.0 * correct / total


def _lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, t)))


CONTRAST_JITTER = (0.6, 1.4)  # base training: per-image contrast factor range (around the image mean)
BRIGHTNESS_JITTER = (-0.2, 0.2)  # base training: per-image brightness offset range, on [0, 1] pixel values


def photometric_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 batch -> uint8 batch with a random contrast factor and brightness offset per image (base training
    augmentation, so that the base model is not helpless on a shifted histogram; domains go beyond these ranges)."""
    n = x.shape[0]
    c = torch.empty(n, 1, 1, 1).uniform_(*CONTRAST_JITTER, generator=generator)
    b = torch.empty(n, 1, 1, 1).uniform_(*BRIGHTNESS_JITTER, generator=generator)
    f = x.float() / 255.0
    m = f.mean(dim=(1, 2, 3), keepdim=True)
    return (((f - m) * c + m + b).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def train_base(model: RepVGG, train_loader: Any, epochs: int, lr: float, device: str,
               generator: torch.Generator, mean: Sequence[float], std: Sequence[float],
               weight_decay: float = 1e-4, label_smoothing: float = 0.1) -> Dict[str, Any]:
    """Train a plain RepVGG from scratch: SGD (momentum 0.9, Nesterov), linear warm-up then cosine decay per
    step, label smoothing, photometric jitter and random horizontal flips drawn from `generator`.  Returns the history (per-epoch loss/accuracy)."""
    model.to(device).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    total = max(1, epochs * len(train_loader))
    warmup = max(1, total // 20)
    step = 0
    history: List[Dict[str, float]] = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f'base epoch {epoch + 1}/{epochs}', leave=False, disable=None)
        for x, y in bar:
            for g in opt.param_groups:
                g['lr'] = _lr_at(step, total, lr, warmup)
            x = _normalize(photometric_jitter(x, generator), mean, std, device)
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip.to(device).reshape(-1, 1, 1, 1), x.flip(-1), x)
            y = y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            seen += int(y.numel())
            bar.set_postfix(loss=f'{loss_sum / seen:.3f}', acc=f'{100.0 * correct / seen:.1f}')
        history.append({'epoch': epoch + 1, 'train_loss': loss_sum / max(1, seen),
                        'train_acc_pct': 100.0 * correct / max(1, seen),
                        'time_s': time.perf_counter() - t0})
    model.eval()
    return {'epochs': history}


def _domain_state(model: HyperRepVGG) -> Dict[str, torch.Tensor]:
    """What train_alpha changes: every alpha, plus BN statistics when the model adapts them."""
    keep = {}
    for k, v in model.state_dict().items():
        leaf = k.rsplit('.', 1)[-1]
        if leaf == 'alpha' or (model.adapt_bn and leaf in ('running_mean', 'running_var', 'num_batches_tracked')):
            keep[k] = v.detach().clone()
    return keep


def train_alpha(model: HyperRepVGG, train_loader: Any, val_loader: Any, epochs: int, lr: float, device: str,
                generator: Optional[torch.Generator] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, desc: str = 'alpha') -> Dict[str, Any]:
    """Train only the hyper-weights alpha of the kept branches (Adam, `epochs` passes over `train_loader`).

    Base weights stay frozen; BN statistics too unless the model was built with adapt_bn.  After each epoch
    the validation accuracy is measured; the model ends with the best state seen, the initial one included,
    so validation accuracy never drops.  `generator` is accepted for interface symmetry with the solvers
    (the loader's own generator drives shuffling; this loop draws no random numbers).
    Returns {'initial_val_acc_pct', 'best_val_acc_pct', 'best_epoch', 'epochs': [...]}.
    """
    mean, std = _stats(train_loader, mean, std)
    model.to(device)
    params = [p for p in model.alpha_parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    initial = evaluate_accuracy(model, val_loader, mean, std, device, desc=f'{desc} val')
    best_acc, best_epoch, best_state = initial, 0, _domain_state(model)
    history: List[Dict[str, float]] = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in tqdm(train_loader, desc=f'{desc} epoch {epoch + 1}/{epochs}', leave=False, disable=None):
            y = y.to(device)
            logits = model(_normalize(x, mean, std, device))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            seen += int(y.numel())
        model.eval()
        val = evaluate_accuracy(model, val_loader, mean, std, device, desc=f'{desc} val')
        history.append({'epoch': epoch + 1, 'train_loss': loss_sum / max(1, seen),
                        'train_acc_pct': 100.0 * correct / max(1, seen), 'val_acc_pct': val,
                        'time_s': time.perf_counter() - t0})
        if val > best_acc:
            best_acc, best_epoch, best_state = val, epoch + 1, _domain_state(model)
    merged = model.state_dict()
    merged.update(best_state)
    model.load_state_dict(merged, strict=True)
    model.eval()
    return {'initial_val_acc_pct': initial, 'best_val_acc_pct': best_acc, 'best_epoch': best_epoch,
            'epochs': history}


def fine_tune_alpha(model: HyperRepVGG, train_loader: Any, val_loader: Any, epochs: int, lr: float, device: str,
                    generator: Optional[torch.Generator] = None, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None, desc: str = 'fine-tune') -> Dict[str, Any]:
    """Progressive pruning's fine-tuning: train_alpha on the branches the model still keeps (pruned branches
    take no part in the forward pass, so their alpha receives no gradient and is left unchanged)."""
    return train_alpha(model, train_loader, val_loader, epochs, lr, device, generator, mean, std, desc)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def base_config_key(cfg: Config) -> Dict[str, Any]:
    """Everything that determines our trained base model."""
    from data.datasets import num_classes_for
    return {'arch': cfg.model.name, 'width_multiplier': cfg.model.width_multiplier,
            'small_input': cfg.model.small_input, 'input_size': cfg.model.input_size,
            'dataset': cfg.data.dataset, 'num_classes': num_classes_for(cfg.data.dataset, cfg),
            'base_epochs': cfg.train.base_epochs, 'base_lr': cfg.train.base_lr,
            'base_train_samples': cfg.train.base_train_samples, 'batch_size': cfg.train.batch_size,
            'seed': cfg.seed, **({'base_split_seed': cfg.train.base_split_seed} if cfg.train.base_split_seed else {})}


def base_checkpoint_path(cfg: Config) -> Path:
    """Where our trained base model for this configuration lives (a different config, a different file)."""
    key = base_config_key(cfg)
    digest = fingerprint(key)[:10]
    name = f'{key["arch"]}_{key["dataset"]}_{key["input_size"]}px_{digest}.pt'
    return cfg.path(BASE_DIR, name)


def save_state_dict(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """torch.save of plain tensors, written atomically."""
    from artifacts import atomic_write_bytes
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def _torch_reason(text: str) -> str:
    """The informative part of a torch load error, one line: the unpickler's complaint, or the first mismatch of
    a state dict (torch's own messages span many lines and advise weights_only=False, which we never do)."""
    m = re.search(r'WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)', text, re.S)
    if m:
        return one_line(m.group(1), 200)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith('Error(s) in loading state_dict'):
        more = f' (+{len(lines) - 2} more)' if len(lines) > 2 else ''
        return one_line(lines[1] if len(lines) > 1 else lines[0], 300) + more
    return one_line(text, 300)


def load_state_dict_file(path: Path, what: str) -> Dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a local file; a missing or unreadable file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{what}: file {path} does not exist')
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on several lines
            warnings.simplefilter('ignore')
            obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        text = str(e)
        if 'WeightsUnpickler' in text or 'weights_only' in text.lower():
            raise CheckpointError(f'{what}: {path} refused: it holds Python objects, not only tensors '
                                  f'({_torch_reason(text)}); only plain tensor state dicts are loaded') from None
        raise CheckpointError(f'{what}: cannot load {path} as a tensor state dict ({_torch_reason(text)})') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{what}: {path} holds a {type(obj).__name__}, expected a state dict')
    return obj


def build_model(cfg: Config, hyper: bool = True) -> RepVGG:
    """An untrained model of cfg's architecture and dataset class count."""
    from data.datasets import num_classes_for
    from hyper_repvgg import build_repvgg
    ncls = num_classes_for(cfg.data.dataset, cfg)
    if is_plain(cfg.model.name):  # a plain network (chain_nets): torchvision's own modules, random weights
        from data._torchvision import torchvision_chain_net
        return torchvision_chain_net({'name': canonical_name(cfg.model.name), 'num_classes': ncls,
                                      'width_multiplier': cfg.model.width_multiplier, 'small_input': False})
    if hyper:
        return build_hyper_repvgg(cfg.model.name, None, ncls, cfg.model.width_multiplier, cfg.model.small_input,
                                  cfg.model.adapt_bn)
    return build_repvgg(cfg.model.name, ncls, cfg.model.width_multiplier, cfg.model.small_input)


def load_base_model(cfg: Config) -> HyperRepVGG:
    """HyperRepVGG with the base weights of cfg.model.checkpoint (official train-time layout) if set, else of
    our trained checkpoint (base_checkpoint_path); alpha = 1, all branches kept."""
    if cfg.model.checkpoint:
        path, what = resolve_path(cfg.model.checkpoint), '--checkpoint / model.checkpoint'
    else:
        path, what = base_checkpoint_path(cfg), 'base model (run step 0 to train it)'
    state = load_state_dict_file(path, what)
    model = build_model(cfg, hyper=True)
    try:
        model.load_base_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f'{what}: {path} does not fit {cfg.model.name} with width {cfg.model.width_multiplier}'
                              f' and {model.num_classes} classes: '
                              f'{_torch_reason(e.args[0] if isinstance(e, KeyError) and e.args else str(e))}') from None
    return model.eval()


def hyper_weights_path(cfg: Config) -> Path:
    return cfg.path(HYPER_WEIGHTS_FILE)


def load_domain_model(cfg: Config, d: int) -> HyperRepVGG:
    """The base model with domain d's trained hyper-weights (and BN statistics, when they were adapted)."""
    from artifacts import load_artifact
    path = hyper_weights_path(cfg)
    obj = load_artifact(path, kind='trained_hyper_weights', fields={'domains': dict})
    entry = obj['domains'].get(str(d))
    if entry is None:
        raise CheckpointError(f'{path}: field "domains" has no domain {d!r} (has {sorted(obj["domains"], key=int)}); '
                              'run step 0 for it')
    model = load_base_model(cfg)
    try:
        model.load_hyper_weights(entry)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{path}: domains.{d}: {e}') from None
    bn_file = entry.get('bn_state_file')
    if bn_file:
        bn = load_state_dict_file(cfg.path(bn_file), f'{path}: domains.{d}.bn_state_file')
        merged = model.state_dict()
        unknown = set(bn) - set(merged)
        if unknown:
            raise CheckpointError(f'{cfg.path(bn_file)}: keys {sorted(unknown)[:3]} are not in the model')
        merged.update(bn)
        model.load_state_dict(merged, strict=True)
    return model.eval()


def bn_state(model: HyperRepVGG) -> Dict[str, torch.Tensor]:
    """The BatchNorm statistics of a model (saved with alpha when BN was adapted)."""
    return {k: v for k, v in model.state_dict().items()
            if k.rsplit('.', 1)[-1] in ('running_mean', 'running_var', 'num_batches_tracked')}


def copy_model(model: HyperRepVGG) -> HyperRepVGG:
    return copy.deepcopy(model)


# ----------------------------------------------------------------------------------------------------------
# Step 0 building blocks: the base model and one domain's hyper-weights
# ----------------------------------------------------------------------------------------------------------

def seeded_generator(*keys: int) -> torch.Generator:
    """A torch.Generator seeded from integers (e.g. (seed, domain)), independent of other streams."""
    import numpy as np
    state = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state & 0x7FFF_FFFF_FFFF_FFFF)


def base_loaders(cfg: Config, generator: torch.Generator):
    """(train loader over the base-training subset, test loader over the whole test source), clean images."""
    from data.datasets import SampleDataset, load_sources
    from data.domains import base_train_ids
    sources = load_sources(cfg)
    train_src, test_src = sources.get('train'), sources['test']
    test = SampleDataset(test_src, range(len(test_src)), cfg.model.input_size, cache=len(test_src) <= 20000)
    test_loader = torch.utils.data.DataLoader(test, batch_size=cfg.train.eval_batch_size, shuffle=False)
    if train_src is None:
        return None, test_loader
    ids = base_train_ids(len(train_src), cfg.train.base_train_samples, cfg.train.base_split_seed)
    train = SampleDataset(train_src, ids, cfg.model.input_size, cache=len(ids) <= 100000)
    train_loader = torch.utils.data.DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True,
                                               generator=generator, drop_last=len(ids) > cfg.train.batch_size,
                                               num_workers=cfg.data.num_workers)
    return train_loader, test_loader


def prepare_base(cfg: Config, force: bool = False) -> Dict[str, Any]:
    """Get the base model: cfg.model.checkpoint if given (nothing is trained), else our cached checkpoint,
    else train one on the dataset's train source and save it (state dict + a 'base_model' JSON artifact).

    Returns {'model': HyperRepVGG, 'info': JSON-able facts (source, file, trained, history, time_s)}.
    `force` retrains our own base model even when it is cached.
    """
    from artifacts import load_artifact, write_artifact
    from config import command_line
    from data.datasets import dataset_stats
    if cfg.model.checkpoint:
        model = load_base_model(cfg)
        return {'model': model, 'info': {'source': 'checkpoint', 'file': str(resolve_path(cfg.model.checkpoint)),
                                         'trained_here': False}}
    path = base_checkpoint_path(cfg)
    meta_path = path.with_suffix('.json')
    if path.is_file() and meta_path.is_file() and not force:
        meta = load_artifact(meta_path, kind='base_model', fields={'history': dict, 'train_time_s': float})
        info = {'source': 'cached', 'file': str(path), 'trained_here': False, 'history': meta['history'],
                'train_time_s': meta['train_time_s'], 'train_samples': meta.get('train_samples')}
        return {'model': load_base_model(cfg), 'info': info}
    mean, std = dataset_stats(cfg)
    generator = seeded_generator(cfg.seed, 7)
    torch.manual_seed(cfg.seed)  # weight initialisation
    train_loader, _ = base_loaders(cfg, generator)
    if train_loader is None:
        raise UserError(f'dataset {cfg.data.dataset} at {cfg.data.data_root} has no train split to train a base '
                        'model on; give a trained one with --checkpoint FILE')
    plain = build_model(cfg, hyper=False)
    t0 = time.perf_counter()
    history = train_base(plain, train_loader, cfg.train.base_epochs, cfg.train.base_lr, cfg.device, generator,
                         mean, std)
    elapsed = time.perf_counter() - t0
    save_state_dict(plain.state_dict(), path)
    write_artifact(meta_path, 'base_model', {
        'checkpoint_file': path.name, 'arch': plain.spec_dict(), 'key': base_config_key(cfg), 'history': history,
        'train_time_s': elapsed, 'train_samples': len(train_loader.dataset)}, cfg, command_line())
    info = {'source': 'trained', 'file': str(path), 'trained_here': True, 'history': history,
            'train_time_s': elapsed, 'train_samples': len(train_loader.dataset)}
    return {'model': load_base_model(cfg), 'info': info}


def domain_fingerprint(cfg: Config, partition_text: str, model: HyperRepVGG, checkpoint: Path) -> str:
    """What a domain's trained alpha depends on (partition, base weights, architecture, alpha settings)."""
    key = {'partition': hashlib.sha256(partition_text.encode()).hexdigest(),
           'base': file_sha256(checkpoint), 'arch': model.spec_dict(),
           'alpha': [cfg.train.alpha_epochs, cfg.train.alpha_lr, cfg.train.batch_size, cfg.model.adapt_bn, cfg.seed]}
    return fingerprint(key)


def load_done_domains(path: Path, kind: str, fingerprint: str) -> Dict[str, Any]:
    """The 'domains' of an earlier step-0 artifact with the same fingerprint ({} when absent, invalid or stale)."""
    import logging
    from artifacts import ArtifactError, load_artifact, pct_names
    try:
        obj = load_artifact(path, kind=kind, fields={'domains': dict, 'fingerprint': str}, upgrade=pct_names)
    except ArtifactError as e:
        if Path(path).exists():
            logging.getLogger(__name__).info('ignoring %s (%s); its domains are retrained', path, e)
        return {}
    if obj['fingerprint'] != fingerprint:
        logging.getLogger(__name__).info('%s comes from another partition, base model or training setting; its '
                                         'domains are retrained', path)
        return {}
    return obj['domains']


def train_domain(cfg: Config, partition: Dict[str, Any], base: HyperRepVGG, d: int) -> Dict[str, Any]:
    """Train domain d's alpha on its train split (selected on val); measure val and test accuracy before and
    after.  Returns {'hyper_weights': model.hyper_weights(), 'results': ..., 'bn_state': dict or None}."""
    from data.datasets import dataset_stats
    from data.domains import domain_loader
    mean, std = dataset_stats(cfg)
    model = copy.deepcopy(base)
    gen = seeded_generator(cfg.seed, 1000 + d)
    bs, ebs = cfg.train.batch_size, cfg.train.eval_batch_size
    train = domain_loader(cfg, partition, d, 'train', bs, True, gen)
    val = domain_loader(cfg, partition, d, 'val', ebs, False)
    test = domain_loader(cfg, partition, d, 'test', ebs, False)
    t0 = time.perf_counter()
    test_before = evaluate_accuracy(model, test, mean, std, cfg.device, desc=f'domain {d} test')
    hist = train_alpha(model, train, val, cfg.train.alpha_epochs, cfg.train.alpha_lr, cfg.device, gen, mean, std,
                       desc=f'domain {d} alpha')
    test_after = evaluate_accuracy(model, test, mean, std, cfg.device, desc=f'domain {d} test')
    results = {'initial_val_acc_pct': hist['initial_val_acc_pct'],
               'final_val_acc_pct': hist['best_val_acc_pct'],
               'initial_test_acc_pct': test_before, 'final_test_acc_pct': test_after,
               'best_epoch': hist['best_epoch'], 'history': hist['epochs'],
               'num_samples': {s: len(partition['domains'][d]['indices'][s]) for s in ('train', 'val', 'test')},
               'corruption': partition['domains'][d]['corruption'], 'classes': partition['domains'][d]['classes'],
               'time_s': time.perf_counter() - t0}
    return {'hyper_weights': model.hyper_weights(), 'results': results,
            'bn_state': bn_state(model) if model.adapt_bn else None}
