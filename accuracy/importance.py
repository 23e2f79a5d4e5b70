"""Branch FLOPs at each block's true input resolution, and importance = |alpha| / GFLOPs (pure functions).

FLOPs come from the closed form in timing/flops.py (FLOPs = 2 x MACs).  `fvcore_check` counts the two conv
branches of every block with fvcore (which counts MACs) at the same resolution and compares: the identity
branch is a per-channel affine that fvcore does not count, so it is reported as not applicable.

Only branches a block actually has appear: the identity of a block with stride 2 or in != out channels is
not a branch, so it has no FLOPs entry, no importance and no rank.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from hyper_repvgg import BRANCHES, BlockSpec
from timing.flops import block_input_hw, branch_macs, out_hw

FORMULA = 'importance = |alpha| / GFLOPs, GFLOPs = 2 * MACs / 1e9 of the branch at its block\'s input resolution'
FVCORE_RTOL = 1e-9  # closed form and fvcore count the same integer MACs


def branch_flops_table(plan: Sequence[BlockSpec], input_size: int) -> Dict[str, Any]:
    """branch_flops.json's payload: per block its input/output resolution and per branch MACs, FLOPs, GFLOPs."""
    hws = block_input_hw(plan, input_size)
    blocks = []
    for spec, hw in zip(plan, hws):
        hw = [int(v) for v in hw]
        macs = {b: int(m) for b, m in branch_macs(spec, tuple(hw)).items()}
        blocks.append({
            'block': spec.index, 'name': spec.name, 'in_channels': spec.in_channels, 'out_channels': spec.out_channels,
            'stride': spec.stride, 'groups': spec.groups, 'input_hw': hw, 'output_hw': list(out_hw(spec, tuple(hw))),
            'branches': {b: {'macs': m, 'flops': 2 * m, 'gflops': 2 * m / 1e9} for b, m in macs.items()},
            'block_flops': 2 * sum(macs.values()),
        })
    return {'input_size_px': int(input_size), 'unit_note': 'FLOPs = 2 x MACs (closed form, timing/flops.py)',
            'blocks': blocks, 'total_flops': sum(b['block_flops'] for b in blocks)}


def fvcore_check(model: Any, table: Dict[str, Any]) -> Dict[str, Any]:
    """Count each block's D and O convs with fvcore at the block's input resolution; compare with `table`.

    Adds 'fvcore_macs' (or None for the identity) to every branch entry of `table` in place and returns a
    summary {'checked', 'mismatches': [...], 'all_match', 'note'}.
    """
    import torch
    from fvcore.nn import FlopCountAnalysis
    mismatches: List[Dict[str, Any]] = []
    checked = 0
    for entry, block in zip(table['blocks'], model.blocks):
        h, w = entry['input_hw']
        x = torch.zeros(1, entry['in_channels'], h, w)
        for b, info in entry['branches'].items():
            if b == 'I':
                info['fvcore_macs'] = None  # per-channel affine: fvcore has no count for it
                continue
            conv = block.rbr_dense.conv if b == 'D' else block.rbr_1x1.conv
            counter = FlopCountAnalysis(conv, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            n = int(counter.total())
            info['fvcore_macs'] = n
            checked += 1
            if abs(n - info['macs']) > FVCORE_RTOL * max(1, info['macs']):
                mismatches.append({'block': entry['block'], 'branch': b, 'closed_form_macs': info['macs'],
                                   'fvcore_macs': n})
    return {'checked_branches': checked, 'mismatches': mismatches, 'all_match': not mismatches,
            'note': 'fvcore counts conv MACs; identity branches are not counted by fvcore (fvcore_macs null)'}


def importance_scores(hyper_weights: Dict[str, Any], table: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per existing branch of every block: alpha, GFLOPs and importance = |alpha| / GFLOPs (block order)."""
    flops = {e['block']: e['branches'] for e in table['blocks']}
    out = []
    for blk in hyper_weights['blocks']:
        k = int(blk['block'])
        for b in BRANCHES:
            if b not in flops[k] or b not in blk['alpha']:
                continue
            alpha = float(blk['alpha'][b])
            g = float(flops[k][b]['gflops'])
            out.append({'block': k, 'name': blk['name'], 'branch': b, 'alpha': alpha, 'gflops': g,
                        'importance': abs(alpha) / g if g > 0 else float('inf'),
                        'kept': b in blk.get('kept', BRANCHES)})
    return out


def rank_ascending(scores: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Scores sorted by importance, lowest (pruned first) to highest; ties by block then branch."""
    order = sorted(scores, key=lambda s: (s['importance'], s['block'], BRANCHES.index(s['branch'])))
    return [{'rank': i, 'block': s['block'], 'name': s['name'], 'branch': s['branch'], 'importance': s['importance']}
            for i, s in enumerate(order)]


def scores_by_block(scores: Sequence[Dict[str, Any]]) -> Dict[int, Dict[str, float]]:
    """{block: {branch: importance}} (for heatmaps)."""
    out: Dict[int, Dict[str, float]] = {}
    for s in scores:
        out.setdefault(s['block'], {})[s['branch']] = s['importance']
    return out
