"""Datasets, Non-IID partition and corruptions (synthetic data; fast)."""
import dataclasses
import gzip
import json

import numpy as np
import pytest
import torch

from config import Config, DataConfig, ModelConfig, TrainConfig
from data import datasets, domains
from data.datasets import DatasetError, normalize_batch
from data.domains import PartitionError


def synthetic_cfg(tmp_path=None, **data):
    kw = dict(dataset='synthetic', num_domains=4, synthetic_samples=600)
    kw.update(data)
    return Config(data=DataConfig(**kw), model=ModelConfig(input_size=24), train=TrainConfig(base_train_samples=300),
                  results_dir=str(tmp_path or 'results'))


def test_unknown_dataset_lists_choices():
    with pytest.raises(DatasetError) as e:
        datasets.dataset_spec('mnist-ish')
    for name in ('fashion-mnist', 'cifar10', 'cifar100', 'imagefolder', 'synthetic'):
        assert name in str(e.value)


def test_missing_data_root_is_named(tmp_path):
    cfg = Config(data=DataConfig(dataset='cifar10', data_root=str(tmp_path / 'nowhere')))
    with pytest.raises(DatasetError, match='nowhere'):
        domains.check_partition_config(cfg)
    cfg = Config(data=DataConfig(dataset='cifar10', data_root=str(tmp_path)))
    with pytest.raises(DatasetError, match='cifar-10-batches'):
        datasets.load_sources(cfg)


def test_read_idx_roundtrip_and_bad_file(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b''.join(int(n).to_bytes(4, 'big') for n in arr.shape)
    p = tmp_path / 'x-idx3-ubyte.gz'
    with gzip.open(p, 'wb') as f:
        f.write(header + arr.tobytes())
    assert np.array_equal(datasets.read_idx(p), arr)
    bad = tmp_path / 'bad-idx3-ubyte'
    bad.write_bytes(header + arr.tobytes()[:-1])
    with pytest.raises(DatasetError, match='bytes'):
        datasets.read_idx(bad)


def test_normalize_batch():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize_batch(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_class_slice_windows():
    assert [domains.class_slice_classes(d, 10, 10, 3) for d in (0, 8, 9)] == [[0, 1, 2], [0, 8, 9], [0, 1, 9]]
    assert domains.class_slice_classes(3, 100, 10, 3) == list(range(30, 40))
    assert domains.class_slice_classes(1, 10, 5, 3) == [2, 3, 4]


@pytest.mark.parametrize('partition', ['class-slices', 'dirichlet'])
def test_partition_deterministic_disjoint_stratified(partition):
    cfg = synthetic_cfg(partition=partition, dirichlet_alpha=1.0)
    a, b = domains.make_partition(cfg), domains.make_partition(cfg)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    other = domains.make_partition(dataclasses.replace(cfg, seed=1))
    assert json.dumps(other, sort_keys=True) != json.dumps(a, sort_keys=True)
    seen = set()
    for dom in a['domains']:
        for split in domains.SPLITS:
            ids = dom['indices'][split]
            assert ids == sorted(ids) and len(ids) > 0
            assert not seen & set(ids), 'a sample is in two splits or two domains'
            seen |= set(ids)
        counts = dom['class_counts']
        for c in range(a['num_classes']):  # stratified: every class with >= 7 samples is in all three splits
            if sum(counts[s][c] for s in domains.SPLITS) >= 7:
                assert all(counts[s][c] > 0 for s in domains.SPLITS)
    base = domains.base_train_ids(a['sources']['train'], 300, 0)
    assert not seen & set(base.tolist()), 'domain pool overlaps the base-training subset'
    other_ids = {i for dom in other['domains'] for s in domains.SPLITS for i in dom['indices'][s]}
    assert not other_ids & set(base.tolist()), 'another --seed must keep the base-training subset out of the domains'
    if partition == 'class-slices':
        for dom in a['domains']:
            present = {c for c in range(10) if dom['class_counts']['train'][c] > 0}
            assert present <= set(dom['classes']) and len(dom['classes']) >= 3


def test_bad_partition_settings_are_named():
    with pytest.raises(PartitionError, match='--num_domains'):
        domains.make_partition(synthetic_cfg(num_domains=0))
    with pytest.raises(PartitionError, match='--partition'):
        domains.make_partition(synthetic_cfg(partition='random'))
    with pytest.raises(PartitionError, match='--num_domains'):
        domains.make_partition(synthetic_cfg(num_domains=400))


@pytest.mark.parametrize('name', list(domains.CORRUPTIONS))
def test_corruptions_deterministic_and_effective(name):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, size=(3, 32, 32)).astype(np.float32)
    value = domains.corruption_for(domains.DOMAIN_CORRUPTIONS.index(name), 3)['value']
    a = domains.corrupt(x, name, value, seed=5, sample_id=17)
    b = domains.corrupt(x, name, value, seed=5, sample_id=17)
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - x).mean() > 1e-3, f'{name} left the image unchanged'
    if name in ('gaussian_noise', 'salt_pepper', 'shot_noise', 'occlusion'):
        assert not np.array_equal(a, domains.corrupt(x, name, value, seed=5, sample_id=18))


def test_domain_dataset_items_repeat_exactly(tmp_path):
    cfg = synthetic_cfg()
    part = domains.make_partition(cfg)
    ds = domains.domain_dataset(cfg, part, 1, 'val')
    img, label = ds[0]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 24, 24)
    assert label in part['domains'][1]['classes']
    domains._cached_domain_dataset.cache_clear()
    again = domains.domain_dataset(cfg, part, 1, 'val')
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))
    loader = domains.domain_loader(cfg, part, 1, 'train', 16, True, torch.Generator().manual_seed(0))
    x, y = next(iter(loader))
    assert x.shape[1:] == (3, 24, 24) and x.dtype == torch.uint8 and y.shape == (x.shape[0],)


def test_load_partition_rejects_tampering(tmp_path):
    from artifacts import write_artifact
    cfg = synthetic_cfg(tmp_path)
    part = domains.make_partition(cfg)
    path = tmp_path / 'partition_info.json'
    write_artifact(path, 'partition_info', part, cfg, 'test')
    assert domains.load_partition(path, cfg)['num_domains'] == 4
    part['domains'][1]['indices']['train'].append(part['domains'][0]['indices']['test'][0])
    write_artifact(path, 'partition_info', part, cfg, 'test')
    with pytest.raises(PartitionError, match=r'domains\[1\].*disjoint'):
        domains.load_partition(path, cfg)
    with pytest.raises(PartitionError, match='input_size_px'):
        part['domains'][1]['indices']['train'].pop()
        write_artifact(path, 'partition_info', part, cfg, 'test')
        domains.load_partition(path, dataclasses.replace(cfg, model=ModelConfig(input_size=32)))


def test_torchvision_shim_imports():
    from data._torchvision import import_torchvision
    tv = import_torchvision()
    assert hasattr(tv.datasets, 'FashionMNIST')
