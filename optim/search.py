"""Best-improvement local search over a configuration (gammas, lambda): the one neighbourhood search of steps 2 and 3.

The solvers differ only in what "better" means: step 2 (optim/relax.py) compares the exact cost's objective, then the
latency; step 3 (optim/goal.py) the goal program's lexicographic key.  Each passes that as `improve`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

# improve(candidate gammas (M, N), candidate lambdas (M,), current gammas (N,), current lambda) -> the index of the
# best candidate when it strictly improves on the current configuration, else None
Improve = Callable[[np.ndarray, np.ndarray, np.ndarray, int], Optional[int]]


def pair_moves_of(g: np.ndarray, lam: int, ks: np.ndarray, gs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Every pair of layout changes (ks[i] -> gs[i], ks[j] -> gs[j]) in two different blocks, split kept."""
    i1, i2 = np.triu_indices(ks.size, 1)
    diff = ks[i1] != ks[i2]
    i1, i2 = i1[diff], i2[diff]
    cand = np.repeat(g[None], i1.size, 0)
    cand[np.arange(i1.size), ks[i1]] = gs[i1]
    cand[np.arange(i1.size), ks[i2]] = gs[i2]
    return cand, np.full(i1.size, lam)


def local_search(gammas: np.ndarray, lam: int, allowed: np.ndarray, improve: Improve, max_moves: int = 200,
                 pair_moves: bool = False) -> Tuple[np.ndarray, int, int, str]:
    """Each move evaluates every single-block layout change allowed by `allowed` (N, 14) and every split (layouts
    kept) and takes the best strict improvement; with `pair_moves`, when none improves, every pair of layout changes
    in two blocks (e.g. restore a branch here to prune one there).  Returns (gammas, lam, moves, status) with status
    'converged' or 'move_limit' (stopped after `max_moves`)."""
    n = allowed.shape[0]
    g = np.asarray(gammas, dtype=np.int64).copy()
    lam = int(lam)
    ks, gs = np.nonzero(allowed)
    lams = np.arange(n + 1)
    for moves in range(max_moves):
        cand = np.repeat(g[None], ks.size + n + 1, 0)
        cand[np.arange(ks.size), ks] = gs
        cl = np.concatenate([np.full(ks.size, lam), lams])
        i = improve(cand, cl, g, lam)
        if i is None and pair_moves:
            cand, cl = pair_moves_of(g, lam, ks, gs)
            i = improve(cand, cl, g, lam)
        if i is None:
            return g, lam, moves, 'converged'
        g, lam = cand[i].copy(), int(cl[i])
    return g, lam, max_moves, 'move_limit'
