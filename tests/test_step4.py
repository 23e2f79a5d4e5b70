"""Step 4 (figures and the paper table): records -> figures/table, and the step on real pipeline artifacts."""
import math

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
    assert any('step-3' in n for n in notes) and any('real-mode' in n for n in notes)
    builders, notes = plots.figure_builders(Inputs(_lut_view(recs[0].num_blocks), None, recs, 'test', []))
    assert 'predicted_vs_measured' not in builders and 'stage_times' in builders
