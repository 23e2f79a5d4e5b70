"""Paired accuracy comparisons: the difference of two classifiers on the SAME images, with a seeded bootstrap.

Two models evaluated on the same n images disagree on few of them; the accuracy difference only depends on the
discordant images (`ref_only`: the reference right and the candidate wrong, `new_only`: the reverse).  Its
bootstrap resamples the n images with replacement, which for a difference of 0/1 outcomes is a multinomial draw
of the three counts (ref_only, new_only, concordant): exact, and cheap for any number of resamples.

`paired_difference` returns the candidate-minus-reference difference in accuracy points with the one-sided lower
bound (the acceptance test of step 3: accept when lower >= -epsilon) and the two-sided interval (what the
reports show).  With no discordant image the interval is [0, 0]: the two models agree on every image.

No prints, no files.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

LEVEL = 0.95  # confidence of the one-sided acceptance bound and of the two-sided reported interval
RESAMPLES = 20000


def paired_difference(ref_correct: Any, new_correct: Any, generator: np.random.Generator,
                      resamples: int = RESAMPLES, level: float = LEVEL) -> Dict[str, Any]:
    """Candidate-minus-reference accuracy on the same images (points) with its paired bootstrap bounds.

    `ref_correct`, `new_correct`: (n,) bool, image i classified correctly.  Returns {'n', 'ref_only', 'new_only',
    'diff_pct', 'drop_pct' (= -diff), 'se_pct' (analytic paired standard error), 'lower_pct' (one-sided `level`
    lower bound of diff), 'ci_pct' ([lo, hi], two-sided `level` interval of diff), 'level', 'resamples',
    'method'}."""
    a = np.asarray(ref_correct, dtype=bool).ravel()
    b = np.asarray(new_correct, dtype=bool).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f'paired_difference: expected two equal non-empty (n,) masks, got {a.shape} and {b.shape}')
    if not 0.5 < level < 1:
        raise ValueError(f'paired_difference: level must be in (0.5, 1), got {level}')
    n = int(a.size)
    ref_only, new_only = int((a & ~b).sum()), int((~a & b).sum())
    diff = 100.0 * (new_only - ref_only) / n
    d = np.concatenate([np.full(ref_only, -1.0), np.full(new_only, 1.0)])
    se = 100.0 * math.sqrt(max(0.0, float((d ** 2).sum()) / n - (float(d.sum()) / n) ** 2) / n)
    if ref_only + new_only == 0:
        lower, lo, hi = 0.0, 0.0, 0.0
    else:
        p = np.array([ref_only, new_only, n - ref_only - new_only], dtype=np.float64) / n
        draws = generator.multinomial(n, p, size=int(resamples))
        boot = 100.0 * (draws[:, 1] - draws[:, 0]) / n
        lower = float(np.quantile(boot, 1.0 - level))
        lo, hi = (float(v) for v in np.quantile(boot, [(1.0 - level) / 2, (1.0 + level) / 2]))
    return {'n': n, 'ref_only': ref_only, 'new_only': new_only, 'diff_pct': diff, 'drop_pct': 0.0 - diff,
            'se_pct': se, 'lower_pct': lower, 'ci_pct': [lo, hi], 'level': level, 'resamples': int(resamples),
            'method': 'paired bootstrap (multinomial resampling of the n images), seeded'}


def prior_se_pct(drop_pct: float, n: int) -> float:
    """Standard error (points) of a paired difference of `drop_pct` points on n images when every discordant image
    goes one way (the fewest discordant images that drop allows): 100 * sqrt(p (1 - p) / n), p = drop / 100."""
    p = min(max(float(drop_pct), 0.0) / 100.0, 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / max(1, int(n)))


def one_sided_z(level: float = LEVEL) -> float:
    """The standard normal quantile at `level` (1.645 at 0.95)."""
    from scipy.stats import norm
    return float(norm.ppf(level))
