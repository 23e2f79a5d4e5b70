"""Plain chain networks (issue 18): exact split at every block boundary, the device's torch-only blocks against
torchvision's, the FLOP counts against the modules, and steps 1-2 on MobileNetV2 in pseudo mode."""
import json

import pytest
import torch

import chain_nets as CN
import nets
from data._torchvision import torchvision_chain_net
from timing import flops as F
from timing.measure import randomize_bn_

# (name, width_multiplier, input size): small inputs keep it fast
CASES = (('mobilenet_v2', [0.25] * 4, 32), ('resnet18', None, 32), ('resnet50', None, 32))


def _spec(name, wm, ncls=7):
    return {'name': name, 'num_classes': ncls, 'width_multiplier': wm, 'small_input': False}


def _torchvision(name, wm, seed=0):
    torch.manual_seed(seed)
    model = torchvision_chain_net(_spec(name, wm))
    g = torch.Generator()
    g.manual_seed(seed + 1)
    return randomize_bn_(model, g).eval()


@pytest.mark.parametrize('name,wm,size', CASES)
def test_split_is_exact_at_every_block_boundary_and_the_device_blocks_equal_torchvision(name, wm, size):
    tv = _torchvision(name, wm)
    dev = nets.build_model(_spec(name, wm), tv.state_dict()).eval()
    assert set(dev.state_dict()) == set(tv.state_dict())
    x = torch.randn(2, 3, size, size)
    per_block = [set(CN.block_keys(s, b).values()) for s, b in zip(tv.plan, tv.blocks)]
    with torch.no_grad():
        ref = tv(x)
        assert torch.allclose(dev(x), ref, rtol=1e-4, atol=1e-5)
        for lam in range(tv.num_blocks + 1):
            edge, server = tv.split(lam)
            h = edge(x)
            assert torch.equal(server(h), ref), lam
            sd = tv.edge_state_dict(lam)
            assert set(sd) == set().union(*per_block[:lam]), lam  # blocks below lambda only
            device_edge = nets.build_edge(_spec(name, wm), lam, sd, [0] * lam)
            assert torch.allclose(device_edge(x), h, rtol=1e-4, atol=1e-5), lam


def test_block_names_follow_the_network():
    names = [s.name for s in nets.plan_of(_spec('mobilenet_v2', None))]
    assert names == ['features.{}'.format(i) for i in range(19)]
    r50 = [s.name for s in nets.plan_of(_spec('resnet50', None))]
    assert r50[:3] == ['stem', 'layer1.0', 'layer1.1'] and r50[-1] == 'layer4.2' and len(r50) == 17
    assert len(nets.plan_of(_spec('resnet18', None))) == 9
    assert nets.canonical_name('MobileNetV2') == 'mobilenet_v2' and nets.canonical_name('a0') == 'RepVGG-A0'
    assert nets.is_plain('resnet50') and not nets.is_plain('RepVGG-B3')


def test_bad_names_widths_and_checkpoints_are_clear_errors():
    with pytest.raises(KeyError, match='mobilenet_v2'):
        nets.canonical_name('vgg16')
    with pytest.raises(ValueError, match='one width multiplier'):
        nets.plan_of(_spec('mobilenet_v2', [0.25, 0.25, 0.25, 0.5]))
    with pytest.raises(ValueError, match='no width multiplier'):
        nets.plan_of(_spec('resnet18', [1.0] * 4))
    sd = _torchvision('resnet18', None).state_dict()
    wrapped = {'state_dict': {'module.' + k: v for k, v in sd.items()}}
    nets.build_model(_spec('resnet18', None), wrapped)  # the wrapper and the prefix are accepted
    del sd['fc.bias']
    with pytest.raises(KeyError, match='fc.bias'):
        nets.build_model(_spec('resnet18', None), sd)
    with pytest.raises(ValueError, match='all 0'):
        nets.build_edge(_spec('resnet18', None), 1, {}, [13])


def _count_macs(model, x):
    """MACs of every Conv2d in the model, counted from the modules with forward hooks."""
    per = []

    def hook(m, inp, out):
        per.append(out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sum(per)


@pytest.mark.parametrize('name,wm,size', CASES)
def test_flop_counts_equal_the_modules(name, wm, size):
    tv = _torchvision(name, wm)
    plan = tv.plan
    hws = F.block_input_hw(plan, size)
    x = torch.randn(1, 3, size, size)
    for spec, block, hw in zip(plan, tv.blocks, hws):
        assert F.measurable_layouts(spec) == [0]
        assert F.layout_cost(spec, hw, 0).macs == _count_macs(block, x), spec.name
        with torch.no_grad():
            x = block(x)
        assert tuple(x.shape[1:]) == (spec.out_channels,) + F.out_hw(spec, hw), spec.name
    with pytest.raises(ValueError):
        F.layout_cost(plan[1], hws[1], 4)


def test_steps_1_to_4_on_mobilenet_v2_in_pseudo_mode(tmp_path, capsys):
    from pipeline import step1_measure_lut as step1
    from pipeline import step2_initial_throughput_opt as step2
    from pipeline import step4_visualize_results as step4
    from pipeline import step_3_joint as step3
    flags = ['--results_dir', str(tmp_path), '--model', 'mobilenet_v2', '--dataset', 'synthetic',
             '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'model.input_size=32']
    assert step1.main(['--mode', 'pseudo', '--repeats', '3', '--warmup', '1', '--no_validate', *flags]) == 0
    lut = json.loads((tmp_path / 'hardware_lut_complete.json').read_text())
    assert lut['num_blocks'] == 19 and all(b['available_layouts'] == [0] for b in lut['blocks'])
    assert [b['name'] for b in lut['blocks']][:2] == ['features.0', 'features.1']
    assert step2.main(['--steps', '50', '--restarts', '1', *flags]) == 0
    out = json.loads((tmp_path / 'initial_throughput_config.json').read_text())
    assert out['gammas'] == [0] * 19 and 0 <= out['lam'] <= 19
    assert out['exact']['throughput_fps'] >= out['baselines']['edge_only']['throughput_fps'] - 1e-9
    capsys.readouterr()
    assert step3.main(['--all_domains', *flags]) == 0  # step 3 is RepVGG's: one line, step 2's split
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and 'branch pruning is RepVGG-only' in lines[0], lines
    assert f"lambda {out['lam']} of 19" in lines[0] and f"{out['exact']['throughput_fps']:.1f} fps" in lines[0]
    assert not (tmp_path / 'joint_optimization').exists()
    assert step4.main(['--formats', 'png', *flags]) == 0
    assert (tmp_path / 'visualization' / 'summary.md').is_file()
    from artifacts import ArtifactError
    with pytest.raises(ArtifactError, match="'mobilenet_v2', this run is resnet18"):  # step 2 ran another model
        step3.main(['--all_domains', '--results_dir', str(tmp_path), '--model', 'resnet18', '--dataset', 'synthetic',
                    '--set', 'model.width_multiplier=none'])


@pytest.mark.parametrize('name,wm,size', CASES[:2])
def test_part_files_of_a_plain_network_rebuild_its_parts_exactly(name, wm, size):
    import io

    import numpy as np

    from comm import parts as PF
    tv = _torchvision(name, wm)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = tv(x)
        for lam in (0, 3, tv.num_blocks):
            edge, meta = PF.load_part(PF.part_bytes(tv, lam, 'edge', size))
            server, smeta = PF.load_part(PF.part_bytes(tv, lam, 'server', size))
            assert [b['kinds'] for b in meta['blocks']] == [[s.kind] for s in tv.plan[:lam]]
            h = edge(x)  # the classifier too at lambda N
            want = tv.split(lam)[0](x) if lam < tv.num_blocks else ref
            assert torch.allclose(h, want, rtol=1e-4, atol=1e-5), lam
            out = server(h) if lam < tv.num_blocks else h
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), lam
            assert smeta['head'] == (lam < tv.num_blocks) and bool(meta['head']) == (lam == tv.num_blocks)
    arrays = dict(np.load(io.BytesIO(PF.part_bytes(tv, 2, 'edge', size))))
    key = next(k for k in arrays if k.startswith('block1.') and k.endswith('weight'))
    bad = dict(arrays, **{key: arrays[key][:1]})
    buf = io.BytesIO()
    np.savez(buf, **bad)
    with pytest.raises(PF.PartFileError, match=key.replace('.', r'\.')):
        PF.load_part(buf.getvalue())
    del bad[key]
    buf = io.BytesIO()
    np.savez(buf, **bad)
    with pytest.raises(PF.PartFileError, match='missing array ' + key.replace('.', r'\.')):
        PF.load_part(buf.getvalue())


PLAIN_TINY = ['--dataset', 'synthetic', '--model', 'mobilenet_v2', '--set', 'model.input_size=16',
              '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'data.synthetic_samples=600',
              '--set', 'train.base_train_samples=300', '--set', 'train.base_epochs=1', '--set', 'train.batch_size=32',
              '--num_domains', '2', '--threads', '1']


def test_step0_of_a_plain_network_trains_a_base_model_and_no_alpha(tmp_path, caplog):
    from pipeline import step0_prepare as step0
    caplog.set_level('INFO')
    assert step0.main(['--results_dir', str(tmp_path), *PLAIN_TINY]) == 0
    assert (tmp_path / 'partition_info.json').is_file() and list((tmp_path / 'base_model').glob('*.pt'))
    assert not (tmp_path / 'trained_hyper_weights.json').exists()
    assert 'no alpha training for mobilenet_v2' in caplog.text


def test_step0_of_a_plain_network_takes_a_torchvision_checkpoint_strictly(tmp_path, caplog):
    from accuracy.training import CheckpointError
    from pipeline import step0_prepare as step0
    from scripts import random_checkpoint
    caplog.set_level('INFO')
    ckpt = tmp_path / 'mbv2.pt'
    assert random_checkpoint.main(['--model', 'mobilenet_v2', '--width', '0.25', '--wrap', '--out', str(ckpt)]) == 0
    raw = torch.load(str(ckpt), weights_only=True)
    assert list(raw) == ['state_dict'] and all(k.startswith('module.features.') or k.startswith('module.classifier.')
                                               for k in raw['state_dict'])
    flags = ['--results_dir', str(tmp_path / 'r'), *PLAIN_TINY]
    assert step0.main([*flags, '--checkpoint', str(ckpt)]) == 0  # the wrapper and the module. prefix are accepted
    assert not (tmp_path / 'r' / 'base_model').exists() and 'base model (checkpoint)' in caplog.text
    del raw['state_dict']['module.features.3.conv.1.0.weight']
    torch.save(raw, str(ckpt))
    with pytest.raises(CheckpointError, match=r'mbv2\.pt.*features\.3\.conv\.1\.0\.weight'):
        step0.main([*flags, '--checkpoint', str(ckpt)])
    wrong = tmp_path / 'r18.pt'
    random_checkpoint.main(['--model', 'resnet18', '--out', str(wrong)])
    with pytest.raises(CheckpointError, match='r18.pt'):
        step0.main([*flags, '--checkpoint', str(wrong)])


@pytest.mark.slow  # ~25 s
def test_resnet50_steps_1_2_and_the_split_sweep_with_a_random_weight_checkpoint(tmp_path):
    """Issue 18's ResNet-50 flow (README: at 224 px) at 64 px: a torchvision-keyed checkpoint of random weights
    (scripts/random_checkpoint.py), steps 1-2 in pseudo mode and the split sweep of step 2's configuration."""
    import csv

    from pipeline import split_sweep
    from pipeline import step1_measure_lut as step1
    from pipeline import step2_initial_throughput_opt as step2
    from scripts import random_checkpoint
    ckpt = tmp_path / 'r50.pt'
    assert random_checkpoint.main(['--model', 'resnet50', '--out', str(ckpt)]) == 0
    flags = ['--results_dir', str(tmp_path / 'r'), '--model', 'resnet50', '--dataset', 'synthetic',
             '--set', 'model.width_multiplier=none', '--set', 'model.input_size=64', '--set', f'model.checkpoint={ckpt}']
    assert step1.main(['--mode', 'pseudo', '--repeats', '2', '--warmup', '0', '--no_validate',
                       '--set', 'lut.fit_configurations=4', '--set', 'lut.fit_rounds=2', *flags]) == 0
    assert step2.main(['--steps', '50', '--restarts', '1', *flags]) == 0
    assert split_sweep.main(['--no_figure', *flags]) == 0
    out = json.loads((tmp_path / 'r' / 'initial_throughput_config.json').read_text())
    with open(tmp_path / 'r' / 'split_latency_results.csv') as f:
        rows = list(csv.DictReader(f))
    assert out['num_blocks'] == 17 and len(rows) == 18 and 0 <= out['lam'] <= 17
