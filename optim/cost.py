"""Pipelined cost model (DESIGN.md section 5): pure functions over LUT arrays.

A configuration is (gammas, lam): a layout index per block and the split point.  For a batch of B samples:

    T_edge   = sum_{k < lam} edge_ms[k, gamma_k]  (+ edge_head_ms when lam == N)
    T_link   = latency_ms + link_bytes[lam] * B * 8 / bandwidth   (+ serialize_ms_per_mb * MB)
    T_server = sum_{k >= lam} server_ms[k, gamma_k] + server_head_ms  (0 when lam == N)
    latency  = T_edge + T_link + T_server
    throughput = B / max(T_edge, T_link, T_server)   frames per second (the three stages overlap)

Every function here is array in / array out: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

STAGES = ('edge', 'link', 'server')


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
            raise ValueError(f'edge_ms and server_ms must be (N, 14), got {self.edge_ms.shape} and '
                             f'{self.server_ms.shape}')
        if self.link_bytes.shape != (n + 1,):
            raise ValueError(f'link_bytes must have N + 1 = {n + 1} entries, got {self.link_bytes.shape}')
        if not (self.bandwidth_mbps > 0 and np.isfinite(self.bandwidth_mbps)):
            raise ValueError(f'bandwidth_mbps must be a positive number, got {self.bandwidth_mbps}')
        if not self.latency_ms >= 0:
            raise ValueError(f'latency_ms must be >= 0, got {self.latency_ms}')
        if self.batch < 1:
            raise ValueError(f'batch must be >= 1, got {self.batch}')

    @property
    def num_blocks(self) -> int:
        return int(self.edge_ms.shape[0])

    @property
    def valid(self) -> np.ndarray:
        """(N, 14) bool: layouts measured on both sides."""
        return np.isfinite(self.edge_ms) & np.isfinite(self.server_ms)

    def link_ms(self) -> np.ndarray:
        """(N + 1,) link stage time for each split point, ms."""
        mb = self.link_bytes * self.batch / 1e6
        return self.latency_ms + mb * 8.0 / self.bandwidth_mbps * 1e3 + mb * self.serialize_ms_per_mb


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
        raise ValueError(f'gammas must be (M, {n}) and lams (M,), got {gammas.shape} and {lams.shape}')
    if lams.min() < 0 or lams.max() > n:
        raise ValueError(f'split lambda must be in 0..{n}, got {lams.min()}..{lams.max()}')
    rows = np.arange(n)
    e = t.edge_ms[rows, gammas]  # (M, N)
    s = t.server_ms[rows, gammas]
    on_edge = rows[None, :] < lams[:, None]
    if np.isnan(np.where(on_edge, e, 0.0)).any() or np.isnan(np.where(on_edge, 0.0, s)).any():
        m, k = np.argwhere(np.isnan(np.where(on_edge, e, s)))[0]
        raise ValueError(f'layout gamma={gammas[m, k]} has no LUT entry for block {k} on the '
                         f'{"edge" if on_edge[m, k] else "server"}')
    full = lams == n
    t_edge = np.where(on_edge, e, 0.0).sum(1) + np.where(full, t.edge_head_ms, 0.0)
    t_server = np.where(on_edge, 0.0, s).sum(1) + np.where(full, 0.0, t.server_head_ms)
    t_link = t.link_ms()[lams]
    stacked = np.stack([t_edge, t_link, t_server], 1)
    worst = stacked.max(1)
    return StageTimes(t_edge, t_link, t_server, stacked.sum(1), t.batch * 1e3 / worst, stacked.argmax(1))


def evaluate(gammas, lam: int, t: CostTables) -> dict:
    """Stage times, latency, throughput and bottleneck of one configuration, as plain Python values."""
    st = stage_times(np.asarray(gammas)[None, :], np.array([lam]), t)
    return {'edge_ms': float(st.edge_ms[0]), 'link_ms': float(st.link_ms[0]), 'server_ms': float(st.server_ms[0]),
            'latency_ms': float(st.latency_ms[0]), 'throughput_fps': float(st.throughput_fps[0]),
            'bottleneck': STAGES[int(st.bottleneck[0])]}
