"""Step 3's accuracy surrogate, kept honest: additive branch losses re-centred on the latest accepted configuration,
a calibration factor fitted on the measured rounds, a confidence margin in the solver's budget, and its error on
configurations it was not fitted to.  Pure functions of arrays (points of accuracy); no prints, no files.

The surrogate of a configuration u is  drop(u) = sum over the anchor's pruned branches of their share of the
anchor's measured loss  +  rho * sum over u's other pruned branches of their sensitivity measured ON THE ANCHOR
(one branch pruned at a time).  The anchor is the latest accepted configuration (the domain model before any);
its measured loss is exact by construction, the marginal sensitivities include the interactions with what is
already pruned, and rho (measured over predicted increments of the earlier rounds, fine-tuning included) corrects
the part single-branch measurements miss.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import numpy as np

from accuracy.pruning import correct_sensitivities

RHO_RANGE = (0.25, 2.0)  # the calibration factor is clipped to this range
RHO_MIN_EVIDENCE_PCT = 0.2  # predicted increments (points, summed) needed before rho moves from 1


def recentre(fresh: np.ndarray, previous: np.ndarray, anchor_pruned: np.ndarray, anchor_loss_pct: float) -> np.ndarray:
    """Sensitivities around a newly accepted configuration: the marginal losses `fresh` (N, 3) measured on it (NaN
    where not measured) for the branches it keeps, and for the branches it prunes their `previous` values scaled to
    sum to its measured loss `anchor_loss_pct` (>= 0, points)."""
    pruned = np.asarray(anchor_pruned, dtype=bool)
    shares, _ = correct_sensitivities(previous, pruned, anchor_loss_pct)
    return np.where(pruned, shares, np.asarray(fresh, dtype=np.float64))


def calibration_factor(pairs: Sequence[Tuple[float, float]]) -> float:
    """rho = sum(measured increments) / sum(predicted increments) over (predicted, measured) pairs in points, clipped
    to RHO_RANGE; 1 until the predicted increments sum to RHO_MIN_EVIDENCE_PCT."""
    pred = float(sum(max(0.0, p) for p, _ in pairs))
    meas = float(sum(max(0.0, m) for _, m in pairs))
    if pred < RHO_MIN_EVIDENCE_PCT:
        return 1.0
    return float(np.clip(meas / pred, *RHO_RANGE))


def for_solver(sens: np.ndarray, anchor_pruned: np.ndarray, rho: float) -> np.ndarray:
    """The sensitivities the goal program sums: the anchor's shares as they are, the others times rho."""
    sens = np.asarray(sens, dtype=np.float64)
    return np.where(np.asarray(anchor_pruned, dtype=bool), sens, sens * float(rho))


def increment(sens: np.ndarray, anchor_pruned: np.ndarray, want_pruned: np.ndarray) -> float:
    """Unscaled surrogate increment (points) of pruning `want_pruned` (N, 3) beyond the anchor."""
    new = np.asarray(want_pruned, dtype=bool) & ~np.asarray(anchor_pruned, dtype=bool)
    return float(np.nansum(np.where(new, np.clip(sens, 0.0, None), 0.0)))


def margin_pct(epsilon: float, n_val: int, se_last_pct: float, z: float) -> float:
    """Points the solver keeps below epsilon so that a configuration it proposes can pass the one-sided bound:
    z * max(the standard error of a one-directional drop of epsilon on n_val images, the latest measured one)."""
    from accuracy.stats import prior_se_pct
    return float(z * max(prior_se_pct(epsilon, n_val), float(se_last_pct or 0.0)))


def error_summary(points: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """{'n', 'median_abs_error_pct', 'mean_abs_error_pct', 'max_abs_error_pct', 'mean_error_pct'} over records with
    'error_pct' (predicted minus measured drop, points); None values when there are none."""
    err = np.array([p['error_pct'] for p in points if p.get('error_pct') is not None], dtype=np.float64)
    if err.size == 0:
        return {'n': 0, 'median_abs_error_pct': None, 'mean_abs_error_pct': None, 'max_abs_error_pct': None,
                'mean_error_pct': None}
    return {'n': int(err.size), 'median_abs_error_pct': float(np.median(np.abs(err))),
            'mean_abs_error_pct': float(np.mean(np.abs(err))), 'max_abs_error_pct': float(np.max(np.abs(err))),
            'mean_error_pct': float(np.mean(err))}
