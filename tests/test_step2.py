"""Step 2 (pipeline/step2_initial_throughput_opt.py) on a tiny LUT built through timing.lut from device profiles."""
import dataclasses
import json
import subprocess
import sys

import pytest

from artifacts import ArtifactError, load_artifact, write_artifact
from config import REPO_ROOT, Config, ConfigError, DataConfig, ModelConfig, UserError
from timing import lut as L
from timing.profiles import get_profile
from pipeline import step2_initial_throughput_opt as step2
from viz.summary import load_step2

TINY_WIDTH = (0.25, 0.25, 0.25, 0.25)
OUT = 'initial_throughput_config.json'
VOLATILE = ('created_at', 'wall_s')  # the only fields allowed to differ between two runs with the same seed


def _write_lut(tmp_path, link='wifi', batch_sizes=(1,), edge_profile='jetson-tx2'):
    """hardware_lut_complete.json: the TX2 profile as the edge, the Orin Nano profile as the 'server'."""
    cfg = Config(model=ModelConfig(input_size=32, width_multiplier=TINY_WIDTH),
                 data=DataConfig(dataset='synthetic'), results_dir=str(tmp_path))
    model = L.model_spec(cfg)
    edge = L.modelled_side(get_profile(edge_profile), model, 32, list(batch_sizes), side='edge')
    server = L.modelled_side(get_profile('jetson-orin-nano'), model, 32, list(batch_sizes), side='server')
    payload = L.merge(server, edge, L.LINK_PRESETS[link], 'fp32')
    path = cfg.path('hardware_lut_complete.json')
    write_artifact(path, 'hardware_lut_complete', payload, cfg, 'test')
    return path


def _run(tmp_path, *flags):
    assert step2.main(['--results_dir', str(tmp_path), '--steps', '100', '--restarts', '2', *flags]) == 0
    return load_artifact(tmp_path / OUT, 'initial_throughput_config')


def test_writes_a_valid_artifact_that_step4_reads(tmp_path, capsys):
    _write_lut(tmp_path)
    obj = _run(tmp_path)
    n = obj['num_blocks']
    assert len(obj['gammas']) == n and 0 <= obj['lam'] <= n and len(obj['layouts']) == n
    for f in ('edge_ms', 'link_ms', 'server_ms', 'latency_ms', 'throughput_fps', 'bottleneck'):
        assert f in obj['predicted'] and f in obj['exact']
    assert 0.0 <= obj['gap_pct'] <= 1.0 and obj['gradient_descent']['gap_pct'] >= obj['gap_pct']
    assert obj['predicted']['throughput_fps'] >= obj['baselines']['best_plain_split']['throughput_fps'] * 0.99
    assert set(obj['baselines']) == {'edge_only', 'server_only', 'best_plain_split'}
    assert obj['baselines']['edge_only']['lam'] == n and obj['baselines']['server_only']['lam'] == 0
    assert set(obj['objective_choices']) == {'min_latency', 'max_throughput'}
    assert obj['link']['name'] == 'wifi' and obj['edge']['profile'] == 'jetson-tx2'
    assert len(obj['history']['restarts']) == 2 and obj['history']['restarts'][0]['relaxed_loss_ms']
    assert obj['config']['optim']['steps'] == 100
    view = load_step2(tmp_path / OUT)
    assert view.lam == obj['lam'] and view.gap_pct == obj['gap_pct'] and set(view.baselines) == set(obj['baselines'])
    out = capsys.readouterr().out
    for label in ('chosen', 'exact optimum', 'edge only', 'server only', 'best plain split', 'gap to the exact'):
        assert label in out


def test_same_seed_gives_the_same_artifact(tmp_path):
    _write_lut(tmp_path)
    texts = []
    for _ in range(2):
        obj = _run(tmp_path, '--seed', '5')
        for f in VOLATILE:
            obj.pop(f)
        texts.append(json.dumps(obj, sort_keys=True))
    assert texts[0] == texts[1]
    raw = (tmp_path / OUT).read_text()
    assert '"wall_s"' in raw and '"created_at"' in raw


def test_link_flags_re_evaluate_the_lut(tmp_path):
    _write_lut(tmp_path, link='wifi')
    wifi = _run(tmp_path)
    g4 = _run(tmp_path, '--link', '4g')
    assert g4['link']['name'] == '4g' and g4['link']['bandwidth_mbps'] == 5.85
    assert g4['baselines']['server_only']['link_ms'] > wifi['baselines']['server_only']['link_ms']
    custom = _run(tmp_path, '--bandwidth_mbps', '100', '--rtt_ms', '2')
    assert custom['link']['bandwidth_mbps'] == 100.0 and custom['link']['latency_ms'] == 1.0
    assert custom['link']['name'] == 'custom'  # both overridden: nothing of the LUT's link is left
    assert _run(tmp_path, '--rtt_ms', '2')['link']['name'] == 'wifi+explicit'  # the LUT's link, one override
    with pytest.raises(UserError, match='--bandwidth_mbps: lut.bandwidth_mbps: expected a value > 0, got -3'):
        step2.main(['--results_dir', str(tmp_path), '--bandwidth_mbps', '-3'])
    with pytest.raises(UserError, match='unknown link preset'):
        step2.main(['--results_dir', str(tmp_path), '--link', '5g'])


def test_edge_profile_must_match_the_lut(tmp_path):
    _write_lut(tmp_path)
    _run(tmp_path, '--edge_profile', 'jetson-tx2')
    with pytest.raises(L.LutError, match="profile 'jetson-tx2'; re-run step 1 with --edge_profile rpi4"):
        step2.main(['--results_dir', str(tmp_path), '--edge_profile', 'rpi4'])
    with pytest.raises(L.LutError, match='re-run step 1 with --edge_profile rpi4'):
        step2.main(['--results_dir', str(tmp_path), '--set', 'lut.edge_profile=rpi4'])
    with pytest.raises(UserError, match="unknown device profile 'tx3'"):
        step2.main(['--results_dir', str(tmp_path), '--edge_profile', 'tx3'])


def test_one_profile_rule_for_steps_2_and_3(tmp_path):
    """A LUT modelled for jetson-nano: used as is when no profile is asked (flag or changed config key), refused
    when another one is; step 3 calls the same pipeline.throughput.check_edge_profile (pipeline/joint.py)."""
    from pipeline import throughput as T
    lut = L.load_lut(_write_lut(tmp_path, edge_profile='jetson-nano'))
    assert T.requested_profile(False, Config()) is None
    T.check_edge_profile(lut, T.requested_profile(False, Config()), 'lut')
    assert _run(tmp_path)['edge']['profile'] == 'jetson-nano'
    _run(tmp_path, '--edge_profile', 'jetson-nano')
    with pytest.raises(L.LutError, match="--edge_profile jetson-tx2: .* profile 'jetson-nano'"):
        step2.main(['--results_dir', str(tmp_path), '--edge_profile', 'jetson-tx2'])
    asked = Config(lut=dataclasses.replace(Config().lut, edge_profile='rpi4'))
    assert T.requested_profile(False, asked) == 'rpi4' and T.requested_profile(True, Config()) == 'jetson-tx2'
    with pytest.raises(L.LutError, match='re-run step 1 with --edge_profile rpi4'):
        T.check_edge_profile(lut, T.requested_profile(False, asked), 'lut')
    measured = dict(lut, edge=dict(lut['edge'], source='measured', profile=None))
    T.check_edge_profile(measured, None, 'lut')
    with pytest.raises(L.LutError, match='was measured on'):
        T.check_edge_profile(measured, 'jetson-tx2', 'lut')


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match='hardware_lut_complete.json: artifact file does not exist'):
        step2.main(['--results_dir', str(tmp_path)])
    path = _write_lut(tmp_path)
    with pytest.raises(L.LutError, match=r'batch 4 is not in the LUT; measured batch sizes: \[1\]'):
        step2.main(['--results_dir', str(tmp_path), '--batch_size', '4'])
    with pytest.raises(UserError, match='unknown objective'):
        step2.main(['--results_dir', str(tmp_path), '--objective', 'fps'])
    with pytest.raises(ConfigError, match='no_such_key'):
        step2.main(['--results_dir', str(tmp_path), '--set', 'optim.no_such_key=1'])
    obj = json.loads(path.read_text())
    obj['blocks'] = obj['blocks'][:-1]  # a LUT missing a block
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match='field "blocks" has'):
        step2.main(['--results_dir', str(tmp_path)])
    obj = json.loads(_write_lut(tmp_path).read_text())
    del obj['edge']['entries'][L.lut_key(2, 13, 1)]  # a missing entry (block 2 has an identity branch)
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match='edge LUT has no entry for block 2, gamma 13, batch 1'):
        step2.main(['--results_dir', str(tmp_path), '--lut_file', str(path)])


def test_cli_help_import_and_exit_code(tmp_path):
    script = REPO_ROOT / 'pipeline' / 'step2_initial_throughput_opt.py'
    r = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '--lut_file' in r.stdout and '(default: throughput)' in r.stdout
    r = subprocess.run([sys.executable, str(script), '--results_dir', str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith('error: ') and 'Traceback' not in r.stderr


def test_bench_optimizer_quick(tmp_path):
    from bench import bench_optimizer
    assert bench_optimizer.main(['--quick', '--out_dir', str(tmp_path)]) == 0
    obj = load_artifact(tmp_path / 'optimizer_step2.json', 'bench_optimizer_step2')
    assert obj['quick'] is True and obj['random']['summary']['instances'] == 5
    assert obj['random']['summary']['max_gap_pct'] <= 1.0 and all(c['gap_pct'] <= 1.0 for c in obj['cases'])
    with pytest.raises(ConfigError, match='--sections'):
        bench_optimizer.main(['--sections', 'step9', '--out_dir', str(tmp_path)])


def test_steps_2_and_3_use_the_luts_own_link_unless_told_otherwise():
    from config import LutConfig
    from pipeline.throughput import link_for
    lut = {'link': {'name': 'measured', 'bandwidth_mbps': 7.5, 'rtt_ms': 12.0}}
    link, source = link_for(lut, LutConfig(), link_flag_given=False)  # default config: the LUT's (measured) link
    assert (link.bandwidth_mbps, link.rtt_ms) == (7.5, 12.0) and 'LUT' in source
    link, source = link_for(lut, LutConfig(link='wifi'), link_flag_given=False)  # another preset in the config
    assert link.bandwidth_mbps == 18.88 and 'preset wifi' in source
    link, _ = link_for(lut, LutConfig(), link_flag_given=True)  # --link ethernet given explicitly
    assert link.name == 'ethernet'
    link, _ = link_for(lut, LutConfig(bandwidth_mbps=3.0), link_flag_given=False)
    assert (link.bandwidth_mbps, link.rtt_ms) == (3.0, 12.0)
