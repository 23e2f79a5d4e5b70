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

Chains of K devices (docs/design.md#device-chains).  A chain d_1 -> ... -> d_K has K stage tables and K - 1 links
and a split vector lam_1 <= ... <= lam_{K-1}: device j runs blocks lam_{j-1} <= k < lam_j (lam_0 = 0, lam_K = N),
the device holding block N - 1 (the first j with lam_j = N) also runs the head, and link j carries the activation
at lam_j (the logits when lam_j = N).  T_dev_j as T_edge above, T_link_j = link_bytes[lam_j] * B * 8 / bandwidth_j
(+ serialization), period = max over the 2K - 1 stages, latency = their sum + every link's one-way latency.
The two-device model is K = 2 of the same code: `CostTables.chain` is its ChainTables and `stage_times` reads
`chain_stage_times` (same operations, so bit-identical to the former two-device formula; tests/test_chain.py).

Every function here is array in / array out: no I/O.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

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
        return self.chain.link_ms(0)

    @cached_property
    def chain(self) -> 'ChainTables':
        """These tables as the chain edge -> server (K = 2), the form every cost function computes on."""
        return ChainTables((self.edge_ms, self.server_ms), (self.edge_head_ms, self.server_head_ms), self.link_bytes,
                           (ChainLink(self.bandwidth_mbps, self.latency_ms, self.serialize_ms_per_mb),), self.batch,
                           ('edge', 'server'), ('link',))


@dataclass(frozen=True)
class ChainLink:
    """One hop of a chain: the link from device j to device j + 1."""
    bandwidth_mbps: float  # Mbit/s
    latency_ms: float  # one-way latency, ms
    serialize_ms_per_mb: float = 0.0  # (de)serialization cost per MB sent, ms (0 = unknown)


@dataclass(frozen=True)
class ChainTables:
    """The LUT of one batch size for a chain of K >= 2 devices (module docstring), all times in ms per batch.

    `device_ms[j]` is (N, 14) for device j (NaN where not measurable), `head_ms[j]` its pooling + classifier time,
    `links[j]` the hop from device j to j + 1; `link_bytes` (N + 1,) bytes per sample at each split point (the same
    activation whichever hop carries it).  Names label the stages in results ('edge', 'link', 'server' for K = 2)."""
    device_ms: Tuple[np.ndarray, ...]  # K arrays (N, 14), ms
    head_ms: Tuple[float, ...]  # K head times, ms
    link_bytes: np.ndarray  # (N + 1,) bytes per sample
    links: Tuple[ChainLink, ...]  # K - 1 hops
    batch: int = 1  # samples per batch B
    device_names: Tuple[str, ...] = ()  # K names (default d1..dK)
    link_names: Tuple[str, ...] = ()  # K - 1 names (default link1..link{K-1})

    def __post_init__(self) -> None:
        k = len(self.device_ms)
        if k < 2:
            raise CostError(f'a chain needs at least 2 devices, got {k}')
        n = np.shape(self.device_ms[0])[0]
        for j, a in enumerate(self.device_ms):
            if np.shape(a) != (n, 14):
                raise CostError(f'chain device {j}: stage table must be ({n}, 14), got {np.shape(a)}')
            if (a[np.isfinite(a)] < 0).any() or np.isinf(a).any():
                raise CostError(f'chain device {j}: stage table must hold times >= 0 ms (NaN where not measurable)')
        if len(self.head_ms) != k or not all(h >= 0 and np.isfinite(h) for h in self.head_ms):
            raise CostError(f'a chain of {k} devices needs {k} head times >= 0 ms, got {list(self.head_ms)}')
        if len(self.links) != k - 1:
            raise CostError(f'a chain of {k} devices needs {k - 1} links, got {len(self.links)}')
        for j, ln in enumerate(self.links):
            if not (ln.bandwidth_mbps > 0 and np.isfinite(ln.bandwidth_mbps)):
                raise CostError(f'chain link {j}: bandwidth_mbps must be a positive number, got {ln.bandwidth_mbps}')
            if not (ln.latency_ms >= 0 and np.isfinite(ln.latency_ms)):
                raise CostError(f'chain link {j}: latency_ms must be >= 0, got {ln.latency_ms}')
            if not (ln.serialize_ms_per_mb >= 0 and np.isfinite(ln.serialize_ms_per_mb)):
                raise CostError(f'chain link {j}: serialize_ms_per_mb must be >= 0, got {ln.serialize_ms_per_mb}')
        if np.shape(self.link_bytes) != (n + 1,):
            raise CostError(f'link_bytes must have N + 1 = {n + 1} entries, got {np.shape(self.link_bytes)}')
        if not (np.isfinite(self.link_bytes).all() and (self.link_bytes >= 0).all()):
            raise CostError('link_bytes must be finite byte counts >= 0')
        if self.batch < 1:
            raise CostError(f'batch must be >= 1, got {self.batch}')
        if self.device_names and len(self.device_names) != k or self.link_names and len(self.link_names) != k - 1:
            raise CostError(f'a chain of {k} devices needs {k} device names and {k - 1} link names')

    @property
    def num_devices(self) -> int:
        return len(self.device_ms)

    @property
    def num_blocks(self) -> int:
        return int(np.shape(self.device_ms[0])[0])

    @property
    def names(self) -> Tuple[str, ...]:
        """The 2K - 1 stage names in pipeline order: device 1, link 1, device 2, ..., device K."""
        dev = self.device_names or tuple(f'd{j + 1}' for j in range(self.num_devices))
        lnk = self.link_names or tuple(f'link{j + 1}' for j in range(self.num_devices - 1))
        return tuple(x for pair in itertools.zip_longest(dev, lnk) for x in pair if x is not None)

    @property
    def valid(self) -> np.ndarray:
        """(N, 14) bool: layouts measured on every device."""
        return np.logical_and.reduce([np.isfinite(a) for a in self.device_ms])

    @property
    def latency_ms(self) -> float:
        """The one-way latencies of all hops, summed, ms."""
        return float(sum(ln.latency_ms for ln in self.links))

    def link_ms(self, j: int) -> np.ndarray:
        """(N + 1,) occupancy per batch of hop j (without its one-way latency) at each split point, ms."""
        return occupancy_ms(self.link_bytes * self.batch, self.links[j])


def occupancy_ms(bytes_per_batch: np.ndarray, link: ChainLink) -> np.ndarray:
    """How long one hop is busy with `bytes_per_batch` bytes, ms: bytes * 8 / bandwidth (+ serialization per MB);
    the one-way latency is not in it (a streamed link overlaps it: the module docstring)."""
    mb = np.asarray(bytes_per_batch, dtype=np.float64) / 1e6
    return mb * 8.0 / link.bandwidth_mbps * 1e3 + mb * link.serialize_ms_per_mb


def two_device_tables(c: ChainTables) -> CostTables:
    """A chain of two devices as the two-device CostTables (the inverse of CostTables.chain): d_1 is the edge,
    d_2 the server, its one link the link.  CostError for K != 2."""
    if c.num_devices != 2:
        raise CostError(f'two_device_tables: a chain of {c.num_devices} devices is not a two-device split')
    ln = c.links[0]
    return CostTables(c.device_ms[0], c.device_ms[1], float(c.head_ms[0]), float(c.head_ms[1]), c.link_bytes,
                      ln.bandwidth_mbps, ln.latency_ms, c.batch, ln.serialize_ms_per_mb)


class StageTimes(NamedTuple):
    edge_ms: np.ndarray
    link_ms: np.ndarray
    server_ms: np.ndarray
    latency_ms: np.ndarray
    throughput_fps: np.ndarray
    bottleneck: np.ndarray  # index into STAGES


class ChainStageTimes(NamedTuple):
    stages_ms: np.ndarray  # (M, 2K - 1): device 1, link 1, device 2, ..., device K (ChainTables.names), ms
    latency_ms: np.ndarray  # (M,)
    throughput_fps: np.ndarray  # (M,)
    bottleneck: np.ndarray  # (M,) index into ChainTables.names

    @property
    def device_ms(self) -> np.ndarray:
        """(M, K) device stage times, ms."""
        return self.stages_ms[:, 0::2]

    @property
    def link_ms(self) -> np.ndarray:
        """(M, K - 1) link occupancies, ms."""
        return self.stages_ms[:, 1::2]

    @property
    def period_ms(self) -> np.ndarray:
        return self.stages_ms.max(1)


def check_splits(lams: np.ndarray, num_blocks: int, num_devices: int) -> np.ndarray:
    """Split vectors as an (M, K - 1) int array, checked: 0 <= lam_1 <= ... <= lam_{K-1} <= N."""
    lams = np.asarray(lams, dtype=np.int64)
    lams = lams.reshape(-1, 1) if lams.ndim <= 1 and num_devices == 2 else np.atleast_2d(lams)
    if lams.shape[1] != num_devices - 1:
        raise CostError(f'a chain of {num_devices} devices needs split vectors of {num_devices - 1} points, got '
                        f'shape {lams.shape}')
    if lams.size and (lams.min() < 0 or lams.max() > num_blocks):
        raise CostError(f'split lambda must be in 0..{num_blocks}, got {lams.min()}..{lams.max()}')
    if lams.shape[1] > 1 and (np.diff(lams, axis=1) < 0).any():
        raise CostError(f'split vector {lams[np.flatnonzero((np.diff(lams, axis=1) < 0).any(1))[0]].tolist()} is '
                        f'not non-decreasing (lam_1 <= ... <= lam_(K-1))')
    return lams


def chain_stage_times(gammas: np.ndarray, lams: np.ndarray, c: ChainTables) -> ChainStageTimes:
    """Stage times of M chain configurations: gammas (M, N) ints, lams (M, K - 1) split vectors (or (M,) for K = 2)."""
    gammas = np.atleast_2d(np.asarray(gammas, dtype=np.int64))
    n, k = c.num_blocks, c.num_devices
    lams = check_splits(lams, n, k)
    if gammas.shape[1] != n or gammas.shape[0] != lams.shape[0]:
        raise CostError(f'gammas must be (M, {n}) and split vectors (M, {k - 1}), got {gammas.shape} and '
                        f'{lams.shape}')
    m = lams.shape[0]
    bounds = np.concatenate([np.zeros((m, 1), np.int64), lams, np.full((m, 1), n, np.int64)], 1)
    rows = np.arange(n)[None, :]
    cols = []
    for j in range(k):
        if j == 0:
            here = rows < bounds[:, 1:2]
        elif j == k - 1:
            here = rows >= bounds[:, j:j + 1]
        else:
            here = (rows >= bounds[:, j:j + 1]) & (rows < bounds[:, j + 1:j + 2])
        x = np.where(here, c.device_ms[j][rows, gammas], 0.0)  # (M, N): the blocks of device j
        if np.isnan(x).any():
            i, b = np.argwhere(np.isnan(x))[0]
            names = c.device_names or tuple(f'd{d + 1}' for d in range(k))
            raise CostError(f'layout gamma={gammas[i, b]} has no LUT entry for block {b} on the {names[j]}')
        head = (bounds[:, j + 1] == n) & (bounds[:, j] < n)  # this device runs block N - 1, hence the head
        cols.append(x.sum(1) + np.where(head, c.head_ms[j], 0.0))
        if j < k - 1:
            cols.append(c.link_ms(j)[lams[:, j]])
    return pipeline_times(np.stack(cols, 1), c.latency_ms, c.batch)


def pipeline_times(stages_ms: np.ndarray, latency_ms: float, batch: int) -> ChainStageTimes:
    """The pipeline over stage times (M, 2K - 1) in pipeline order (device 1, link 1, ..., device K; ms per batch of
    `batch`): period = the slowest stage, throughput = batch / period, latency = the sum + the links' one-way
    `latency_ms`.  chain_stage_times ends here, and so does the prediction of a real chain run from its measured
    stage times (comm.session.predict_chain)."""
    stacked = np.asarray(stages_ms, dtype=np.float64)
    worst = stacked.max(1)
    with np.errstate(divide='ignore'):
        fps = batch * 1e3 / worst
    return ChainStageTimes(stacked, stacked.sum(1) + latency_ms, fps, stacked.argmax(1))


def stage_times(gammas: np.ndarray, lams: np.ndarray, t: CostTables) -> StageTimes:
    """Stage times of M configurations at once: gammas (M, N) ints, lams (M,) ints in 0..N (the chain
    edge -> server, `chain_stage_times` with K = 2)."""
    gammas = np.atleast_2d(np.asarray(gammas, dtype=np.int64))
    lams = np.atleast_1d(np.asarray(lams, dtype=np.int64))
    n = t.num_blocks
    if gammas.shape[1] != n or gammas.shape[0] != lams.shape[0] or lams.ndim != 1:
        raise CostError(f'gammas must be (M, {n}) and lams (M,), got {gammas.shape} and {lams.shape}')
    cs = chain_stage_times(gammas, lams[:, None], t.chain)
    s = cs.stages_ms
    return StageTimes(s[:, 0], s[:, 1], s[:, 2], cs.latency_ms, cs.throughput_fps, cs.bottleneck)


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


def period_ms(st) -> np.ndarray:
    """The pipeline period max(T_edge, T_link, T_server) (for a chain: max over its 2K - 1 stages) of each
    configuration, ms per batch."""
    if isinstance(st, ChainStageTimes):
        return st.period_ms
    return np.maximum(np.maximum(st.edge_ms, st.link_ms), st.server_ms)


def objective_values(st, objective: str = 'throughput', omega: float = 0.5) -> np.ndarray:
    """The minimized objective of each configuration (StageTimes or ChainStageTimes), ms per batch (see the module
    docstring)."""
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
    return check_chain_valid(t.chain, valid)


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


# ----------------------------------------------------------------------------------------------------------
# Chains: split vectors, per-hop block ranges, one configuration described
# ----------------------------------------------------------------------------------------------------------

def num_split_vectors(num_blocks: int, num_devices: int) -> int:
    """How many split vectors 0 <= lam_1 <= ... <= lam_{K-1} <= N there are: C(N + K - 1, K - 1)."""
    from math import comb
    return comb(int(num_blocks) + int(num_devices) - 1, int(num_devices) - 1)


def split_vectors(num_blocks: int, num_devices: int) -> np.ndarray:
    """(S, K - 1) every split vector of a chain of K devices over N blocks, in lexicographic order (for K = 2 the
    column 0..N, the order of the two-device split scan)."""
    out = np.array(list(itertools.combinations_with_replacement(range(int(num_blocks) + 1), int(num_devices) - 1)),
                   dtype=np.int64)
    return out.reshape(-1, int(num_devices) - 1)


def hop_ranges(lams: Sequence[int], num_blocks: int) -> List[Tuple[int, int]]:
    """The blocks each device of a chain runs, from its split vector: [(start, end)] per device d_1..d_K, device j
    running blocks start <= k < end (end == start: it runs none and only forwards the activation it receives).
    K = len(lams) + 1.  E.g. hop_ranges([3, 10], 22) == [(0, 3), (3, 10), (10, 22)]; the device whose range ends
    at N (the first one, if several do) also runs the head.  CostError unless 0 <= lam_1 <= ... <= N."""
    lam = check_splits(np.asarray(list(lams), dtype=np.int64)[None, :], num_blocks, len(lams) + 1)[0]
    b = [0] + [int(x) for x in lam] + [int(num_blocks)]
    return [(b[j], b[j + 1]) for j in range(len(b) - 1)]


def chain_describe(gammas: Sequence[int], lams: Sequence[int], c: ChainTables, objective: str = 'throughput',
                   omega: float = 0.5) -> Dict[str, object]:
    """One chain configuration as plain values (JSON-able): gammas, lams, the blocks per device, every stage time
    by name, the device and link times as lists, period, latency, throughput, bottleneck and objective (ms)."""
    g = [int(x) for x in gammas]
    lam = [int(x) for x in lams]
    st = chain_stage_times(np.asarray(g)[None], np.asarray(lam)[None], c)
    names = c.names
    return {'gammas': g, 'lams': lam, 'hop_blocks': [list(r) for r in hop_ranges(lam, c.num_blocks)],
            'stages_ms': {nm: float(v) for nm, v in zip(names, st.stages_ms[0])},
            'device_ms': [float(v) for v in st.device_ms[0]], 'link_ms': [float(v) for v in st.link_ms[0]],
            'period_ms': float(st.period_ms[0]), 'latency_ms': float(st.latency_ms[0]),
            'throughput_fps': float(st.throughput_fps[0]), 'bottleneck': names[int(st.bottleneck[0])],
            'objective_ms': float(objective_values(st, objective, omega)[0])}


def check_chain_valid(c: ChainTables, valid: np.ndarray) -> np.ndarray:
    """`valid` (N, 14) as a bool array, checked against every device of the chain (as check_valid)."""
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (c.num_blocks, NUM_LAYOUTS):
        raise CostError(f'valid layout mask must be ({c.num_blocks}, {NUM_LAYOUTS}), got {valid.shape}')
    names = c.device_names or tuple(f'd{j + 1}' for j in range(c.num_devices))
    for k in range(c.num_blocks):
        if not valid[k].any():
            raise CostError(f'block {k} has no valid layout')
        for name, a in zip(names, c.device_ms):
            missing = np.flatnonzero(valid[k] & ~np.isfinite(a[k]))
            if missing.size:
                raise CostError(f'the LUT has no {name} time for block {k}, layout gamma={int(missing[0])} '
                                f'(valid for its kept branches); re-run step 1 for this model')
    return valid

