"""Figures of step 4, drawn from plain records (viz.summary) on matplotlib's Agg canvas.

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global state, no display);
`save_figure` writes it once per requested format.  Every axis carries a label with its unit.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')  # server-side: never open a window

import numpy as np  # noqa: E402
from matplotlib import colors as mcolors
from matplotlib import patheffects  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from artifacts import atomic_write_bytes  # noqa: E402
from hyper_repvgg import BRANCHES, LAYOUTS  # noqa: E402
from viz.summary import DomainResult, Inputs, LutView, Stage  # noqa: E402

log = logging.getLogger(__name__)

STYLE = {'font.size': 10, 'axes.titlesize': 11, 'axes.labelsize': 10, 'legend.fontsize': 8.5,
         'xtick.labelsize': 9, 'ytick.labelsize': 9, 'figure.titlesize': 12, 'axes.grid': True,
         'grid.alpha': 0.3, 'savefig.dpi': 150}
STAGE_COLORS = {'edge': '#4C72B0', 'link': '#DD8452', 'server': '#55A868'}
BASELINE_STYLE = {  # label, marker, color
    'best_plain_split': ('best plain split', 's', '#C44E52'),
    'edge_only': ('edge-only', 'v', '#8172B3'),
    'server_only': ('server-only', '^', '#937860'),
}
BRANCH_NAMES = {'D': '3x3 dense (D)', 'O': '1x1 (O)', 'I': 'identity (I)'}
FORMATS = ('png', 'pdf')
FIGURE_NAMES = ('accuracy_throughput_curve', 'domain_comparison', 'alpha_heatmap', 'gamma_heatmap', 'lut_heatmap_edge',
                'lut_heatmap_server', 'stage_times', 'predicted_vs_measured', 'chain_stages')  # every figure step 4 can draw


def new_figure(width: float, height: float) -> Figure:
    """A Figure with the step-4 style, not registered with pyplot."""
    with matplotlib.rc_context(STYLE):
        return Figure(figsize=(width, height), layout='constrained')


def save_figure(fig: Figure, out_dir: Path, name: str, formats: Sequence[str] = FORMATS) -> List[Path]:
    """Write `name.<fmt>` for each format atomically; returns the written paths."""
    import io
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        with matplotlib.rc_context(STYLE):
            fig.savefig(buf, format=fmt)
        path = Path(out_dir) / f'{name}.{fmt}'
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _grid(n: int, max_cols: int = 5) -> Tuple[int, int]:
    cols = min(n, max_cols)
    return int(math.ceil(n / cols)), cols


def _styled(fn):
    """Run a figure builder under the step-4 rcParams (tick and grid styles are read at axes creation)."""
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _yerr(values: Sequence[float], intervals: Sequence[Optional[Tuple[float, float]]]) -> Optional[np.ndarray]:
    """(2, n) asymmetric error bars from 95 % intervals, or None when no value has one."""
    if not any(iv is not None for iv in intervals):
        return None
    return np.array([[max(0.0, v - iv[0]) if iv else 0.0 for v, iv in zip(values, intervals)],
                     [max(0.0, iv[1] - v) if iv else 0.0 for v, iv in zip(values, intervals)]])


def _truncation_mark(ax: Any, bottom: float) -> None:
    """A broken-axis mark at the foot of a y axis that does not start at 0, with the value it starts at."""
    kw = dict(transform=ax.transAxes, color='black', clip_on=False, lw=1)
    for dx in (0.0, 0.012):
        ax.plot([-0.012 + dx, 0.0 + dx], [0.005, 0.025], **kw)
    ax.annotate(f'axis starts at {bottom:.0f}', (0.0, 0.0), xycoords='axes fraction', xytext=(2, 2),
                textcoords='offset points', fontsize=7, color='#333333')


def _pareto_points(ax: Any, r: DomainResult) -> List[float]:
    """Draw the epsilon sweep: measured points with their 95 % interval (solid), predictions hollow and dashed."""
    pts = sorted(r.pareto, key=lambda p: p.throughput_fps)
    for measured, style in ((True, dict(ls='-', mfc='#4C72B0')), (False, dict(ls='--', mfc='white'))):
        sel = [p for p in pts if p.measured == measured]
        if not sel:
            continue
        x, y = [p.throughput_fps for p in sel], [p.accuracy_pct for p in sel]
        ax.errorbar(x, y, yerr=_yerr(y, [p.accuracy_ci_pct for p in sel]), marker='o', color='#4C72B0', ms=4.5,
                    lw=1.4, capsize=2.5, zorder=3, **style)
        for p in sel:
            ax.annotate(f'ε={p.epsilon:g}', (p.throughput_fps, p.accuracy_pct), textcoords='offset points',
                        xytext=(3, 4), fontsize=7, color='#333333')
    return [p.throughput_fps for p in pts]


@_styled
def accuracy_throughput_curve(results: Sequence[DomainResult], accuracy_label: str) -> Figure:
    """Per domain (small multiples): the epsilon-sweep front (measured on test with 95 % intervals; predictions
    of old artifacts drawn hollow and dashed), the chosen point, the floor A_ref - epsilon and the baselines."""
    rows, cols = _grid(len(results))
    fig = new_figure(3.1 * cols + 0.4, 2.7 * rows + 1.1)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, results):
        fps_all = [s.throughput_fps for s in r.baselines.values()] + [r.predicted.throughput_fps]
        if r.pareto:
            fps_all += _pareto_points(ax, r)
        ax.errorbar([r.predicted.throughput_fps], [r.final_acc_pct], yerr=_yerr([r.final_acc_pct], [r.final_ci_pct]),
                    marker='*', color='#FFB000', mec='black', ms=13, capsize=3, ecolor='black', zorder=4)
        for key, stage in r.baselines.items():
            label, marker, color = BASELINE_STYLE.get(key, (key, 'D', 'grey'))
            ax.plot([stage.throughput_fps], [r.a_ref_pct], marker, color=color, mec='black', ms=7, zorder=4)
        ax.axhline(r.a_ref_pct, color='grey', ls=':', lw=1)
        ax.axhline(r.floor_pct, color='#C44E52', ls='--', lw=1)
        if max(fps_all) / max(min(fps_all), 1e-9) > 20:
            ax.set_xscale('log')
        ax.set_title(r.title, fontsize=10)
        ax.set_xlabel('predicted throughput (frames/s)')
        ax.set_ylabel('accuracy (%)')
        ax.margins(x=0.12, y=0.15)
        _truncation_mark(ax, ax.get_ylim()[0])
    handles = [Line2D([], [], color='#4C72B0', marker='o', ms=4.5,
                      label='ε sweep, each point deployed and measured (test, 95 % interval)'),
               Line2D([], [], color='#4C72B0', marker='o', mfc='white', ls='--', ms=4.5,
                      label='ε sweep, surrogate prediction (older artifacts)'),
               Line2D([], [], ls='', marker='*', color='#FFB000', mec='black', ms=12,
                      label=f'chosen, ε of step 3 ({accuracy_label}, measured, 95 % interval)'),
               Line2D([], [], color='grey', ls=':', label='A_ref (unpruned)'),
               Line2D([], [], color='#C44E52', ls='--', label='floor A_ref − ε')]
    if not any(p.measured is False for r in results for p in r.pareto):
        handles.pop(1)
    handles += [Line2D([], [], ls='', marker=m, color=c, mec='black', ms=7, label=f'{lab} (unpruned, A_ref)')
                for lab, m, c in BASELINE_STYLE.values()]
    fig.legend(handles=handles, loc='outside lower center', ncol=3)
    fig.suptitle('Accuracy vs predicted throughput per domain (pruned + split vs plain baselines)')
    return fig


@_styled
def domain_comparison(results: Sequence[DomainResult], accuracy_label: str) -> Figure:
    """Per domain: A_ref vs final accuracy, throughput gain over the best plain split, chosen split lambda."""
    fig = new_figure(max(9.5, 0.75 * len(results) + 5.5), 8.2)
    ax_acc, ax_gain, ax_lam = fig.subplots(3, 1, sharex=True)
    x = np.arange(len(results))
    names = [str(r.domain) + (f'\n{r.corruption}' if r.corruption else '') for r in results]
    w = 0.38
    a_ref = np.array([r.a_ref_pct for r in results])
    final = np.array([r.final_acc_pct for r in results])
    ax_acc.bar(x - w / 2, a_ref, w, label='A_ref (unpruned, domain hyper-weights)', color='#8C8C8C')
    ax_acc.bar(x + w / 2, final, w, yerr=_yerr(list(final), [r.final_ci_pct for r in results]), capsize=2.5,
               label=f'final ({accuracy_label}, pruned; 95 % paired interval)', color='#4C72B0')
    floor = np.array([r.floor_pct for r in results])
    ax_acc.hlines(floor, x - w, x + w, colors='#C44E52', linestyles='--', lw=1.2, label='floor A_ref − ε', zorder=3)
    lo = float(min(a_ref.min(), final.min(), floor.min()))
    bottom = max(0.0, lo - max(5.0, 0.1 * (100 - lo)))
    ax_acc.set_ylim(bottom, min(100.0, float(max(a_ref.max(), final.max())) + 3))
    if bottom > 0:
        _truncation_mark(ax_acc, bottom)
    for xi, r in zip(x, results):
        ax_acc.annotate(f'{0.0 - r.drop_pct:+.1f}', (xi + w / 2, r.final_acc_pct), textcoords='offset points',
                        xytext=(0, 2), ha='center', fontsize=7.5)
    ax_acc.set_ylabel('accuracy (%)')
    ax_acc.set_title('Accuracy: unpruned reference vs final pruned model (labels: change, points)')
    ax_acc.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0))
    gains = np.array([r.gain_x if r.gain_x is not None else np.nan for r in results])
    mgains = np.array([r.measured_gain_x if r.measured_gain_x is not None else np.nan for r in results])
    measured = bool(np.isfinite(mgains).any())
    bw = w if measured else 0.6
    sets = [(x - w / 2 if measured else x, gains, 'predicted: joint config / best plain split', '#55A868', None)]
    if measured:
        sets.append((x + w / 2, mgains, 'measured: joint config / best plain split', '#4C72B0', '//'))
    for xs, vals, label, color, hatch in sets:
        bars = ax_gain.bar(xs, vals, bw, color=np.where(vals >= 1.0, color, '#C44E52'), hatch=hatch, label=label)
        for b, g in zip(bars, vals):
            if np.isfinite(g):
                ax_gain.annotate(f'{g:.2f}x', (b.get_x() + b.get_width() / 2, g), textcoords='offset points',
                                 xytext=(0, 2), ha='center', fontsize=7.5)
    ax_gain.axhline(1.0, color='black', lw=1, ls='--', label='1x (no gain)')
    ax_gain.set_ylabel('throughput gain (x)')
    ax_gain.set_ylim(0, np.nanmax(np.concatenate([gains, mgains, [1.0]])) * 1.2)
    mode = next((r.report['mode'] for r in results if r.report), '')
    how = {'real': 'real mode: through the worker and the link', 'pseudo': 'pseudo mode: server part measured'}
    ax_gain.set_title('Gain over the best plain split: predicted'
                      + (f' and measured ({how.get(mode, mode)})' if measured else ' (nothing measured)'))
    ax_gain.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0))
    lams = [r.lam for r in results]
    n = max(r.num_blocks for r in results)
    ax_lam.bar(x, lams, 0.6, color='#8172B3', label='chosen split λ (blocks on the edge)')
    plain = [r.baseline_lam.get('best_plain_split') for r in results]
    if any(p is not None for p in plain):
        ax_lam.plot(x, [np.nan if p is None else p for p in plain], 's', color='#C44E52', mec='black',
                    label='λ of the best plain split')
    ax_lam.set_ylim(0, n * 1.08 + 1)
    ax_lam.axhline(n, color='grey', lw=1, ls=':', label=f'N = {n} (edge-only)')
    ax_lam.set_ylabel('split point λ (blocks)')
    ax_lam.set_title('Chosen split point')
    ax_lam.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0))
    ax_lam.set_xticks(x, names, fontsize=8 if any(r.corruption for r in results) else None)
    if any(r.corruption for r in results):  # long corruption names: slant them so neighbours do not overlap
        ax_lam.tick_params(axis='x', labelrotation=25)
        for label in ax_lam.get_xticklabels():
            label.set_horizontalalignment('right')
    ax_lam.set_xlabel('domain')
    fig.suptitle('Per-domain comparison')
    return fig


@_styled
def alpha_heatmap(results: Sequence[DomainResult]) -> Figure:
    """Domains x blocks, one panel per branch: the final alpha; pruned branches crossed, absent ones blank."""
    n = max(r.num_blocks for r in results)
    fig = new_figure(max(8.0, 0.36 * n + 2.5), 1.0 + 3 * (0.32 * len(results) + 0.8))
    axes = fig.subplots(3, 1, sharex=True)
    vals = np.full((3, len(results), n), np.nan)
    pruned = np.zeros((3, len(results), n), dtype=bool)
    for i, r in enumerate(results):
        for k, (alpha, kept) in enumerate(zip(r.alpha, r.kept)):
            for b, br in enumerate(BRANCHES):
                if br in alpha:
                    vals[b, i, k] = alpha[br]
                    pruned[b, i, k] = br not in kept
    finite = vals[np.isfinite(vals)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    norm = mcolors.TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax) if finite.size and finite.min() < 0 \
        else mcolors.Normalize(vmin=0.0, vmax=vmax)
    cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
    for b, ax in enumerate(axes):
        im = ax.imshow(np.ma.masked_invalid(vals[b]), aspect='auto', cmap=cmap, norm=norm, interpolation='nearest')
        ii, kk = np.nonzero(pruned[b])
        ax.plot(kk, ii, 'x', color='red', ms=6, mew=1.6, ls='')
        ax.set_yticks(range(len(results)), [str(r.domain) for r in results])
        ax.set_ylabel('domain')
        ax.set_title(f'α of branch {BRANCH_NAMES[BRANCHES[b]]}')
        ax.grid(False)
        fig.colorbar(im, ax=ax, label='α (unitless)', pad=0.01)
    axes[-1].set_xticks(range(n))
    axes[-1].set_xlabel('block k (0 = stage0)')
    fig.legend(handles=[Line2D([], [], ls='', marker='x', color='red', mew=1.6, label='pruned (α kept, branch off)'),
                        Patch(facecolor='white', edgecolor='grey', label='branch absent in block')],
               loc='outside lower center', ncol=2)
    fig.suptitle('Final hyper-weights α per domain and block')
    return fig


@_styled
def gamma_heatmap(results: Sequence[DomainResult]) -> Figure:
    """Domains x blocks: the chosen layout γ (annotated), the split λ as a bar between edge and server blocks."""
    n = max(r.num_blocks for r in results)
    fig = new_figure(max(8.0, 0.42 * n + 2.5), 1.6 + 0.42 * len(results))
    ax = fig.subplots()
    g = np.full((len(results), n), np.nan)
    for i, r in enumerate(results):
        g[i, :len(r.gammas)] = r.gammas
    cmap = mcolors.ListedColormap(matplotlib.colormaps['tab20'].colors[:len(LAYOUTS)]).with_extremes(bad='white')
    ax.imshow(np.ma.masked_invalid(g), aspect='auto', cmap=cmap, vmin=-0.5, vmax=len(LAYOUTS) - 0.5,
              interpolation='nearest')
    for i, r in enumerate(results):
        for k, gamma in enumerate(r.gammas):
            ax.text(k, i, str(gamma), ha='center', va='center', fontsize=7.5)
        ax.plot([r.lam - 0.5, r.lam - 0.5], [i - 0.5, i + 0.5], color='black', lw=3.5, solid_capstyle='butt',
                path_effects=[patheffects.withStroke(linewidth=6, foreground='white')])
    ax.set_xlim(-0.65, n - 0.35)
    ax.set_yticks(range(len(results)), [f'{r.domain} (λ={r.lam})' for r in results])
    ax.set_xticks(range(n))
    ax.set_xlabel('block k (0 = stage0)')
    ax.set_ylabel('domain (chosen split)')
    ax.grid(False)
    used = sorted({int(v) for v in g[np.isfinite(g)]})
    handles = [Patch(facecolor=cmap(u), edgecolor='grey', label=f'γ={u}: {LAYOUTS[u].description}') for u in used]
    handles.append(Line2D([], [], color='black', lw=3, label='split λ (edge | server)'))
    fig.legend(handles=handles, loc='outside lower center', ncol=2, fontsize=8)
    ax.set_title('Layout γ per domain and block (black bar: split point λ)')
    return fig


@_styled
def lut_heatmap(view: LutView, side: str) -> Figure:
    """Blocks x layouts of one side's LUT in ms (log colour scale); layouts with no entry are blank."""
    ms = view.edge_ms if side == 'edge' else view.server_ms
    n = ms.shape[0]
    fig = new_figure(9.0, 1.8 + 0.3 * n)
    ax = fig.subplots()
    finite = ms[np.isfinite(ms) & (ms > 0)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.1, 1.0)
    log_scale = hi / lo > 10
    norm = mcolors.LogNorm(vmin=lo, vmax=hi) if log_scale else mcolors.Normalize(vmin=lo, vmax=hi)
    cmap = matplotlib.colormaps['magma_r'].with_extremes(bad='#F2F2F2')
    im = ax.imshow(np.ma.masked_invalid(np.where(ms > 0, ms, np.nan)), aspect='auto', cmap=cmap, norm=norm,
                   interpolation='nearest')
    for k in range(n):
        for gm in range(ms.shape[1]):
            v = ms[k, gm]
            if np.isfinite(v):
                r, g, b, _ = cmap(norm(max(v, lo)))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(gm, k, f'{v:.3g}', ha='center', va='center', fontsize=6.5, color='white' if dark else 'black')
    ax.set_xticks(range(ms.shape[1]), [f'{lay.gamma}\n' + '+'.join(''.join(p) for p in lay.parts)
                                       for lay in LAYOUTS], fontsize=7.5)
    ax.set_yticks(range(n))
    ax.set_xlabel('layout γ (parts: fused branches joined, "+" = run separately)')
    ax.set_ylabel('block k (0 = stage0)')
    ax.grid(False)
    fig.colorbar(im, ax=ax, label=f'median time per batch of {view.batch} (ms{", log scale" if log_scale else ""})',
                 pad=0.01)
    source = view.edge_source if side == 'edge' else view.server_source
    device = view.edge_device if side == 'edge' else view.server_device
    ax.set_title(f'{side.capitalize()} LUT: {device} ({source}), batch {view.batch}\n'
                 'grey = layout not measurable (its branches are not all in the block)')
    return fig


@_styled
def stage_bars(rows: Sequence[Tuple[str, Stage]], title: str, separator: Optional[int] = None) -> Figure:
    """Grouped bars of edge / link / server time per configuration; the bottleneck stage outlined and starred.

    Bars far above the typical bottleneck (e.g. server-only over a slow link) are cut at the top of the axis
    and labelled with their value, so the other groups stay readable.  `separator`: draw a line before row i.
    """
    fig = new_figure(max(7.5, 0.9 * len(rows) + 2.5), 4.8)
    ax = fig.subplots()
    x = np.arange(len(rows))
    w = 0.26
    worst = np.array([max(st.edge_ms, st.link_ms, st.server_ms) for _, st in rows])
    cap = float(worst.max()) * 1.15
    if worst.max() > 4 * np.median(worst):
        cap = float(np.median(worst)) * 2.5
    for s, stage in enumerate(('edge', 'link', 'server')):
        vals = np.array([getattr(st, f'{stage}_ms') for _, st in rows])
        bars = ax.bar(x + (s - 1) * w, np.minimum(vals, cap), w, color=STAGE_COLORS[stage])
        for b, v, (_, st) in zip(bars, vals, rows):
            top = min(v, cap)
            if v > cap:
                ax.annotate(f'{v:.3g} ms (cut)', (b.get_x() + b.get_width() / 2, cap), textcoords='offset points',
                            xytext=(0, -12), ha='center', fontsize=7.5, color='white', fontweight='bold',
                            rotation=90, va='top')
            if st.bottleneck == stage:
                b.set_edgecolor('black')
                b.set_linewidth(2)
                ax.annotate('★', (b.get_x() + b.get_width() / 2, top), textcoords='offset points',
                            xytext=(0, 1), ha='center', fontsize=11, annotation_clip=False)
    if separator:
        ax.axvline(separator - 0.5, color='grey', lw=1, ls='--')
    ax.set_ylim(0, cap * 1.08)
    ax.set_xticks(x, [f'{name}\n{st.throughput_fps:.3g} fps' for name, st in rows], fontsize=8)
    ax.set_ylabel('predicted stage time per batch (ms)')
    ax.set_xlabel('configuration (predicted throughput in frames/s under each name)')
    handles = [Patch(facecolor=STAGE_COLORS[k], label=f'{k} (ms)') for k in ('edge', 'link', 'server')]
    handles.append(Line2D([], [], ls='', marker='$★$', color='black', ms=9, label='bottleneck stage (outlined)'))
    ax.legend(handles=handles, loc='upper right', ncol=4)
    ax.set_title(title)
    return fig


@_styled
def chain_stage_bars(chain: Mapping[str, Any]) -> Figure:
    """Step 2's chain section (--chain): per configuration (the chosen one, the exact optimum, the best split on at
    most two computing devices) the predicted time of each of the chain's 2K - 1 stages, devices and links in
    pipeline order, the bottleneck outlined; the blocks each device runs under the group."""
    rows = [('chosen (GD + local search)', chain['predicted']), ('exact optimum', chain['exact']),
            ('best with 2 computing devices', chain['best_two_device'])]
    names = list(chain['exact']['stages_ms'])
    fig = new_figure(max(7.5, 1.1 * len(names) * len(rows) / 2 + 2.5), 4.8)
    ax = fig.subplots()
    w = 0.8 / len(names)
    x = np.arange(len(rows))
    cmap = matplotlib.colormaps['tab10']
    for s, name in enumerate(names):
        is_link = s % 2 == 1
        vals = [float(d['stages_ms'].get(name, 0.0)) for _, d in rows]
        bars = ax.bar(x + (s - (len(names) - 1) / 2) * w, vals, w, color=cmap(s // 2) if not is_link else '#DD8452',
                      hatch='//' if is_link else None, label=f'{name} (ms)', alpha=0.9)
        for b, (_, d) in zip(bars, rows):
            if d['bottleneck'] == name:
                b.set_edgecolor('black')
                b.set_linewidth(2)
    labels = [f'{label}\n{d["throughput_fps"]:.3g} fps\nblocks {" ".join(f"{a}-{b}" for a, b in d["hop_blocks"])}'
              for label, d in rows]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel('predicted stage time per batch (ms)')
    ax.set_xlabel('configuration (predicted throughput; blocks start-end per device, a-a = none)')
    ax.legend(loc='upper right', ncol=2, title='stage (links hatched; bottleneck outlined)')
    ax.set_title(f'Chain {chain.get("description", "")}: predicted stage times '
                 f'(chain {chain["chain_gain_pct"]:+.1f} % fps over 2 devices)')
    return fig


@_styled
def predicted_vs_measured(points: Mapping[str, Sequence[Tuple[str, float, float]]]) -> Figure:
    """One scatter panel per quantity ('throughput (frames/s)', ...): measured vs predicted, y = x line."""
    fig = new_figure(max(6.5, 4.2 * len(points) + 0.5), 5.0)  # one panel: wide enough for the title and labels
    axes = fig.subplots(1, len(points), squeeze=False)[0]
    for ax, (quantity, pts) in zip(axes, points.items()):
        pred = np.array([p[1] for p in pts])
        meas = np.array([p[2] for p in pts])
        lo = float(min(pred.min(), meas.min())) * 0.9
        hi = float(max(pred.max(), meas.max())) * 1.1
        ax.plot([lo, hi], [lo, hi], '--', color='grey', lw=1, label='measured = predicted')
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color='grey', alpha=0.15,
                        label='±10 %')
        ax.plot(pred, meas, 'o', color='#4C72B0', mec='black', label='configuration (labelled)')
        groups: Dict[Tuple[int, int], List[Tuple[str, float, float]]] = {}
        tol = (hi - lo) / 100
        for name, p, m in pts:  # points within 1 % of the axis share one label
            groups.setdefault((round(p / tol), round(m / tol)), []).append((str(name), p, m))
        for members in groups.values():
            names = [n for n, _, _ in members]
            label = ', '.join(names) if len(names) <= 3 else f'{names[0]} ... {names[-1]} ({len(names)} points)'
            ann = ax.annotate(label, members[0][1:], textcoords='offset points', xytext=(5, 3), fontsize=7.5,
                              clip_on=True)
            ann.set_in_layout(False)  # a long label is clipped at the axes, never squeezes them
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f'predicted {quantity}')
        ax.set_ylabel(f'measured {quantity}')
        ax.legend(loc='upper left')
    fig.suptitle('Measured vs predicted (LUT cost model)\nclosed loop: s2 = step 2, d<k> = domain k')
    return fig


def stage_rows(step2: Optional[Mapping[str, Stage]], results: Sequence[DomainResult]) -> List[Tuple[str, Stage]]:
    """The bars of the stage-time figure: the step-2 configuration and its baselines, then each domain."""
    rows: List[Tuple[str, Stage]] = []
    for key, stage in (step2 or {}).items():
        rows.append((f'step 2:\n{key.replace("_", " ")}', stage))
    rows += [(f'domain {r.domain}', r.predicted) for r in results]
    return rows



def measured_points(results: Sequence[DomainResult],
                    step2_loop: Optional[Mapping[str, Any]] = None) -> Dict[str, List[Tuple[str, float, float]]]:
    """Pairs (name, predicted, measured) per quantity: the closed loop's configurations (step 2 and each domain's
    chosen one and baselines) and real-mode runs; empty when nothing was measured."""
    pts: Dict[str, List[Tuple[str, float, float]]] = {}
    short = {'chosen': '', 'best_plain_split': 'plain', 'edge_only': 'edge', 'server_only': 'server'}
    loops = [('s2', step2_loop)] + [(f'd{r.domain}', r.loop) for r in results]
    for name, loop in loops:
        for rec in (loop or {}).get('measurements') or []:
            role = next((x for x in rec['roles'] if x in short), None)
            if role is None:
                continue
            pts.setdefault('closed loop throughput (frames/s)', []).append(
                (name + ('' if not short[role] else f' {short[role]}'), float(rec['predicted']['throughput_fps']),
                 float(rec['measured']['throughput_fps'])))
    for r in results:
        m = r.measured or {}
        for key, quantity, pred in (('throughput_fps', 'real run, test split: throughput (frames/s)',
                                     r.predicted.throughput_fps),
                                    ('latency_ms', 'real run, test split: latency (ms)', r.predicted.latency_ms)):
            if isinstance(m.get(key), (int, float)):
                pts.setdefault(quantity, []).append((r.domain, pred, float(m[key])))
    return pts


def figure_builders(inputs: Inputs) -> Tuple[Dict[str, Callable[[], Figure]], List[str]]:
    """The figures the inputs allow, as name -> builder, and a note for each one left out."""
    acc = f'{inputs.accuracy_source} accuracy'
    res = inputs.domains
    b: Dict[str, Callable[[], Figure]] = {
        'lut_heatmap_edge': lambda: lut_heatmap(inputs.lut, 'edge'),
        'lut_heatmap_server': lambda: lut_heatmap(inputs.lut, 'server'),
    }
    notes: List[str] = []
    if res:
        b['accuracy_throughput_curve'] = lambda: accuracy_throughput_curve(res, acc)
        b['domain_comparison'] = lambda: domain_comparison(res, acc)
        b['alpha_heatmap'] = lambda: alpha_heatmap(res)
        b['gamma_heatmap'] = lambda: gamma_heatmap(res)
        if not any(r.pareto for r in res):
            notes.append('no domain has Pareto points (epsilon sweep): the curve shows chosen points and baselines only')
    else:
        notes.append('no step-3 results: accuracy_throughput_curve, domain_comparison, alpha/gamma heatmaps skipped')
    if res or inputs.step2:
        s2 = None
        if inputs.step2:
            s2 = {'chosen': inputs.step2.chosen, **inputs.step2.baselines}
        b['stage_times'] = lambda: stage_bars(stage_rows(s2, res), 'Predicted stage times per batch '
                                              '(step 2 unpruned configurations, then each domain\'s joint one)',
                                              separator=len(s2 or {}))
    else:
        notes.append('neither step 2 nor step 3 results: stage_times skipped')
    if inputs.step2 and inputs.step2.chain:
        b['chain_stages'] = lambda: chain_stage_bars(inputs.step2.chain)
    pts = measured_points(res, inputs.step2.loop if inputs.step2 else None)
    if pts:
        b['predicted_vs_measured'] = lambda: predicted_vs_measured(pts)
    else:
        notes.append('no measurements in the step-2 / step-3 results: predicted_vs_measured skipped')
    return b, notes


@_styled
def split_sweep(rows: Sequence[Mapping[str, object]], chosen_lam: int, title: str) -> Figure:
    """The split sweep (pipeline/split_sweep.py): per lambda, edge / link / server time per batch stacked (medians),
    the pipelined throughput (median, p10-p90 band) and the LUT's prediction on a second axis; the configuration's
    own lambda and the best measured one marked."""
    lams = np.array([int(r['split_layer']) for r in rows])
    fig = new_figure(max(7.5, 0.32 * len(rows) + 3.0), 4.8)
    ax = fig.subplots()
    bottom = np.zeros(len(rows))
    for stage, key in (('edge', 'edge_compute_median_ms'), ('link', 'transfer_median_ms'),
                       ('server', 'server_compute_median_ms')):
        vals = np.array([float(r[key]) for r in rows])
        ax.bar(lams, vals, 0.75, bottom=bottom, color=STAGE_COLORS[stage], label=f'{stage} (ms)')
        bottom += vals
    ax.set_xlabel('split point lambda (blocks on the edge)')
    ax.set_ylabel('time per batch, median (ms): edge + link + server stacked')
    ax.set_xticks(lams)
    ax.tick_params(axis='x', labelsize=7.5)
    ax.set_xlim(lams.min() - 0.6, lams.max() + 0.6)
    tx = ax.twinx()
    fps = np.array([float(r['throughput_median_fps']) for r in rows])
    # real mode: the median is the stream's steady rate, which a burst of stalls can put outside the windows' p10-p90
    lo = np.maximum(0.0, fps - np.array([float(r['throughput_p10_fps']) for r in rows]))
    hi = np.maximum(0.0, np.array([float(r['throughput_p90_fps']) for r in rows]) - fps)
    tx.errorbar(lams, fps, yerr=[lo, hi], fmt='none', ecolor='black', elinewidth=0.8, capsize=2, alpha=0.6,
                label='throughput p10-p90')
    tx.plot(lams, fps, color='black', marker='o', ms=3.5, lw=1.5, label='throughput, median (frames/s)')
    tx.plot(lams, [float(r['predicted_throughput_fps']) for r in rows], color='black', ls=':', lw=1.2,
            label='throughput predicted by the LUT (frames/s)')
    tx.set_ylabel('pipelined throughput (frames/s)')
    tx.set_ylim(0, max(fps.max(), max(float(r['predicted_throughput_fps']) for r in rows)) * 1.18)
    ax.axvline(chosen_lam, color='#C44E52', lw=1.6, ls='--')
    best = int(lams[int(np.argmax(fps))])
    tx.annotate(f'chosen lambda = {chosen_lam}', (chosen_lam, tx.get_ylim()[1] * 0.97), ha='left', va='top',
                fontsize=8.5, color='#C44E52', xytext=(3, 0), textcoords='offset points')
    tx.plot([best], [fps.max()], marker='*', ms=13, color='#C44E52', ls='', label=f'best measured (lambda = {best})')
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = tx.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc='outside lower center', ncol=4, fontsize=7.5)
    ax.set_ylim(0, bottom.max() * 1.15)
    ax.set_title(title)
    return fig
