"""Step 2 by LUT gradient descent (docs/design.md#step-2-solvers): the relaxed layout/split problem (float64).

Relaxation, for each of R restarts optimized together (one batch dimension, independent parameters):

* layouts: per block a softmax over its VALID layouts only (the others masked with -inf).  A block runs on one
  side only, so it gets one layout softmax per side, p_edge[k, gamma] and p_server[k, gamma]; the configuration
  read out is gamma_k = argmax p_edge[k] for k < lambda and argmax p_server[k] otherwise.  This is an exact
  reformulation of the problem (every (gamma, lambda) is reachable and nothing else is), and it avoids the trap of
  one shared softmax: while the split distribution sits near lambda = 0 the edge times get no gradient, the
  layouts stay tuned to the server, and the split never learns that the edge could be faster;
* split: a softmax over the N + 1 split points, q[lambda] (see the last point for how it is optimized);
* expected per-block times on each side, e[k] = sum_gamma p_edge[k, gamma] edge[k, gamma] (same for the server);
  T_edge(lambda) = prefix sum of e over k < lambda (+ edge head at lambda = N), T_server(lambda) = suffix sum of
  s over k >= lambda + server head (lambda < N), T_link(lambda) from the LUT;
* per lambda the objective F(lambda) with the maximum replaced by a smooth maximum tau * logsumexp(T / tau) (times
  divided by a fixed scale so that tau is unitless), then its expectation under q;
* the split softmax is optimized exactly at every step rather than by Adam: the expectation is linear in q, and
  its entropy-regularized minimum, min_q E_q[F] - tau H(q), is the Gibbs distribution q = softmax(-F / tau)
  with the value -tau * logsumexp(-F / tau) (a smooth minimum over the splits), which is the loss.  Every split
  passes gradient to the layouts in proportion to q.  (Adam on free split logits fails here: its per-coordinate
  step normalization raises every better-than-average split at the same rate, so the split that wins is decided
  by the initial noise and many runs end far from the optimum, most at lambda = 0: docs/design.md#deviations.)
* all softmaxes use the same temperature tau (logits / tau), annealed geometrically from tau_start to tau_end, so
  the distributions end close to one-hot; Adam on the layout logits.  Step 2 anneals to 0.001 (optim.step2_tau_end):
  at 0.02 the smooth max overstates splits with balanced stages by up to tau * ln 3 (2 % of the scale), which
  costs the descent alone measurable gaps (docs/design.md#deviations; current gaps: bench/README.md, optimizer_step2).

Then each restart's argmax (gamma, lambda) is improved by a local search under the EXACT cost (optim/cost.py):
best-improvement moves that change one block's layout or the split (layouts kept), repeated until no move
improves (bounded by `max_rounds`).  The best restart wins.  Deterministic for a seeded np.random.Generator.

The descent itself runs in numpy with the analytic gradient (`relaxed_value_grad`); the torch versions of the
pieces below are its autograd reference in the tests.

The relaxed pieces (`RelaxTables`, `expected_stage_times`, `smooth_max`, `split_objective`, `gibbs_split`,
`relaxed_objective`) are meant for reuse by step 3.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from optim.cost import (ChainTables, CostError, CostTables, best_index, chain_describe, chain_stage_times,
                        check_chain_valid, check_objective, check_valid, describe, objective_values, split_vectors,
                        stage_times)
from optim.search import Improve, local_search


@dataclass(frozen=True)
class RelaxTables:
    """The LUT as float64 tensors for the relaxed problem (invalid layouts: time 0, mask False)."""
    edge: torch.Tensor  # (N, 14) ms
    server: torch.Tensor  # (N, 14) ms
    mask: torch.Tensor  # (N, 14) bool, valid layouts
    link: torch.Tensor  # (N + 1,) ms
    edge_head: torch.Tensor  # (N + 1,) ms: the edge head at lambda = N, 0 elsewhere
    server_head: torch.Tensor  # (N + 1,) ms: the server head at lambda < N, 0 at lambda = N
    scale: float  # ms: times are divided by it inside the smooth maximum

    @property
    def num_blocks(self) -> int:
        return int(self.edge.shape[0])


def relax_tables(t: CostTables, valid: np.ndarray) -> RelaxTables:
    valid = check_valid(t, valid)
    edge = torch.tensor(np.where(valid, t.edge_ms, 0.0), dtype=torch.float64)
    server = torch.tensor(np.where(valid, t.server_ms, 0.0), dtype=torch.float64)
    link = torch.tensor(t.link_ms(), dtype=torch.float64)
    # scale: the mean over splits of the largest stage under uniform layouts (any fixed positive scale would do)
    cnt = valid.sum(1)
    e = np.where(valid, t.edge_ms, 0.0).sum(1) / cnt
    s = np.where(valid, t.server_ms, 0.0).sum(1) / cnt
    ec = np.concatenate([[0.0], np.cumsum(e)])
    sc = np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]])
    big = np.maximum(np.maximum(ec, t.link_ms()), sc).mean()
    scale = float(big) if big > 0 else 1.0
    n = t.num_blocks
    head_e = torch.zeros(n + 1, dtype=torch.float64)
    head_e[n] = float(t.edge_head_ms)
    head_s = torch.full((n + 1,), float(t.server_head_ms), dtype=torch.float64)
    head_s[n] = 0.0
    return RelaxTables(edge, server, torch.tensor(valid), link, head_e, head_s, scale)


def expected_stage_times(p: torch.Tensor, rt: RelaxTables, p_server: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expected (T_edge, T_link, T_server) at every split, each (..., N + 1) ms, for layout probabilities p
    (..., N, 14) on the edge and p_server on the server (default: the same p on both sides)."""
    e = (p * rt.edge).sum(-1)
    s = ((p if p_server is None else p_server) * rt.server).sum(-1)
    zero = torch.zeros(e.shape[:-1] + (1,), dtype=e.dtype)
    t_edge = torch.cat([zero, torch.cumsum(e, -1)], -1)
    t_server = torch.cat([torch.flip(torch.cumsum(torch.flip(s, [-1]), -1), [-1]), zero], -1)
    return t_edge + rt.edge_head, rt.link.expand_as(t_edge), t_server + rt.server_head


def smooth_max(x: torch.Tensor, tau: float, dim: int = -1) -> torch.Tensor:
    """tau * logsumexp(x / tau): an upper bound of max(x) within tau * log(len)."""
    return tau * torch.logsumexp(x / tau, dim)


def split_objective(p: torch.Tensor, rt: RelaxTables, objective: str, omega: float, tau: float,
                    p_server: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The smoothed objective at every split, (..., N + 1), in units of rt.scale, for layout probabilities p on the
    edge and p_server (default p) on the server."""
    te, tl, ts = expected_stage_times(p, rt, p_server)
    stages = torch.stack([te, tl, ts], -1) / rt.scale
    lat = stages.sum(-1)
    if objective == 'latency':
        return lat
    per = smooth_max(stages, tau)
    return per if objective == 'throughput' else omega * lat + (1.0 - omega) * per


def relaxed_objective(p: torch.Tensor, q: torch.Tensor, rt: RelaxTables, objective: str, omega: float,
                      tau: float, p_server: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expected (under a split softmax q (..., N + 1)) smoothed objective, in units of rt.scale, shape (...)."""
    return (q * split_objective(p, rt, objective, omega, tau, p_server)).sum(-1)


def gibbs_split(f: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q, value): the split softmax minimizing E_q[f] - tau * H(q), q = softmax(-f / tau), and that minimum,
    -tau * logsumexp(-f / tau) (a smooth minimum of f over the last axis, within tau * log(len) below min f)."""
    return torch.softmax(-f / tau, -1), -tau * torch.logsumexp(-f / tau, -1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(logits / tau) over the last axis, restricted to `mask` (the other entries get probability 0)."""
    return torch.softmax((logits / tau).masked_fill(~mask, -np.inf), -1)


@dataclass
class RelaxResult:
    gammas: List[int]  # chosen layout per block (after local search)
    lam: int  # chosen split
    objective_ms: float  # exact objective of the choice, ms per batch
    stages: Dict[str, object]  # cost.describe() of the choice
    gd_gammas: List[int]  # best restart's argmax before the local search
    gd_lam: int
    gd_objective_ms: float  # exact objective of that argmax
    restart: int  # the winning restart
    history: List[Dict[str, object]] = field(default_factory=list)  # per restart: loss curve, argmax, search
    status: str = 'converged'  # converged | round_limit (local search stopped by its bound)
    wall_s: float = 0.0


def exact_improvement(t: CostTables, objective: str, omega: float) -> Improve:
    """Step 2's `improve` for optim.search.local_search: the candidate with the best exact-cost objective (ties within
    1e-12 relative: the lower latency) if it is strictly better in (objective, then latency)."""
    def improve(cand: np.ndarray, cl: np.ndarray, g: np.ndarray, lam: int) -> Optional[int]:
        st = stage_times(cand, cl, t)
        obj = objective_values(st, objective, omega)
        i = best_index(obj, st.latency_ms)
        cur = stage_times(g[None], np.array([lam]), t)
        cur_obj = float(objective_values(cur, objective, omega)[0])
        tol = 1e-12 * max(1.0, abs(cur_obj))
        better = obj[i] < cur_obj - tol or (obj[i] <= cur_obj + tol and st.latency_ms[i] < cur.latency_ms[0] - tol)
        return int(i) if better else None
    return improve


def gibbs_loss_grad(x: np.ndarray, objective: str, omega: float, tau: float, scale: float
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From stage times x (R, S, stages) in units of `scale` at each of S splits: the per-split objective F (smooth
    maximum over the stages), the loss -tau * logsumexp(-F / tau) (R,), the Gibbs split distribution q (R, S) and
    d loss / d (stage time in ms) (R, S, stages)."""
    if objective == 'latency':
        f, df = x.sum(-1), np.ones_like(x)
    else:
        m = x.max(-1, keepdims=True)
        w = np.exp((x - m) / tau)
        per = m[..., 0] + tau * np.log(w.sum(-1))
        w = w / w.sum(-1, keepdims=True)
        f, df = (per, w) if objective == 'throughput' else (omega * x.sum(-1) + (1 - omega) * per,
                                                             omega + (1 - omega) * w)
    mn = f.min(-1, keepdims=True)
    a = np.exp(-(f - mn) / tau)
    loss = mn[:, 0] - tau * np.log(a.sum(-1))
    q = a / a.sum(-1, keepdims=True)
    return loss, q, q[..., None] * df / scale


def check_settings(solver: str, objective: str, omega: float, steps: int, restarts: int, lr: float,
                   tau_start: float, tau_end: float, rng: Optional[np.random.Generator]) -> None:
    """CostError unless the relaxed solver's settings make sense and a seeded Generator is given."""
    check_objective(objective, omega)
    if steps < 1 or restarts < 1 or not lr > 0 or not (tau_start >= tau_end > 0):
        raise CostError(f'optim: expected steps >= 1, restarts >= 1, lr > 0 and tau_start >= tau_end > 0; got '
                        f'steps={steps}, restarts={restarts}, lr={lr}, tau_start={tau_start}, tau_end={tau_end}')
    if rng is None:
        raise CostError(f'{solver} needs an explicit numpy Generator (seed it from the config)')


def adam_descent(theta: np.ndarray, value_grad, steps: int, lr: float, tau_start: float, tau_end: float,
                 history_points: int) -> Tuple[np.ndarray, np.ndarray, List[List[float]], int]:
    """Adam (torch.optim.Adam's defaults) on the layout logits theta (..., R, N, 14) with tau annealed geometrically;
    value_grad(theta, tau) -> (loss (R,) ms, grad, q).  Returns (theta, the last q, loss curves per restart sampled
    every `every` steps, every)."""
    m1, m2 = np.zeros_like(theta), np.zeros_like(theta)
    b1, b2, eps = 0.9, 0.999, 1e-8
    ratio = tau_end / tau_start
    every = max(1, steps // max(1, history_points))
    curves: List[List[float]] = [[] for _ in range(theta.shape[-3])]
    q = None
    for step in range(steps):
        tau = tau_start * ratio ** (step / max(1, steps - 1))
        loss, grad, q = value_grad(theta, tau)
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        theta = theta - lr / (1 - b1 ** (step + 1)) * m1 / (np.sqrt(m2 / (1 - b2 ** (step + 1))) + eps)
        if step % every == 0 or step == steps - 1:
            for r, v in enumerate(loss):
                curves[r].append(float(v))
    return theta, q, curves, every


def relaxed_value_grad(theta: np.ndarray, rt: RelaxTables, objective: str, omega: float, tau: float
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step-2 loss -tau * logsumexp(-F / tau) (F = split_objective, layouts p = masked_softmax(theta, tau)
    per side) and its analytic gradient, in numpy: (loss (R,), d loss / d theta (2, R, N, 14), q (R, N + 1)).

    theta is (2, R, N, 14): [0] edge and [1] server layout logits of R restarts.  Equal to autograd through
    `split_objective` and `gibbs_split` (tests/test_relax.py checks it); numpy because the tensors are tiny and a
    step costs tens of microseconds instead of the milliseconds of torch's per-op overhead."""
    mask, edge, server = rt.mask.numpy(), rt.edge.numpy(), rt.server.numpy()
    z = np.where(mask, theta / tau, -np.inf)
    ez = np.exp(z - z.max(-1, keepdims=True))
    p = ez / ez.sum(-1, keepdims=True)
    e = (p[0] * edge).sum(-1)  # (R, N) expected block times
    s = (p[1] * server).sum(-1)
    zero = np.zeros((e.shape[0], 1))
    t_edge = np.concatenate([zero, np.cumsum(e, -1)], -1) + rt.edge_head.numpy()
    t_server = np.concatenate([np.cumsum(s[:, ::-1], -1)[:, ::-1], zero], -1) + rt.server_head.numpy()
    x = np.stack([t_edge, np.broadcast_to(rt.link.numpy(), t_edge.shape), t_server], -1) / rt.scale  # (R, N+1, 3)
    loss, q, g = gibbs_loss_grad(x, objective, omega, tau, rt.scale)  # g: d loss / d (T_edge, T_link, T_server)
    d_e = np.cumsum(g[..., 0][:, ::-1], -1)[:, ::-1][:, 1:]  # block k is on the edge for every split > k
    d_s = np.cumsum(g[..., 2], -1)[:, :-1]  # and on the server for every split <= k
    dp = np.stack([d_e[..., None] * edge, d_s[..., None] * server])
    grad = p * (dp - (p * dp).sum(-1, keepdims=True)) / tau
    return loss, grad, q


def solve_relaxed(t: CostTables, valid: np.ndarray, objective: str = 'throughput', omega: float = 0.5,
                  steps: int = 300, restarts: int = 4, lr: float = 0.1, tau_start: float = 2.0,
                  tau_end: float = 0.001, rng: Optional[np.random.Generator] = None, init_std: float = 1.0,
                  search: bool = True, max_rounds: int = 200, history_points: int = 50) -> RelaxResult:
    """Solve step 2 by the relaxed problem (module docstring) for a fixed kept set given as the `valid` mask.
    Deterministic for the state of `rng` (explicit: seed it from the config)."""
    check_settings('solve_relaxed', objective, omega, steps, restarts, lr, tau_start, tau_end, rng)
    t0 = time.perf_counter()
    valid = check_valid(t, valid)
    rt = relax_tables(t, valid)
    n = t.num_blocks
    theta = init_std * rng.standard_normal((2, restarts, n, valid.shape[1]))  # [0] edge, [1] server logits

    def value_grad(th: np.ndarray, tau: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        loss, grad, q = relaxed_value_grad(th, rt, objective, omega, tau)
        return loss * rt.scale, grad, q
    theta, q, curves, every = adam_descent(theta, value_grad, steps, lr, tau_start, tau_end, history_points)
    side_g = np.where(valid, theta, -np.inf).argmax(-1)  # (2, R, N)
    arg_l = q.argmax(-1)
    on_edge = np.arange(n)[None, :] < arg_l[:, None]
    arg_g = np.where(on_edge, side_g[0], side_g[1])
    st = stage_times(arg_g, arg_l, t)
    gd_obj = objective_values(st, objective, omega)
    history, finals = [], []
    status = 'converged'
    improve = exact_improvement(t, objective, omega)
    for r in range(restarts):
        if search:
            g, lam, moves, s = local_search(arg_g[r], int(arg_l[r]), valid, improve, max_rounds)
            status = 'round_limit' if s != 'converged' else status  # step 2's artifact word (docs/artifacts.md)
        else:
            g, lam, moves = arg_g[r], int(arg_l[r]), 0
        final = float(objective_values(stage_times(g[None], np.array([lam]), t), objective, omega)[0])
        finals.append((g, lam, final))
        history.append({'restart': r, 'loss_every_steps': every, 'relaxed_loss_ms': curves[r],
                        'gd_lam': int(arg_l[r]), 'gd_objective_ms': float(gd_obj[r]),
                        'local_search_moves': int(moves), 'final_lam': lam, 'final_objective_ms': final})
    lat = stage_times(np.stack([f[0] for f in finals]), np.array([f[1] for f in finals]), t).latency_ms
    best = best_index(np.array([f[2] for f in finals]), lat)
    gd_best = best_index(gd_obj, st.latency_ms)
    g, lam, final = finals[best]
    return RelaxResult([int(x) for x in g], int(lam), final, describe(g, lam, t, objective, omega),
                       [int(x) for x in arg_g[gd_best]], int(arg_l[gd_best]), float(gd_obj[gd_best]), int(best),
                       history, status, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# Chains of K devices (docs/design.md#device-chains)
# ----------------------------------------------------------------------------------------------------------
#
# The same relaxation with one layout softmax per block and DEVICE (theta is (K, R, N, 14)) and the split softmax
# over every split vector (cost.split_vectors, S = C(N + K - 1, K - 1) of them), again solved exactly by the Gibbs
# distribution at every step.  Device j's expected time at split vector s is C_j[b_{j+1}(s)] - C_j[b_j(s)] (+ its
# head where it runs block N - 1), C_j the prefix sums of its expected block times and b the bounds
# (0, lam_1, ..., lam_{K-1}, N): a product with the (S, N + 1) incidence matrix A_j = onehot(b_{j+1}) - onehot(b_j),
# and the gradient flows back through A_j's transpose.  For K = 2 this is the problem of `relaxed_value_grad`
# (solve_relaxed keeps its own faster code for K = 2: its artifacts stay as they were).

@dataclass(frozen=True)
class ChainRelaxTables:
    """A chain's LUT for the relaxed problem (numpy; invalid layouts: time 0, mask False)."""
    device: np.ndarray  # (K, N, 14) ms
    mask: np.ndarray  # (N, 14) bool
    vectors: np.ndarray  # (S, K - 1) split vectors
    incidence: np.ndarray  # (K, S, N + 1): A_j
    fixed: np.ndarray  # (S, 2K - 1) ms: the heads in the device columns, the link occupancies in the link columns
    scale: float  # ms


def chain_relax_tables(c: ChainTables, valid: np.ndarray) -> ChainRelaxTables:
    valid = check_chain_valid(c, valid)
    n, k = c.num_blocks, c.num_devices
    vectors = split_vectors(n, k)
    s = len(vectors)
    bounds = np.concatenate([np.zeros((s, 1), np.int64), vectors, np.full((s, 1), n, np.int64)], 1)
    inc = np.zeros((k, s, n + 1))
    fixed = np.zeros((s, 2 * k - 1))
    rows = np.arange(s)
    for j in range(k):
        inc[j, rows, bounds[:, j + 1]] += 1.0
        inc[j, rows, bounds[:, j]] -= 1.0
        fixed[:, 2 * j] = np.where((bounds[:, j + 1] == n) & (bounds[:, j] < n), c.head_ms[j], 0.0)
        if j < k - 1:
            fixed[:, 2 * j + 1] = c.link_ms(j)[vectors[:, j]]
    device = np.stack([np.where(valid, a, 0.0) for a in c.device_ms])
    uniform = device.sum(-1) / valid.sum(1)  # (K, N) block times under uniform layouts
    cum = np.concatenate([np.zeros((k, 1)), np.cumsum(uniform, 1)], 1)  # (K, N + 1)
    x = fixed.copy()
    x[:, 0::2] += np.einsum('ksi,ki->sk', inc, cum)
    big = x.max(1).mean()
    return ChainRelaxTables(device, valid, vectors, inc, fixed, float(big) if big > 0 else 1.0)


def chain_relaxed_value_grad(theta: np.ndarray, rt: ChainRelaxTables, objective: str, omega: float, tau: float
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chain loss -tau * logsumexp(-F / tau) over the split vectors and its analytic gradient:
    (loss (R,), d loss / d theta (K, R, N, 14), q (R, S)); theta (K, R, N, 14) holds each device's layout logits."""
    z = np.where(rt.mask, theta / tau, -np.inf)
    ez = np.exp(z - z.max(-1, keepdims=True))
    p = ez / ez.sum(-1, keepdims=True)
    e = (p * rt.device[:, None]).sum(-1)  # (K, R, N) expected block times
    cum = np.concatenate([np.zeros(e.shape[:2] + (1,)), np.cumsum(e, -1)], -1)  # (K, R, N + 1)
    dev = np.einsum('ksi,kri->rsk', rt.incidence, cum)  # (R, S, K)
    x = np.broadcast_to(rt.fixed, dev.shape[:2] + rt.fixed.shape[1:]).copy()
    x[..., 0::2] += dev
    x /= rt.scale  # (R, S, 2K - 1)
    loss, q, g = gibbs_loss_grad(x, objective, omega, tau, rt.scale)
    d_cum = np.einsum('ksi,rsk->kri', rt.incidence, g[..., 0::2])  # (K, R, N + 1)
    d_e = np.cumsum(d_cum[..., ::-1], -1)[..., ::-1][..., 1:]  # block k is in C_j[i] for every i > k
    dp = d_e[..., None] * rt.device[:, None]
    grad = p * (dp - (p * dp).sum(-1, keepdims=True)) / tau
    return loss, grad, q


@dataclass
class ChainRelaxResult:
    gammas: List[int]  # chosen layout per block (after local search)
    lams: List[int]  # chosen split vector
    objective_ms: float  # exact objective of the choice, ms per batch
    stages: Dict[str, object]  # cost.chain_describe() of the choice
    gd_gammas: List[int]  # best restart's argmax before the local search
    gd_lams: List[int]
    gd_objective_ms: float  # exact objective of that argmax
    restart: int
    history: List[Dict[str, object]] = field(default_factory=list)
    status: str = 'converged'  # converged | round_limit
    wall_s: float = 0.0


def chain_local_search(c: ChainTables, gammas: np.ndarray, lams: np.ndarray, valid: np.ndarray, objective: str,
                       omega: float, vectors: np.ndarray, max_moves: int = 200) -> Tuple[np.ndarray, np.ndarray, int,
                                                                                         str]:
    """Best-improvement moves under the exact chain cost: every single-block layout change (split kept) and every
    split vector in `vectors` (layouts kept); strictly better in (objective, then latency).  Returns
    (gammas, lams, moves, 'converged' | 'move_limit')."""
    g = np.asarray(gammas, dtype=np.int64).copy()
    lam = np.asarray(lams, dtype=np.int64).copy()
    ks, gs = np.nonzero(valid)
    for moves in range(max_moves):
        cand = np.repeat(g[None], ks.size + len(vectors), 0)
        cand[np.arange(ks.size), ks] = gs
        cl = np.concatenate([np.repeat(lam[None], ks.size, 0), vectors])
        st = chain_stage_times(cand, cl, c)
        obj = objective_values(st, objective, omega)
        i = best_index(obj, st.latency_ms)
        cur = chain_stage_times(g[None], lam[None], c)
        cur_obj = float(objective_values(cur, objective, omega)[0])
        tol = 1e-12 * max(1.0, abs(cur_obj))
        if not (obj[i] < cur_obj - tol or (obj[i] <= cur_obj + tol and st.latency_ms[i] < cur.latency_ms[0] - tol)):
            return g, lam, moves, 'converged'
        g, lam = cand[i].copy(), cl[i].copy()
    return g, lam, max_moves, 'move_limit'


def solve_chain_relaxed(c: ChainTables, valid: np.ndarray, objective: str = 'throughput', omega: float = 0.5,
                        steps: int = 300, restarts: int = 4, lr: float = 0.1, tau_start: float = 2.0,
                        tau_end: float = 0.001, rng: Optional[np.random.Generator] = None, init_std: float = 1.0,
                        search: bool = True, max_rounds: int = 200, history_points: int = 50) -> ChainRelaxResult:
    """Solve the chain problem by the relaxation above (Adam on the layout logits, annealed tau, Gibbs split over
    the split vectors), then each restart's argmax by `chain_local_search`; the best restart wins.  Deterministic
    for the state of `rng`."""
    check_settings('solve_chain_relaxed', objective, omega, steps, restarts, lr, tau_start, tau_end, rng)
    t0 = time.perf_counter()
    rt = chain_relax_tables(c, valid)
    valid = rt.mask
    n, k = c.num_blocks, c.num_devices
    theta = init_std * rng.standard_normal((k, restarts, n, valid.shape[1]))

    def value_grad(th: np.ndarray, tau: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        loss, grad, q = chain_relaxed_value_grad(th, rt, objective, omega, tau)
        return loss * rt.scale, grad, q
    theta, q, curves, every = adam_descent(theta, value_grad, steps, lr, tau_start, tau_end, history_points)
    dev_g = np.where(valid, theta, -np.inf).argmax(-1)  # (K, R, N)
    arg_l = rt.vectors[q.argmax(-1)]  # (R, K - 1)
    device = (np.arange(n)[None, :, None] >= arg_l[:, None, :]).sum(-1)  # (R, N)
    arg_g = np.take_along_axis(dev_g, device[None], 0)[0]
    st = chain_stage_times(arg_g, arg_l, c)
    gd_obj = objective_values(st, objective, omega)
    history, finals = [], []
    status = 'converged'
    for r in range(restarts):
        if search:
            g, lam, moves, s = chain_local_search(c, arg_g[r], arg_l[r], valid, objective, omega, rt.vectors,
                                                  max_rounds)
            status = 'round_limit' if s != 'converged' else status
        else:
            g, lam, moves = arg_g[r], arg_l[r], 0
        final = float(objective_values(chain_stage_times(g[None], lam[None], c), objective, omega)[0])
        finals.append((g, lam, final))
        history.append({'restart': r, 'loss_every_steps': every, 'relaxed_loss_ms': curves[r],
                        'gd_lams': [int(x) for x in arg_l[r]], 'gd_objective_ms': float(gd_obj[r]),
                        'local_search_moves': int(moves), 'final_lams': [int(x) for x in lam],
                        'final_objective_ms': final})
    lat = chain_stage_times(np.stack([f[0] for f in finals]), np.stack([f[1] for f in finals]), c).latency_ms
    best = best_index(np.array([f[2] for f in finals]), lat)
    gd_best = best_index(gd_obj, st.latency_ms)
    g, lam, final = finals[best]
    return ChainRelaxResult([int(x) for x in g], [int(x) for x in lam], final,
                            chain_describe(g, lam, c, objective, omega), [int(x) for x in arg_g[gd_best]],
                            [int(x) for x in arg_l[gd_best]], float(gd_obj[gd_best]), int(best), history, status,
                            time.perf_counter() - t0)
