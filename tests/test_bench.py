"""bench/: bench_lut.py --quick end to end (tiny model, a few seconds), the run_pipeline.sh log parser and the
generated bench README."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import bench_pipeline, common

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def lut_result(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'bench_lut.py'), '--quick', '--out_dir', str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / 'lut_fidelity.json').read_text()), proc.stdout


def test_bench_lut_quick_fields(lut_result):
    out, obj, stdout = lut_result
    assert obj['kind'] == 'bench_lut_fidelity' and obj['quick'] is True and 'bench_lut.py' in obj['command']
    m = obj['machine']
    assert m['cpu_cores'] >= 1 and m['cpu_model'] and m['torch_version'].startswith('2.')
    (row,) = obj['models'].values()
    assert row['num_blocks'] == 22 and row['batch'] == 1 and row['configurations'] == 4
    # the validation configurations were timed in the fit's own rounds; the later window re-timed them with anchors
    unseen = row['records']
    assert len(unseen) == 4 and not any(r['anchor'] or r['seen_by_fit'] for r in unseen)
    assert len(row['later']['records']) == 4 + row['speed']['anchors']
    assert row['settings']['validation_visits'] == 2 * row['settings']['fit_rounds']
    assert row['lut_entries'] > 22 and row['settings']['timing'] == 'fit'
    fit = row['methods']['fit']
    assert 0.0 <= fit['share_within_10pct'] <= 1.0 and fit['median_abs_error_pct'] >= 0.0
    assert fit['spearman_rho'] is None or -1.0 <= fit['spearman_rho'] <= 1.0
    errs = sorted(abs(r['error_pct']['total']) for r in unseen)
    assert fit['median_abs_error_pct'] == pytest.approx((errs[1] + errs[2]) / 2)
    assert fit['share_within_10pct'] == pytest.approx(sum(e <= 10.0 for e in errs) / 4)
    # re-anchored: the later window's measurements against the LUT's sums times that window's speed factor
    f = row['speed']['factor']
    later = [r for r in row['later']['records'] if not r['anchor']]
    aerrs = sorted(abs(100 * (f * r['predicted']['total_ms'] - r['measured']['total_ms']) / r['measured']['total_ms'])
                   for r in later)
    assert row['methods']['fit, a later window, re-anchored']['median_abs_error_pct'] == pytest.approx(
        (aerrs[1] + aerrs[2]) / 2)
    assert fit['noise']['passes'] == 2 and fit['noise']['pass_to_pass_pct'] >= 0.0
    assert row['methods']['chain']['configurations'] == 4 and isinstance(row['loaded'], bool)
    assert len(row['load_average_start']) == 3 and 'met' in fit['targets']
    assert 'configurations within +/-10 %' in [h[0] for h in obj['headline']][0]
    assert obj['tables'][0]['columns'][0] == 'model' and len(obj['tables'][0]['rows']) == 4
    assert 'Spearman rho' in stdout and 'noise floor' in stdout


def test_report_readme_from_results(lut_result):
    out, obj, _ = lut_result
    results = common.collect(out)
    text = common.readme_text(results, '2000-01-01 00:00 UTC')
    assert 'Generated 2000-01-01 00:00 UTC' in text and obj['machine']['cpu_model'] in text
    assert '| lut_fidelity (quick) |' in text and obj['tables'][0]['title'] in text


def test_report_rejects_non_bench_file(tmp_path):
    (tmp_path / 'x.json').write_text('{"a": 1}')
    with pytest.raises(common.UserError, match='x.json'):
        common.collect(tmp_path)


def test_bench_lut_unknown_model_is_named(tmp_path):
    from bench import bench_lut
    with pytest.raises(common.UserError, match='b3_224'):
        bench_lut.main(['--models', 'b9', '--out_dir', str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_parse_pipeline_log():
    log = '\n'.join(['== step 0 (data, base model, hyper-weights): pipeline/step0_prepare.py',
                     '== step 0 (data, base model, hyper-weights) done in 131 s',
                     '== step 1: reusing results/hardware_lut_complete.json (delete it, or --fresh, to measure again)',
                     '== step 2 (throughput) done in 7 s',
                     'run_pipeline.sh: step 3 (joint, per domain) failed (see the message above); finished work '
                     'is kept, rerun to resume'])
    steps = bench_pipeline.parse_log(log)
    assert steps['0'] == {'description': 'data, base model, hyper-weights', 'status': 'done', 'wall_s': 131.0}
    assert steps['1']['status'] == 'reused' and steps['2']['wall_s'] == 7.0 and steps['3']['status'] == 'failed'
    rows = bench_pipeline.step_rows(steps)
    assert rows[4] == ['step 4', '', None, 'not reached']


@pytest.fixture(scope='module')
def quality_result(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench_quality')
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'bench_quality.py'), '--quick', '--links',
                           'ethernet,3g', '--out_dir', str(out)], capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / 'quality.json').read_text()), proc.stdout


@pytest.mark.slow
def test_bench_quality_quick_per_link_rows_and_summary(quality_result):
    obj, stdout = quality_result
    assert obj['kind'] == 'bench_quality' and obj['quick'] is True and list(obj['links']) == ['ethernet', '3g']
    for link, run in obj['links'].items():
        recs, s = run['domains'], run['summary']
        assert [r['domain'] for r in recs] == [0, 1] and s['domains'] == 2
        for r in recs:
            assert r['link']['name'] == link
            assert r['best_plain_split_fps'] >= max(r['edge_only_fps'], r['server_only_fps']) * (1 - 1e-9)
            assert r['joint_over_best_plain'] == pytest.approx(r['joint_fps'] / r['best_plain_split_fps'])
            assert r['accuracy_drop_pct'] == pytest.approx(r['a_ref_pct'] - r['final_accuracy_pct'])
        ratios = [r['joint_over_best_plain'] for r in recs]
        assert s['mean_joint_over_best_plain'] == pytest.approx(sum(ratios) / 2)
        assert s['worst_joint_over_best_plain'] == min(ratios)
        assert s['worst_accuracy_drop_pct'] == max(r['accuracy_drop_pct'] for r in recs)
    # a 3G uplink makes sending anything slower than running the tiny model on the edge
    assert all(r['best_plain_split_lam'] == 22 for r in obj['links']['3g']['domains'])
    assert len(obj['tables'][1]['rows']) == 4 and 'Per domain' in stdout


def test_bench_quality_missing_inputs_are_named(tmp_path):
    from bench import bench_quality
    with pytest.raises(common.UserError, match='partition_info.json'):
        bench_quality.main(['--results_dir', str(tmp_path), '--links', 'wifi', '--out_dir', str(tmp_path / 'o')])
    with pytest.raises(common.UserError, match='5g'):
        bench_quality.main(['--links', 'wifi,5g', '--out_dir', str(tmp_path / 'o')])
    assert not (tmp_path / 'o').exists()


def test_step3_random_goal_program_gd_never_beats_milp():
    import numpy as np

    from bench import bench_optimizer
    from hyper_repvgg import block_plan
    has_id = [s.has_identity for s in block_plan('B3')]
    p, eps = bench_optimizer.random_goal_problem(np.random.default_rng(0), has_id, 0.01)
    assert p.num_blocks == 28 and 0.2 <= eps <= 3.0 and p.loss_budget == pytest.approx(eps)
    assert (p.allowed.sum(1) > [5 if h else 2 for h in has_id]).all()  # pruned layouts are choices too
    r = bench_optimizer._solve_pair(p, 0, {'steps': 20, 'restarts': 1}, 30.0)
    assert r['milp_status'] == 'optimal' and r['gap_pct'] >= -1e-6 and r['num_blocks'] == 28


def test_domain_timings_from_joint_artifacts(tmp_path):
    from artifacts import write_artifact
    for d, wall in ((1, 2.5), (0, 4.0)):
        write_artifact(tmp_path / 'joint_optimization' / f'domain_{d}_joint.json', 'joint_domain',
                       {'domain': d, 'gammas': [0] * 22, 'timing': {'wall_s': wall}}, None, 'test')
    rows = bench_pipeline.domain_timings(tmp_path)
    assert [(r['domain'], r['wall_s'], r['num_blocks']) for r in rows] == [(0, 4.0, 22), (1, 2.5, 22)]


def test_bench_accuracy_summary_counts_violations_and_held_out_error(tmp_path):
    from bench import bench_accuracy as ba

    def case(seed, drop, lo, errs, gain):
        return {'seed': seed, 'domain': 0, 'drop_pct': drop, 'drop_ci95_pct': [lo, drop + 1.0],
                'violation_within_interval': lo <= 1.0, 'held_out_errors_pct': errs, 'gain_x': gain}
    cases = [case(0, 0.2, -0.5, [0.1, -0.3], 1.1), case(0, 1.4, 0.6, [2.0], 1.2), case(1, 1.8, 1.2, [], 1.0)]
    s = ba.summarize(cases, [{'domain': 0, 'drop_pct': 1.5, 'gain_x': 1.3}], 1.0)
    assert s['cases'] == 3 and s['share_within_epsilon'] == pytest.approx(1 / 3) and s['violations'] == 2
    assert s['violations_outside_interval'] == 1  # case 3: its interval starts above epsilon
    assert s['worst_drop_pct'] == 1.8 and s['worst_case'] == 'seed 1 domain 0'
    assert s['surrogate_held_out_points'] == 3 and s['surrogate_median_abs_error_pct'] == pytest.approx(0.3)
    lo, hi = s['mean_drop_ci95_pct']
    assert lo <= s['mean_drop_pct'] <= hi
    assert s['geomean_gain_seed0_x'] == pytest.approx((1.1 * 1.2) ** 0.5)
    assert s['gain_kept_share'] == pytest.approx((s['geomean_gain_seed0_x'] - 1) / 0.3)
    with pytest.raises(ba.BenchQualityError, match='base_model'):
        ba.base_checkpoint(tmp_path)


def test_bench_accuracy_noise_floor_split_errors_and_paired_comparison():
    from bench import bench_accuracy as ba

    def case(d, a_ref, gain, pts):
        return {'seed': 0, 'domain': d, 'drop_pct': 0.5, 'drop_ci95_pct': [0.0, 1.0], 'a_ref_test_pct': a_ref,
                'violation_within_interval': True, 'held_out_errors_pct': [p[1] for p in pts], 'gain_x': gain,
                'held_out_points': [{'where': w, 'error_pct': e, 'val_drop_pct': v, 'test_drop_pct': t,
                                     'centre_distance': c} for w, e, v, t, c in pts]}
    cases = [case(0, 90.0, 1.10, [('round 1', 0.2, 1.0, 1.5, 0), ('pareto eps=4', -2.0, 5.0, 4.0, 3)]),
             case(1, 80.0, 1.20, [('round 1', -0.4, 0.0, None, 1)])]
    today = [{'domain': 0, 'drop_pct': 1.2, 'gain_x': 1.21, 'a_ref_test_pct': 90.0, 'acceptance': 'point'},
             {'domain': 1, 'drop_pct': 0.1, 'gain_x': 1.0, 'a_ref_test_pct': 81.0}]  # other test images: unpaired
    s = ba.summarize(cases, today, 1.0)
    assert s['surrogate_noise_floor_pct'] == pytest.approx(0.75)  # median of |1.0 - 1.5| and |5.0 - 4.0|
    assert s['surrogate_median_abs_error_rounds_pct'] == pytest.approx(0.3)
    assert s['surrogate_median_abs_error_pareto_pct'] == pytest.approx(2.0) and s['surrogate_held_out_pareto_points'] == 1
    # centre_distance 0: a round re-deploying a pruned set measured before; the split leaves it out
    assert s['surrogate_held_out_new_sets_points'] == 2
    assert s['surrogate_median_abs_error_new_sets_pct'] == pytest.approx(1.2)
    assert s['today_paired'] and s['paired_domains'] == 1 and s['today_acceptance'] == ['point']
    assert s['paired_gain_ratio_geomean'] == pytest.approx(1.10 / 1.21)
    assert s['paired_drops_pct'] == [[0, 0.5, 1.2]]
    heads = [h[0] for h in ba.headline_for(s)]
    assert any(h.startswith('paired, 1 domains') for h in heads) and any('noise floor' in h for h in heads)
    assert any('the 2 whose pruned set was never measured before' in h for h in heads)


def _result(name, value):
    return {'bench': name, 'quick': False, 'headline': [[f'{name} metric', value, 's']], '_file': f'{name}.json',
            'created_at': 'then', 'command': f'bench_{name}.py', 'machine': {'cpu_model': 'cpu', 'cpu_cores': 2},
            'tables': [{'title': f'{name} table', 'columns': ['a'], 'rows': [[value]]}]}


def test_update_readme_replaces_only_the_given_benches():
    old = common.readme_text([_result('alpha', 1.0), _result('beta', 2.0)], '2000-01-01 00:00 UTC')
    new = common.update_readme_text(old, [_result('beta', 3.0), _result('gamma', 4.0)], '2001-01-01 00:00 UTC')
    assert '| alpha | alpha metric | 1 | s |' in new and '| beta | beta metric | 3 | s |' in new
    assert '| beta | beta metric | 2 | s |' not in new and '| gamma | gamma metric | 4 | s |' in new
    assert new.count('## beta') == 1 and '## alpha' in new and '## gamma' in new and '| 3 |' in new
    assert 'Generated 2000-01-01 00:00 UTC. Updated 2001-01-01 00:00 UTC: beta, gamma.' in new


def test_executor_projection_makespan():
    from bench import bench_executor
    assert bench_executor.makespan([3, 1, 1, 1], 2) == 3 and bench_executor.makespan([1, 1, 1], 2) == 2
    rows = bench_executor.projection([1.0, 1.0], 2, 2, task_h=1.0, serial_h=0.0, overhead_s=0.0)
    by_gpus = {r[0]: r for r in rows}
    assert by_gpus[1][2] == 4.0 and by_gpus[2][2] == 2.0 and by_gpus[4][4] == 1.0 and by_gpus[8][4] == 0.5


@pytest.mark.slow
def test_bench_repeat_quick_runs_steps_1_2_twice_and_checks_stability(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'bench_repeat.py'), '--quick', '--out_dir',
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    obj = json.loads((tmp_path / 'decision_stability.json').read_text())
    assert obj['kind'] == 'bench_decision_stability' and len(obj['runs']) == 2
    for r in obj['runs']:
        assert r['validation']['window'] == 'fit' and r['validation']['speed']['anchors'] >= 1
        assert r['report']['chosen']['measured_fps'] > 0
        assert str(r['report']['chosen']['lam']) in r['measured_fps_by_lambda']
    metrics = [h[0] for h in obj['headline']]
    assert any('re-anchored' in m for m in metrics) and any('chosen lambda per run' in m for m in metrics)
    assert any('median |error| <= noise floor of the same run' in m for m in metrics)
    lams = {r['report']['chosen']['lam'] for r in obj['runs']}
    spread = next(h[1] for h in obj['headline'] if h[0].startswith('measured throughput difference'))
    assert (spread == 0.0) == (len(lams) == 1)


def test_bench_lut_runs_a_plain_network_case_without_a_spearman_target():
    from bench import bench_lut
    arch = {'name': 'mobilenet_v2', 'num_classes': 10, 'width_multiplier': [0.25] * 4, 'small_input': False}
    case = bench_lut.Case('mbv2_224', 'MobileNetV2 w0.25 32 px (test)', arch, 32, 1, 2, 0.0, 4, 4, 2, 1, 4)
    r = bench_lut.run_case(case, 1, 0)
    assert r['num_blocks'] == 19 and r['lut_entries'] == 19
    assert all(rec['gammas'] == [0] * 19 for rec in r['records'])
    assert 'Spearman' not in r['methods']['fit']['targets']['rule']
    assert set(bench_lut.PLAIN_CASES) <= set(bench_lut.cases(False))


def test_bench_optimizer_step2_cases_include_the_plain_networks_at_224_px():
    from bench import bench_optimizer
    from config import OptimConfig
    from pipeline.throughput import unpruned_valid
    from timing import lut as L
    from timing.profiles import get_profile
    cases = bench_optimizer._lut_cases(False)
    assert {'MobileNetV2 (224 px)', 'ResNet-50 (224 px)'} <= set(cases)
    model, size = cases['ResNet-50 (224 px)']
    edge = L.modelled_side(get_profile('jetson-tx2'), model, size, [1], side='edge')
    server = L.modelled_side(get_profile('jetson-orin-nano'), model, size, [1], side='server')
    lut = L.merge(server, edge, L.LINK_PRESETS['wifi'], 'fp32')
    r = bench_optimizer._run_case(L.cost_tables(lut, 1, L.LINK_PRESETS['ethernet']), unpruned_valid(lut),
                                  OptimConfig(steps=60, restarts=1), 0)
    assert lut['num_blocks'] == 17 and 0 <= r['lam'] <= 17 and r['gap_pct'] == 0
    assert r['chosen_fps'] >= max(r['edge_only_fps'], r['server_only_fps']) - 1e-9


def test_bench_lut_terms_quick_cross_validates_the_shipped_fit_and_the_alternatives(tmp_path):
    from bench import bench_lut_terms as B
    assert B.main(['--quick', '--out_dir', str(tmp_path)]) == 0
    obj = json.loads((tmp_path / 'lut_terms.json').read_text())
    rows = {r[0]: r for r in obj['rows']}
    assert list(rows) == [m[0] for m in B.MODELS]
    assert all(r[-1] == 40 and r[4] > 0 for r in rows.values())  # every configuration left out once
    # the ridge model without extra terms is the shipped additive fit (same priors) up to the shipped fit's bounds
    # and robust loss, which a loaded machine's outliers activate (a 5 % tolerance failed once under load)
    assert rows['ridge: additive'][1] == pytest.approx(rows['shipped fit, additive (step 1 before)'][1], rel=0.25,
                                                       abs=0.2)
    from errors import UserError
    with pytest.raises(UserError, match='--rounds 3 .*an even number of rounds'):
        B.main(['--quick', '--rounds', '3', '--out_dir', str(tmp_path)])


def test_stream_noise_components_separate_pass_shift_deployment_and_back_to_back_noise():
    from bench import bench_stream_noise as B
    rng = np.random.default_rng(0)
    k, p, r = 4, 40, 3
    shift = rng.normal(0, 0.05, p)  # a whole pass runs faster or slower: removed from 'between'
    dep = rng.normal(0, 0.02, (k, p))  # each deployment its own offset
    fast = rng.normal(0, 0.04, (k, p, r))  # back to back in one deployment
    base = np.log([1000.0, 1200.0, 900.0, 1500.0])
    x = np.exp(base[:, None, None] + shift[None, :, None] + dep[:, :, None] + fast)
    c = B.noise_components(x, np.exp(base[:, None] + shift[None, :] + dep))
    assert 3.0 < c['median']['within_pct'] < 5.0  # the back-to-back sd, 4 %
    # the deployment means carry 2 % of their own and 4 %/sqrt(3) of the fast noise; the pass shift is not in them
    assert 2.0 < c['median']['between_pct'] < 3.8
    assert 5.5 < c['median']['stream_pct'] < 8.0  # one stream over the passes: shift + deployment + fast, ~6.7 %
    assert 4.0 < c['median']['long_pct'] < 6.5  # the long stream here has no fast noise: shift + deployment, ~5.4 %
    assert np.corrcoef(c['pass_effect_pct'], 100 * (shift - shift.mean()))[0, 1] > 0.9
    with pytest.raises(ValueError, match='repeats >= 2'):
        B.noise_components(x[:, :, :1])


def test_bench_stream_noise_quick_streams_through_the_local_device(tmp_path):
    import os
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip('the local stand-in device needs 2 cores')
    import torch
    from bench import bench_stream_noise as B
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    assert B.main(['--quick', '--out_dir', str(tmp_path)]) == 0
    # the bench pins itself to the server cores while it streams, and gives this process its cores back
    assert os.sched_getaffinity(0) == cores and torch.get_num_threads() == threads
    obj = json.loads((tmp_path / 'stream_noise.json').read_text())
    assert obj['quick'] is True and len(obj['lams']) == 2
    assert np.array(obj['short_fps']).shape == (2, 2, 2) and all(v > 0 for v in np.ravel(obj['short_fps']))
    assert obj['headline'][0][0].startswith('24-image streams back to back')
    # both readings of the same streams: the median period is never below the steady throughput's whole-span pace
    # by more than the noise of a 24-image stream, and both are kept
    steady = np.array(obj['short_steady_fps'])
    assert steady.shape == (2, 2, 2) and (steady > 0).all()
    assert set(obj['components_steady']['median']) == set(obj['components']['median'])


def test_bench_accuracy_gain_shows_the_goal_programs_pick_beside_the_adopted_one(tmp_path):
    from artifacts import write_artifact
    from bench import bench_accuracy as ba

    def domain(d, fps, choice_fps):
        obj = {'domain': d, 'accuracy_drop_pct': 0.1, 'accuracy_drop_ci95_pct': [-0.5, 0.7], 'a_ref_pct': 90.0,
               'final_accuracy_pct': 89.9, 'branches_pruned': 2, 'chosen_round': 1,
               'predicted': {'throughput_fps': fps}, 'surrogate': {'points': []},
               'baselines': {'unpruned': {'best_plain_split': {'throughput_fps': 100.0}}},
               'data_roles': {'val': {'images': 750}, 'test': {'images': 750}}}
        if choice_fps is not None:  # the closed loop adopted a measured-faster layout / split (adopt_measured)
            obj['optimizer_choice'] = {'predicted': {'throughput_fps': choice_fps}}
        write_artifact(tmp_path / 'joint_optimization' / f'domain_{d}_joint.json', 'joint_domain', obj, None, 't')
    domain(0, 121.0, 110.0)
    domain(1, 105.0, None)
    cases = ba.read_cases(tmp_path, 0, 1.0)
    assert [(c['gain_goal_x'], c['gain_x'], c['adopted']) for c in cases] == [
        (pytest.approx(1.10), pytest.approx(1.21), True), (pytest.approx(1.05), pytest.approx(1.05), False)]
    s = ba.summarize(cases, [], 1.0)
    assert s['geomean_gain_goal_x'] == pytest.approx((1.10 * 1.05) ** 0.5) and s['adopted_cases'] == 1
    assert s['geomean_gain_x'] == pytest.approx((1.21 * 1.05) ** 0.5)
    _, per_case = ba.tables_for([{'cases': cases}], s, 'test')
    col = per_case['columns'].index('gain over best plain, goal program\'s pick (x, LUT-predicted)')
    assert [r[col] for r in per_case['rows']] == [pytest.approx(1.10), pytest.approx(1.05)]
    assert [r[col + 1] for r in per_case['rows']] == [pytest.approx(1.21), '']  # blank: the race kept the pick
