"""Non-IID domains: which samples and classes each domain holds, its corruption, and its splits.

Sample ids.  A dataset has a 'train' source of n_train samples (possibly none) and a 'test' source.
Global sample id g < n_train is train[g]; g >= n_train is test[g - n_train].

Pool.  Domains are drawn from the samples the base model does not train on: every test sample plus the
train samples outside the base-training subset.  The base-training subset (`base_train_ids`) is the whole
train source when train.base_train_samples is 0, otherwise the first base_train_samples ids of a permutation of
the train ids seeded by train.base_split_seed (not by --seed: a base model trained once serves every domain seed,
and the domains never hold its training images).  The same subset is excluded whether or not a base checkpoint
is given.

Partition rules (K = data.num_domains, C = classes):
  class-slices  domain d covers the contiguous (cyclic) window of classes
                  start_d = floor(d * C / K),  width w = max(ceil(C / K), min(C, data.min_classes_per_domain)),
                  classes_d = {(start_d + j) mod C : j < w}.
                With C = 100, K = 10 this is the plain slice 10d .. 10d+9; with C = K = 10 each domain holds
                3 consecutive classes (d, d+1, d+2 mod 10).  A class's pool samples are shuffled (seeded) and
                divided into equal contiguous shares among the domains whose window covers it.
  dirichlet     for every class, domain shares p ~ Dirichlet(data.dirichlet_alpha * 1_K) split the shuffled
                class samples; redrawn (at most 100 times) until every domain holds >= MIN_DOMAIN_SAMPLES.
A domain above data.samples_per_domain (> 0) is cut to that size, keeping its class proportions.
Each domain's samples are then split per class into test (round(n_c * test_fraction)), val
(round(n_c * val_fraction)) and train (the rest): disjoint and stratified.

Corruptions.  Domain d gets DOMAIN_CORRUPTIONS[d mod 10] at severity data.corruption_severity (1..3),
applied to the image after it is resized to model.input_size, with values in [0, 1]:

  name            parameter (severity 1 / 2 / 3)           effect
  gaussian_noise  sigma 0.04 / 0.08 / 0.12                  x + N(0, sigma^2)
  salt_pepper     amount 0.01 / 0.03 / 0.05                 that share of pixels set to 0 or 1
  gaussian_blur   sigma 0.5 / 0.8 / 1.2 (x size/32 px)      Gaussian filter
  contrast        factor 0.6 / 0.4 / 0.25                   (x - mean) * factor + mean
  jpeg            quality 40 / 20 / 10                      JPEG round trip (PIL)
  brightness      delta 0.15 / 0.30 / 0.45                  x + delta
  pixelate        scale 0.6 / 0.45 / 0.3                    box-downscale by scale, nearest-upscale back
  shot_noise      photons 120 / 60 / 30                     Poisson(x * photons) / photons
  occlusion       side 0.2 / 0.3 / 0.4 (of the image)       one random grey square
  gamma           exponent 1.5 / 2.0 / 2.5                  x ** exponent (darker mid-tones)

Random corruptions draw from numpy.random.default_rng([seed, g]) with g the global sample id, so a sample
looks the same in every run and every step (an evaluation repeats exactly).  Results are clipped to [0, 1]
and quantized to uint8 once.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from config import Config, UserError
from data.datasets import (SampleDataset, _load_sources, check_dataset, data_root, dataset_stats, load_sources,
                           num_classes_for, to_uint8)

PARTITION_RULE_VERSION = 1
MIN_DOMAIN_SAMPLES = 10  # dirichlet: fewest samples a domain may hold
DIRICHLET_TRIES = 100
PARTITIONS = ('class-slices', 'dirichlet')
SPLITS = ('train', 'val', 'test')


class PartitionError(UserError, ValueError):
    """A partition that cannot be made or a partition_info.json that does not fit; names the field/flag."""


# ----------------------------------------------------------------------------------------------------------
# Corruptions: pure functions of (image (C, H, W) float in [0, 1], parameter, rng) -> image
# ----------------------------------------------------------------------------------------------------------

def _gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, sigma, size=x.shape)


def _salt_pepper(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(size=x.shape[1:])
    out = x.copy()
    out[:, u < amount / 2] = 0.0
    out[:, u > 1 - amount / 2] = 1.0
    return out


def _gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    s = sigma * x.shape[-1] / 32.0
    return ndimage.gaussian_filter(x, sigma=(0, s, s), mode='reflect')


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * factor + mean


def _jpeg(x: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image
    u8 = to_uint8(x)
    img = Image.fromarray(u8[0]) if u8.shape[0] == 1 else Image.fromarray(u8.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as back:
        arr = np.asarray(back, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr.astype(np.float32) / 255.0


def _brightness(x: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    return x + delta


def _pixelate(x: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(0)
    size = x.shape[-1]
    small = max(1, int(round(size * scale)))
    down = torch.nn.functional.interpolate(t, size=(small, small), mode='area')
    return torch.nn.functional.interpolate(down, size=x.shape[-2:], mode='nearest')[0].numpy()


def _shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(np.clip(x, 0, 1) * photons) / photons


def _occlusion(x: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[1:]
    sh, sw = max(1, int(round(h * side))), max(1, int(round(w * side)))
    top, left = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
    out = x.copy()
    out[:, top:top + sh, left:left + sw] = 0.5
    return out


def _gamma(x: np.ndarray, exponent: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x, 0, 1) ** exponent


# name -> (function, (severity 1, 2, 3 parameter), parameter name)
CORRUPTIONS: Dict[str, Tuple[Callable[[np.ndarray, float, np.random.Generator], np.ndarray],
                             Tuple[float, float, float], str]] = {
    'gaussian_noise': (_gaussian_noise, (0.04, 0.08, 0.12), 'sigma'),
    'salt_pepper': (_salt_pepper, (0.01, 0.03, 0.05), 'amount'),
    'gaussian_blur': (_gaussian_blur, (0.5, 0.8, 1.2), 'sigma_per_32px'),
    'contrast': (_contrast, (0.6, 0.4, 0.25), 'factor'),
    'jpeg': (_jpeg, (40, 20, 10), 'quality'),
    'brightness': (_brightness, (0.15, 0.30, 0.45), 'delta'),
    'pixelate': (_pixelate, (0.6, 0.45, 0.3), 'scale'),
    'shot_noise': (_shot_noise, (120, 60, 30), 'photons'),
    'occlusion': (_occlusion, (0.2, 0.3, 0.4), 'side'),
    'gamma': (_gamma, (1.5, 2.0, 2.5), 'exponent'),
}
DOMAIN_CORRUPTIONS = tuple(CORRUPTIONS)  # domain d -> DOMAIN_CORRUPTIONS[d % 10]


def corruption_for(d: int, severity: int) -> Dict[str, Any]:
    """The corruption record of domain d: {'name', 'severity', 'parameter', 'value'}."""
    if severity not in (1, 2, 3):
        raise PartitionError(f'data.corruption_severity: expected 1, 2 or 3, got {severity}')
    name = DOMAIN_CORRUPTIONS[d % len(DOMAIN_CORRUPTIONS)]
    _, values, pname = CORRUPTIONS[name]
    return {'name': name, 'severity': int(severity), 'parameter': pname, 'value': float(values[severity - 1])}


def corrupt(x: np.ndarray, name: str, value: float, seed: int, sample_id: int) -> np.ndarray:
    """Apply corruption `name` with parameter `value` to x (C, H, W) in [0, 1]; deterministic per (seed, id)."""
    if name not in CORRUPTIONS:
        raise PartitionError(f'unknown corruption {name!r}; valid: {", ".join(CORRUPTIONS)}')
    rng = np.random.default_rng([int(seed), int(sample_id)])
    out = CORRUPTIONS[name][0](np.asarray(x, dtype=np.float32), value, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Partition (pure given the labels)
# ----------------------------------------------------------------------------------------------------------

def base_train_ids(n_train: int, cap: int, seed: int) -> np.ndarray:
    """Sorted train ids the base model trains on: all (cap 0 or >= n_train) or a seeded subset of `cap`."""
    if cap <= 0 or cap >= n_train:
        return np.arange(n_train, dtype=np.int64)
    perm = np.random.default_rng([int(seed), 1]).permutation(n_train)
    return np.sort(perm[:cap]).astype(np.int64)


def class_slice_classes(d: int, num_classes: int, num_domains: int, min_classes: int) -> List[int]:
    """Classes of domain d under the class-slices rule (module docstring)."""
    width = max(math.ceil(num_classes / num_domains), min(num_classes, max(1, min_classes)))
    start = (d * num_classes) // num_domains
    return sorted({(start + j) % num_classes for j in range(width)})


def _stratified_take(ids: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """n of `ids` (already in seeded random order) keeping class proportions (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(ids)
    take = np.floor(quota).astype(int)
    rest = n - take.sum()
    order = np.argsort(-(quota - take), kind='stable')
    take[order[:rest]] += 1
    keep = [ids[labels == c][:t] for c, t in zip(classes, take)]
    return np.concatenate(keep) if keep else ids[:0]


def _split(ids: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float
           ) -> Dict[str, np.ndarray]:
    out: Dict[str, List[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        members = ids[labels == c]  # seeded random order
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        out['test'].append(members[:n_test])
        out['val'].append(members[n_test:n_test + n_val])
        out['train'].append(members[n_test + n_val:])
    return {s: np.sort(np.concatenate(v)) if v else ids[:0] for s, v in out.items()}


def partition_pool(pool_ids: np.ndarray, pool_labels: np.ndarray, num_classes: int, num_domains: int,
                   partition: str, dirichlet_alpha: float, min_classes: int, samples_per_domain: int,
                   val_fraction: float, test_fraction: float, seed: int) -> List[Dict[str, Any]]:
    """Assign pool samples to domains and split them; returns per-domain {'classes', 'splits'} (sorted ids)."""
    rng = np.random.default_rng([int(seed), 2])
    order = rng.permutation(len(pool_ids))
    ids, labels = pool_ids[order], pool_labels[order]
    members: List[List[np.ndarray]] = [[] for _ in range(num_domains)]
    if partition == 'class-slices':
        windows = [class_slice_classes(d, num_classes, num_domains, min_classes) for d in range(num_domains)]
        for c in range(num_classes):
            owners = [d for d in range(num_domains) if c in windows[d]]
            for d, chunk in zip(owners, np.array_split(ids[labels == c], len(owners))):
                members[d].append(chunk)
    else:
        for _ in range(DIRICHLET_TRIES):
            members = [[] for _ in range(num_domains)]
            for c in range(num_classes):
                class_ids = ids[labels == c]
                shares = rng.dirichlet(np.full(num_domains, float(dirichlet_alpha)))
                cuts = (np.cumsum(shares)[:-1] * len(class_ids)).astype(int)
                for d, chunk in enumerate(np.split(class_ids, cuts)):
                    members[d].append(chunk)
            if min(sum(len(m) for m in ms) for ms in members) >= MIN_DOMAIN_SAMPLES:
                break
        else:
            raise PartitionError(f'--dirichlet_alpha {dirichlet_alpha}: after {DIRICHLET_TRIES} draws some of the '
                                 f'{num_domains} domains still hold fewer than {MIN_DOMAIN_SAMPLES} samples; use '
                                 'fewer domains or a larger alpha')
    label_of = dict(zip(pool_ids.tolist(), pool_labels.tolist()))
    domains = []
    for d in range(num_domains):
        dom_ids = np.concatenate(members[d]) if members[d] else ids[:0]
        dom_labels = np.array([label_of[i] for i in dom_ids.tolist()], dtype=np.int64)
        if samples_per_domain > 0 and len(dom_ids) > samples_per_domain:
            dom_ids = _stratified_take(dom_ids, dom_labels, samples_per_domain)
            dom_labels = np.array([label_of[i] for i in dom_ids.tolist()], dtype=np.int64)
        splits = _split(dom_ids, dom_labels, val_fraction, test_fraction)
        empty = [s for s in SPLITS if len(splits[s]) == 0]
        if empty:
            raise PartitionError(f'--num_domains {num_domains}: domain {d} gets {len(dom_ids)} samples and an empty '
                                 f'{"/".join(empty)} split; use fewer domains or larger split fractions')
        classes = sorted(set(dom_labels.tolist()))
        if partition == 'class-slices':
            classes = class_slice_classes(d, num_classes, num_domains, min_classes)
        domains.append({'classes': classes, 'splits': splits})
    return domains


def _check_partition_args(cfg: Config) -> None:
    dc = cfg.data
    if dc.partition not in PARTITIONS:
        raise PartitionError(f'--partition / data.partition: unknown {dc.partition!r}; valid: {", ".join(PARTITIONS)}')
    if dc.num_domains < 1:
        raise PartitionError(f'--num_domains / data.num_domains: expected an integer >= 1, got {dc.num_domains}')
    if dc.partition == 'dirichlet' and not dc.dirichlet_alpha > 0:
        raise PartitionError(f'--dirichlet_alpha / data.dirichlet_alpha: expected > 0, got {dc.dirichlet_alpha}')
    if not (0 < dc.val_fraction < 1 and 0 < dc.test_fraction < 1 and dc.val_fraction + dc.test_fraction < 1):
        raise PartitionError('data.val_fraction and data.test_fraction: expected each in (0, 1) and a sum < 1, got '
                             f'{dc.val_fraction} and {dc.test_fraction}')
    if dc.samples_per_domain < 0:
        raise PartitionError(f'data.samples_per_domain: expected >= 0, got {dc.samples_per_domain}')
    corruption_for(0, dc.corruption_severity)


def check_partition_config(cfg: Config) -> None:
    """Validate every partition-related setting and the dataset/root, without loading images."""
    check_dataset(cfg)
    _check_partition_args(cfg)


def make_partition(cfg: Config) -> Dict[str, Any]:
    """The partition of cfg's dataset into cfg.data.num_domains domains (JSON-able; same seed, same bytes)."""
    check_partition_config(cfg)
    dc = cfg.data
    sources = load_sources(cfg)
    train, test = sources.get('train'), sources['test']
    n_train = len(train) if train is not None else 0
    num_classes = num_classes_for(dc.dataset, cfg)
    if dc.partition == 'class-slices' and dc.num_domains > num_classes * 10:
        raise PartitionError(f'--num_domains {dc.num_domains}: too many domains for {num_classes} classes')
    base_ids = base_train_ids(n_train, cfg.train.base_train_samples, cfg.train.base_split_seed)
    all_labels = np.concatenate([train.labels if train is not None else np.zeros(0, np.int64), test.labels])
    in_base = np.zeros(len(all_labels), dtype=bool)
    in_base[base_ids] = True
    pool_ids = np.nonzero(~in_base)[0].astype(np.int64)
    if len(pool_ids) < dc.num_domains * 3:
        raise PartitionError(f'--num_domains {dc.num_domains}: the pool holds only {len(pool_ids)} samples')
    domains = partition_pool(pool_ids, all_labels[pool_ids], num_classes, dc.num_domains, dc.partition,
                             dc.dirichlet_alpha, dc.min_classes_per_domain, dc.samples_per_domain,
                             dc.val_fraction, dc.test_fraction, cfg.seed)
    out_domains = []
    for d, dom in enumerate(domains):
        counts = {}
        for s in SPLITS:
            c = np.bincount(all_labels[dom['splits'][s]], minlength=num_classes)
            counts[s] = [int(v) for v in c]
        out_domains.append({
            'domain': d,
            'classes': [int(c) for c in dom['classes']],
            'corruption': corruption_for(d, dc.corruption_severity),
            'corruption_seed': int(cfg.seed),
            'num_samples': {s: int(len(dom['splits'][s])) for s in SPLITS},
            'class_counts': counts,
            'indices': {s: [int(i) for i in dom['splits'][s]] for s in SPLITS},
        })
    return {
        'rule_version': PARTITION_RULE_VERSION,
        'dataset': dc.dataset,
        'num_classes': int(num_classes),
        'num_domains': int(dc.num_domains),
        'partition': dc.partition,
        'dirichlet_alpha': float(dc.dirichlet_alpha) if dc.partition == 'dirichlet' else None,
        'min_classes_per_domain': int(dc.min_classes_per_domain),
        'samples_per_domain': int(dc.samples_per_domain),
        'val_fraction': float(dc.val_fraction),
        'test_fraction': float(dc.test_fraction),
        'input_size_px': int(cfg.model.input_size),
        'seed': int(cfg.seed),
        'sources': {'train': int(n_train), 'test': int(len(test)),
                    'id_rule': 'global id g < sources.train is train[g], otherwise test[g - sources.train]'},
        'base_train': {'count': int(len(base_ids)), 'cap': int(cfg.train.base_train_samples),
                       'sha256': hashlib.sha256(base_ids.astype('<i8').tobytes()).hexdigest(),
                       'split_seed': int(cfg.train.base_split_seed),
                       'rule': 'all train ids if cap is 0, else the first `cap` of numpy default_rng([split_seed, 1])'
                               '.permutation(n_train), sorted'},
        'pool_size': int(len(pool_ids)),
        'corruption_rule': 'numpy default_rng([corruption_seed, global id]) per sample, after resizing; '
                           'table in data/domains.py',
        'domains': out_domains,
    }


PARTITION_FIELDS = {'rule_version': int, 'dataset': str, 'num_classes': int, 'num_domains': int, 'partition': str,
                    'seed': int, 'input_size_px': int, 'sources': dict, 'domains': list}


def validate_partition(part: Dict[str, Any], where: str, cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Check a partition dict's structure (and, given cfg, that it fits cfg's dataset); returns it."""
    for name, tp in PARTITION_FIELDS.items():
        if not isinstance(part.get(name), tp):
            raise PartitionError(f'{where}: field {name!r} missing or not {tp.__name__}')
    if part['rule_version'] != PARTITION_RULE_VERSION:
        raise PartitionError(f'{where}: field "rule_version" is {part["rule_version"]}, this code reads '
                             f'{PARTITION_RULE_VERSION}; rerun step 0')
    if len(part['domains']) != part['num_domains']:
        raise PartitionError(f'{where}: field "domains" lists {len(part["domains"])} domains, num_domains says '
                             f'{part["num_domains"]}')
    total = part['sources'].get('train', 0) + part['sources'].get('test', 0)
    seen: Dict[int, str] = {}
    for d, dom in enumerate(part['domains']):
        f = f'{where}: domains[{d}]'
        if dom.get('domain') != d:
            raise PartitionError(f'{f}.domain is {dom.get("domain")!r}, expected {d}')
        corr = dom.get('corruption')
        if not isinstance(corr, dict) or corr.get('name') not in CORRUPTIONS or \
                not isinstance(corr.get('value'), (int, float)):
            raise PartitionError(f'{f}.corruption must name one of {", ".join(CORRUPTIONS)} with a numeric value')
        idx = dom.get('indices')
        if not isinstance(idx, dict) or set(idx) != set(SPLITS):
            raise PartitionError(f'{f}.indices must have the splits {", ".join(SPLITS)}')
        for s in SPLITS:
            for i in idx[s]:
                if not isinstance(i, int) or not 0 <= i < total:
                    raise PartitionError(f'{f}.indices.{s}: id {i!r} is not a sample id in 0..{total - 1}')
                if i in seen:
                    raise PartitionError(f'{f}.indices.{s}: sample {i} is also in {seen[i]} (splits must be disjoint)')
                seen[i] = f'domains[{d}].{s}'
        if not isinstance(dom.get('corruption_seed'), int):
            raise PartitionError(f'{f}.corruption_seed missing or not an integer')
    if cfg is not None:
        want = {'dataset': cfg.data.dataset, 'input_size_px': cfg.model.input_size}
        for key, value in want.items():
            if part[key] != value:
                raise PartitionError(f'{where}: field {key!r} is {part[key]!r} but the config says {value!r}; '
                                     'rerun step 0 with this config (or --force)')
    return part


def load_partition(path: Path, cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Read partition_info.json (an artifact whose fields are the partition) and validate it."""
    from artifacts import load_artifact
    obj = load_artifact(Path(path), kind='partition_info', fields=PARTITION_FIELDS)
    return validate_partition(obj, str(path), cfg)


# ----------------------------------------------------------------------------------------------------------
# Domain datasets and loaders
# ----------------------------------------------------------------------------------------------------------

class DomainCorruption:
    """Picklable transform: corrupt(x, name, value, seed, global id) for samples of one source."""

    def __init__(self, name: str, value: float, seed: int, id_offset: int):
        self.name, self.value, self.seed, self.id_offset = name, float(value), int(seed), int(id_offset)

    def __call__(self, x: np.ndarray, source_index: int) -> np.ndarray:
        return corrupt(x, self.name, self.value, self.seed, self.id_offset + source_index)


class ConcatSamples(torch.utils.data.ConcatDataset):
    """Concatenation of the train-source and test-source parts of one domain split, with `labels`."""

    def __init__(self, parts: Sequence[SampleDataset]):
        super().__init__(list(parts))
        self.labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64)


@functools.lru_cache(maxsize=8)
def _cached_domain_dataset(dataset: str, root: str, synthetic: int, size: int, ids: Tuple[int, ...],
                           corruption: Tuple[str, float], seed: int, n_train: int) -> ConcatSamples:
    sources = _load_sources(dataset, root, synthetic)
    arr = np.asarray(ids, dtype=np.int64)
    parts = []
    for src_name, src, lo, hi in (('train', sources.get('train'), 0, n_train),
                                  ('test', sources['test'], n_train, n_train + len(sources['test']))):
        sel = arr[(arr >= lo) & (arr < hi)] - lo
        if len(sel) == 0:
            continue
        assert src is not None
        parts.append(SampleDataset(src, sel, size, DomainCorruption(corruption[0], corruption[1], seed, lo),
                                   cache=True))
    return ConcatSamples(parts)


def domain_dataset(cfg: Config, partition: Dict[str, Any], d: int, split: str) -> ConcatSamples:
    """Domain d's `split` ('train' | 'val' | 'test'): (uint8 3 x S x S corrupted image, label) items, cached."""
    if split not in SPLITS:
        raise PartitionError(f'split {split!r}: valid splits are {", ".join(SPLITS)}')
    if not 0 <= d < partition['num_domains']:
        raise PartitionError(f'domain {d}: partition has domains 0..{partition["num_domains"] - 1}')
    dom = partition['domains'][d]
    sources = load_sources(cfg)
    n_train = len(sources['train']) if sources.get('train') is not None else 0
    if partition['sources'].get('train') != n_train or partition['sources'].get('test') != len(sources['test']):
        raise PartitionError(f'partition field "sources" ({partition["sources"]}) does not match dataset '
                             f'{cfg.data.dataset} ({n_train} train, {len(sources["test"])} test samples)')
    root = str(data_root(cfg))
    corr = dom['corruption']
    ds = _cached_domain_dataset(cfg.data.dataset, root, int(cfg.data.synthetic_samples), int(cfg.model.input_size),
                                  tuple(dom['indices'][split]), (corr['name'], float(corr['value'])),
                                  int(dom['corruption_seed']), n_train)
    ds.mean, ds.std = dataset_stats(cfg)
    return ds


def domain_loader(cfg: Config, partition: Dict[str, Any], d: int, split: str, batch_size: int, shuffle: bool,
                  generator: Optional[torch.Generator] = None) -> torch.utils.data.DataLoader:
    """DataLoader over domain_dataset(...); shuffling draws from `generator` (pass one for repeatable runs)."""
    ds = domain_dataset(cfg, partition, d, split)
    return torch.utils.data.DataLoader(ds, batch_size=int(batch_size), shuffle=bool(shuffle), generator=generator,
                                       num_workers=int(cfg.data.num_workers))


def partition_json(part: Dict[str, Any]) -> str:
    """Canonical JSON text of a partition (for determinism checks)."""
    return json.dumps(part, sort_keys=True)
