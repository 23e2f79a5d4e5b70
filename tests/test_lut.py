"""Step 1: measurement, device profiles, link presets, LUT merge / validated loading / cost tables, step1 main()."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from artifacts import ArtifactError, write_artifact
from config import Config, ConfigError
from hyper_repvgg import block_plan
from timing import flops as F
from timing import lut as L
from timing import measure as M
from timing.profiles import PROFILES, ProfileError, get_profile

TINY = {'name': 'RepVGG-A0', 'num_classes': 10, 'width_multiplier': [0.25, 0.25, 0.25, 0.25], 'small_input': False}
TINY_ARGS = ['--model', 'A0', '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--input_size', '32',
             '--dataset', 'synthetic', '--set', 'lut.threads=1', '--repeats', '2', '--warmup', '1',
             '--set', 'lut.validation_samples=3']


@pytest.fixture(scope='module')
def measured():
    return M.measure_side(TINY, 32, (1,), 'cpu', warmup=1, repeats=3, threads=1, microbenchmark=False, timing='chain')


def _lut(measured, link=L.LINK_PRESETS['wifi']):
    server = L.side_payload('server', TINY, 32, dict(measured, roofline={'peak_flops_per_s': 1e11,
                                                                         'mem_bandwidth_bytes_per_s': 1e10,
                                                                         'knee_flop_per_byte': 10.0}))
    edge = L.modelled_side(get_profile('jetson-tx2'), TINY, 32, [1])
    return L.merge(server, edge, link, 'fp32')


def _write(path, lut):
    write_artifact(path, 'hardware_lut_complete', lut, Config(), 'test')
    return path


def test_edge_side_tables_add_the_edge_part_offsets_and_the_server_side_does_not(measured, tmp_path):
    server = L.side_payload('server', TINY, 32, dict(measured, roofline={'peak_flops_per_s': 1e11,
                                                                         'mem_bandwidth_bytes_per_s': 1e10,
                                                                         'knee_flop_per_byte': 10.0}))
    lut0 = L.merge(server, dict(server, side='edge'), L.LINK_PRESETS['wifi'], 'fp32')
    n = lut0['num_blocks']
    offsets = {'1': [0.01 * (k + 1) for k in range(n)]}
    payload = L.merge(dict(server, edge_part_offset_ms=offsets), dict(server, side='edge', edge_part_offset_ms=offsets),
                      L.LINK_PRESETS['wifi'], 'fp32')
    lut = L.load_lut(_write(tmp_path / 'lut.json', payload))
    assert lut['edge']['edge_part_offset_ms'] == offsets  # merge carries them
    assert np.allclose(L.side_ms(lut, 'server', 1), L.side_ms(lut0, 'server', 1), equal_nan=True)
    want = np.maximum(L.side_ms(lut0, 'edge', 1) + 0.01 * np.arange(1, n + 1)[:, None], 0)
    assert np.allclose(L.side_ms(lut, 'edge', 1), want, equal_nan=True)
    payload['edge']['edge_part_offset_ms'] = {'1': [0.0] * (n - 1)}
    with pytest.raises(ArtifactError, match=r'field "edge"\.edge_part_offset_ms\[1\]: expected \d+ finite times'):
        L.load_lut(_write(tmp_path / 'bad.json', payload))


# --------------------------------------------------------------------------------------------- measurement

def test_measured_entries_cover_exactly_the_measurable_layouts(measured):
    plan = block_plan(TINY['name'], TINY['width_multiplier'])
    by_block = {}
    for e in measured['entries']:
        by_block.setdefault(e['block'], []).append(e['layout'])
        assert e['n'] == 3 and 0 < e['p10_ms'] <= e['median_ms'] <= e['p90_ms']
    for spec in plan:
        assert sorted(by_block[spec.index]) == F.measurable_layouts(spec)
    assert sorted(by_block[0]) == [0, 1, 3, 4]  # stage0: 3 -> 16 channels, stride 2, no identity
    assert len(measured['head']) == 1 and measured['head'][0]['median_ms'] > 0
    assert measured['metadata']['threads'] == 1 and 'power_mode' in measured['metadata']


def test_time_callable_budget_keeps_minimum_runs():
    import time
    out = M.time_callable(lambda: time.sleep(0.002), 'cpu', warmup=0, repeats=100, max_time_s=0.001)
    assert out['n'] == M.MIN_TIMED_RUNS and out['median_ms'] >= 2.0


def test_roofline_microbenchmark_is_positive():
    r = M.roofline_microbenchmark('cpu', matmul_n=128, copy_mb=4, repeats=3)
    assert r['peak_flops_per_s'] > 1e8 and r['mem_bandwidth_bytes_per_s'] > 1e8
    assert r['knee_flop_per_byte'] == pytest.approx(r['peak_flops_per_s'] / r['mem_bandwidth_bytes_per_s'])


# --------------------------------------------------------------------------------------------- profiles, link

@pytest.mark.parametrize('name', sorted(PROFILES))
def test_profile_model_is_monotone_and_sourced(name):
    p = get_profile(name)
    for v in (p.peak_flops_fp32, p.peak_flops_fp16, p.mem_bandwidth, p.compute_efficiency, p.memory_efficiency,
              p.kernel_overhead_s):
        assert v.value > 0 and len(v.source) > 10
    grid = np.geomspace(1e3, 1e11, 25)
    for kernels in (0, 2, 6):
        t_f = [p.predict_ms(f, 1e6, kernels) for f in grid]
        t_b = [p.predict_ms(1e6, b, kernels) for b in grid]
        assert all(a <= b for a, b in zip(t_f, t_f[1:])) and t_f[-1] > t_f[0]
        assert all(a <= b for a, b in zip(t_b, t_b[1:])) and t_b[-1] > t_b[0]
    assert p.predict_ms(1e6, 1e6, 3) > p.predict_ms(1e6, 1e6, 2)
    assert p.knee_flop_per_byte() == pytest.approx(p.peak_flops_fp32.value / p.mem_bandwidth.value)


def test_published_tx2_figures_and_unknown_profile():
    tx2 = get_profile('jetson-tx2')
    assert tx2.peak_flops_fp32.value == pytest.approx(665.6e9) and tx2.mem_bandwidth.value == pytest.approx(59.7e9)
    assert get_profile('jetson-nano').peak_flops_fp16.value == pytest.approx(472e9)
    with pytest.raises(ProfileError, match='valid choices: jetson-nano, jetson-orin-nano, jetson-tx2, rpi4'):
        get_profile('jetson-agx')


def test_modelled_side_is_marked_and_absent_layouts_stay_absent():
    side = L.modelled_side(get_profile('rpi4'), TINY, 32, [1, 4])
    assert side['source'] == 'modelled'
    assert all(e['source'] == 'modelled' for e in side['entries'].values())
    assert L.lut_key(0, 13, 1) not in side['entries'] and L.lut_key(0, 4, 1) in side['entries']
    one, four = side['entries'][L.lut_key(5, 13, 1)], side['entries'][L.lut_key(5, 13, 4)]
    assert four['median_ms'] > one['median_ms']


def test_link_presets_and_explicit_values():
    assert {k: v.bandwidth_mbps for k, v in L.LINK_PRESETS.items()} == {'3g': 1.1, '4g': 5.85, 'wifi': 18.88,
                                                                       'ethernet': 1000.0}
    assert all(v.rtt_source and v.bandwidth_source for v in L.LINK_PRESETS.values())
    import dataclasses
    lc = dataclasses.replace(Config().lut, link='4g', bandwidth_mbps=None, rtt_ms=None)
    assert L.resolve_link(lc) == L.LINK_PRESETS['4g']
    link = L.resolve_link(dataclasses.replace(lc, link='wifi', rtt_ms=3.0))
    assert (link.bandwidth_mbps, link.rtt_ms, link.latency_ms, link.name) == (18.88, 3.0, 1.5, 'wifi+explicit')
    link = L.resolve_link(dataclasses.replace(lc, bandwidth_mbps=100.0, rtt_ms=1.0))
    assert link.name == 'custom' and 'explicit' in link.bandwidth_source
    with pytest.raises(ConfigError, match='lut.link'):
        L.resolve_link(dataclasses.replace(lc, link='5g'))
    with pytest.raises(ConfigError, match='bandwidth_mbps'):
        L.resolve_link(dataclasses.replace(lc, bandwidth_mbps=0.0))


# --------------------------------------------------------------------------------------------- merge, load

def test_merge_refuses_mismatched_models_and_sizes(measured):
    server = L.side_payload('server', TINY, 32, dict(measured, roofline={}))
    tx2 = get_profile('jetson-tx2')
    other = dict(TINY, width_multiplier=[0.5, 0.5, 0.5, 0.5])
    with pytest.raises(L.LutError, match='model.width_multiplier'):
        L.merge(server, L.modelled_side(tx2, other, 32, [1]), L.LINK_PRESETS['4g'], 'fp32')
    with pytest.raises(L.LutError, match='input_size: server 32 vs edge 64'):
        L.merge(server, L.modelled_side(tx2, TINY, 64, [1]), L.LINK_PRESETS['4g'], 'fp32')
    with pytest.raises(L.LutError, match='num_classes'):
        L.merge(server, L.modelled_side(tx2, dict(TINY, num_classes=100), 32, [1]), L.LINK_PRESETS['4g'], 'fp32')
    with pytest.raises(L.LutError, match='no common batch size'):
        L.merge(server, L.modelled_side(tx2, TINY, 32, [2]), L.LINK_PRESETS['4g'], 'fp32')


def test_complete_lut_roundtrip_cost_tables_and_block_stats(measured, tmp_path):
    lut = L.load_lut(_write(tmp_path / 'lut.json', _lut(measured)))
    n = lut['num_blocks']
    t = L.cost_tables(lut, 1)
    plan = block_plan(TINY['name'], TINY['width_multiplier'])
    for spec in plan:
        row_valid = np.isfinite(t.server_ms[spec.index])
        assert list(np.flatnonzero(row_valid)) == F.measurable_layouts(spec)
        assert np.array_equal(row_valid, np.isfinite(t.edge_ms[spec.index]))
    assert t.link_bytes[0] == 3 * 32 * 32 and t.link_bytes[-1] == 40
    assert t.latency_ms == pytest.approx(L.LINK_PRESETS['wifi'].rtt_ms / 2)
    assert t.server_head_ms == lut['server']['head'][L.lut_key('head', None, 1)]['median_ms']
    half = L.cost_tables(lut, 1, link=L.LINK_PRESETS['3g'], feature_dtype='fp16')
    assert half.bandwidth_mbps == 1.1 and half.link_bytes[3] == t.link_bytes[3] / 2
    st = L.block_stats(lut)
    for k in ('flops', 'weight_bytes', 'act_bytes', 'intensity'):
        assert st[k].shape == (n, 14) and np.array_equal(np.isfinite(st[k]), t.valid)
    assert st['knee_server'] == 10.0 and st['knee_edge'] == pytest.approx(get_profile('jetson-tx2').knee_flop_per_byte())
    with pytest.raises(L.LutError, match='batch 8 is not in the LUT'):
        L.cost_tables(lut, 8)


def test_runtime_overhead_is_added_to_every_edge_and_server_stage_and_nothing_else(measured, tmp_path):
    from optim import cost as C
    lut = _lut(measured)
    lut['runtime_overhead'] = {'kind': 'measured', 'edge_ms': 0.25, 'server_ms': 0.5, 'batch': 1, 'configurations': []}
    lut = L.load_lut(_write(tmp_path / 'lut.json', lut))
    plain, cal = L.cost_tables(lut, 1, runtime=False), L.cost_tables(lut, 1)
    n = plain.num_blocks
    gammas = np.array([C.fused_gammas(C.measured_kept(plain))] * (n + 1))
    lams = np.arange(n + 1)
    a, b = C.stage_times(gammas, lams, plain), C.stage_times(gammas, lams, cal)
    assert np.allclose(b.edge_ms - a.edge_ms, np.where(lams > 0, 0.25, 0.0))  # an edge stage exists iff lam > 0
    assert np.allclose(b.server_ms - a.server_ms, np.where(lams < n, 0.5, 0.0))  # a server stage iff lam < N
    assert np.array_equal(b.link_ms, a.link_ms)
    other = dict(lut, runtime_overhead=dict(lut['runtime_overhead'], batch=4))  # measured at another batch size
    assert L.cost_tables(other, 1).server_head_ms == plain.server_head_ms
    with pytest.raises(L.LutError, match='runtime_overhead.edge_ms'):
        L.cost_tables(dict(lut, runtime_overhead=dict(lut['runtime_overhead'], edge_ms=-1.0)), 1)


def test_load_lut_errors_name_file_and_field(measured, tmp_path):
    with pytest.raises(ArtifactError, match='does not exist'):
        L.load_lut(tmp_path / 'missing.json')
    bad = tmp_path / 'corrupt.json'
    bad.write_text('{"schema_version": 1, "kind": ')
    with pytest.raises(ArtifactError, match='corrupt.json: not valid JSON'):
        L.load_lut(bad)
    good = _lut(measured)
    path = _write(tmp_path / 'lut.json', good)
    obj = json.loads(path.read_text())
    del obj['link_bytes']
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match="lut.json: missing field 'link_bytes'"):
        L.load_lut(path)
    obj = json.loads(_write(tmp_path / 'lut.json', good).read_text())
    obj['edge']['entries'][L.lut_key(4, 9, 1)]['median_ms'] = 'fast'
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match=r'edge.*entries\[k4_g9_b1\]\.median_ms'):
        L.load_lut(path)
    obj = json.loads(_write(tmp_path / 'lut.json', good).read_text())
    del obj['server']['entries'][L.lut_key(8, 5, 1)]
    path.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match='server LUT has no entry for block 8, gamma 5, batch 1'):
        L.load_lut(path)


def test_old_artifacts_with_client_names_still_load(measured, tmp_path):
    """hardware_lut_complete.json / lut_client.json written before the edge device had one name."""
    good = _lut(measured)
    obj = json.loads(_write(tmp_path / 'hardware_lut_complete.json', good).read_text())
    obj['client'] = obj.pop('edge')
    (tmp_path / 'hardware_lut_complete.json').write_text(json.dumps(obj))
    lut = L.load_lut(tmp_path / 'hardware_lut_complete.json')
    assert 'client' not in lut and lut['edge']['entries'] == good['edge']['entries']
    side = L.modelled_side(get_profile('jetson-tx2'), TINY, 32, [1])
    write_artifact(tmp_path / 'lut_client.json', 'lut_client', dict(side, side='client'), Config(), 'test')
    old = L.load_side(tmp_path / 'lut_client.json', 'edge')
    assert old['kind'] == 'lut_edge' and old['side'] == 'edge' and old['entries'] == side['entries']
    assert L.upgrade_edge_naming({'kind': 'lut_edge', 'edge': 1}) == {'kind': 'lut_edge', 'edge': 1}


def test_old_config_key_client_profile_names_the_new_key(tmp_path):
    from config import apply_overrides
    with pytest.raises(ConfigError, match="'client_profile' was renamed; use 'lut.edge_profile'"):
        apply_overrides(Config(), {'lut': {'client_profile': 'rpi4'}}, str(tmp_path / 'cfg.json'))
    with pytest.raises(ConfigError, match="lut.client_profile: key 'client_profile' was renamed"):
        apply_overrides(Config(), {'lut.client_profile': 'rpi4'}, '--set')


def test_missing_entry_in_cost_tables_names_block_gamma_batch(measured):
    lut = _lut(measured)
    del lut['edge']['entries'][L.lut_key(2, 11, 1)]
    with pytest.raises(L.LutError, match='edge LUT has no entry for block 2, gamma 11, batch 1'):
        L.cost_tables(lut, 1)


def test_lut_key_is_unique():
    keys = {L.lut_key(k, g, b) for k in range(30) for g in range(14) for b in (1, 2, 16)}
    assert len(keys) == 30 * 14 * 3 and L.lut_key('head', None, 4) not in keys


# --------------------------------------------------------------------------------------------- validation

def test_validation_summary_maths():
    recs = [{'error_pct': {'total': e, 'edge': None, 'server': e}} for e in (1.0, -5.0, 9.9, -12.0, 30.0)]
    s = L.validation_summary(recs)
    assert s['total']['share_within_tol'] == pytest.approx(0.6) and s['total']['median_abs_error_pct'] == 9.9
    assert s['edge']['count'] == 0 and s['edge']['median_abs_error_pct'] is None


def test_random_configurations_are_valid_and_seeded():
    a = L.random_configurations(TINY, 5, np.random.default_rng(1))
    b = L.random_configurations(TINY, 5, np.random.default_rng(1))
    assert a == b
    plan = block_plan(TINY['name'], TINY['width_multiplier'])
    for c in a:
        assert 0 <= c['lam'] <= len(plan)
        assert all(g in F.measurable_layouts(s) for g, s in zip(c['gammas'], plan))


# --------------------------------------------------------------------------------------------- step 1 main

def test_step1_pseudo_then_edge_replay(tmp_path, capsys):
    from pipeline.step1_measure_lut import main
    rd = ['--results_dir', str(tmp_path)]
    assert main(['--mode', 'pseudo', *TINY_ARGS, *rd, '--link', 'wifi', '--rtt_ms', '4']) == 0
    out = capsys.readouterr().out
    assert 'modelled from device profile jetson-tx2' in out and 'LUT validation' in out
    lut = L.load_lut(tmp_path / 'hardware_lut_complete.json')
    assert lut['edge']['source'] == 'modelled' and lut['server']['source'] == 'measured'
    assert lut['link']['rtt_ms'] == 4.0 and lut['link']['bandwidth_mbps'] == 18.88
    assert lut['model'] == TINY and lut['input_size'] == 32
    val = json.loads((tmp_path / 'lut_validation.json').read_text())
    assert val['kind'] == 'lut_validation' and len([r for r in val['records'] if not r['anchor']]) == 3
    assert 0.0 <= val['summary']['total']['share_within_tol'] <= 1.0
    assert math.isfinite(val['summary']['total']['median_abs_error_pct'])
    # a measured edge LUT (as the device would produce it) is replayed by pseudo mode and kept
    assert main(['--mode', 'client', '--no_validate', *TINY_ARGS, *rd]) == 0
    assert main(['--mode', 'pseudo', '--no_validate', *TINY_ARGS, *rd]) == 0
    assert 'replaying the measured' in capsys.readouterr().out
    assert L.load_lut(tmp_path / 'hardware_lut_complete.json')['edge']['source'] == 'measured'
    # another input size: the measured edge LUT does not fit, is kept, and the modelled one goes beside it
    assert main(['--mode', 'pseudo', '--no_validate', *TINY_ARGS, *rd, '--input_size', '40']) == 0
    assert json.loads((tmp_path / 'lut_edge.json').read_text())['source'] == 'measured'
    assert (tmp_path / 'lut_edge_modelled.json').is_file()
    # merge mode refuses the mismatched pair on disk
    with pytest.raises(L.LutError, match='input_size'):
        main(['--mode', 'merge', *TINY_ARGS, *rd, '--input_size', '40'])


def test_step1_bad_input_writes_nothing(tmp_path):
    from pipeline.step1_measure_lut import main
    with pytest.raises(ProfileError, match='unknown device profile'):
        main(['--mode', 'pseudo', *TINY_ARGS, '--results_dir', str(tmp_path), '--edge_profile', 'pi5'])
    with pytest.raises(ConfigError, match='lut.link'):
        main(['--mode', 'pseudo', *TINY_ARGS, '--results_dir', str(tmp_path), '--link', 'lte'])
    with pytest.raises(ArtifactError, match='lut_server.json'):
        main(['--mode', 'merge', *TINY_ARGS, '--results_dir', str(tmp_path)])
    assert not any(Path(tmp_path).iterdir())


def test_roofline_fit_recovers_a_profile_model():
    tx2 = get_profile('jetson-tx2')
    side = L.modelled_side(tx2, dict(TINY, width_multiplier=[1.0, 1.0, 1.0, 1.0]), 64, [1])
    fit = L.roofline_fit(side)
    assert fit['median_abs_error_pct'] < 5.0 and fit['share_within_10pct'] > 0.9
    assert fit['kernel_overhead_s'] == pytest.approx(tx2.kernel_overhead_s.value, rel=0.3)
