"""Step 0: alpha training, FLOPs/importance, artifacts, resumability and bad input (synthetic data, tiny model)."""
import json

import pytest
import torch

from artifacts import load_artifact
from config import Config, DataConfig, ModelConfig, TrainConfig, UserError
from data import domains
from data.datasets import dataset_stats
from hyper_repvgg import BlockSpec, block_plan, build_hyper_repvgg
from accuracy import importance, training

TINY_WIDTH = (0.25, 0.25, 0.25, 0.25)
TINY = ['--dataset', 'synthetic', '--set', 'model.input_size=16', '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25',
        '--set', 'data.synthetic_samples=1200', '--set', 'train.base_train_samples=600', '--set', 'train.base_epochs=3',
        '--set', 'train.base_lr=0.1', '--set', 'train.batch_size=32', '--num_domains', '3', '--epochs', '2',
        '--lr', '0.05', '--threads', '2']


def tiny_cfg(tmp_path):
    return Config(model=ModelConfig(input_size=16, width_multiplier=TINY_WIDTH),
                  data=DataConfig(dataset='synthetic', num_domains=3, synthetic_samples=2000),
                  train=TrainConfig(base_train_samples=1000, base_epochs=3, base_lr=0.1, batch_size=32, alpha_epochs=3,
                                    alpha_lr=0.05),
                  results_dir=str(tmp_path))


def test_flops_of_a_known_block_match_closed_form():
    spec = BlockSpec(index=2, name='stage1.1', in_channels=16, out_channels=16, stride=1, groups=1)
    plan = block_plan('A0', TINY_WIDTH)
    table = importance.branch_flops_table(plan, 64)
    entry = table['blocks'][2]
    assert entry['name'] == spec.name and entry['input_hw'] == [16, 16]  # 64 -> stage0 /2 -> stage1.0 /2
    hw = 16 * 16
    assert entry['branches']['D']['macs'] == 16 * 16 * 9 * hw
    assert entry['branches']['O']['macs'] == 16 * 16 * hw
    assert entry['branches']['D']['flops'] == 2 * 16 * 16 * 9 * hw
    first = table['blocks'][1]  # stride 2, 16 -> 16 channels: no identity branch
    assert 'I' not in first['branches'] and first['output_hw'] == [16, 16]
    model = build_hyper_repvgg('A0', num_classes=10, width_multiplier=TINY_WIDTH)
    check = importance.fvcore_check(model, table)
    assert check['all_match'] and check['checked_branches'] == 2 * len(plan)


def test_importance_ranks_only_real_branches():
    model = build_hyper_repvgg('A0', num_classes=10, width_multiplier=TINY_WIDTH)
    with torch.no_grad():
        model.blocks[5].alpha[0] = -0.5
    table = importance.branch_flops_table(model.plan, 32)
    scores = importance.importance_scores(model.hyper_weights(), table)
    assert len(scores) == sum(3 if s.has_identity else 2 for s in model.plan)
    d5 = next(s for s in scores if s['block'] == 5 and s['branch'] == 'D')
    assert d5['importance'] == pytest.approx(0.5 / d5['gflops'])
    ranked = importance.rank_ascending(scores)
    values = [r['importance'] for r in ranked]
    assert values == sorted(values) and [r['rank'] for r in ranked] == list(range(len(scores)))


def test_alpha_training_changes_alpha_and_keeps_val_accuracy(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.set_num_threads(2)
    base = training.prepare_base(cfg)
    assert base['info']['source'] == 'trained' and training.base_checkpoint_path(cfg).is_file()
    assert training.prepare_base(cfg)['info']['source'] == 'cached'
    part = domains.make_partition(cfg)
    mean, std = dataset_stats(cfg)
    improved = []
    # Every domain: the training loss falls and validation accuracy never drops.  Whether one domain's ~180
    # validation images show a gain after 3 epochs depends on the base model's float path (it differs from CPU
    # to CPU), so a gain is required on one of the three corrupted domains, not on a given one.
    for d in range(cfg.data.num_domains):
        model = training.prepare_base(cfg)['model']
        gen = torch.Generator().manual_seed(0)
        train = domains.domain_loader(cfg, part, d, 'train', 32, True, gen)
        val = domains.domain_loader(cfg, part, d, 'val', 64, False)
        before = [b.alpha.detach().clone() for b in model.blocks]
        hist = training.train_alpha(model, train, val, 3, 0.05, 'cpu', gen, mean, std)
        assert hist['best_val_acc_pct'] >= hist['initial_val_acc_pct']
        assert training.evaluate_accuracy(model, val, mean, std) == pytest.approx(hist['best_val_acc_pct'])
        losses = [e['train_loss'] for e in hist['epochs']]
        assert losses[-1] < losses[0], f'domain {d}: alpha training did not lower the training loss: {losses}'
        if hist['best_epoch'] > 0:
            assert any(not torch.equal(a, b.alpha.detach()) for a, b in zip(before, model.blocks))
        improved.append(hist['best_epoch'] > 0)
        trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(k.endswith('alpha') for k in trainable)
    assert any(improved), 'alpha training never improved validation accuracy on any corrupted domain'


def _main(argv):
    from pipeline import step0_prepare
    return step0_prepare.main(argv)


@pytest.mark.slow
def test_step0_end_to_end_resumable_and_valid(tmp_path):
    out = tmp_path / 'res'
    assert _main(TINY + ['--results_dir', str(out)]) == 0
    hw = load_artifact(out / 'trained_hyper_weights.json', 'trained_hyper_weights',
                       {'domains': dict, 'fingerprint': str, 'arch': dict, 'base': dict})
    res = load_artifact(out / 'training_results.json', 'training_results', {'domains': dict, 'base': dict})
    assert sorted(hw['domains']) == sorted(res['domains']) == ['0', '1', '2']
    for r in res['domains'].values():
        for k in ('initial_val_acc_pct', 'final_val_acc_pct', 'initial_test_acc_pct',
                  'final_test_acc_pct'):
            assert 0.0 <= r[k] <= 100.0
        assert r['final_val_acc_pct'] >= r['initial_val_acc_pct'] and len(r['history']) == 2
    assert 0.0 <= res['base']['test_acc_pct'] <= 100.0
    from config import resolve_config
    from pipeline import step0_prepare
    cfg = resolve_config(step0_prepare.parse_args(TINY + ['--results_dir', str(out)]), step0_prepare.FLAG_KEYS)
    model = training.load_domain_model(cfg, 1)  # the same settings as the run: its base model and alpha
    assert model.hyper_weights()['blocks'] == hw['domains']['1']['blocks']
    flops = load_artifact(out / 'branch_flops.json', 'branch_flops', {'blocks': list, 'fvcore_check': dict})
    assert flops['fvcore_check']['all_match']
    ranks = load_artifact(out / 'importance_rankings.json', 'importance_rankings', {'domains': dict})
    for d, ranking in ranks['domains'].items():
        absent = {(e['block'], 'I') for e in flops['blocks'] if 'I' not in e['branches']}
        assert not absent & {(r['block'], r['branch']) for r in ranking}
    load_artifact(out / 'importance_scores.json', 'importance_scores', {'domains': dict, 'formula': str})
    for png in ('hyper_weights_heatmap.png', 'importance_heatmap.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    part_bytes = (out / 'partition_info.json').read_bytes()
    res_bytes = (out / 'training_results.json').read_bytes()
    assert _main(TINY + ['--results_dir', str(out)]) == 0  # resumes: nothing retrained or rewritten
    assert (out / 'partition_info.json').read_bytes() == part_bytes
    assert (out / 'training_results.json').read_bytes() == res_bytes
    assert _main(TINY + ['--results_dir', str(out), '--domains', '2', '--force']) == 0
    again = json.loads((out / 'training_results.json').read_text())
    assert again['domains']['2']['final_val_acc_pct'] == res['domains']['2']['final_val_acc_pct']


@pytest.mark.parametrize('bad, match', [
    (['--dataset', 'nope'], 'valid choices'),
    (['--dataset', 'cifar10', '--data_root', '/nonexistent/dir'], '/nonexistent/dir'),
    (['--num_domains', '0'], '--num_domains'),
    (['--num_domains', 'ten'], 'num_domains'),
    (['--checkpoint', '/nonexistent/ckpt.pt'], 'ckpt.pt'),
    (['--domains', '7'], '--domains'),
])
def test_bad_input_clear_error_and_nothing_written(tmp_path, bad, match):
    out = tmp_path / 'res'
    with pytest.raises(UserError, match=match):
        _main(TINY + ['--results_dir', str(out)] + bad)
    assert not out.exists()


def test_missing_base_checkpoint_is_named(tmp_path):
    with pytest.raises(training.CheckpointError, match=r'\.pt'):
        training.load_base_model(tiny_cfg(tmp_path))


def test_old_step0_results_with_percent_fields_still_load(tmp_path):
    """A training_results.json written with `_percent` fields (before `_pct`) is reused, read with `_pct`."""
    from artifacts import pct_names, write_artifact
    old = {'fingerprint': 'f', 'domains': {'0': {'final_val_acc_percent': 81.5,
                                                 'history': [{'epoch': 1, 'val_acc_percent': 80.0}]}}}
    write_artifact(tmp_path / 'training_results.json', 'training_results', old, Config(), 'test')
    done = training.load_done_domains(tmp_path / 'training_results.json', 'training_results', 'f')
    assert done == {'0': {'final_val_acc_pct': 81.5, 'history': [{'epoch': 1, 'val_acc_pct': 80.0}]}}
    assert pct_names({'a_pct': 1, 'n': [2]}) == {'a_pct': 1, 'n': [2]}


def test_step0_cache_keys_keep_their_former_digests(tmp_path):
    """artifacts.fingerprint replaced step 0's own json.dumps + sha256 recipes: the keys must not change (a changed
    key retrains every domain and the base model)."""
    import hashlib

    from artifacts import fingerprint
    cfg = tiny_cfg(tmp_path)
    ckpt = tmp_path / 'base.pt'
    ckpt.write_bytes(b'weights')
    model = build_hyper_repvgg('A0', num_classes=10, width_multiplier=TINY_WIDTH, small_input=True)
    key = {'partition': hashlib.sha256(b'{"a": 1}').hexdigest(), 'base': hashlib.sha256(b'weights').hexdigest(),
           'arch': model.spec_dict(), 'alpha': [cfg.train.alpha_epochs, cfg.train.alpha_lr, cfg.train.batch_size,
                                                cfg.model.adapt_bn, cfg.seed]}
    former = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    assert training.domain_fingerprint(cfg, '{"a": 1}', model, ckpt) == former == fingerprint(key)
    base_key = training.base_config_key(cfg)
    digest = hashlib.sha256(json.dumps(base_key, sort_keys=True).encode()).hexdigest()[:10]
    assert training.base_checkpoint_path(cfg).name.endswith(f'_{digest}.pt')
    assert fingerprint({'b': [1, 2.5], 'a': None}) == fingerprint({'a': None, 'b': (1, 2.5)})
    assert fingerprint([1, 2]) != fingerprint([2, 1])
