"""The closed loop of steps 2 and 3 (pipeline/closed_loop.py): the uncertainty band and its runners-up, the plan of
what is measured, the interleaved passes, pseudo / real records and the closed-loop figures."""
import dataclasses

import numpy as np
import pytest
import torch

from optim import cost as C
from pipeline import closed_loop as CL
from pipeline.throughput import random_tables


@pytest.fixture()
def inst():
    return random_tables(np.random.default_rng(3), 8)


def scaled(t, f):
    return dataclasses.replace(t, edge_ms=t.edge_ms * f, server_ms=t.server_ms * f, edge_head_ms=t.edge_head_ms * f,
                               server_head_ms=t.server_head_ms * f)


def test_split_candidates_hold_the_exact_optimum_first_and_one_row_per_split(inst):
    from optim.exact import solve_exact
    t, valid = inst
    rows = CL.split_candidates(t, valid)
    assert sorted(r['lam'] for r in rows) == list(range(t.num_blocks + 1))
    ex = solve_exact(t, valid)
    assert rows[0]['throughput_fps'] == pytest.approx(ex.stages['throughput_fps'])
    assert all(a['throughput_fps'] >= b['throughput_fps'] for a, b in zip(rows, rows[1:]))


def test_band_is_the_largest_of_the_lut_spread_noise_floor_and_lut_error_and_lists_runners_up_inside_it(inst):
    t, valid = inst
    rows = CL.split_candidates(t, valid)
    chosen = rows[0]
    # the LUT's own spread: entries +/-10 % -> throughput interval about -9 %..+11 %, half width about 10 %
    d = CL.decision(chosen, rows, scaled(t, 0.9), scaled(t, 1.1), None)
    period = max(chosen['edge_ms'], chosen['server_ms'])
    if chosen['link_ms'] < 0.9 * period:  # a compute-bound optimum: its throughput moves with the entries
        assert d['spread_pct'] == pytest.approx(50 * (1 / 0.9 - 1 / 1.1), rel=1e-6)
    assert d['band_pct'] == pytest.approx(d['spread_pct'])
    # a noise floor larger than the spread sets the band; runners-up are exactly the other splits inside it
    d2 = CL.decision(chosen, rows, t, t, 30.0)
    assert d2['spread_pct'] == 0 and d2['band_pct'] == 30.0
    inside = {r['lam'] for r in rows[1:] if r['throughput_fps'] >= 0.7 * chosen['throughput_fps']}
    assert {r['lam'] for r in d2['runners_up']} == inside
    assert d2['coin_toss'] == bool(inside)
    for r in d2['runners_up']:
        assert r['diff_pct'] == pytest.approx(100 * (r['throughput_fps'] / chosen['throughput_fps'] - 1))
    line = CL.decision_line(d2)
    assert ('coin toss' in line) == bool(inside) and 'noise floor 30.0 %' in line
    # the LUT's error on unseen configurations, when larger than both, sets the band
    d3 = CL.decision(chosen, rows, t, t, 1.0, 30.0)
    assert d3['band_pct'] == 30.0 and {r['lam'] for r in d3['runners_up']} == inside
    assert 'LUT error on unseen configurations 30.0 %' in CL.decision_line(d3)
    # no band: no runner-up unless it predicts exactly the same
    d0 = CL.decision(chosen, rows, t, t, None)
    assert all(r['diff_pct'] == 0 for r in d0['runners_up'])


def test_quantile_lut_replaces_medians_by_the_asked_percentile():
    lut = {'edge': {'entries': {'a': {'median_ms': 2.0, 'p10_ms': 1.0, 'p90_ms': 4.0}},
                    'head': {'h': {'median_ms': 1.0}}},
           'server': {'entries': {'a': {'median_ms': 2.0, 'p10_ms': 1.5, 'p90_ms': 3.0}}, 'head': {}}, 'x': 1}
    q = CL.quantile_lut(lut, 'p90_ms')
    assert q['edge']['entries']['a']['median_ms'] == 4.0 and q['server']['entries']['a']['median_ms'] == 3.0
    assert q['edge']['head']['h']['median_ms'] == 1.0 and q['x'] == 1
    assert lut['edge']['entries']['a']['median_ms'] == 2.0  # the original is untouched


def test_plan_measures_each_configuration_once_with_all_its_roles(inst):
    t, valid = inst
    rows = CL.split_candidates(t, valid)
    kept = C.measured_kept(t)
    base = C.plain_baselines(t, kept)
    plan = CL.plan_measurements(rows[0], base, rows, 4)
    keys = [(tuple(r['gammas']), r['lam']) for r in plan]
    assert len(keys) == len(set(keys))
    roles = [x for r in plan for x in r['roles']]
    assert roles.count('chosen') == 1 and {'top1', 'top2', 'top3', 'top4'} <= set(roles)
    assert 'top5' not in roles and {'edge_only', 'server_only', 'best_plain_split'} <= set(roles)
    assert 'top1' in next(r for r in plan if 'chosen' in r['roles'])['roles']


def test_measure_interleaves_passes_and_reports_their_disagreement():
    plan = [{'gammas': [0], 'lam': i, 'predicted': {'throughput_fps': 10.0 * (i + 1)}, 'roles': [f'top{i + 1}']}
            for i in range(3)]
    order = []

    def run(row):
        order.append(row['lam'])
        return {'v': 10.0 * (row['lam'] + 1) * (1.0 if len(order) <= 3 else 1.1)}

    def combine(pred, res):
        return {'throughput_fps': float(np.median([r['v'] for r in res])), 'kind': 'measured'}
    out = CL.measure(plan, CL.sequential_passes(run), combine, passes=2)
    assert order == [0, 1, 2, 2, 1, 0]  # the second pass runs in reverse: drift hits every configuration alike
    for r in out:
        m = r['measured']
        assert len(m['passes_fps']) == 2 and m['pass_to_pass_pct'] == pytest.approx(100 * 0.1 / 1.05)
        assert 'before' in m['load_average']


def test_pseudo_record_keeps_the_modelled_edge_and_says_which_stage_bound_it():
    pred = {'edge_ms': 2.0, 'link_ms': 0.5, 'server_ms': 1.0, 'throughput_fps': 500.0}
    r = CL.pseudo_record(pred, {'median_ms': 3.0, 'p10_ms': 2.5, 'p90_ms': 4.0, 'n': 20}, batch=1)
    assert r['throughput_fps'] == pytest.approx(1e3 / 3.0) and r['bottleneck'] == 'server'
    assert r['bottleneck_source'] == 'measured' and r['p10_fps'] == pytest.approx(250.0)
    assert r['p90_fps'] == pytest.approx(400.0)
    r2 = CL.pseudo_record(pred, {'median_ms': 1.2, 'p10_ms': 1.1, 'p90_ms': 1.3}, batch=2)
    assert r2['throughput_fps'] == pytest.approx(1e3) and r2['bottleneck_source'] == 'modelled'
    assert 'modelled' in r2['how']


def test_real_record_takes_the_median_run_and_windows_for_the_spread():
    def run(fps, n=11):
        return {'steady_throughput_fps': fps, 'throughput_fps': fps * 0.9, 'edge_ms': 1.0, 'link_ms': 2.0,
                'server_ms': 0.5, 'latency_ms': 4.0, 'samples': n,
                'per_batch': [{'samples': 1, 'done_s': i / fps} for i in range(n)]}
    r = CL.real_record({'throughput_fps': 100.0}, [run(100.0), run(120.0), run(110.0)])
    assert r['throughput_fps'] == 110.0 and r['bottleneck'] == 'link' and r['kind'] == 'measured'
    assert 100.0 - 1e-6 <= r['p10_fps'] <= r['p90_fps'] <= 120.0 + 1e-6
    assert CL.window_fps(run(50.0)['per_batch'], 5) == pytest.approx([50.0] * 5)


def test_period_fps_is_the_streams_pace_without_the_pauses_that_steady_throughput_counts():
    from comm.session import _run_summary, period_fps
    done = [0.0] + [0.01 * i for i in range(1, 21)]  # 100 frames/s, batch 1 ...
    done = done[:11] + [t + 0.05 for t in done[11:]]  # ... and one 50 ms pause (another process took the core)
    rows = [{'samples': 1, 'done_s': t, 'latency_ms': 1.0, 'edge_ms': 1.0, 'link_ms': 1.0, 'server_ms': 1.0}
            for t in done]
    assert period_fps(rows) == pytest.approx(100.0)
    summary = _run_summary(rows, torch.zeros(21, dtype=torch.long), torch.zeros(21, dtype=torch.long), 1.0)
    assert summary['period_throughput_fps'] == pytest.approx(100.0)
    assert summary['steady_throughput_fps'] == pytest.approx(20 / 0.25)  # the pause counted
    assert period_fps(rows[:2]) is None
    # the closed loop reads a run at its median period, and keeps the steady figure beside it
    run = {'steady_throughput_fps': 80.0, 'period_throughput_fps': 100.0, 'throughput_fps': 70.0, 'samples': 21,
           'per_batch': rows}
    rec = CL.real_record({}, [run])
    assert rec['throughput_fps'] == pytest.approx(100.0) and rec['steady_fps'] == pytest.approx(80.0)
    assert 'median period' in rec['how']


def test_real_runner_streams_with_the_luts_server_threads_and_gives_the_process_its_own_back():
    from timing.lut import model_spec
    from config import Config
    seen = []

    class Session:  # what real_runner asks of comm.session.ServerSession
        def deploy(self, model, gammas, lam, mean, std, feature_dtype='fp32', threads=0):
            return {'threads': threads}

        def run(self, server, images, labels, batch):
            seen.append(torch.get_num_threads())
            return {'throughput_fps': 1.0, 'predictions': [0]}
    spec = model_spec(Config())
    own = torch.get_num_threads()
    want = 2 if own == 1 else 1
    run = CL.real_runner(Session(), spec, 8, 1, 4, 'fp32', 'cpu', 0, threads=1, server_threads=want)
    from timing import measure as M
    n = len(M.random_model(spec, 0).plan)
    res = run({'gammas': [0] * n, 'lam': 3})
    assert seen == [want] and res['server_threads'] == want and res['worker_threads'] == 1
    assert torch.get_num_threads() == own and 'predictions' not in res
    assert CL.lut_threads({'server': {'metadata': {'threads': 3}}}, 'server') == 3
    assert CL.lut_threads({'server': {}}, 'server') is None


def test_loop_report_compares_the_chosen_with_the_best_measured_of_the_top_k():
    def rec(lam, roles, pred, meas):
        return {'lam': lam, 'gammas': [0], 'roles': roles, 'predicted': {'throughput_fps': pred},
                'measured': {'throughput_fps': meas, 'p10_fps': meas * 0.9, 'p90_fps': meas * 1.1, 'how': 'x',
                             'pass_to_pass_pct': 4.0, 'load_average': {'before': [1.5, 1, 1]},
                             'bottleneck_source': 'measured', 'bottleneck': 'edge'}}
    records = [rec(3, ['chosen', 'top1'], 100.0, 90.0), rec(4, ['top2'], 98.0, 95.0),
               rec(1, ['best_plain_split'], 80.0, 60.0), rec(0, ['server_only', 'top3'], 50.0, 40.0)]
    rep = CL.loop_report(records, 'pseudo', 3)
    assert rep['top_k'] == 3 and rep['best_measured_of_top_k']['lam'] == 4
    assert rep['chosen_over_best_measured_pct'] == pytest.approx(100 * 90 / 95)
    assert rep['gain_over_best_plain_split']['measured_x'] == pytest.approx(1.5)
    assert rep['gain_over_best_plain_split']['predicted_x'] == pytest.approx(1.25)
    line = CL.report_line(rep)
    assert 'measured' in line and 'predicted' in line and 'load average 1.50' in line
    table = CL.measured_table(records)
    assert 'chosen,top1' in table and '0.90' in table


TINY = ['--dataset', 'synthetic', '--set', 'model.input_size=16', '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25']


@pytest.fixture(scope='module')
def measured_lut(tmp_path_factory):
    """Step 1 --mode pseudo on a tiny model: the server side measured here, the edge modelled (TX2 profile)."""
    from pipeline import step1_measure_lut as step1
    out = tmp_path_factory.mktemp('loop')
    assert step1.main(['--mode', 'pseudo', '--results_dir', str(out), '--repeats', '5', '--warmup', '2',
                       '--no_validate', *TINY]) == 0
    return out


def test_step2_pseudo_measures_the_chosen_configuration_its_baselines_and_the_top_k(measured_lut, capsys):
    from artifacts import load_artifact
    from pipeline import step2_initial_throughput_opt as step2
    assert step2.main(['--results_dir', str(measured_lut), '--steps', '60', '--restarts', '1', '--set', 'loop.top_k=4',
                       *TINY]) == 0
    obj = load_artifact(measured_lut / 'initial_throughput_config.json', 'initial_throughput_config')
    loop = obj['closed_loop']
    assert obj['mode'] == 'pseudo' and loop['mode'] == 'pseudo' and 'skipped' not in loop
    chosen = next(r for r in loop['measurements'] if 'chosen' in r['roles'])
    assert (chosen['gammas'], chosen['lam']) == (obj['gammas'], obj['lam'])
    roles = {x for r in loop['measurements'] for x in r['roles']}
    assert {'edge_only', 'server_only', 'best_plain_split', 'top1', 'top4'} <= roles and 'top5' not in roles
    for r in loop['measurements']:
        m, p = r['measured'], r['predicted']
        assert m['kind'] == 'measured' and 'modelled' in m['how']
        # the race adds fresh passes to the first two of every configuration it measured again
        assert (2 < len(m['passes_fps']) <= 2 + loop['settings']['confirm_passes']) if m.get('confirmed') else \
            len(m['passes_fps']) == 2
        assert m['edge_ms'] == pytest.approx(p['edge_ms'])  # the edge stays the LUT's in pseudo mode
        if r['lam'] == obj['num_blocks']:  # edge only: nothing runs on the server, the figure is the model's
            assert m['bottleneck_source'] == 'modelled'
    rep = loop['report']
    assert rep['top_k'] == 4 and 0 < rep['chosen_over_best_measured_pct'] <= 100 + 1e-9
    assert loop['server_device']['device'] == 'cpu' and 'this CPU' in loop['server_device']['note']
    out = capsys.readouterr().out
    assert 'decision: lambda' in out and 'closed loop (pseudo' in out and 'meas. fps' in out
    assert 'the "server" is this CPU' in out


def test_real_mode_refuses_a_modelled_edge_and_names_the_command(measured_lut):
    from config import UserError
    from pipeline import step2_initial_throughput_opt as step2
    with pytest.raises(UserError, match=r'modelled .*step1_measure_lut.py --mode real'):
        step2.main(['--results_dir', str(measured_lut), '--mode', 'real', '--port', '1', *TINY])


def test_noise_floor_and_estimation_error_are_read_from_the_validation_summary(tmp_path):
    from artifacts import write_artifact
    path = tmp_path / 'lut_validation.json'
    assert CL.validation_uncertainty(path) == (None, None)  # no validation
    write_artifact(path, 'lut_validation', {'summary': {'total': {}}}, None, 'test')
    assert CL.validation_uncertainty(path) == (None, None)  # an older one-pass validation without the figures
    write_artifact(path, 'lut_validation', {'summary': {'noise': {'pass_to_pass_pct': 7.5},
                                                        'total': {'median_abs_error_pct': 9.0}}}, None, 'test')
    assert CL.validation_uncertainty(path) == (7.5, 9.0)


def test_bench_closed_loop_rows_and_headline_from_records():
    from bench import bench_closed_loop as B
    def rec(lam, roles, p, m):
        return {'lam': lam, 'gammas': [0], 'roles': roles, 'predicted': {'throughput_fps': p},
                'measured': {'throughput_fps': m, 'p10_fps': m, 'p90_fps': m, 'how': 'x', 'pass_to_pass_pct': 2.0,
                             'bottleneck_source': 'measured', 'load_average': {'before': [3.5, 1, 1]}}}
    records = [rec(3, ['chosen', 'top1'], 100.0, 96.0), rec(4, ['top2'], 99.0, 100.0),
               rec(1, ['best_plain_split'], 80.0, 64.0)]
    loop = {'report': CL.loop_report(records, 'real', 2),
            'decision': {'coin_toss': True, 'runners_up': [{'lam': 4}]}}
    row = B.loop_row('step 3 domain 0', loop, 'x.json')
    assert row[1] == 'real' and row[2] == 'yes (4)' and row[7] == pytest.approx(96.0)
    assert row[8] == pytest.approx(1.5) and row[11] == 3.5
    assert row[12] == 'predicted' and row[14] == pytest.approx(96.0)  # no adoption: the pick is the optimizer's
    # the loop adopted lambda 4 over the optimizer's lambda 3
    adopted = [rec(3, ['predicted_choice', 'top1'], 100.0, 90.0), rec(4, ['top2', 'chosen'], 99.0, 100.0),
               rec(1, ['best_plain_split'], 80.0, 64.0)]
    loop2 = {'report': dict(CL.loop_report(adopted, 'real', 2), decision_source='measured'),
             'decision': {'coin_toss': False, 'runners_up': []}}
    row2 = B.loop_row('step 3 domain 1', loop2, 'x.json')
    assert row2[3] == 4 and row2[7] == pytest.approx(100.0) and row2[12] == 'measured'
    assert row2[13] == '90.0 (3)' and row2[14] == pytest.approx(90.0)
    assert [B.cell(row2, c) for c in B.COLUMNS[15:]] == [None] * 9  # no evaluation in this run
    head = {h[0]: h[1] for h in B.headline([row, row2])}
    assert not any(k.startswith('evaluation') for k in head)
    assert head['steps reaching >= 95 % of the best measured'] == 2
    assert head["the optimizer's own pick >= 95 % of the best measured"] == 1
    assert head['steps decided on measurement (another top-k configuration won the race on fresh passes)'] == 1
    with pytest.raises(B.BenchLoopError, match='y.json: nothing measured'):
        B.loop_row('step 2', {'skipped': 'off', 'decision': {}}, 'y.json')
    # with the evaluation's fresh passes the target is judged there, the deciding passes' share beside it
    ev = {'chosen_over_best_pct': 93.0, 'optimizer_pick_over_best_pct': 97.0, 'best': {'lam': 4},
          'pass_to_pass_median_pct': 1.5, 'chosen_over_best_crossfit_pct': 96.0,
          'optimizer_pick_over_best_crossfit_pct': 94.0, 'chosen_over_best_crossfit_ci95_pct': [91.0, 100.0]}
    loop['report'] = dict(loop['report'], evaluation=ev)
    loop2['report'] = dict(loop2['report'], evaluation=dict(ev, chosen_over_best_pct=99.0,
                                                            chosen_over_best_crossfit_pct=101.0))
    r1, r2 = B.loop_row('step 2', loop, 'x.json'), B.loop_row('step 3 domain 1', loop2, 'x.json')
    assert [B.cell(r1, c) for c in B.COLUMNS[15:]] == [93.0, 4, 97.0, 96.0, [91.0, 100.0], 94.0, 1.5, 50.0, None]
    # read at the 90th percentile, the chosen one's passes that an episode slowed (60) do not decide; the same passes
    # read at the median make the steady lambda 4 the best on both halves
    passes = {'pace_quantile': 90.0, 'configurations': [
        {'lam': 3, 'roles': ['chosen', 'top1'], 'passes_fps': [100.0, 100.0, 60.0, 60.0, 60.0, 60.0]},
        {'lam': 4, 'roles': ['top2'], 'passes_fps': [90.0] * 6}]}
    assert B.crossfit_at(passes, 50.0) == pytest.approx(100.0 * 60.0 / 90.0)
    assert B.crossfit_at(passes, 90.0) == pytest.approx(100.0)
    r3 = B.loop_row('step 2', {'report': dict(loop['report'], evaluation=dict(ev, **passes)),
                               'decision': loop['decision']}, 'x.json')
    assert B.cell(r3, 'evaluation: percentile of the passes read') == 90.0
    assert B.cell(r3, 'evaluation: chosen / best picked on the other half, read at the median of the passes %') == \
        pytest.approx(100.0 * 60.0 / 90.0)
    # two misses below 95 %: one whose interval reaches 95 % (within the judge's noise), one beyond it
    miss = {'report': dict(loop['report'], evaluation=dict(ev, chosen_over_best_crossfit_pct=92.0,
                                                           chosen_over_best_crossfit_ci95_pct=[86.0, 97.5])),
            'decision': loop['decision']}
    far = {'report': dict(loop['report'], evaluation=dict(ev, chosen_over_best_crossfit_pct=88.0,
                                                          chosen_over_best_crossfit_ci95_pct=[84.0, 93.0])),
           'decision': loop['decision']}
    h3 = {h[0]: h[1] for h in B.headline([r1, B.loop_row('d', miss, 'x'), B.loop_row('e', far, 'x')])}
    assert h3['evaluation, best picked on the other half: steps below 95 % whose 95 % interval over the passes does '
              'not reach 95 % (a miss beyond the judge\'s own noise)'] == 1
    head = {h[0]: h[1] for h in B.headline([r1, r2])}
    assert head['evaluation: steps whose choice reached >= 95 % of that max'] == 1
    assert head['evaluation: chosen / the max over the same passes (biased up among near-ties), worst step'] == 93.0
    assert head["evaluation: steps whose optimizer's own pick reached >= 95 % of that max"] == 2
    assert head['evaluation, best picked on the other half: steps whose choice reached >= 95 %'] == 2
    assert head["evaluation, best picked on the other half: steps whose optimizer's own pick reached >= 95 %"] == 0
    assert head['evaluation (fresh passes no decision saw), best picked on one half of them and valued on the '
                'other: chosen / best, worst step'] == 96.0


def test_pseudo_mode_measures_only_against_a_server_side_measured_here_on_this_device():
    import platform
    lut = {'server': {'source': 'measured', 'metadata': {'host': platform.node(), 'device': 'cpu'}}}
    assert CL.pseudo_skip_reason(lut, 'cpu') is None
    assert 'device cpu' in CL.pseudo_skip_reason(lut, 'cuda')
    assert 'modelled' in CL.pseudo_skip_reason({'server': {'source': 'modelled'}}, 'cpu')
    other = {'server': {'source': 'measured', 'metadata': {'host': 'elsewhere', 'device': 'cpu'}}}
    assert 'elsewhere' in CL.pseudo_skip_reason(other, 'cpu')


def test_runtime_overhead_is_the_period_minus_the_bounding_sides_lut_sum_with_the_stage_excess_as_fallback():
    def rec(lam, pe, me, ps, ms, period_ms, link=0.1):
        return {'lam': lam, 'gammas': [0], 'predicted': {'edge_ms': pe, 'server_ms': ps, 'link_ms': link,
                                                         'throughput_fps': 1.0},
                'measured': {'edge_ms': me, 'server_ms': ms, 'link_ms': 0.2, 'throughput_fps': 1000.0 / period_ms}}
    # two server-bound streams (server stage the longer), one edge-bound: each side's cost is period - LUT sum,
    # which includes what the stage timer does not see (the side's sender / receiver threads on the same cores)
    recs = [rec(1, 1.0, 1.1, 2.0, 2.3, 2.5), rec(2, 1.5, 1.55, 1.5, 1.6, 1.7), rec(3, 2.0, 2.2, 1.0, 1.2, 2.45)]
    ov = CL.runtime_overhead(recs, 1)
    assert ov['edge_ms'] == pytest.approx(0.45) and ov['server_ms'] == pytest.approx(0.35)
    assert ov['from'] == {'edge': 'period', 'server': 'period'}
    assert [c['bound'] for c in ov['configurations']] == ['server', 'server', 'edge']
    assert ov['configurations'][0]['period_ms'] == pytest.approx(2.5)
    assert ov['kind'] == 'measured' and len(ov['configurations']) == 3 and ov['batch'] == 1
    # the period of a batch of 4 is 4 samples / throughput
    assert CL.runtime_overhead([rec(3, 2.0, 2.2, 1.0, 1.2, 2.45 / 4)], 4)['edge_ms'] == pytest.approx(0.45)
    # no edge-bound stream: the edge falls back to its stage timer's excess (median of 0.1, 0.05)
    only = CL.runtime_overhead(recs[:2], 1)
    assert only['edge_ms'] == pytest.approx(0.075) and only['from'] == {'edge': 'stage', 'server': 'period'}
    # a stream that may be link-bound (occupancy >= 0.9 of the period) says nothing about either side's cost
    linked = CL.runtime_overhead([rec(1, 1.0, 1.1, 2.0, 2.3, 2.5, link=2.4)], 1)
    assert linked['configurations'][0]['bound'] == 'link' and linked['from'] == {'edge': 'stage', 'server': 'stage'}
    assert linked['server_ms'] == pytest.approx(0.3)
    faster = [rec(1, 1.0, 0.9, 2.0, 1.8, 1.9)]  # a side measured faster than the LUT adds nothing
    assert CL.runtime_overhead(faster, 1)['edge_ms'] == 0.0 == CL.runtime_overhead(faster, 1)['server_ms']
    line = CL.runtime_line(ov)
    assert 'edge +0.450 ms, server +0.350 ms' in line and 'from the periods of the streams it bounds' in line


def _fake_loop(values):
    """A measure() setup whose runs return values[lam][call] in turn (the last value repeats)."""
    calls = {}

    def run(row):
        lam = row['lam']
        k = calls.get(lam, 0)
        calls[lam] = k + 1
        seq = values[lam]
        return {'v': seq[min(k, len(seq) - 1)]}

    def combine(pred, res):
        return {'throughput_fps': float(np.median([r['v'] for r in res])), 'kind': 'measured', 'p10_fps': 0.0,
                'p90_fps': 0.0, 'how': 'x', 'bottleneck_source': 'measured'}
    plan = [{'gammas': [0], 'lam': lam, 'predicted': {'throughput_fps': 100.0 - lam}, 'roles': roles}
            for lam, roles in ((1, ['chosen', 'top1']), (2, ['top2']), (3, ['top3']), (4, ['best_plain_split']))]
    tp = CL.sequential_passes(run)
    return CL.measure(plan, tp, combine, passes=2, keep_runs=True), tp, combine, calls


def test_confirm_choice_adopts_a_top_k_configuration_that_stays_faster_on_fresh_passes():
    recs, tp, combine, calls = _fake_loop({1: [90.0], 2: [95.0], 3: [99.0], 4: [50.0]})
    out, ad = CL.confirm_choice(recs, tp, combine, confirm=2, passes=3)
    assert ad['adopted'] and ad['source'] == 'measured'
    assert [r['lam'] for r in ad['shortlist']] == [1, 3, 2]  # the predicted choice, then the top-k, fastest first
    # one fresh pass, then lambda 1 and 2 measured slower than lambda 3 beyond the noise: out, the race ends
    assert calls == {1: 3, 2: 3, 3: 3, 4: 2} and ad['fresh_passes'] == 1
    assert [r['eliminated_after_passes'] for r in ad['shortlist']] == [3, None, 3]
    chosen = next(r for r in out if 'chosen' in r['roles'])
    assert chosen['lam'] == 3 and 'predicted_choice' in out[0]['roles'] and 'chosen' not in out[0]['roles']
    assert len(chosen['measured']['passes_fps']) == 3 and chosen['measured']['confirmed']
    rep = CL.loop_report([{k: v for k, v in r.items() if k != '_runs'} for r in out], 'real', 3)
    assert rep['chosen']['lam'] == 3 and rep['predicted_choice']['lam'] == 1
    assert rep['chosen_over_best_measured_pct'] == pytest.approx(100.0)
    assert 'adopted on measurement' in CL.report_line(rep)


def test_confirm_choice_keeps_the_predicted_choice_when_the_faster_one_was_only_lucky():
    # lambda 2 measured 120 in the first pass and 80 ever after: on three passes its median is 80, below lambda 1
    recs, tp, combine, calls = _fake_loop({1: [90.0], 2: [120.0, 80.0], 3: [70.0], 4: [50.0]})
    out, ad = CL.confirm_choice(recs, tp, combine, confirm=2, passes=3)
    assert not ad['adopted'] and ad['source'] == 'predicted' and [r['lam'] for r in ad['shortlist']] == [1, 2, 3]
    assert ad['shortlist'][1]['first_fps'] == 100.0 and ad['shortlist'][1]['pooled_fps'] == 80.0
    assert next(r for r in out if 'chosen' in r['roles'])['lam'] == 1
    out0, ad0 = CL.confirm_choice(recs, tp, combine, confirm=0, passes=3)
    assert not ad0['adopted'] and 'loop.confirm is 0' in ad0['why']
    # a configuration that may not be adopted (step 3: over the edge memory budget) does not race
    _, ad1 = CL.confirm_choice(recs, tp, combine, confirm=2, passes=3, eligible=lambda r: r['lam'] == 1)
    assert not ad1['adopted'] and 'shortlist' not in ad1


def test_confirm_choice_keeps_racing_near_ties_and_pairs_each_pass():
    # lambda 2 is 1 % faster than lambda 1 in every pass while whole passes shift by +-20 %: paired per pass, the
    # difference is clear after three passes; lambda 3 is far behind and out at the first chance
    shift = [1.0, 0.8, 1.2, 0.85, 1.15, 0.9, 1.1, 1.0, 0.95, 1.05]
    recs, tp, combine, calls = _fake_loop({1: [100.0 * f for f in shift], 2: [101.0 * f for f in shift],
                                           3: [80.0 * f for f in shift], 4: [50.0]})
    out, ad = CL.confirm_choice(recs, tp, combine, confirm=4, passes=6)
    assert ad['adopted'] and next(r for r in out if 'chosen' in r['roles'])['lam'] == 2
    assert calls[3] == 3 and calls[4] == 2
    # the same 1 % but each pass's figures scattered by +-10 % of their own: the race runs to its last pass and the
    # better median decides; ties keep the predicted choice
    rng = np.random.default_rng(0)
    noisy = {1: list(100.0 * np.exp(rng.normal(0, 0.1, 10))), 2: list(100.0 * np.exp(rng.normal(0, 0.1, 10))),
             3: [60.0], 4: [50.0]}
    recs, tp, combine, calls = _fake_loop(noisy)
    _, ad = CL.confirm_choice(recs, tp, combine, confirm=4, passes=4)
    assert ad['fresh_passes'] == 4 and calls[1] == calls[2] == 6
    recs, tp, combine, _ = _fake_loop({1: [90.0], 2: [90.0], 3: [60.0], 4: [50.0]})
    _, ad = CL.confirm_choice(recs, tp, combine, confirm=4, passes=3)
    assert not ad['adopted']


def test_race_elimination_pairs_passes_and_weighs_each_configuration_by_its_own_noise():
    # a constant 3 % deficit under a large common pass shift: out; the same deficit with +-10 % independent noise: in
    shift = np.array([1.0, 0.7, 1.3, 0.9])
    assert CL.eliminated({0: list(100 * shift), 1: list(97 * shift)}, 0, 2.0) == [1]
    rng = np.random.default_rng(1)
    noisy = list(97 * np.exp(rng.normal(0, 0.1, 4)))
    assert CL.eliminated({0: list(100 * shift), 1: [a * b for a, b in zip(noisy, shift)]}, 0, 2.0) == []
    # a steady (link-bound) configuration far behind does not make the noisy one look certain
    assert CL.eliminated({0: list(100 * shift), 1: [a * b for a, b in zip(noisy, shift)], 2: list(60 * shift)},
                         0, 2.0) == [2]
    assert CL.eliminated({0: [100.0, 100.0, 100.0]}, 0, 2.0) == []


def test_adopted_configuration_becomes_the_decision_of_step_2_and_of_a_step_3_domain(tmp_path):
    from types import SimpleNamespace

    from artifacts import load_artifact, write_artifact
    from config import Config
    from optim import cost as C
    from pipeline import joint
    from pipeline.throughput import random_tables
    t, valid = random_tables(np.random.default_rng(0), 4, has_identity=[True] * 4)
    g0, g1 = [13, 13, 13, 13], [13, 12, 13, 13]
    loop = {'adoption': {'adopted': True},
            'measurements': [{'gammas': g0, 'lam': 2, 'roles': ['predicted_choice', 'top1']},
                             {'gammas': g1, 'lam': 3, 'roles': ['top2', 'chosen']}]}
    s2 = {'gammas': g0, 'lam': 2, 'layouts': ['x'] * 4, 'predicted': C.describe(g0, 2, t)}
    assert CL.adopt_step2(s2, loop, t)
    assert (s2['gammas'], s2['lam']) == (g1, 3) and s2['optimizer_choice']['lam'] == 2
    assert s2['predicted'] == C.describe(g1, 3, t) and len(s2['layouts']) == 4
    assert not CL.adopt_step2(dict(s2), {'adoption': {'adopted': False}, 'measurements': []}, t)
    # step 3: the same branches, other layouts / split; the memory and roofline figures follow the adopted split,
    # and so does the state file that export_parts deploys
    rng = np.random.default_rng(1)
    stats = {'flops': rng.uniform(1, 2, (4, 14)), 'weight_bytes': rng.uniform(1, 2, (4, 14)),
             'act_bytes': rng.uniform(1, 2, (4, 14)), 'knee_edge': 2.0, 'knee_server': 3.0}
    cfg = Config(results_dir=str(tmp_path))
    inp = SimpleNamespace(tables=t, stats=stats, cfg=cfg)
    path = joint.state_path(cfg, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_artifact(path, 'joint_state', {'gammas': g0, 'lam': 2, 'blocks': [], 'domain': 0}, cfg, 'step 3')
    pay = {'domain': 0, 'gammas': g0, 'lam': 2, 'predicted': {k: C.describe(g0, 2, t)[k] for k in CL.PREDICTED_KEYS},
           'roofline': joint.side_roofline(inp, g0, 2), 'edge_weight_bytes': CL.edge_weight_bytes(inp, g0, 2),
           'goal_evaluation': {'accuracy_pct': 90.0}, 'closed_loop': loop}
    assert not joint.adopt_measured(inp, dict(pay, closed_loop={'adoption': {'adopted': False}}))
    assert joint.adopt_measured(inp, pay)
    assert (pay['gammas'], pay['lam']) == (g1, 3) and pay['optimizer_choice']['lam'] == 2
    assert pay['edge_weight_bytes'] == pytest.approx(sum(stats['weight_bytes'][k, g1[k]] for k in range(3)))
    assert pay['roofline']['edge']['blocks'] == 3 and pay['goal_evaluation']['accuracy_pct'] == 90.0
    assert pay['goal_evaluation']['throughput_fps'] == pytest.approx(C.describe(g1, 3, t)['throughput_fps'])
    st = load_artifact(path, 'joint_state')
    assert (st['gammas'], st['lam'], st['optimizer_choice']['lam'], st['blocks']) == (g1, 3, 2, [])


def test_crossfit_interval_is_wide_among_ties_and_excludes_95_for_a_clearly_slower_choice():
    rng = np.random.default_rng(0)
    shift = rng.normal(0, 0.05, 10)  # each pass's common shift: paired, it does not widen the interval
    ties = np.exp(np.log(1000.0) + shift[None, :] + rng.normal(0, 0.06, (6, 10)))
    lo, hi = CL.crossfit_interval_pct(ties, 0, np.random.default_rng(1))
    assert lo < 95.0 < 100.0 < hi  # six configurations tied within 6 % noise: the judge cannot tell
    width = hi - lo
    slow = ties.copy()
    slow[0] *= 0.8  # the chosen one 20 % slower than the rest
    lo, hi = CL.crossfit_interval_pct(slow, 0, np.random.default_rng(1))
    assert hi < 95.0
    calm = np.exp(np.log(1000.0) + shift[None, :] + rng.normal(0, 0.01, (6, 10)))  # less noise: a narrower interval
    lo2, hi2 = CL.crossfit_interval_pct(calm, 0, np.random.default_rng(1))
    assert hi2 - lo2 < 0.5 * width
    with pytest.raises(ValueError, match='>= 2 passes per half'):
        CL.crossfit_interval_pct(ties[:, :3], 0, np.random.default_rng(1))


def test_evaluate_choice_judges_the_decision_on_fresh_passes_it_never_saw():
    # measure() sees lambda 1 at 90 and lambda 3 at 99; on the fresh passes lambda 1 keeps 90 and lambda 3 drops to 60
    recs, tp, combine, calls = _fake_loop({1: [90.0], 2: [95.0], 3: [99.0, 99.0, 60.0], 4: [50.0]})
    ev = CL.evaluate_choice(recs, tp, combine, passes=3)
    assert calls == {1: 5, 2: 5, 3: 5, 4: 2}  # every top-k configuration and the chosen one, not the baseline
    assert ev['kind'] == 'measured' and ev['passes'] == 3 and ev['best'] == {'lam': 2, 'fps': 95.0}
    assert ev['chosen_over_best_pct'] == pytest.approx(100.0 * 90.0 / 95.0)
    assert ev['optimizer_pick_over_best_pct'] == ev['chosen_over_best_pct']  # nothing adopted: the same pick
    assert ev['chosen_over_best_crossfit_pct'] == ev['optimizer_pick_over_best_crossfit_pct'] is not None
    assert CL.evaluate_choice(recs, tp, combine, passes=1)['chosen_over_best_crossfit_pct'] is None
    rep = CL.loop_report([{k: v for k, v in r.items() if k != '_runs'} for r in recs], 'real', 3)
    rep['evaluation'] = ev
    assert 'fresh evaluation passes no decision saw: chosen = 94.7 % of the best (lambda 2)' in CL.report_line(rep)


def test_real_mode_reads_a_configuration_at_an_upper_percentile_so_a_slow_episode_does_not_decide():
    # six passes at ~100 fps, three of them caught in one of the stand-in's slow episodes (~60): the median lands
    # between the two states, the 90th percentile reads the configuration's own pace
    def run(fps):
        return {'period_throughput_fps': fps, 'steady_throughput_fps': fps, 'throughput_fps': fps, 'samples': 3,
                'per_batch': []}
    runs = [run(v) for v in (100.0, 60.0, 101.0, 59.0, 99.0, 61.0)]
    assert CL.real_record({}, runs)['throughput_fps'] == pytest.approx(80.0)
    rec = CL.real_combine(90.0)({}, runs)
    assert rec['throughput_fps'] == pytest.approx(100.5) and rec['pace_quantile'] == 90.0
    assert rec['runs_fps'] == [100.0, 60.0, 101.0, 59.0, 99.0, 61.0]
    # its spread is that of the passes it is read from, so the figure lies within its own p10-p90
    assert rec['p10_fps'] == pytest.approx(59.5) and rec['p90_fps'] == pytest.approx(100.5)
    assert CL.pass_pace([3.0, 1.0, 2.0]) == 2.0


def test_race_at_an_upper_percentile_keeps_a_configuration_that_an_episode_slowed_and_drops_a_slower_one():
    lead = [100.0, 101.0, 99.0, 100.0, 100.0, 101.0, 99.0, 100.0]
    hit = [100.0, 60.0, 101.0, 62.0, 61.0, 100.0, 63.0, 64.0]  # as fast, but slowed in five of the eight passes
    slower = [90.0, 91.0, 89.0, 90.0, 90.0, 91.0, 89.0, 90.0]  # 10 % slower in every pass
    assert CL.eliminated({0: lead, 1: hit, 2: slower}, 0, 2.0) == [1, 2]  # the median counts the episode
    assert CL.eliminated({0: lead, 1: hit, 2: slower}, 0, 2.0, quantile=90.0) == [2]
    # a common shift of whole passes cancels: drawn pass by pass, a constant 3 % deficit is beyond the noise
    shift = np.array([1.0, 0.7, 1.3, 0.9])
    assert CL.eliminated({0: list(100 * shift), 1: list(97 * shift)}, 0, 2.0, quantile=90.0) == [1]


def test_race_keeps_the_predicted_choice_unless_it_is_measured_slower_beyond_the_noise():
    # lambda 1 and 2 scatter alike around the same pace; lambda 2's 90th percentile is the higher one by one lucky
    # pass (103), not beyond the noise, so the model's pick stays
    one = [99.0, 101.0, 98.0, 102.0, 100.0, 99.0, 101.0, 100.0, 98.0, 102.0]
    two = [100.0, 99.0, 101.0, 98.0, 103.0, 99.0, 100.0, 101.0, 99.0, 98.0]
    recs, tp, _, _ = _fake_loop({1: one, 2: two, 3: [70.0], 4: [50.0]})

    def combine(pred, res):
        return {'throughput_fps': CL.pass_pace([r['v'] for r in res], 90.0), 'kind': 'measured', 'p10_fps': 0.0,
                'p90_fps': 0.0, 'how': 'x', 'bottleneck_source': 'measured'}
    out, ad = CL.confirm_choice(recs, tp, combine, confirm=4, passes=6, quantile=90.0)
    rows = {r['lam']: r for r in ad['shortlist']}
    assert rows[2]['pooled_fps'] > rows[1]['pooled_fps'] and rows[3]['eliminated_after_passes'] == 3
    assert rows[1]['eliminated_after_passes'] is None and rows[2]['eliminated_after_passes'] is None
    assert not ad['adopted'] and next(r for r in out if 'chosen' in r['roles'])['lam'] == 1
    assert ad['pace_quantile'] == 90.0 and '90th percentiles' in ad['how']


def test_share_and_gain_compare_on_the_passes_both_configurations_ran():
    # the chosen lambda 7 raced lambda 6 for seven passes, the last four in a slow episode; lambda 5 left the race
    # after three and the plain split was measured in measure()'s two: pooled figures would set the episode against
    # passes that never saw it (domain 0, fresh-clone pipeline 01:06: 78.6 % and x0.77)
    def rec(lam, roles, passes, pred=1700.0):
        return {'lam': lam, 'gammas': [0], 'roles': roles, 'predicted': {'throughput_fps': pred},
                'measured': {'throughput_fps': float(np.median(passes)), 'passes_fps': passes, 'p10_fps': 0.0,
                             'p90_fps': 0.0, 'how': 'x', 'pass_to_pass_pct': 1.0, 'bottleneck_source': 'measured',
                             'load_average': None}}
    chosen = rec(7, ['chosen', 'top1'], [1726.0, 1726.0, 1726.0, 1302.0, 1213.0, 1209.0, 1158.0])
    six = rec(6, ['top2'], [1721.0, 1739.0, 1735.0, 1259.0, 1210.0, 1147.0, 1168.0])
    five = rec(5, ['top3'], [1643.0, 1656.0, 1679.0])
    plain = rec(7, ['best_plain_split'], [1677.0, 1685.0], pred=1668.0)
    rep = CL.loop_report([chosen, six, five, plain], 'pseudo', 3)
    assert CL.paired_ratio(chosen, five) == pytest.approx(1726.0 / 1656.0)
    assert CL.paired_ratio(chosen, six) == pytest.approx(1302.0 / 1259.0)
    # ahead of both on the passes it shared with each: the best of the top-k is the chosen one itself
    assert rep['best_measured_of_top_k']['lam'] == 7 and rep['chosen_over_best_measured_pct'] == pytest.approx(100.0)
    slower = rec(7, ['chosen', 'top1'], [1600.0, 1610.0, 1620.0, 1302.0, 1213.0, 1209.0, 1158.0])
    rep2 = CL.loop_report([slower, six, five, plain], 'pseudo', 3)
    # slower than lambda 5 in the three passes they shared: lambda 5 is the best, whatever the episode did later
    assert rep2['best_measured_of_top_k']['lam'] == 5
    assert rep2['chosen_over_best_measured_pct'] == pytest.approx(100.0 * 1610.0 / 1656.0)
    assert rep['gain_over_best_plain_split']['measured_x'] == pytest.approx(1726.0 / 1681.0)
    assert 'on the passes both ran' in CL.report_line(rep)
