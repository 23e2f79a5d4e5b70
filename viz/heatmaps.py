"""Step 0's two heatmaps: per-domain hyper-weights alpha and per-domain branch importance.

One panel per branch (D = 3x3, O = 1x1, I = identity), domains down, blocks across, one shared colour scale
and colour bar per figure.  Cells of branches a block does not have (identity in blocks with stride 2 or
in != out channels) are hatched grey, never coloured.  Matplotlib's Agg canvas, no pyplot state.
"""
import math
from pathlib import Path
from typing import Dict, Mapping, Sequence

import numpy as np

BRANCH_LABELS = {'D': 'D (3x3 conv)', 'O': 'O (1x1 conv)', 'I': 'I (identity BN)'}


def _matrix(values: Mapping[int, Mapping[int, Mapping[str, float]]], domains: Sequence[int], num_blocks: int,
            branch: str) -> np.ndarray:
    m = np.full((len(domains), num_blocks), np.nan)
    for i, d in enumerate(domains):
        for k, per_branch in values[d].items():
            if branch in per_branch:
                m[i, int(k)] = per_branch[branch]
    return m


def branch_heatmap(values: Mapping[int, Mapping[int, Mapping[str, float]]], block_names: Sequence[str],
                   title: str, colorbar_label: str, path: Path, log10: bool = False, center: float = None,
                   annotate: bool = False) -> None:
    """values[domain][block][branch] -> one PNG at `path` with three stacked panels (D, O, I)."""
    from matplotlib import colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    domains = sorted(values)
    n = len(block_names)
    mats: Dict[str, np.ndarray] = {b: _matrix(values, domains, n, b) for b in ('D', 'O', 'I')}
    if log10:
        mats = {b: np.where(m > 0, np.log10(np.where(m > 0, m, 1.0)), np.nan) for b, m in mats.items()}
    finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    if center is not None and lo < center < hi:
        norm = colors.TwoSlopeNorm(vmin=lo, vcenter=center, vmax=hi)
        cmap = 'RdBu_r'
    else:
        norm = colors.Normalize(vmin=lo, vmax=hi)
        cmap = 'viridis'
    width = max(9.0, 0.48 * n + 3.0)
    panel_h = max(1.6, 0.32 * len(domains) + 0.9)
    fig = Figure(figsize=(width, 3 * panel_h + 1.0), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    image = None
    for ax, b in zip(axes, ('D', 'O', 'I')):
        m = mats[b]
        ax.set_facecolor('#d9d9d9')
        image = ax.imshow(np.ma.masked_invalid(m), aspect='auto', cmap=cmap, norm=norm, interpolation='nearest')
        for i in range(m.shape[0]):
            for k in range(m.shape[1]):
                if not math.isfinite(m[i, k]):
                    ax.add_patch(_hatch(k, i))
                elif annotate:
                    rgba = image.cmap(image.norm(m[i, k]))
                    dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                    ax.text(k, i, f'{m[i, k]:.2f}', ha='center', va='center', fontsize=6,
                            color='white' if dark else 'black')
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels([str(d) for d in domains], fontsize=8)
        ax.set_ylabel(f'domain\n{BRANCH_LABELS[b]}', fontsize=9)
    axes[-1].set_xticks(range(n))
    axes[-1].set_xticklabels([f'{k}\n{name}' for k, name in enumerate(block_names)], fontsize=7, rotation=90)
    axes[-1].set_xlabel('block (index, official name); hatched grey = branch absent in that block', fontsize=9)
    fig.suptitle(title, fontsize=11)
    cbar = fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.01)
    cbar.set_label(colorbar_label, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name('.' + path.name + '.tmp.png')
    fig.savefig(str(tmp), dpi=130)
    tmp.replace(path)


def _hatch(k: int, i: int):
    from matplotlib.patches import Rectangle
    return Rectangle((k - 0.5, i - 0.5), 1, 1, facecolor='#d9d9d9', edgecolor='#9a9a9a', hatch='///', linewidth=0)


def write_heatmaps(out_dir: Path, model, alphas: Mapping[int, Sequence[dict]],
                   importance: Mapping[int, Mapping[int, Mapping[str, float]]], what: str) -> None:
    """hyper_weights_heatmap.png and importance_heatmap.png under out_dir (alphas: per domain the
    hyper_weights()['blocks'] list; importance: per domain {block: {branch: importance}})."""
    names = [s.name for s in model.plan]
    branch_heatmap({d: {b['block']: b['alpha'] for b in blocks} for d, blocks in alphas.items()}, names,
                   f'Trained hyper-weights alpha per domain ({what})', 'alpha (initial value 1)',
                   Path(out_dir) / 'hyper_weights_heatmap.png', center=1.0, annotate=True)
    branch_heatmap(importance, names, f'Branch importance |alpha| / GFLOPs per domain ({what}); low = pruned first',
                   'log10 importance (importance in 1 / GFLOPs)', Path(out_dir) / 'importance_heatmap.png', log10=True)
