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

Chains of K devices (`solve_chain_exact`): the same argument holds for every split vector lam_1 <= ... <= lam_{K-1}
(each device's time depends only on the layouts of its own blocks, the links on the split vector alone, and every
objective is non-decreasing in every stage time), so the exact optimum is the scan over all C(N + K - 1, K - 1)
split vectors with each block in its fastest valid layout on its device (4495 vectors for N = 28, K = 4), chunked.
`solve_exact` is its K = 2 case; `brute_force_chain` checks it on tiny chains.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from optim.cost import (ChainTables, CostError, CostTables, best_index, chain_describe, chain_stage_times,
                        check_chain_valid, check_objective, check_valid, describe, num_split_vectors,
                        objective_values, split_vectors, stage_times)


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
    check_valid(t, valid)
    best = chain_device_best(t.chain, valid)
    return best[0], best[1]


def split_gammas(t: CostTables, valid: np.ndarray) -> np.ndarray:
    """(N + 1, N): row lambda holds, per block, its fastest valid layout on the side it runs on at that split."""
    check_valid(t, valid)
    return chain_split_gammas(chain_device_best(t.chain, valid), np.arange(t.num_blocks + 1)[:, None])


def solve_exact(t: CostTables, valid: np.ndarray, objective: str = 'throughput', omega: float = 0.5) -> ExactResult:
    """The optimum by the split scan (see the module docstring): N + 1 configurations, vectorized; the chain
    edge -> server of `solve_chain_exact`."""
    check_valid(t, valid)
    r = solve_chain_exact(t.chain, valid, objective, omega)
    return ExactResult(r.gammas, r.lams[0], r.objective_ms, describe(r.gammas, r.lams[0], t, objective, omega),
                       r.per_vector_objective_ms, r.status, r.evaluated, r.wall_s)


@dataclass(frozen=True)
class ChainExactResult:
    gammas: List[int]  # layout per block (on the device that runs it)
    lams: List[int]  # split vector lam_1 <= ... <= lam_{K-1}
    objective_ms: float  # minimized objective, ms per batch
    stages: Dict[str, object]  # cost.chain_describe() of the optimum
    per_vector_objective_ms: List[float] = field(default_factory=list)  # best objective per split vector (order:
    # cost.split_vectors), kept only up to `keep_per_vector` vectors
    status: str = 'optimal'
    evaluated: int = 0  # configurations evaluated
    wall_s: float = 0.0


def chain_device_best(c: ChainTables, valid: np.ndarray) -> np.ndarray:
    """(K, N): per device and block the fastest valid layout there (ties: the lowest gamma)."""
    valid = check_chain_valid(c, valid)
    return np.stack([np.argmin(np.where(valid, a, np.inf), axis=1) for a in c.device_ms])


def chain_split_gammas(best: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """(S, N): for each split vector (S, K - 1) every block in its device's fastest layout (`chain_device_best`)."""
    n = best.shape[1]
    device = (np.arange(n)[None, :, None] >= lams[:, None, :]).sum(-1)  # (S, N): index of the device of block k
    return best[device, np.arange(n)[None, :]]


def active_devices(lams: np.ndarray, num_blocks: int) -> np.ndarray:
    """(S,) how many devices run at least one block under each split vector (S, K - 1)."""
    s = lams.shape[0]
    bounds = np.concatenate([np.zeros((s, 1), np.int64), lams, np.full((s, 1), num_blocks, np.int64)], 1)
    return (np.diff(bounds, axis=1) > 0).sum(1)


def solve_chain_exact(c: ChainTables, valid: np.ndarray, objective: str = 'throughput', omega: float = 0.5,
                      chunk: int = 8192, max_vectors: int = 5_000_000, keep_per_vector: int = 10_000,
                      max_active: int = 0) -> ChainExactResult:
    """The optimum of a chain by the scan over every split vector (module docstring), `chunk` vectors at a time;
    ties go to the lower latency, then the first vector in cost.split_vectors order.  With `max_active` > 0 only the
    split vectors under which at most that many devices compute (the others only forward) are scanned: max_active
    = 2 is the best two-device split inside the chain.  Refuses more than `max_vectors` split vectors (CostError)."""
    check_objective(objective, omega)
    t0 = time.perf_counter()
    best = chain_device_best(c, valid)
    n, k = c.num_blocks, c.num_devices
    total = num_split_vectors(n, k)
    if total > max_vectors:
        raise CostError(f'a chain of {k} devices over {n} blocks has {total} split vectors, more than '
                        f'max_vectors={max_vectors}')
    vectors = split_vectors(n, k)
    if max_active > 0:
        vectors = vectors[active_devices(vectors, n) <= max_active]
        total = len(vectors)
    per: List[float] = []
    cur: Tuple[float, float, int] = (np.inf, np.inf, -1)
    for lo in range(0, total, chunk):
        lams = vectors[lo:lo + chunk]
        st = chain_stage_times(chain_split_gammas(best, lams), lams, c)
        obj = objective_values(st, objective, omega)
        if total <= keep_per_vector:
            per.extend(float(x) for x in obj)
        i = best_index(obj, st.latency_ms)
        tol = 1e-12 * max(1.0, abs(cur[0])) if np.isfinite(cur[0]) else 0.0
        if obj[i] < cur[0] - tol or (obj[i] <= cur[0] + tol and st.latency_ms[i] < cur[1]):
            cur = (float(obj[i]), float(st.latency_ms[i]), lo + i)
    lam = vectors[cur[2]]
    g = chain_split_gammas(best, lam[None])[0]
    return ChainExactResult([int(x) for x in g], [int(x) for x in lam], cur[0],
                            chain_describe(g, lam, c, objective, omega), per, 'optimal', total,
                            time.perf_counter() - t0)


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


def brute_force_chain(c: ChainTables, valid: np.ndarray, objective: str = 'throughput', omega: float = 0.5,
                      max_configs: int = 2_000_000, chunk: int = 65_536) -> ChainExactResult:
    """The chain optimum by enumerating every valid layout combination and every split vector (tiny chains only:
    refuses more than `max_configs` configurations).  Ties: the lower latency."""
    check_objective(objective, omega)
    valid = check_chain_valid(c, valid)
    t0 = time.perf_counter()
    n, k = c.num_blocks, c.num_devices
    choices = [np.flatnonzero(valid[b]) for b in range(n)]
    combos = int(np.prod([x.size for x in choices], dtype=np.float64))
    vectors = split_vectors(n, k)
    total = combos * len(vectors)
    if total > max_configs:
        raise CostError(f'brute force over {total} configurations exceeds max_configs={max_configs}')
    best: Tuple[float, float, List[int], List[int]] = (np.inf, np.inf, [], [])
    it = itertools.product(*choices)
    rows = max(1, chunk // len(vectors))
    for _ in range(-(-combos // rows)):
        block = np.array(list(itertools.islice(it, rows)), dtype=np.int64).reshape(-1, n)
        g = np.repeat(block, len(vectors), axis=0)
        lam = np.tile(vectors, (block.shape[0], 1))
        st = chain_stage_times(g, lam, c)
        obj = objective_values(st, objective, omega)
        i = best_index(obj, st.latency_ms)
        tol = 1e-12 * max(1.0, abs(best[0])) if np.isfinite(best[0]) else 0.0
        if obj[i] < best[0] - tol or (obj[i] <= best[0] + tol and st.latency_ms[i] < best[1]):
            best = (float(obj[i]), float(st.latency_ms[i]), [int(x) for x in g[i]], [int(x) for x in lam[i]])
    return ChainExactResult(best[2], best[3], best[0], chain_describe(best[2], best[3], c, objective, omega), [],
                            'optimal', total, time.perf_counter() - t0)
