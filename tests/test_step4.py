"""Step 4 (figures and the paper table): records -> figures/table, and the step on real pipeline artifacts."""
import json
import math
import os

import numpy as np
import pytest

from hyper_repvgg import BRANCHES, build_hyper_repvgg, fused_layout
from viz import plots
from viz.summary import (DomainResult, Inputs, LutView, ParetoPoint, Stage, Step2View, aggregate_rows,
                         build_summary, domain_row, summary_markdown)


def _stage(e, li, s):
    worst = max(e, li, s)
    return Stage(e, li, s, e + li + s, 1e3 / worst, ('edge', 'link', 'server')[[e, li, s].index(worst)])


def _records(num_domains=3, measured=False):
    model = build_hyper_repvgg('A0', num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.25))
    n = model.num_blocks
    out = []
    for d in range(num_domains):
        alpha = tuple({br: 1.0 - 0.1 * d for br in BRANCHES if br in b.available()} for b in model.blocks)
        kept = tuple(tuple(a) if k % 3 else tuple(a)[:1] for k, a in enumerate(alpha))
        pareto = tuple(ParetoPoint(eps, 90.0 - eps, 30.0 + 5 * eps) for eps in (0.5, 1.0, 2.0))
        out.append(DomainResult(
            domain=str(d), a_ref_pct=90.0 + d, final_acc_pct=89.5 + d - 0.5 * d, epsilon=1.0, lam=d + 2,
            num_blocks=n, gammas=tuple(fused_layout(k) for k in kept), alpha=alpha, kept=kept,
            predicted=_stage(20.0, 25.0, 10.0 + d),
            baselines={'best_plain_split': _stage(30.0, 32.0, 12.0), 'edge_only': _stage(150.0, 0.1, 0.0),
                       'server_only': _stage(0.0, 400.0, 9.0)},
            baseline_lam={'best_plain_split': 4, 'edge_only': n, 'server_only': 0}, pareto=pareto,
            measured={'throughput_fps': 38.0 + d, 'latency_ms': 60.0} if measured else None))
    return out


def _lut_view(n):
    rng = np.random.default_rng(0)
    ms = rng.uniform(0.1, 20.0, (n, 14))
    ms[:, 2] = np.nan  # a layout no block has
    return LutView(ms, ms / 5, 1, 'modelled (jetson-tx2 profile)', 'measured', 'Jetson TX2', 'test CPU')


def test_summary_rows_mean_and_worst():
    recs = _records()
    rows = [domain_row(r) for r in recs]
    assert [r['drop_pct'] for r in rows] == pytest.approx([0.5, 1.0, 1.5])
    assert rows[0]['branches_pruned'] == sum(len(a) - 1 for k, a in enumerate(recs[0].alpha) if k % 3 == 0)
    assert rows[0]['gain_x'] == pytest.approx((1e3 / 25.0) / (1e3 / 32.0))
    mean, worst = aggregate_rows(rows)
    assert mean['a_ref_pct'] == pytest.approx(91.0)
    assert mean['gain_x'] == pytest.approx(math.exp(np.mean(np.log([r['gain_x'] for r in rows]))))
    assert worst['domain'] == 'worst (2)' and worst['drop_pct'] == pytest.approx(1.5)


def test_figures_and_table_from_records(tmp_path):
    recs = _records(measured=True)
    s2 = Step2View((13,) * recs[0].num_blocks, 3, _stage(22.0, 30.0, 11.0),
                   dict(recs[0].baselines), dict(recs[0].baseline_lam), 33.4, 0.0)
    inputs = Inputs(_lut_view(recs[0].num_blocks), s2, recs, 'test', [])
    builders, notes = plots.figure_builders(inputs)
    assert set(builders) == {'accuracy_throughput_curve', 'domain_comparison', 'alpha_heatmap', 'gamma_heatmap',
                             'lut_heatmap_edge', 'lut_heatmap_server', 'stage_times', 'predicted_vs_measured'}
    assert notes == []
    for name, make in builders.items():
        fig = make()
        for ax in fig.axes:
            if ax.get_label() != '<colorbar>' and ax.get_visible():
                assert ax.get_ylabel(), f'{name}: a y axis without a label'
                assert any(a.get_xlabel() for a in ax.get_shared_x_axes().get_siblings(ax)), \
                    f'{name}: an x axis without a label'
        paths = plots.save_figure(fig, tmp_path, name, ['png'])
        assert paths[0].stat().st_size > 10_000
    md = summary_markdown(build_summary(inputs, notes))
    assert '| mean |' in md and '| worst (2) |' in md and 'best plain split' in md
    assert md.count('\n| ') >= 3 + 2 + 4


def test_builders_skip_what_is_missing():
    recs = _records()
    builders, notes = plots.figure_builders(Inputs(_lut_view(recs[0].num_blocks), None, [], 'test', []))
    assert set(builders) == {'lut_heatmap_edge', 'lut_heatmap_server'}
    assert any('step-3' in n for n in notes) and any('no measurements' in n for n in notes)
    builders, notes = plots.figure_builders(Inputs(_lut_view(recs[0].num_blocks), None, recs, 'test', []))
    assert 'predicted_vs_measured' not in builders and 'stage_times' in builders


def _loop(pred, meas, plain_pred, plain_meas):
    """A closed-loop record in pipeline/closed_loop.py's schema: chosen (top1), best plain split, one more top-k."""
    from pipeline import closed_loop as CL

    def rec(lam, roles, p, m):
        return {'lam': lam, 'gammas': [0], 'roles': roles, 'predicted': {'throughput_fps': p},
                'measured': {'kind': 'measured', 'how': CL.PSEUDO_LABEL, 'throughput_fps': m, 'p10_fps': 0.9 * m,
                             'p90_fps': 1.1 * m, 'pass_to_pass_pct': 3.0, 'bottleneck': 'server',
                             'bottleneck_source': 'measured', 'load_average': {'before': [1.0, 1.0, 1.0]}}}
    records = [rec(3, ['chosen', 'top1'], pred, meas), rec(5, ['top2'], pred * 0.99, meas * 1.05),
               rec(4, ['best_plain_split'], plain_pred, plain_meas)]
    dec = {'lam': 3, 'throughput_fps': pred, 'band_pct': 5.0, 'spread_pct': 5.0, 'noise_floor_pct': None,
           'runners_up': [{'lam': 5, 'diff_pct': -1.0, 'throughput_fps': pred * 0.99}], 'coin_toss': True}
    return {'decision': dec, 'measurements': records, 'report': CL.loop_report(records, 'pseudo', 2),
            'server_device': {'device': 'cpu', 'note': 'the "server" is this CPU (test), not a GPU server'}}


def test_measured_columns_gains_and_closed_loop_lines_in_the_table(tmp_path):
    from dataclasses import replace
    recs = [replace(r, loop=_loop(r.predicted.throughput_fps, 35.0, 31.25, 28.0)) for r in _records()]
    row = domain_row(recs[0])
    assert row['measured_fps'] == 35.0 and row['measured_gain_x'] == pytest.approx(35.0 / 28.0)
    assert row['of_best_pct'] == pytest.approx(100 / 1.05) and row['runners_up'] == 'λ 5'
    assert row['measured_plain_fps'] == 28.0 and row['measured_spread'] == '31.5–38.5'
    s2 = Step2View((13,) * recs[0].num_blocks, 3, _stage(22.0, 30.0, 11.0), dict(recs[0].baselines),
                   dict(recs[0].baseline_lam), 33.4, 0.0, _loop(33.3, 30.0, 31.25, 29.0))
    inputs = Inputs(_lut_view(recs[0].num_blocks), s2, recs, 'test', [])
    summ = build_summary(inputs)
    md = summary_markdown(summ)
    assert 'meas. throughput (fps)' in md and 'meas. gain (x)' in md and 'pred. gain (x)' in md
    assert 'Closed loop' in md and 'coin toss' in md and 'the "server" is this CPU' in md
    by = {r['configuration']: r for r in summ.step2}
    assert summ.step2[0]['measured_fps'] == 30.0 and by['best plain split']['measured_fps'] == 29.0
    assert by['edge only']['measured_fps'] is None  # not measured in this record: a dash, not a number
    assert summ.to_payload()['throughput_kind']['measured_gain_x'] == 'measured'
    builders, _ = plots.figure_builders(inputs)
    pts = plots.measured_points(recs, s2.loop)
    assert ('s2', 33.3, 30.0) in pts['closed loop throughput (frames/s)']
    for name in ('domain_comparison', 'predicted_vs_measured'):
        assert plots.save_figure(builders[name](), tmp_path, name, ['png'])[0].stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------------
# The step on artifacts: a real LUT (timing.lut, modelled on both sides: fast) and step-2/3 results computed with
# optim.cost on it.  Where steps 2/3 have not landed their writers, these are hand-built in their schema.
# ----------------------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from artifacts import ArtifactError, load_artifact, write_artifact  # noqa: E402
from config import Config, DataConfig, ModelConfig, UserError  # noqa: E402
from hyper_repvgg import block_plan, layouts_for  # noqa: E402
from optim import cost  # noqa: E402
from timing import lut as L  # noqa: E402
from timing.profiles import get_profile  # noqa: E402
from pipeline import step4_visualize_results as step4  # noqa: E402

TINY_WIDTH = (0.25, 0.25, 0.25, 0.25)
FIGURES = ('accuracy_throughput_curve', 'domain_comparison', 'alpha_heatmap', 'gamma_heatmap', 'lut_heatmap_edge',
           'lut_heatmap_server', 'stage_times')


def _cfg(tmp_path):
    return Config(model=ModelConfig(input_size=32, width_multiplier=TINY_WIDTH),
                  data=DataConfig(dataset='synthetic', num_domains=3), results_dir=str(tmp_path))


def _write_lut(cfg):
    """hardware_lut_complete.json through timing.lut: the TX2 profile as the edge, the Orin Nano as the 'server'."""
    model = L.model_spec(cfg)
    edge = L.modelled_side(get_profile('jetson-tx2'), model, cfg.model.input_size, [1], side='edge')
    server = L.modelled_side(get_profile('jetson-orin-nano'), model, cfg.model.input_size, [1], side='server')
    payload = L.merge(server, edge, L.resolve_link(cfg.lut), 'fp32')
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete', payload, cfg, 'test')
    return L.cost_tables(L.load_lut(cfg.path('hardware_lut_complete.json')), 1)


def _best(tables, kept):
    """Exact best (gammas, lam) for kept branch sets: per split, each block's fastest valid layout on its side."""
    n = tables.num_blocks
    best = None
    for lam in range(n + 1):
        g = []
        for k in range(n):
            t = tables.edge_ms[k] if k < lam else tables.server_ms[k]
            g.append(min(layouts_for(kept[k]), key=lambda x: t[x]))
        ev = cost.evaluate(g, lam, tables)
        if best is None or ev['throughput_fps'] > best[2]['throughput_fps']:
            best = (g, lam, ev)
    return best


def _baselines(tables, plan):
    n = len(plan)
    fused = [13 if s.has_identity else 4 for s in plan]
    out = {'edge_only': dict(cost.evaluate(fused, n, tables), lam=n, gammas=fused),
           'server_only': dict(cost.evaluate(fused, 0, tables), lam=0, gammas=fused)}
    lam = max(range(n + 1), key=lambda m: cost.evaluate(fused, m, tables)['throughput_fps'])
    out['best_plain_split'] = dict(cost.evaluate(fused, lam, tables), lam=lam, gammas=fused)
    return out


def _write_step2(cfg, tables, plan):
    full = [('D', 'O', 'I') if s.has_identity else ('D', 'O') for s in plan]
    g, lam, ev = _best(tables, full)
    write_artifact(cfg.path('initial_throughput_config.json'), 'initial_throughput_config',
                   {'gammas': g, 'lam': lam, 'predicted': ev, 'exact': {'gammas': g, 'lam': lam, **ev},
                    'gap_pct': 0.0, 'baselines': _baselines(tables, plan)}, cfg, 'test')


def _write_joint(cfg, tables, plan, d, measured=False):
    rng = np.random.default_rng(d)
    blocks, kept_all = [], []
    for s in plan:
        have = ['D', 'O', 'I'] if s.has_identity else ['D', 'O']
        kept = [b for b in have if rng.random() > 0.3] or ['D']
        blocks.append({'block': s.index, 'name': s.name, 'alpha': {b: float(rng.uniform(0.3, 1.4)) for b in have},
                       'kept': kept})
        kept_all.append(kept)
    g, lam, ev = _best(tables, kept_all)
    a_ref = 80.0 + 1.5 * d
    pareto = []
    for eps in (0.5, 1.0, 2.0):
        pareto.append({'epsilon': eps, 'accuracy_pct': a_ref - 0.8 * eps, 'throughput_fps': ev['throughput_fps']
                       * (0.9 + 0.1 * eps), 'lam': lam})
    payload = {'domain': d, 'a_ref_pct': a_ref, 'final_accuracy_pct': a_ref - 0.7, 'epsilon': 1.0, 'lam': lam,
               'gammas': g, 'blocks': blocks, 'predicted': ev,
               'baselines': {'unpruned': _baselines(tables, plan), 'pruned': {}}, 'pareto': pareto}
    if measured:
        payload['measured'] = {'throughput_fps': ev['throughput_fps'] * 0.93, 'latency_ms': ev['latency_ms'] * 1.1}
    write_artifact(cfg.path('joint_optimization', f'domain_{d}_joint.json'), 'joint_domain', payload, cfg, 'test')


@pytest.fixture()
def results(tmp_path):
    cfg = _cfg(tmp_path)
    tables = _write_lut(cfg)
    plan = block_plan('A0', TINY_WIDTH)
    _write_step2(cfg, tables, plan)
    for d in range(3):
        _write_joint(cfg, tables, plan, d, measured=d == 1)
    return cfg


def test_step4_writes_every_file(results, capsys):
    assert step4.main(['--results_dir', results.results_dir]) == 0
    out = Path(results.results_dir) / 'visualization'
    for name in FIGURES + ('predicted_vs_measured',):
        for fmt in ('png', 'pdf'):
            assert (out / f'{name}.{fmt}').stat().st_size > 5_000, f'{name}.{fmt}'
    md = (out / 'summary.md').read_text()
    assert md.count('\n| 0 |') == 1 and '| mean |' in md and '| worst (' in md and 'edge only' in md
    s = load_artifact(out / 'summary.json', 'summary', {'domains': list, 'mean': dict, 'worst': dict, 'step2': list})
    assert [r['domain'] for r in s['domains']] == ['0', '1', '2']
    j1 = json.loads((Path(results.results_dir) / 'joint_optimization' / 'domain_1_joint.json').read_text())
    row = s['domains'][1]
    assert row['throughput_fps'] == pytest.approx(j1['predicted']['throughput_fps'])
    assert row['gain_x'] == pytest.approx(j1['predicted']['throughput_fps']
                                          / j1['baselines']['unpruned']['best_plain_split']['throughput_fps'])
    assert row['branches_pruned'] == sum(len(b['alpha']) - len(b['kept']) for b in j1['blocks'])
    assert s["mean"]["a_ref_pct"] == pytest.approx(81.5)
    assert 'mean' in capsys.readouterr().out


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_step4_domains_and_formats(results):
    assert step4.main(['--results_dir', results.results_dir, '--formats', 'pdf']) == 0
    out = Path(results.results_dir) / 'visualization'
    assert (out / 'predicted_vs_measured.pdf').is_file()
    (out / 'predicted_vs_measured.png').write_bytes(b'an earlier run')
    pdfs = {p.name: p.read_bytes() for p in out.glob('*.pdf')}
    assert step4.main(['--results_dir', results.results_dir, '--domains', '2', '--formats', 'png']) == 0
    # domain 2 had no real-mode run: the earlier run's png of predicted_vs_measured is stale and gone; the PDFs, a
    # format this run did not write, are left exactly as they were
    assert not (out / 'predicted_vs_measured.png').exists()
    assert {p.name: p.read_bytes() for p in out.glob('*.pdf')} == pdfs and 'predicted_vs_measured.pdf' in pdfs
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~current_umask() for p in out.iterdir())
    assert sorted(p.stem for p in out.glob('*.png')) == sorted(FIGURES)
    assert [r['domain'] for r in json.loads((out / 'summary.json').read_text())['domains']] == ['2']
    with pytest.raises(UserError, match='domain.*7'):
        step4.main(['--results_dir', results.results_dir, '--domains', '7'])
    with pytest.raises(UserError, match='--formats'):
        step4.main(['--results_dir', results.results_dir, '--formats', 'gif'])


def test_step4_skips_optional_and_names_missing_required(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    with pytest.raises(ArtifactError, match='hardware_lut_complete.json'):
        step4.main(['--results_dir', str(tmp_path)])
    assert not (tmp_path / 'visualization').exists()
    _write_lut(cfg)
    with caplog.at_level('INFO'):
        assert step4.main(['--results_dir', str(tmp_path), '--formats', 'png']) == 0
    names = sorted(p.name for p in (tmp_path / 'visualization').iterdir())
    assert names == ['lut_heatmap_edge.png', 'lut_heatmap_server.png', 'summary.json', 'summary.md']
    assert 'step 3' in caplog.text and 'step 2' in caplog.text
    joint = tmp_path / 'joint_optimization' / 'domain_0_joint.json'
    write_artifact(joint, 'joint_domain', {'domain': 0}, cfg, 'test')
    with pytest.raises(ArtifactError, match=r'domain_0_joint.json.*a_ref'):
        step4.main(['--results_dir', str(tmp_path)])


def test_predicted_vs_measured_lays_out_one_panel_with_long_labels_without_collapsing():
    # one quantity, eleven configurations on one spot: a long shared label used to squeeze the axes to nothing
    import io
    import warnings
    pts = {'closed loop throughput (frames/s)': [(f'd{k} edge', 520.0, 520.0) for k in range(11)]
           + [(f'd{k}', 1700.0 + k, 1750.0) for k in range(3)]}
    fig = plots.predicted_vs_measured(pts)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fig.savefig(io.BytesIO(), format='png')
    ax = fig.axes[0]
    assert ax.get_position().width > 0.6  # the axes keep most of the figure's width
    labels = [t.get_text() for t in ax.texts]
    assert labels == ['d0 edge ... d10 edge (11 points)', 'd0, d1, d2']  # three or fewer: every name
