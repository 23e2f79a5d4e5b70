"""Exact optimum of the step-2 problem (docs/design.md#step-2-solvers) and a brute-force check for tiny models.

The problem: a fixed kept branch set per block (its valid layouts), choose a layout gamma_k per block and a split
lambda minimizing one of the objectives of optim/cost.py.

Why the split scan is exact.  For a fixed lambda, T_edge = sum_{k < lambda} edge[k, gamma_k] (+ head) depends only
on the layouts of the edge blocks and T_server = sum_{k >= lambda} server[k, gamma_k] + head only on those of the
server blocks; T_link depends on lambda alone.  Every objective is non-decreasing in T_edge and in T_server
(period = max, latency = sum, weighted = a non-negative combination of the two).  Picking, for every block, its
fastest valid layout on its side minimizes T_edge and T_server at the same time, hence the objective, for that
lambda.  Enumerating the N + 1 splits therefore gives the optimum (and among the optima, ties broken by latency).
`brute_force` enumerates every layout combination and split to check this on tiny models.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from optim.cost import (CostError, CostTables, best_index, check_objective, check_valid, describe,
                        objective_values, stage_times)


@dataclass(frozen=True)
class ExactResult:
    gammas: List[int]  # layout per block
    lam: int  # split point
    objective_ms: float  # minimized objective, ms per batch
    stages: Dict[str, object]  # cost.describe() of the optimum
    per_split_objective_ms: List[float] = field(default_factory=list)  # best objective at each lambda = 0..N
    status: str = 'optimal'
    evaluated: int = 0  # configurations evaluated
    wall_s: float = 0.0


def side_best(t: CostTables, valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(edge_best, server_best): per block the fastest valid layout on each side (ties: the lowest gamma)."""
    valid = check_valid(t, valid)
    edge = np.argmin(np.where(valid, t.edge_ms, np.inf), axis=1)
    server = np.argmin(np.where(valid, t.server_ms, np.inf), axis=1)
    return edge, server


def split_gammas(t: CostTables, valid: np.ndarray) -> np.ndarray:
    """(N + 1, N): row lambda holds, per block, its fastest valid layout on the side it runs on at that split."""
    edge, server = side_best(t, valid)
    n = t.num_blocks
    on_edge = np.arange(n)[None, :] < np.arange(n + 1)[:, None]
    return np.where(on_edge, edge[None, :], server[None, :])


def solve_exact(t: CostTables, valid: np.ndarray, objective: str = 'throughput', omega: float = 0.5) -> ExactResult:
    """The optimum by the split scan (see the module docstring): N + 1 configurations, vectorized."""
    check_objective(objective, omega)
    t0 = time.perf_counter()
    g = split_gammas(t, valid)
    lams = np.arange(t.num_blocks + 1)
    st = stage_times(g, lams, t)
    obj = objective_values(st, objective, omega)
    i = best_index(obj, st.latency_ms)
    return ExactResult([int(x) for x in g[i]], int(i), float(obj[i]), describe(g[i], i, t, objective, omega),
                       [float(x) for x in obj], 'optimal', int(lams.size), time.perf_counter() - t0)


def brute_force(t: CostTables, valid: np.ndarray, objective: str = 'throughput', omega: float = 0.5,
                max_configs: int = 2_000_000, chunk: int = 65_536) -> ExactResult:
    """The optimum by enumerating every valid layout combination and every split (tiny models only: refuses
    more than `max_configs` configurations)."""
    check_objective(objective, omega)
    valid = check_valid(t, valid)
    t0 = time.perf_counter()
    n = t.num_blocks
    choices = [np.flatnonzero(valid[k]) for k in range(n)]
    combos = int(np.prod([c.size for c in choices], dtype=np.float64))  # >= 1: check_valid ensures a layout each
    total = combos * (n + 1)
    if total > max_configs:
        raise CostError(f'brute force over {total} configurations exceeds max_configs={max_configs}')
    best: Tuple[float, float, List[int], int] = (np.inf, np.inf, [], 0)
    per_split = np.full(n + 1, np.inf)
    it = itertools.product(*choices)
    lams = np.arange(n + 1)
    rows = max(1, chunk // (n + 1))  # layout combinations per vectorized chunk
    for _ in range(-(-combos // rows)):
        block = np.array(list(itertools.islice(it, rows)), dtype=np.int64).reshape(-1, n)
        g = np.repeat(block, n + 1, axis=0)
        lam = np.tile(lams, block.shape[0])
        st = stage_times(g, lam, t)
        obj = objective_values(st, objective, omega)
        np.minimum.at(per_split, lam, obj)
        i = best_index(obj, st.latency_ms)
        cand = (float(obj[i]), float(st.latency_ms[i]))
        tol = 1e-12 * max(1.0, abs(best[0])) if np.isfinite(best[0]) else 0.0
        if cand[0] < best[0] - tol or (cand[0] <= best[0] + tol and cand[1] < best[1]):
            best = (cand[0], cand[1], [int(x) for x in g[i]], int(lam[i]))
    return ExactResult(best[2], best[3], best[0], describe(best[2], best[3], t, objective, omega),
                       [float(x) for x in per_split], 'optimal', total, time.perf_counter() - t0)


def objective_choices(t: CostTables, valid: np.ndarray) -> Dict[str, Dict[str, object]]:
    """The exact optimum for latency alone ('min_latency') and for throughput alone ('max_throughput'), with
    layouts chosen too: how far the two goals pull the split apart."""
    out = {}
    for name, objective in (('min_latency', 'latency'), ('max_throughput', 'throughput')):
        r = solve_exact(t, valid, objective)
        out[name] = dict(r.stages, description=f'exact optimum (layouts and split) for the {objective} objective')
    return out
