"""One strict config: defaults, --config files, --set and flags; artifacts written atomically and validated."""
import argparse
import json
import re

import pytest

import artifacts
import config


def parse(argv):
    p = argparse.ArgumentParser()
    config.add_common_args(p)
    p.add_argument('--link', default=None)
    return config.resolve_config(p.parse_args(argv), {'link': 'lut.link'})


def test_defaults_are_frozen_and_relative():
    cfg = parse([])
    assert cfg.results_dir == 'results' and not cfg.results_dir.startswith('/')
    assert cfg.path('x.json') == config.REPO_ROOT / 'results' / 'x.json'
    with pytest.raises(Exception):
        cfg.seed = 3


def test_precedence_file_then_set_then_flags(tmp_path):
    f = tmp_path / 'c.json'
    f.write_text(json.dumps({'optim': {'steps': 11}, 'lut': {'link': 'wifi'}, 'seed': 5}))
    cfg = parse(['--config', str(f), '--set', 'optim.steps=12', '--link', '3g', '--model', 'B3'])
    assert (cfg.optim.steps, cfg.lut.link, cfg.seed, cfg.model.name) == (12, '3g', 5, 'B3')
    assert parse(['--set', 'lut.batch_sizes=1,4,8']).lut.batch_sizes == (1, 4, 8)
    assert parse(['--set', 'lut.bandwidth_mbps=none']).lut.bandwidth_mbps is None
    assert parse(['--set', 'model.width_multiplier=1,1,1,2']).model.width_multiplier == (1.0, 1.0, 1.0, 2.0)


@pytest.mark.parametrize('argv,needle', [
    (['--set', 'optim.no_such_key=1'], 'no_such_key'),
    (['--set', 'nosection.steps=1'], 'nosection'),
    (['--set', 'optim.steps=abc'], 'optim.steps'),
    (['--set', 'model.small_input=maybe'], 'model.small_input'),
    (['--set', 'model.width_multiplier=1,2'], 'expected 4 values'),
    (['--seed', 'x'], '--seed'),
    (['--set', 'loop.pace_quantile=0'], 'loop.pace_quantile'),
    (['--set', 'loop.pace_quantile=101'], 'loop.pace_quantile'),
])
def test_unknown_keys_and_wrong_types_are_named(argv, needle):
    with pytest.raises(config.ConfigError, match=needle):
        parse(argv)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{not json')
    with pytest.raises(config.ConfigError, match='bad.json'):
        parse(['--config', str(bad)])
    wrong = tmp_path / 'wrong.json'
    wrong.write_text(json.dumps({'optim': {'stepz': 1}}))
    with pytest.raises(config.ConfigError, match='stepz'):
        parse(['--config', str(wrong)])
    with pytest.raises(config.ConfigError, match='does not exist'):
        parse(['--config', str(tmp_path / 'missing.json')])


def test_run_cli_exits_2_with_the_message(capsys):
    def main(argv):
        parse(['--set', 'optim.no_such_key=1'])
    with pytest.raises(SystemExit) as e:
        config.run_cli(main)
    assert e.value.code == 2
    assert 'no_such_key' in capsys.readouterr().err


def test_artifact_roundtrip_and_validation(tmp_path):
    cfg = parse([])
    path = tmp_path / 'sub' / 'a.json'
    artifacts.write_artifact(path, 'demo', {'time_ms': 1.5, 'blocks': [1, 2]}, cfg, 'demo --x')
    obj = artifacts.load_artifact(path, 'demo', {'time_ms': float, 'blocks': list})
    assert obj['config']['optim']['steps'] == cfg.optim.steps and obj['command'] == 'demo --x'
    assert [p.name for p in path.parent.iterdir()] == ['a.json']  # no temp file left behind
    with pytest.raises(artifacts.ArtifactError, match=r'a.json: field "kind"'):
        artifacts.load_artifact(path, 'other')
    with pytest.raises(artifacts.ArtifactError, match="missing field 'nope'"):
        artifacts.load_artifact(path, 'demo', {'nope': int})
    with pytest.raises(artifacts.ArtifactError, match="'blocks' should be dict"):
        artifacts.load_artifact(path, 'demo', {'blocks': dict})
    path.write_text('{"trunc')
    with pytest.raises(artifacts.ArtifactError, match='not valid JSON'):
        artifacts.load_artifact(path)
    with pytest.raises(artifacts.ArtifactError, match='does not exist'):
        artifacts.load_artifact(tmp_path / 'none.json')


def test_failed_write_leaves_the_old_artifact(tmp_path):
    path = tmp_path / 'a.json'
    artifacts.write_artifact(path, 'demo', {'v': 1}, None, 'x')
    with pytest.raises(ValueError, match='non-finite'):
        artifacts.write_artifact(path, 'demo', {'v': float('nan')}, None, 'x')
    assert artifacts.load_artifact(path)['v'] == 1
    assert len(list(tmp_path.iterdir())) == 1


def test_artifacts_are_written_with_the_umask_mode_not_0600(tmp_path):
    """Others on a shared server can read the results: 0666 minus the umask, like a plain open()."""
    import os
    old = os.umask(0o022)
    try:
        artifacts.write_artifact(tmp_path / 'a.json', 'demo', {}, None, 'demo')
        artifacts.atomic_write_bytes(tmp_path / 'b.bin', b'x')
        assert (tmp_path / 'a.json').stat().st_mode & 0o777 == 0o644
        assert (tmp_path / 'b.bin').stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        artifacts.atomic_write_bytes(tmp_path / 'c.bin', b'x')
        assert (tmp_path / 'c.bin').stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def _shown(value):
    """How a --help text shows a Config default (tuples comma-separated)."""
    return ','.join(str(v) for v in value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize('step', ['step0_prepare', 'step1_measure_lut', 'step2_initial_throughput_opt',
                                  'step_3_joint', 'step4_visualize_results'])
def test_every_help_default_is_the_config_default(step, monkeypatch, capsys):
    """Each flag mapped to a config key shows Config()'s value as its default (typed by hand, they drift)."""
    import importlib
    mod = importlib.import_module(f'pipeline.{step}')
    monkeypatch.setenv('COLUMNS', '2000')  # one line per flag
    with pytest.raises(SystemExit):
        mod.main(['--help'])
    lines, flag = {}, None
    for ln in capsys.readouterr().out.splitlines():  # a flag's entry: its line and the indented help after it
        if ln.strip().startswith('-'):
            flag = ln.split()[0].rstrip(',')
            lines[flag] = ln
        elif flag and ln.startswith('   '):
            lines[flag] += ' ' + ln.strip()
        else:
            flag = None
    flags = {flag: key for flag, (key, _) in config.COMMON_FLAGS.items()}
    flags.update(getattr(mod, 'FLAGS', None) or getattr(mod, 'FLAG_KEYS', None) or {})
    reevaluate = step != 'step1_measure_lut'  # steps 2-3 read a LUT whose own link is the default
    checked = 0
    for flag, key in flags.items():
        value = config.default_of(key)
        if value is None or isinstance(value, bool) or (reevaluate and flag in config.LINK_FLAGS):
            continue
        line = lines[f'--{flag}']
        assert re.search(r'\(default: [^)]*\b' + re.escape(_shown(value)) + r'\b', line), (flag, key, line)
        checked += 1
    assert checked >= len(config.COMMON_FLAGS)
