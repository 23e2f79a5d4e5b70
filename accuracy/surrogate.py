"""Step 3's accuracy surrogate, kept honest: additive branch losses centred on a measured configuration, a
calibration factor fitted on the measured rounds, a confidence margin in the solver's budget, and its error on
configurations it was not fitted to.  Pure functions of arrays (points of accuracy); no prints, no files.

The sensitivities (train split) are re-measured around the latest accepted configuration: its pruned branches
carry their share of its measured train-split loss, the others their marginal loss measured on it (one branch
pruned at a time), and rho (measured over predicted increments of the earlier rounds, fine-tuning included)
corrects the part single-branch measurements miss.

The prediction of a configuration u is centred on a measured configuration m (the domain model, a round, an
earlier point of the epsilon sweep: the one nearest u, `nearest`) with pruned set M and measured val drop v_m:

    drop(u) = v_m  -  sum over M minus U of the shares of max(0, v_m)  +  rho * sum over U minus M of the sensitivities

(`centred`: per-branch losses plus a constant, so the goal program stays additive).  Centring on the nearest
measured configuration carries what a measurement knows and the sensitivities miss (interactions, fine-tuning,
the val images' own draw, shared by configurations that differ in a few branches) into the prediction of its
neighbours; docs/design.md#surrogate.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import numpy as np

from accuracy.pruning import correct_sensitivities

RHO_RANGE = (0.25, 2.0)  # the calibration factor is clipped to this range
RHO_MIN_EVIDENCE_PCT = 0.2  # predicted increments (points, summed) needed before rho moves from 1
PROBE_TOLERANCE_PCT = 0.25  # a probe within this of the additive sum (points) leaves the sensitivities as they are
RHO_PRIOR_WEIGHT_PCT = 2.0  # a prior for rho counts as this many points of predicted increments (calibration_factor)


def recentre(fresh: np.ndarray, previous: np.ndarray, anchor_pruned: np.ndarray, anchor_loss_pct: float) -> np.ndarray:
    """Sensitivities around a newly accepted configuration: the marginal losses `fresh` (N, 3) measured on it (NaN
    where not measured) for the branches it keeps, and for the branches it prunes their `previous` values scaled to
    sum to its measured loss `anchor_loss_pct` (>= 0, points)."""
    pruned = np.asarray(anchor_pruned, dtype=bool)
    shares, _ = correct_sensitivities(previous, pruned, anchor_loss_pct)
    return np.where(pruned, shares, np.asarray(fresh, dtype=np.float64))


def probe_corrected(sens: np.ndarray, new: np.ndarray, probe_pct: float) -> np.ndarray:
    """Sensitivities after a probe: the branches `new` (N, 3) bool, pruned together beyond the probed
    configuration's start model, cost `probe_pct` (points, >= 0) together, shared in proportion to their
    sensitivities (equally when those are all <= 0); every other branch keeps its sensitivity.  What pruning them
    together costs replaces the sum of what each costs alone, so the goal program stays additive."""
    sens = np.clip(np.asarray(sens, dtype=np.float64), 0.0, None)
    out, _ = correct_sensitivities(np.nan_to_num(sens), np.asarray(new, dtype=bool), probe_pct)
    return np.where(np.asarray(new, dtype=bool), out, sens)


def calibration_factor(pairs: Sequence[Tuple[float, float]], prior: float = 0.0) -> float:
    """rho = sum(measured increments) / sum(predicted increments) over (predicted, measured) pairs in points, clipped
    to RHO_RANGE; 1 until the predicted increments sum to RHO_MIN_EVIDENCE_PCT.  With a `prior` > 0, the ratio is
    shrunk towards it instead: (measured + prior x W) / (predicted + W), W = RHO_PRIOR_WEIGHT_PCT (the prior counts
    as W points of predicted increments measured at that ratio), so that little evidence leaves rho near the prior
    rather than at 1, and much evidence outweighs it."""
    pred = float(sum(max(0.0, p) for p, _ in pairs))
    meas = float(sum(max(0.0, m) for _, m in pairs))
    if prior > 0:
        return float(np.clip((meas + prior * RHO_PRIOR_WEIGHT_PCT) / (pred + RHO_PRIOR_WEIGHT_PCT), *RHO_RANGE))
    if pred < RHO_MIN_EVIDENCE_PCT:
        return 1.0
    return float(np.clip(meas / pred, *RHO_RANGE))


def increment(sens: np.ndarray, anchor_pruned: np.ndarray, want_pruned: np.ndarray) -> float:
    """Unscaled surrogate increment (points) of pruning `want_pruned` (N, 3) beyond the anchor."""
    new = np.asarray(want_pruned, dtype=bool) & ~np.asarray(anchor_pruned, dtype=bool)
    return float(np.nansum(np.where(new, np.clip(sens, 0.0, None), 0.0)))


def distance(pruned: np.ndarray, other: np.ndarray) -> int:
    """How far measured configuration `other` is from `pruned` ((N, 3) bool each): branches it prunes that `pruned`
    restores count twice (their shares are the less certain part), branches `pruned` adds once."""
    a, b = np.asarray(pruned, dtype=bool), np.asarray(other, dtype=bool)
    return int(2 * (b & ~a).sum() + (a & ~b).sum())


def nearest(pruned: np.ndarray, measured: Sequence[np.ndarray]) -> int:
    """Index of the measured configuration (pruned masks, oldest first) nearest `pruned` (`distance`; ties: the
    latest).  `measured` must not be empty (the domain model, nothing pruned, is always measured)."""
    if not len(measured):
        raise ValueError('surrogate.nearest: no measured configuration')
    return min(range(len(measured)), key=lambda i: (distance(pruned, measured[i]), -i))


def centred(sens: np.ndarray, anchor_pruned: np.ndarray, anchor_drop_pct: float, rho: float
            ) -> Tuple[np.ndarray, float]:
    """The surrogate centred on a measured configuration: (per-branch losses (N, 3), constant), with
    drop(u) = constant + sum of the losses of u's pruned branches.  The anchor's pruned branches share max(0, its
    measured drop) in proportion to their sensitivities (equally when those are all <= 0); every other branch
    carries rho x its sensitivity (>= 0; NaN: not measured, kept NaN).  The constant is the measured drop less the
    shares: 0 for a loss, the gain itself for a negative drop."""
    sens = np.clip(np.asarray(sens, dtype=np.float64), 0.0, None)
    pruned = np.asarray(anchor_pruned, dtype=bool)
    shares, _ = correct_sensitivities(np.nan_to_num(sens), pruned, anchor_drop_pct)
    loss = np.where(pruned, shares, sens * float(rho))
    return loss, float(anchor_drop_pct) - float(np.where(pruned, shares, 0.0).sum())


def predict(loss: np.ndarray, constant: float, pruned: np.ndarray) -> float:
    """drop(u) of `centred`'s surrogate for the configuration pruning `pruned` (N, 3), points."""
    return float(constant) + float(np.nansum(np.where(np.asarray(pruned, dtype=bool), loss, 0.0)))


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
