"""Step 3's accuracy side: per-branch sensitivities, applying a configuration, fast evaluation, surrogate correction.

* `measure_sensitivities`: the accuracy (percentage points) lost when ONE branch alone is pruned, measured on a
  validation set with the model in its deployed form (every block one precomputed fused kernel).  Only block k
  changes, so the input of block k is computed once and shared by its branches.
* `importance_sensitivities`: the cheap option.  The |alpha| / GFLOPs importance (accuracy/importance.py) scaled to
  accuracy points by ONE measurement: the lowest-importance branches (a share of them) pruned together.
* `correct_sensitivities`: after a round, the pruned branches' sensitivities are scaled so that their sum equals the
  measured loss (the excess, or the recovery by fine-tuning, is spread proportionally; added evenly where the
  surrogate predicted nothing).

No prints, no files: the orchestration (pipeline/joint.py) logs and checkpoints.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from errors import UserError
from hyper_repvgg import (
    BRANCHES,
    DeployedBlock,
    HyperRepVGG,
    SplitPart,
    deploy_block,
    fused_layout,
)
from hyper_repvgg import apply_config as apply_model_config

SENSITIVITY_MODES = ('measured', 'importance')


class PruningError(UserError, ValueError):
    """Bad input to the accuracy side (mode, configuration, empty data)."""


def collect(loader: Any, limit: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (M, 3, S, S), labels (M,)) of a loader's first `limit` samples (0 = all)."""
    xs, ys, seen = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y))
        seen += int(x.shape[0])
        if limit and seen >= limit:
            break
    if not xs:
        raise PruningError('the evaluation split is empty')
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit else (x, y)


def deployed(model: HyperRepVGG) -> SplitPart:
    """The whole model (blocks + head) in its fastest deploy form: every block one fused kernel of its kept branches."""
    blocks = []
    for b in model.blocks:
        blocks.append(deploy_block(b, fused_layout(b.kept_set())))
    return SplitPart(blocks, (model.gap, model.linear)).eval()


def _accuracy(logits_fn: Any, chunks: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct, total = 0, 0
    for h, y in chunks:
        correct += int((logits_fn(h).argmax(1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / total


def normalized_chunks(x: torch.Tensor, y: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      batch: int, device: str = 'cpu') -> List[Tuple[torch.Tensor, torch.Tensor]]:
    from data.datasets import normalize_batch
    return [(normalize_batch(x[i:i + batch].to(device), mean, std), y[i:i + batch].to(device))
            for i in range(0, x.shape[0], batch)]


def accuracy(model: HyperRepVGG, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float], std: Sequence[float],
             batch: int = 256, device: str = 'cpu') -> float:
    """Top-1 accuracy (%) of `model` in its deployed form on uint8 images x with labels y."""
    net = deployed(model).to(device)
    with torch.no_grad():
        return _accuracy(net, normalized_chunks(x, y, mean, std, batch, device))


def correct_mask(model: HyperRepVGG, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 batch: int = 256, device: str = 'cpu') -> np.ndarray:
    """(M,) bool: image i is classified correctly by `model` in its deployed form (paired comparisons)."""
    net = deployed(model).to(device)
    with torch.no_grad():
        return np.concatenate([(net(h).argmax(1) == yb).cpu().numpy()
                               for h, yb in normalized_chunks(x, y, mean, std, batch, device)])


def measure_sensitivities(model: HyperRepVGG, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float],
                          std: Sequence[float], batch: int = 256, device: str = 'cpu',
                          desc: str = 'sensitivities', only: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Accuracy lost by pruning each kept branch alone (blocks keeping one branch: nothing to measure), or only the
    branches marked in `only` (N, 3).
    Returns {'base_acc_pct', 'sensitivity_pct': (N, 3) array (NaN where not measured), 'evaluations'}."""
    net = deployed(model).to(device)
    n = model.num_blocks
    sens = np.full((n, 3), np.nan)
    evals = 0
    with torch.no_grad():
        chunks = normalized_chunks(x, y, mean, std, batch, device)
        base = _accuracy(net, chunks)
        def wanted(k: int, br: str) -> bool:
            return only is None or bool(only[k, BRANCHES.index(br)])
        todo = sum(wanted(k, br) for k, b in enumerate(model.blocks) if len(b.kept_set()) > 1 for br in b.kept_set())
        bar = tqdm(total=todo, desc=desc, leave=False, disable=None)
        try:
            h = [c[0] for c in chunks]
            for k, block in enumerate(model.blocks):
                kept = block.kept_set()
                if len(kept) > 1:
                    for br in sorted((x for x in kept if wanted(k, x)), key=BRANCHES.index):
                        alt = deploy_block(block, kept=kept - {br}).to(device).eval()  # block unchanged

                        def run(hk: torch.Tensor, alt: DeployedBlock = alt, k: int = k) -> torch.Tensor:
                            out = alt(hk)
                            for blk in net.blocks[k + 1:]:
                                out = blk(out)
                            return net.linear(torch.flatten(net.gap(out), 1))
                        sens[k, BRANCHES.index(br)] = base - _accuracy(run, list(zip(h, [c[1] for c in chunks])))
                        evals += 1
                        bar.update(1)
                h = [net.blocks[k](hk) for hk in h]
        finally:
            bar.close()
    return {'base_acc_pct': base, 'sensitivity_pct': sens, 'evaluations': evals}


def importance_sensitivities(model: HyperRepVGG, input_size: int, x: torch.Tensor, y: torch.Tensor,
                             mean: Sequence[float], std: Sequence[float], share: float = 0.1, batch: int = 256,
                             device: str = 'cpu') -> Dict[str, Any]:
    """Sensitivity = kappa * |alpha| / GFLOPs, kappa from one measurement: the `share` of prunable branches with the
    lowest importance pruned together (a block keeps >= 1 branch), its measured loss (at least one sample's worth)
    divided by their importance sum."""
    from accuracy.importance import branch_flops_table, importance_scores
    scores = importance_scores(model.hyper_weights(), branch_flops_table(model.plan, input_size))
    n = model.num_blocks
    imp = np.full((n, 3), np.nan)
    for s in scores:
        if s['kept']:
            imp[s['block'], BRANCHES.index(s['branch'])] = s['importance']
    prunable = [(imp[s['block'], BRANCHES.index(s['branch'])], s['block'], s['branch']) for s in scores if s['kept']]
    prunable.sort()
    target = max(1, int(round(share * len(prunable))))
    trial = copy_with(model)
    chosen: List[Tuple[int, str]] = []
    for _, k, br in prunable:
        if len(chosen) >= target:
            break
        if len(trial.kept(k)) > 1:
            trial.prune(k, br)
            chosen.append((k, br))
    base = accuracy(model, x, y, mean, std, batch, device)
    acc = accuracy(trial, x, y, mean, std, batch, device)
    loss = max(base - acc, 100.0 / max(1, int(y.numel())))
    total = float(sum(imp[k, BRANCHES.index(b)] for k, b in chosen))
    kappa = loss / total if total > 0 else 0.0
    return {'base_acc_pct': base, 'sensitivity_pct': imp * kappa, 'evaluations': 2, 'kappa': kappa,
            'calibration': {'pruned': [[k, b] for k, b in chosen], 'measured_loss_pct': base - acc}}


def copy_with(model: HyperRepVGG, gammas: Optional[Sequence[int]] = None) -> HyperRepVGG:
    """A copy of `model`, with the configuration `gammas` applied when given."""
    import copy
    out = copy.deepcopy(model)
    if gammas is not None:
        apply_config(out, gammas)
    return out


def apply_config(model: HyperRepVGG, gammas: Sequence[int]) -> None:
    """hyper_repvgg.apply_config (block k keeps S(gamma_k), restoring earlier prunes where S grows, and runs layout
    gamma_k), with a configuration that does not fit the model reported as a PruningError."""
    try:
        apply_model_config(model, gammas)
    except ValueError as e:
        raise PruningError(f'configuration {list(gammas)}: {e}') from None


def pruned_mask(model: HyperRepVGG) -> np.ndarray:
    """(N, 3) bool: branch b of block k exists and is pruned."""
    out = np.zeros((model.num_blocks, 3), dtype=bool)
    for k, b in enumerate(model.blocks):
        for i, br in enumerate(BRANCHES):
            out[k, i] = br in b.available() and br not in b.kept_set()
    return out


def correct_sensitivities(sens: np.ndarray, pruned: np.ndarray, measured_loss: float) -> Tuple[np.ndarray, Dict]:
    """Scale the pruned branches' sensitivities so that they sum to the measured loss (clamped at >= 0).
    Returns (new sensitivities, record)."""
    sens = np.asarray(sens, dtype=np.float64).copy()
    pruned = np.asarray(pruned, dtype=bool)
    predicted = float(np.nansum(np.where(pruned, sens, 0.0)))
    target = max(0.0, float(measured_loss))
    rec: Dict[str, Any] = {'predicted_loss_pct': predicted, 'measured_loss_pct': float(measured_loss),
                           'pruned_branches': int(pruned.sum())}
    if not pruned.any():
        rec['rule'] = 'nothing pruned: no correction'
        return sens, rec
    if predicted > 1e-9:
        factor = target / predicted
        sens[pruned] = sens[pruned] * factor
        rec.update(rule='scale', factor=factor)
    else:
        add = target / int(pruned.sum())
        sens[pruned] = np.nan_to_num(sens[pruned]) + add
        rec.update(rule='add', added_pct=add)
    return sens, rec
