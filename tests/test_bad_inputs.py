"""Bad files and flags, one table: every case exits 2 before any work, prints ONE line on stderr that names the
file / field / flag and the value, and leaves the good files in results_dir as they were.

Each row runs a step's real entry point (config.run_cli, what `python pipeline/stepN_*.py` runs) in-process."""
import json
import pickle
import sys

import pytest
import torch

from artifacts import write_artifact
from config import Config, ModelConfig, run_cli
from timing import lut as L
from timing.profiles import get_profile

SMALL = ['--set', 'model.input_size=16', '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25']


class _Evil:
    def __reduce__(self):
        return (print, ('this must never run',))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A results dir with a good modelled LUT (and its bad variants beside it), bad configs and checkpoints."""
    d = tmp_path_factory.mktemp('bad_inputs')
    res = d / 'results'
    cfg = Config(model=ModelConfig(input_size=16, width_multiplier=(0.25, 0.25, 0.25, 0.25)), results_dir=str(res))
    spec = L.model_spec(cfg)
    side = {s: L.modelled_side(get_profile(p), spec, 16, [1], side=s)
            for s, p in (('edge', 'jetson-tx2'), ('server', 'jetson-orin-nano'))}
    good = write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete',
                          L.merge(side['server'], side['edge'], L.resolve_link(cfg.lut), 'fp32'), cfg, 'test')

    def lut_variant(name, change):
        obj = json.loads(json.dumps(good))
        change(obj)
        (d / name).write_text(json.dumps(obj, allow_nan=True))
        return str(d / name)

    hw = {'schema_version': 1, 'kind': 'trained_hyper_weights', 'created_at': 'x', 'command': 'x', 'config': {},
          'fingerprint': 'f', 'domains': {'0': {'blocks': [{'alpha': {'D': float('nan')}}]}}}
    (res / 'trained_hyper_weights.json').write_text(json.dumps(hw, allow_nan=True))
    (d / 'config_dir').mkdir()
    (d / 'latin1.json').write_bytes(b'{"seed": "\xe9"}')
    (d / 'deep.json').write_text('[' * 5000 + ']' * 5000)
    (d / 'not_a_dir').write_text('x')
    torch.save({'stage0.rbr_dense.conv.weight': torch.zeros(1, 1, 1, 1)}, str(d / 'wrong_keys.pt'))
    from hyper_repvgg import build_repvgg
    state = build_repvgg('A0', 10, (0.25, 0.25, 0.25, 0.25), False).state_dict()
    state['linear.weight'] = torch.zeros(7, 3)
    torch.save(state, str(d / 'wrong_shape.pt'))
    with open(d / 'pickle.pt', 'wb') as f:
        pickle.dump({'a': _Evil()}, f)
    paths = {
        'dir': str(d), 'res': str(res),
        'no_block': lut_variant('lut_no_block.json', lambda o: o['blocks'][0].pop('block')),
        'layout_x': lut_variant('lut_layout_x.json', lambda o: o['blocks'][1]['available_layouts'].append('x')),
        'bytes_str': lut_variant('lut_bytes_str.json', lambda o: o['link_bytes']['fp32'].__setitem__(3, 'many')),
        'bytes_nan': lut_variant('lut_bytes_nan.json', lambda o: o['link_bytes']['fp16'].__setitem__(2, float('nan'))),
        'bytes_neg': lut_variant('lut_bytes_neg.json', lambda o: o['link_bytes']['fp32'].__setitem__(0, -5)),
        'deep_lut': str(d / 'deep.json'),
    }
    return paths


# (step, arguments, what the one line must contain); {dir} / {res} / {name} are filled from the fixture
CASES = [
    ('step1', ['--repeats', '0'], '--repeats: lut.repeats: expected a value >= 1, got 0'),
    ('step1', ['--repeats', '-1'], '--repeats: lut.repeats: expected a value >= 1, got -1'),
    ('step1', ['--warmup', '-1'], '--warmup: lut.warmup: expected a value >= 0, got -1'),
    ('step1', ['--max_entry_s', 'nan'], "--max_entry_s: lut.max_entry_s: expected a finite number, got 'nan'"),
    ('step1', ['--batch_sizes', '1,0'], 'lut.batch_sizes: expected values >= 1, got 0'),
    ('step1', ['--set', 'lut.batch_sizes='], 'lut.batch_sizes: expected at least one value'),
    ('step1', ['--bandwidth_mbps', '-3'], '--bandwidth_mbps: lut.bandwidth_mbps: expected a value > 0, got -3'),
    ('step1', ['--set', 'real.port=70000'], 'real.port: expected a value >= 0 and <= 65535, got 70000'),
    ('step1', ['--set', 'real.io_timeout_s=inf'], "real.io_timeout_s: expected a finite number, got 'inf'"),
    ('step1', ['--results_dir', '/proc/h15_results'], "--results_dir / results_dir '/proc/h15_results': cannot write"),
    ('step1', ['--results_dir', '{dir}/not_a_dir/sub'], 'not_a_dir is not a directory'),
    ('step2', ['--omega', '2'], '--omega: optim.omega: expected a value >= 0 and <= 1, got 2.0'),
    ('step2', ['--steps', '0'], '--steps: optim.steps: expected a value >= 1, got 0'),
    ('step2', ['--config', '{dir}/config_dir'], 'config_dir is a directory, expected a JSON file'),
    ('step2', ['--config', '{dir}/latin1.json'], 'latin1.json: not UTF-8 text (byte 10'),
    ('step2', ['--config', '{dir}/deep.json'], 'deep.json: JSON nests deeper than 64 levels'),
    ('step2', ['--lut_file', '{no_block}'], 'lut_no_block.json: field "blocks[0]".block: expected 0, got None'),
    ('step2', ['--lut_file', '{layout_x}'], "lut_layout_x.json: field \"blocks[1]\".available_layouts: expected "
                                            "layout ids 0..13, got 'x'"),
    ('step2', ['--lut_file', '{bytes_str}'], "lut_bytes_str.json: field \"link_bytes.fp32[3]\": expected a byte count "
                                             ">= 0, got 'many'"),
    ('step2', ['--lut_file', '{bytes_nan}'], 'lut_bytes_nan.json: field link_bytes.fp16[2] is nan'),
    ('step2', ['--lut_file', '{bytes_neg}'], 'lut_bytes_neg.json: field "link_bytes.fp32[0]": expected a byte count '
                                             '>= 0, got -5'),
    ('step2', ['--lut_file', '{deep_lut}'], 'deep.json: JSON nests deeper than 64 levels'),
    ('step3', ['--domain_id', '0'], 'trained_hyper_weights.json: field domains.0.blocks[0].alpha.D is nan'),
    ('step3', ['--domain_id', '0', '--epsilon', '-1'], '--epsilon: joint.epsilon: expected a value >= 0, got -1'),
    ('step0', ['--checkpoint', '{dir}/wrong_keys.pt'], 'wrong_keys.pt does not fit RepVGG-A0'),
    ('step0', ['--checkpoint', '{dir}/wrong_shape.pt'], 'size mismatch for linear.weight: copying a param with shape '
                                                        'torch.Size([7, 3]) from checkpoint'),
    ('step0', ['--checkpoint', '{dir}/pickle.pt'], 'pickle.pt refused: it holds Python objects, not only tensors'),
    ('step0', ['--dirichlet_alpha', '0'], '--dirichlet_alpha: data.dirichlet_alpha: expected a value > 0, got 0'),
    ('step0', ['--set', 'data.val_fraction=0.6', '--set', 'data.test_fraction=0.5'], 'must leave training samples'),
    ('step4', ['--set', 'train.threads=-2'], 'train.threads: expected a value >= 0, got -2'),
]


def _step(name):
    from pipeline import step0_prepare, step1_measure_lut, step2_initial_throughput_opt, step4_visualize_results
    from pipeline import step_3_joint
    return {'step0': step0_prepare, 'step1': step1_measure_lut, 'step2': step2_initial_throughput_opt,
            'step3': step_3_joint, 'step4': step4_visualize_results}[name]


def _snapshot(root):
    from pathlib import Path
    return {str(p): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


@pytest.mark.parametrize('step, args, expected', CASES, ids=[f'{c[0]} {" ".join(c[1])}'[:60] for c in CASES])
def test_bad_file_or_flag_exits_2_with_one_line_naming_it(files, step, args, expected, monkeypatch, capsys):
    argv = [a.format(**files) for a in args]
    if '--results_dir' not in argv:
        argv += ['--results_dir', files['res']]
    before = _snapshot(files['dir'])
    monkeypatch.setattr(sys, 'argv', [f'{step}.py', *SMALL, *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_step(step).main)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expected in lines[0], lines[0]
    assert 'Traceback' not in err
    assert _snapshot(files["dir"]) == before  # nothing written, nothing good overwritten
    print(f"TABLE|{step} {' '.join(args)}|{lines[0]}")
