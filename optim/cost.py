"""Pipelined cost model (docs/design.md#cost-model): pure functions over LUT arrays.

A configuration is (gammas, lam): a layout index per block and the split point.  For a batch of B samples:

    T_edge   = sum_{k < lam} edge_ms[k, gamma_k]  (+ edge_head_ms when lam == N)
    T_link   = link_bytes[lam] * B * 8 / bandwidth   (+ serialize_ms_per_mb * MB): the link's occupancy per batch
    T_server = sum_{k >= lam} server_ms[k, gamma_k] + server_head_ms  (0 when lam == N)
    latency  = T_edge + latency_ms + T_link + T_server   (one frame, end to end)
    throughput = B / max(T_edge, T_link, T_server)   frames per second (the three stages overlap)

The one-way link latency is paid once per frame (it is in `latency`) but not once per batch in the period: the
batches of a stream are in flight together, so a link-bound stream delivers one batch per bytes / bandwidth.
The starting spec put the latency inside the maximum; why this form instead, measured on the real split runtime:
docs/design.md#link-latency (current figures: bench/README.md, section runtime).

Objectives (all minimized, in ms per batch): 'throughput' -> the period max(T_edge, T_link, T_server) (minimizing
it maximizes B / period); 'latency' -> end-to-end latency; 'weighted' -> omega * latency +
(1 - omega) * period (omega in [0, 1]: 0 = throughput, 1 = latency; both terms are ms, so no rescaling is needed).

Every function here is array in / array out: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence

import numpy as np

from errors import UserError
from hyper_repvgg import LAYOUTS, NUM_LAYOUTS, fused_layout, layouts_for

STAGES = ('edge', 'link', 'server')
COST_MODEL_VERSION = 2  # bump when a formula above changes: cached step-3 results record it and are redone
OBJECTIVES = ('throughput', 'latency', 'weighted')


class CostError(UserError, ValueError):
    """Cost-model input that does not fit (bad tables, link, objective, configuration)."""


@dataclass(frozen=True)
class CostTables:
    """The LUT of one batch size as arrays (all times in ms for one batch of `batch` samples).

    `edge_ms` / `server_ms` are (N, 14): block k run with layout gamma on that side; NaN where layout gamma
    is not measurable for block k (its branch set is not a subset of the block's branches).
    """
    edge_ms: np.ndarray  # (N, 14) float, ms
    server_ms: np.ndarray  # (N, 14) float, ms
    edge_head_ms: float  # global pooling + classifier on the edge (used when lam == N), ms
    server_head_ms: float  # global pooling + classifier on the server (used when lam < N), ms
    link_bytes: np.ndarray  # (N + 1,) bytes per sample crossing the link at split lam
    bandwidth_mbps: float  # uplink bandwidth, Mbit/s
    latency_ms: float  # one-way link latency, ms
    batch: int = 1  # samples per batch B
    serialize_ms_per_mb: float = 0.0  # measured (de)serialization cost per MB sent, ms (0 = unknown)

    def __post_init__(self) -> None:
        n = self.edge_ms.shape[0]
        if self.edge_ms.shape != (n, 14) or self.server_ms.shape != (n, 14):
            raise CostError(f'edge_ms and server_ms must be (N, 14), got {self.edge_ms.shape} and '
                             f'{self.server_ms.shape}')
        if self.link_bytes.shape != (n + 1,):
            raise CostError(f'link_bytes must have N + 1 = {n + 1} entries, got {self.link_bytes.shape}')
        if not (self.bandwidth_mbps > 0 and np.isfinite(self.bandwidth_mbps)):
            raise CostError(f'bandwidth_mbps must be a positive number, got {self.bandwidth_mbps}')
        if not self.latency_ms >= 0:
            raise CostError(f'latency_ms must be >= 0, got {self.latency_ms}')
        if self.batch < 1:
            raise CostError(f'batch must be >= 1, got {self.batch}')
        for name in ('edge_ms', 'server_ms'):
            a = getattr(self, name)
            if (a[np.isfinite(a)] < 0).any() or np.isinf(a).any():
                raise CostError(f'{name} must hold times >= 0 ms (NaN where not measurable)')
        for name in ('edge_head_ms', 'server_head_ms', 'serialize_ms_per_mb'):
            if not (getattr(self, name) >= 0 and np.isfinite(getattr(self, name))):
                raise CostError(f'{name} must be a finite number >= 0, got {getattr(self, name)}')
        if not (np.isfinite(self.link_bytes).all() and (self.link_bytes >= 0).all()):
            raise CostError('link_bytes must be finite byte counts >= 0')

    @property
    def num_blocks(self) -> int:
        return int(self.edge_ms.shape[0])

    @property
    def valid(self) -> np.ndarray:
        """(N, 14) bool: layouts measured on both sides."""
        return np.isfinite(self.edge_ms) & np.isfinite(self.server_ms)

    def link_ms(self) -> np.ndarray:
        """(N + 1,) link stage time (occupancy per batch, without the one-way latency) for each split point, ms."""
        mb = self.link_bytes * self.batch / 1e6
        return mb * 8.0 / self.bandwidth_mbps * 1e3 + mb * self.serialize_ms_per_mb


class StageTimes(NamedTuple):
    edge_ms: np.ndarray
    link_ms: np.ndarray
    server_ms: np.ndarray
    latency_ms: np.ndarray
    throughput_fps: np.ndarray
    bottleneck: np.ndarray  # index into STAGES


def stage_times(gammas: np.ndarray, lams: np.ndarray, t: CostTables) -> StageTimes:
    """Stage times of M configurations at once: gammas (M, N) ints, lams (M,) ints in 0..N."""
    gammas = np.atleast_2d(np.asarray(gammas, dtype=np.int64))
    lams = np.atleast_1d(np.asarray(lams, dtype=np.int64))
    n = t.num_blocks
    if gammas.shape[1] != n or gammas.shape[0] != lams.shape[0]:
        raise CostError(f'gammas must be (M, {n}) and lams (M,), got {gammas.shape} and {lams.shape}')
    if lams.min() < 0 or lams.max() > n:
        raise CostError(f'split lambda must be in 0..{n}, got {lams.min()}..{lams.max()}')
    rows = np.arange(n)
    e = t.edge_ms[rows, gammas]  # (M, N)
    s = t.server_ms[rows, gammas]
    on_edge = rows[None, :] < lams[:, None]
    if np.isnan(np.where(on_edge, e, 0.0)).any() or np.isnan(np.where(on_edge, 0.0, s)).any():
        m, k = np.argwhere(np.isnan(np.where(on_edge, e, s)))[0]
        raise CostError(f'layout gamma={gammas[m, k]} has no LUT entry for block {k} on the '
                         f'{"edge" if on_edge[m, k] else "server"}')
    full = lams == n
    t_edge = np.where(on_edge, e, 0.0).sum(1) + np.where(full, t.edge_head_ms, 0.0)
    t_server = np.where(on_edge, 0.0, s).sum(1) + np.where(full, 0.0, t.server_head_ms)
    t_link = t.link_ms()[lams]
    stacked = np.stack([t_edge, t_link, t_server], 1)
    worst = stacked.max(1)
    return StageTimes(t_edge, t_link, t_server, stacked.sum(1) + t.latency_ms, t.batch * 1e3 / worst,
                      stacked.argmax(1))


def evaluate(gammas, lam: int, t: CostTables) -> dict:
    """Stage times, latency, throughput and bottleneck of one configuration, as plain Python values."""
    st = stage_times(np.asarray(gammas)[None, :], np.array([lam]), t)
    return {'edge_ms': float(st.edge_ms[0]), 'link_ms': float(st.link_ms[0]), 'server_ms': float(st.server_ms[0]),
            'latency_ms': float(st.latency_ms[0]), 'throughput_fps': float(st.throughput_fps[0]),
            'bottleneck': STAGES[int(st.bottleneck[0])]}


# ----------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------

def check_objective(objective: str, omega: float = 0.5) -> None:
    """Raise CostError unless `objective` is one of OBJECTIVES and omega is in [0, 1]."""
    if objective not in OBJECTIVES:
        raise CostError(f'--objective / optim.objective: unknown objective {objective!r}; valid choices: '
                        f'{", ".join(OBJECTIVES)}')
    if not (0.0 <= omega <= 1.0):
        raise CostError(f'--omega / optim.omega: expected a weight in [0, 1], got {omega}')


def period_ms(st: StageTimes) -> np.ndarray:
    """The pipeline period max(T_edge, T_link, T_server) of each configuration, ms per batch."""
    return np.maximum(np.maximum(st.edge_ms, st.link_ms), st.server_ms)


def objective_values(st: StageTimes, objective: str = 'throughput', omega: float = 0.5) -> np.ndarray:
    """The minimized objective of each configuration, ms per batch (see the module docstring)."""
    check_objective(objective, omega)
    if objective == 'throughput':
        return period_ms(st)
    if objective == 'latency':
        return np.asarray(st.latency_ms, dtype=np.float64)
    return omega * st.latency_ms + (1.0 - omega) * period_ms(st)


def bottleneck_names(st: StageTimes) -> List[str]:
    """The name ('edge' | 'link' | 'server') of each configuration's slowest stage."""
    return [STAGES[int(i)] for i in np.atleast_1d(st.bottleneck)]


def best_index(obj: np.ndarray, latency_ms: np.ndarray) -> int:
    """Index of the smallest objective; ties (within 1e-12 relative) go to the lower latency, then the first."""
    obj = np.asarray(obj, dtype=np.float64)
    tol = 1e-12 * max(1.0, float(np.abs(obj).min()))
    near = np.flatnonzero(obj <= obj.min() + tol)
    return int(near[np.argmin(np.asarray(latency_ms)[near])])


def gap_pct(value: float, optimum: float) -> float:
    """Relative excess of a minimized objective over the optimum, %."""
    return 100.0 * (float(value) - float(optimum)) / float(optimum) if optimum > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------
# Kept branch sets and valid layouts
# ----------------------------------------------------------------------------------------------------------

def measured_kept(t: CostTables) -> List[FrozenSet[str]]:
    """Per block, every branch it has (the union of the branch sets of its layouts measured on both sides):
    the kept sets of the unpruned model (step 2)."""
    valid = t.valid
    return [frozenset(b for g in range(NUM_LAYOUTS) if valid[k, g] for b in LAYOUTS[g].branches)
            for k in range(t.num_blocks)]


def valid_mask(kept: Sequence[Sequence[str]]) -> np.ndarray:
    """(N, 14) bool: layout gamma is valid for block k iff its branch set equals kept[k] (docs/design.md#validity)."""
    out = np.zeros((len(kept), NUM_LAYOUTS), dtype=bool)
    for k, ks in enumerate(kept):
        g = layouts_for(ks)
        if not g:
            raise CostError(f'block {k}: kept branch set {sorted(ks)} has no layout (keep at least one of D, O, I)')
        out[k, g] = True
    return out


def check_valid(t: CostTables, valid: np.ndarray) -> np.ndarray:
    """`valid` as a bool (N, 14) array, checked: every block has a valid layout, all of them in the LUT on
    both sides (CostError naming the block, layout and side otherwise)."""
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (t.num_blocks, NUM_LAYOUTS):
        raise CostError(f'valid layout mask must be ({t.num_blocks}, {NUM_LAYOUTS}), got {valid.shape}')
    for k in range(t.num_blocks):
        if not valid[k].any():
            raise CostError(f'block {k} has no valid layout')
        for side, a in (('edge', t.edge_ms), ('server', t.server_ms)):
            missing = np.flatnonzero(valid[k] & ~np.isfinite(a[k]))
            if missing.size:
                raise CostError(f'the LUT has no {side} time for block {k}, layout gamma={int(missing[0])} '
                                f'(valid for its kept branches); re-run step 1 for this model')
    return valid


def fused_gammas(kept: Sequence[Sequence[str]]) -> List[int]:
    """Every block in its single-kernel layout: the plain re-parameterized (RepVGG deploy) model."""
    return [fused_layout(ks) for ks in kept]


# ----------------------------------------------------------------------------------------------------------
# Splits and plain-model baselines
# ----------------------------------------------------------------------------------------------------------

def describe(gammas: Sequence[int], lam: int, t: CostTables, objective: str = 'throughput',
             omega: float = 0.5) -> Dict[str, object]:
    """evaluate() plus gammas, lam, period_ms and the objective value (ms) of one configuration (JSON-able)."""
    g = [int(x) for x in gammas]
    d: Dict[str, object] = {'gammas': g, 'lam': int(lam)}
    d.update(evaluate(g, int(lam), t))
    d['period_ms'] = max(d['edge_ms'], d['link_ms'], d['server_ms'])  # type: ignore[type-var]
    d['objective_ms'] = float(objective_values(stage_times(np.asarray(g)[None], np.array([lam]), t),
                                               objective, omega)[0])
    return d


def best_split(gammas: Sequence[int], t: CostTables, objective: str = 'throughput', omega: float = 0.5,
               lams: Optional[Sequence[int]] = None) -> int:
    """The split (among `lams`, default all 0..N) minimizing the objective for fixed layouts (ties: lower latency)."""
    lams = np.arange(t.num_blocks + 1) if lams is None else np.asarray(lams, dtype=np.int64)
    g = np.broadcast_to(np.asarray(gammas, dtype=np.int64), (lams.size, t.num_blocks))
    st = stage_times(g, lams, t)
    return int(lams[best_index(objective_values(st, objective, omega), st.latency_ms)])


def plain_baselines(t: CostTables, kept: Sequence[Sequence[str]], objective: str = 'throughput',
                    omega: float = 0.5) -> Dict[str, Dict[str, object]]:
    """The plain re-parameterized model (every block in its fused layout) run on the edge only (lam = N), on the
    server only (lam = 0: the uint8 image crosses the link), and split at its best point for `objective`
    (Neurosurgeon / DADS style: layouts fixed, only the split chosen)."""
    g = fused_gammas(kept)
    n = t.num_blocks
    out = {'edge_only': describe(g, n, t, objective, omega), 'server_only': describe(g, 0, t, objective, omega),
           'best_plain_split': describe(g, best_split(g, t, objective, omega), t, objective, omega)}
    out['edge_only']['description'] = 'plain deploy model entirely on the edge device (lambda = N)'
    out['server_only']['description'] = 'plain deploy model entirely on the server, uint8 image sent (lambda = 0)'
    out['best_plain_split']['description'] = f'plain deploy model split at its best lambda for the {objective} ' \
                                             'objective (Neurosurgeon/DADS style)'
    return out
