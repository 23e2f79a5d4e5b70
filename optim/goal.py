"""Step 3's goal program (docs/design.md#goal-program): pure functions and two solvers, array in / array out.

Decision per block k: a layout gamma_k among the block's measurable layouts.  A layout fixes the kept branch set
S(gamma) (hyper_repvgg.LAYOUTS), so choosing gamma_k chooses alpha's mask and gamma together: the branches of the
block outside S(gamma_k) are pruned, every block keeps >= 1 branch and the layout is valid for its kept set by
construction.  Plus the split lambda in 0..N.

Goals, pre-emptive (lexicographic) priority order, each with a deviation variable (level 0 only in pruning rounds:
at most `max_new_prunes` branches pruned beyond the previous round's, a hard limit in the MILP):

1. accuracy     A(u) + xi_A >= floor (= A_ref - eps);  A(u) = a_ref - sum_k loss[k, gamma_k]  (additive surrogate:
                loss[k, gamma] = sum of the sensitivities of the branches gamma prunes in block k);  minimize xi_A.
2. throughput   maximize B / period (period = max(T_edge, T_link, T_server), optim/cost.py), i.e. minimize
                period / period_scale; or, with a target Theta_t > 0, minimize xi_P = max(0, period - B * 1000 /
                Theta_t) / period_scale (then period itself at the last level).  The tie-breakers enter this level with
                the small weight w:  + w * (R + L),  L = the surrogate loss in points plus a small cost per pruned
                branch (GoalProblem.tie_loss: no pruning that buys no throughput), R = the roofline term, the mean
                over blocks of |log10(I[k, gamma_k] / knee_side)|,
                I = FLOPs / (weight + activation bytes) of the block's layout at batch B, knee_side the ridge point
                (peak FLOP/s / memory bandwidth) of the side the block runs on.
3. edge memory  (optional) sum_{k < lambda} weight_bytes[k, gamma_k] <= budget;  minimize xi_M (bytes, / budget).

`evaluate` / `goal_values` score configurations (the one evaluator both solvers report through);
`solve_milp` is exact (HiGHS through scipy.optimize.milp, one MILP per priority level, earlier levels fixed);
`solve_gd` relaxes the choice (per-branch keep probabilities x per-kept-set layout softmaxes, a split softmax,
annealed temperature, penalty weights by priority), rounds, repairs and improves by local search under the
exact evaluator.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hyper_repvgg import BRANCHES, LAYOUTS, NUM_LAYOUTS
from optim.cost import (STAGES, ChainTables, CostError, CostTables, chain_stage_times, check_splits, gap_pct,
                        hop_ranges, split_vectors, stage_times)
from optim.relax import RelaxTables, expected_stage_times, relax_tables, smooth_max
from optim import search
from optim.search import Improve

LEVELS = ('xi_new_prunes', 'xi_accuracy_pct', 'throughput_objective', 'xi_memory', 'period_rel')  # key order
TOL = 1e-7  # absolute tolerance when comparing / fixing priority levels (all levels are O(1) numbers)
# (14, 3) bool: layout gamma keeps branch b
LAYOUT_BRANCHES = np.array([[b in lay.branches for b in BRANCHES] for lay in LAYOUTS], dtype=bool)


class GoalError(CostError):
    """Goal-program input that does not fit (shapes, weights, budgets)."""


@dataclass(frozen=True)
class GoalProblem:
    """One instance of the goal program.  Tables are (N, 14) over (block, layout); `allowed` marks the choices."""
    tables: CostTables  # stage-time LUT arrays (optim/cost.py)
    allowed: np.ndarray  # (N, 14) bool: layout gamma may be chosen for block k (measurable on both sides)
    loss: np.ndarray  # (N, 14) surrogate accuracy loss of choosing gamma for block k, accuracy points
    a_ref: float  # surrogate accuracy with nothing pruned, %
    floor: float  # accuracy goal A_ref - eps, %
    weight_bytes: np.ndarray  # (N, 14) bytes of the deployed kernels of block k in layout gamma
    roof_edge: np.ndarray  # (N, 14) |log10(intensity / knee_edge)|
    roof_server: np.ndarray  # (N, 14) |log10(intensity / knee_server)|
    period_scale_ms: float  # period normalization (e.g. the unpruned optimum's period), ms
    roofline_weight: float = 0.0  # w of the roofline tie-breaker
    throughput_target_fps: float = 0.0  # 0 = maximize throughput
    memory_budget_bytes: float = 0.0  # 0 = no edge-memory goal
    new_prunes: Optional[np.ndarray] = None  # (N, 14) branches gamma prunes that the previous round kept (None: 0)
    max_new_prunes: int = 0  # progressive pruning's step: at most this many new prunes (0 = no limit)

    def __post_init__(self) -> None:
        n = self.tables.num_blocks
        for name in ('allowed', 'loss', 'weight_bytes', 'roof_edge', 'roof_server'):
            if np.shape(getattr(self, name)) != (n, NUM_LAYOUTS):
                raise GoalError(f'goal problem: {name} must be ({n}, {NUM_LAYOUTS}), got {np.shape(getattr(self, name))}')
        if not self.allowed.any(1).all():
            raise GoalError(f'goal problem: block {int(np.flatnonzero(~self.allowed.any(1))[0])} has no allowed layout')
        for name in ('loss', 'weight_bytes', 'roof_edge', 'roof_server'):
            a = getattr(self, name)[self.allowed]
            if not np.isfinite(a).all() or (a < 0).any():
                raise GoalError(f'goal problem: {name} must be finite and >= 0 on the allowed layouts')
        if not (self.period_scale_ms > 0 and np.isfinite(self.period_scale_ms)):
            raise GoalError(f'goal problem: period_scale_ms must be > 0, got {self.period_scale_ms}')
        for name in ('roofline_weight', 'throughput_target_fps', 'memory_budget_bytes'):
            if not (getattr(self, name) >= 0 and np.isfinite(getattr(self, name))):
                raise GoalError(f'goal problem: {name} must be a finite number >= 0, got {getattr(self, name)}')
        if self.new_prunes is not None and np.shape(self.new_prunes) != (n, NUM_LAYOUTS):
            raise GoalError(f'goal problem: new_prunes must be ({n}, {NUM_LAYOUTS}), got {np.shape(self.new_prunes)}')
        if self.max_new_prunes < 0:
            raise GoalError(f'goal problem: max_new_prunes must be >= 0, got {self.max_new_prunes}')
        if not (np.isfinite(self.a_ref) and np.isfinite(self.floor)):
            raise GoalError('goal problem: a_ref and floor must be finite accuracies')

    @property
    def num_blocks(self) -> int:
        return self.tables.num_blocks

    @property
    def have(self) -> np.ndarray:
        """(N, 3) bool: block k has branch b (some allowed layout keeps it)."""
        return (self.allowed[:, :, None] & LAYOUT_BRANCHES[None]).any(1)

    @property
    def tie_loss(self) -> np.ndarray:
        """(N, 14) the accuracy side of the throughput goal's tie-breaker: the surrogate loss (points) plus, per
        pruned branch, a cost just above the largest change one block's layout can make to the roofline term.  So
        no branch is pruned for the roofline term alone, nor for nothing: measured sensitivities of ~0 on a small
        validation split are noise, and a prune that buys no throughput only risks accuracy."""
        prunes = (self.have[:, None, :] & ~LAYOUT_BRANCHES[None]).sum(-1)  # (N, 14)
        swing = max(float((np.where(self.allowed, r, -np.inf).max(1) - np.where(self.allowed, r, np.inf).min(1)).max())
                    for r in (self.roof_edge, self.roof_server))
        return self.loss + (swing / self.num_blocks + 0.01) * prunes

    @property
    def loss_budget(self) -> float:
        """Surrogate loss allowed before xi_A > 0 (a_ref - floor; negative when the floor is above a_ref)."""
        return float(self.a_ref - self.floor)

    @property
    def target_period_ms(self) -> Optional[float]:
        t = self.throughput_target_fps
        return self.tables.batch * 1e3 / t if t > 0 else None


# ----------------------------------------------------------------------------------------------------------
# Building the tables
# ----------------------------------------------------------------------------------------------------------

def available_mask(available: Sequence[Sequence[str]]) -> np.ndarray:
    """(N, 3) bool: block k has branch b (D, O, I)."""
    return np.array([[b in set(av) for b in BRANCHES] for av in available], dtype=bool)


def loss_table(sens: np.ndarray, available: Sequence[Sequence[str]]) -> np.ndarray:
    """(N, 14) surrogate loss: sum of sens[k, b] over the branches block k has and layout gamma prunes.
    NaN where gamma needs a branch the block lacks or prunes a branch whose sensitivity is NaN (not measured: such
    a branch stays kept).  `sens` (N, 3) in accuracy points (branches the block lacks are ignored)."""
    have = available_mask(available)
    sens = np.where(have, np.asarray(sens, dtype=np.float64), 0.0)
    pruned = have[:, None, :] & ~LAYOUT_BRANCHES[None, :, :]  # (N, 14, 3)
    out = np.where(pruned, sens[:, None, :], 0.0).sum(-1)  # NaN where a branch without a sensitivity is pruned
    fits = ~(LAYOUT_BRANCHES[None, :, :] & ~have[:, None, :]).any(-1)
    return np.where(fits, out, np.nan)


def worth_measuring(t: CostTables, available: Sequence[Sequence[str]], min_saving_pct: float) -> np.ndarray:
    """(N, 3) bool: branches whose removal from the block's full branch set makes its fastest layout faster by at
    least `min_saving_pct` % on the edge or on the server (for RepVGG: the 3x3 branch; removing the 1x1 or the
    identity leaves a fused 3x3 kernel of the same cost).  Only those need a sensitivity."""
    have = available_mask(available)
    out = np.zeros_like(have)
    for k, av in enumerate(available):
        full = [g for g in range(NUM_LAYOUTS) if LAYOUTS[g].branches == frozenset(av)]
        for i, b in enumerate(BRANCHES):
            if not have[k, i] or len(av) < 2:
                continue
            less = [g for g in range(NUM_LAYOUTS) if LAYOUTS[g].branches == frozenset(av) - {b}]
            for a in (t.edge_ms, t.server_ms):
                if np.nanmin(a[k, less]) <= (1 - min_saving_pct / 100.0) * np.nanmin(a[k, full]):
                    out[k, i] = True
    return out


def roofline_distance(flops: np.ndarray, weight_bytes: np.ndarray, act_bytes: np.ndarray, knee: float,
                      batch: int = 1) -> np.ndarray:
    """|log10(I / knee)| per (block, layout), I = B * FLOPs / (weight bytes + B * activation bytes); NaN stays NaN."""
    if not knee > 0:
        raise GoalError(f'roofline knee must be > 0 flop/byte, got {knee}')
    intensity = batch * flops / (weight_bytes + batch * act_bytes)
    return np.abs(np.log10(intensity / knee))


def build_problem(t: CostTables, sens: np.ndarray, available: Sequence[Sequence[str]], stats: Dict[str, Any],
                  a_ref: float, epsilon: float, period_scale_ms: float, roofline_weight: float = 0.0,
                  throughput_target_fps: float = 0.0, memory_budget_bytes: float = 0.0,
                  floor: Optional[float] = None, pruned_before: Optional[np.ndarray] = None,
                  max_new_prunes: int = 0) -> GoalProblem:
    """A GoalProblem from the cost tables, per-branch sensitivities (N, 3) and timing.lut.block_stats(lut);
    `pruned_before` (N, 3) bool with `max_new_prunes` > 0 limits how many more branches one round may prune."""
    loss = loss_table(sens, available)
    allowed = np.isfinite(loss) & t.valid
    roof_e = roofline_distance(stats['flops'], stats['weight_bytes'], stats['act_bytes'], stats['knee_edge'], t.batch)
    roof_s = roofline_distance(stats['flops'], stats['weight_bytes'], stats['act_bytes'], stats['knee_server'],
                               t.batch)
    z = np.zeros_like(loss)
    new = None
    if pruned_before is not None:
        have = available_mask(available)
        fresh = have & ~np.asarray(pruned_before, dtype=bool)  # (N, 3) kept so far
        new = (fresh[:, None, :] & ~LAYOUT_BRANCHES[None, :, :]).sum(-1).astype(np.float64)
    return GoalProblem(t, allowed, np.where(allowed, loss, 0.0), float(a_ref),
                       float(a_ref - epsilon if floor is None else floor),
                       np.where(allowed, np.nan_to_num(stats['weight_bytes']), 0.0), np.where(allowed, roof_e, z),
                       np.where(allowed, roof_s, z), float(period_scale_ms), float(roofline_weight),
                       float(throughput_target_fps), float(memory_budget_bytes), new, int(max_new_prunes))


def with_floor(p: GoalProblem, floor: float) -> GoalProblem:
    """The same problem with another accuracy floor (Pareto sweeps)."""
    from dataclasses import replace
    return replace(p, floor=float(floor))


# ----------------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------------

def check_config(p: GoalProblem, gammas: Sequence[int], lam: int) -> None:
    """GoalError unless every gamma_k is an allowed layout of block k and 0 <= lam <= N."""
    g = np.asarray(gammas, dtype=np.int64)
    n = p.num_blocks
    if g.shape != (n,):
        raise GoalError(f'configuration needs {n} layouts, got {g.shape}')
    if not 0 <= int(lam) <= n:
        raise GoalError(f'split lambda={lam} out of range 0..{n}')
    if (g < 0).any() or (g >= NUM_LAYOUTS).any() or not p.allowed[np.arange(n), g].all():
        k = int(np.flatnonzero((g < 0) | (g >= NUM_LAYOUTS) | ~p.allowed[np.arange(n), np.clip(g, 0, 13)])[0])
        raise GoalError(f'layout gamma={int(g[k])} is not an allowed choice for block {k}')


def goal_values(p: GoalProblem, gammas: np.ndarray, lams: np.ndarray,
                chain: Optional[ChainTables] = None) -> Dict[str, np.ndarray]:
    """Vectorized: for M configurations (gammas (M, N), lams (M,)) the stage times, surrogate accuracy, deviations,
    roofline term and the lexicographic levels (LEVELS).

    With `chain` (a K-device ChainTables over the same blocks, docs/design.md#device-chains) lams are (M, K - 1)
    split vectors and the times and period are the chain's (optim.cost.chain_stage_times; extra key 'stages_ms',
    (M, 2K - 1)); pruning is per branch as before, the memory goal counts the blocks on d_1, and the roofline term
    takes the edge knee for the blocks of d_1..d_{K-1} and the server knee for those of d_K (the goal problem holds
    two knees).  Without it: the two-device tables p.tables, unchanged."""
    g = np.atleast_2d(np.asarray(gammas, dtype=np.int64))
    rows = np.arange(p.num_blocks)
    if chain is None:
        lams = np.atleast_1d(np.asarray(lams, dtype=np.int64))
        st = stage_times(g, lams, p.tables)
        period = np.maximum(np.maximum(st.edge_ms, st.link_ms), st.server_ms)
        on_edge = rows[None, :] < lams[:, None]
        on_last = ~on_edge
        times = {'edge_ms': st.edge_ms, 'link_ms': st.link_ms, 'server_ms': st.server_ms}
    else:
        if chain.num_blocks != p.num_blocks:
            raise GoalError(f'the chain has {chain.num_blocks} blocks, the goal problem {p.num_blocks}')
        st = chain_stage_times(g, lams, chain)
        lams = check_splits(lams, chain.num_blocks, chain.num_devices)
        period = st.period_ms
        on_edge = rows[None, :] < lams[:, :1]
        on_last = rows[None, :] >= lams[:, -1:]
        times = {'edge_ms': st.device_ms[:, 0], 'link_ms': st.link_ms.max(1), 'server_ms': st.device_ms[:, -1],
                 'stages_ms': st.stages_ms}
    loss = p.loss[rows, g].sum(1)
    acc = p.a_ref - loss
    xi_a = np.maximum(0.0, p.floor - acc)
    mem = np.where(on_edge, p.weight_bytes[rows, g], 0.0).sum(1)
    roof = np.where(on_last, p.roof_server[rows, g], p.roof_edge[rows, g]).mean(1)
    tp = p.target_period_ms
    xi_p = np.zeros_like(period) if tp is None else np.maximum(0.0, period - tp)
    main = (period if tp is None else xi_p) / p.period_scale_ms
    xi_m = np.maximum(0.0, mem - p.memory_budget_bytes) if p.memory_budget_bytes > 0 else np.zeros_like(mem)
    new = np.zeros_like(period) if p.new_prunes is None else p.new_prunes[rows, g].sum(1)
    xi_new = np.maximum(0.0, new - p.max_new_prunes) if p.max_new_prunes > 0 else np.zeros_like(period)
    return {**times, 'latency_ms': st.latency_ms,
            'throughput_fps': st.throughput_fps, 'bottleneck': st.bottleneck, 'period_ms': period,
            'surrogate_loss_pct': loss, 'accuracy_pct': acc, 'xi_accuracy_pct': xi_a, 'xi_period_ms': xi_p,
            'edge_weight_bytes': mem, 'xi_memory_bytes': xi_m, 'roofline': roof,
            'throughput_objective': main + p.roofline_weight * (roof + p.tie_loss[rows, g].sum(1)),
            'xi_memory': xi_m / max(p.memory_budget_bytes, 1.0), 'period_rel': period / p.period_scale_ms,
            'new_prunes': new, 'xi_new_prunes': xi_new}


def lex_keys(v: Dict[str, np.ndarray]) -> np.ndarray:
    """(M, 5) lexicographic keys (smaller is better) of goal_values' output."""
    return np.stack([np.asarray(v[k], dtype=np.float64) for k in LEVELS], 1)


def lex_better(a: np.ndarray, b: np.ndarray, tol: float = TOL) -> bool:
    """Key a strictly better than key b (levels compared in order, equal within tol)."""
    for x, y in zip(a, b):
        if x < y - tol:
            return True
        if x > y + tol:
            return False
    return False


def lex_best(keys: np.ndarray, tol: float = TOL) -> int:
    """Index of the lexicographically smallest key (ties within tol: the first)."""
    idx = np.arange(keys.shape[0])
    for j in range(keys.shape[1]):
        col = keys[idx, j]
        idx = idx[col <= col.min() + tol]
    return int(idx[0])


def evaluate(p: GoalProblem, gammas: Sequence[int], lam: int) -> Dict[str, Any]:
    """JSON-able evaluation of one configuration: stage times, throughput, surrogate accuracy, deviations,
    edge weight bytes, roofline term and the priority levels."""
    check_config(p, gammas, lam)
    v = goal_values(p, np.asarray(gammas)[None], np.array([lam]))
    out: Dict[str, Any] = {'gammas': [int(x) for x in gammas], 'lam': int(lam)}
    for k, a in v.items():
        out[k] = STAGES[int(a[0])] if k == 'bottleneck' else float(a[0])
    tgt = p.throughput_target_fps
    out['deviations'] = {'xi_accuracy_pct': out['xi_accuracy_pct'],
                         'xi_throughput_fps': max(0.0, tgt - out['throughput_fps']) if tgt > 0 else 0.0,
                         'xi_memory_bytes': out['xi_memory_bytes']}
    out['goals_met'] = {'accuracy': out['xi_accuracy_pct'] <= TOL,
                        'throughput': (out['deviations']['xi_throughput_fps'] <= 1e-9) if tgt > 0 else None,
                        'memory': (out['xi_memory_bytes'] <= 1e-9) if p.memory_budget_bytes > 0 else None}
    out['branches_pruned'] = int(pruned_count(p, gammas))
    return out


def pruned_count(p: GoalProblem, gammas: Sequence[int]) -> int:
    """Branches removed by the layouts (relative to every branch the blocks have)."""
    return int(pruned_mask_of(p, gammas).sum())


def pruned_mask_of(p: GoalProblem, gammas: Sequence[int]) -> np.ndarray:
    """(N, 3) bool: branch b of block k exists (some allowed layout has it) and layout gamma_k drops it."""
    return p.have & ~LAYOUT_BRANCHES[np.asarray(gammas, dtype=np.int64)]


def kept_sets(gammas: Sequence[int]) -> List[List[str]]:
    """Per block the kept branches of its layout, in D, O, I order."""
    return [[b for b in BRANCHES if b in LAYOUTS[int(g)].branches] for g in gammas]


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------

@dataclass
class GoalResult:
    solver: str  # 'gd' | 'milp'
    status: str  # milp: optimal | infeasible (accuracy goal unreachable) | time_limit;  gd: converged | infeasible
    gammas: List[int]
    lam: int
    evaluation: Dict[str, Any]  # evaluate() of the choice
    wall_s: float
    details: Dict[str, Any] = field(default_factory=dict)

    def key(self) -> np.ndarray:
        return np.array([self.evaluation[k] for k in LEVELS])

    def to_dict(self) -> Dict[str, Any]:
        return {'solver': self.solver, 'status': self.status, 'gammas': self.gammas, 'lam': self.lam,
                'objective': self.evaluation['throughput_objective'], 'deviations': self.evaluation['deviations'],
                'evaluation': self.evaluation, 'wall_s': self.wall_s, 'details': self.details}


def compare(gd: Optional[GoalResult], milp: Optional[GoalResult]) -> Dict[str, Any]:
    """The gap of GD to the MILP: accuracy deviation difference and % excess of the throughput level."""
    if gd is None or milp is None:
        return {}
    return {'xi_accuracy_diff_pct': gd.evaluation['xi_accuracy_pct'] - milp.evaluation['xi_accuracy_pct'],
            'objective_gap_pct': gap_pct(gd.evaluation['throughput_objective'],
                                         milp.evaluation['throughput_objective']),
            'period_gap_pct': gap_pct(gd.evaluation['period_ms'], milp.evaluation['period_ms']),
            'throughput_ratio': gd.evaluation['throughput_fps'] / milp.evaluation['throughput_fps'],
            'same_configuration': gd.gammas == milp.gammas and gd.lam == milp.lam}


def best_of(results: Sequence[Optional[GoalResult]]) -> GoalResult:
    """The lexicographically best of the given results (the first on ties)."""
    rs = [r for r in results if r is not None and r.gammas]
    if not rs:
        raise GoalError('no solver returned a configuration')
    return rs[lex_best(np.stack([r.key() for r in rs]))]


# ----------------------------------------------------------------------------------------------------------
# Exact: MILP (HiGHS), one solve per priority level
# ----------------------------------------------------------------------------------------------------------

def undominated(p: GoalProblem, side: str) -> np.ndarray:
    """(N, 14) bool: allowed layouts of each block not dominated on `side` ('edge' | 'server'): another allowed
    layout with time, surrogate loss, tie-break loss, roofline distance (and, on the edge, weight bytes) all <= (one <,
    or all equal and a lower index) can replace it without worsening any level, so the MILP leaves it out."""
    tie = p.tie_loss
    if side == 'edge':
        metrics = [p.tables.edge_ms, p.loss, tie, p.roof_edge, p.weight_bytes]
    else:
        metrics = [p.tables.server_ms, p.loss, tie, p.roof_server]
    return undominated_by(p, metrics)


def undominated_by(p: GoalProblem, metrics: List[np.ndarray]) -> np.ndarray:
    """(N, 14) bool: the allowed layouts of each block that no other allowed layout dominates on `metrics` (each
    (N, 14), smaller is better; p.new_prunes is added when set): undominated's rule, for any device."""
    if p.new_prunes is not None:
        metrics = metrics + [p.new_prunes]
    out = p.allowed.copy()
    for k in range(p.num_blocks):
        idx = np.flatnonzero(p.allowed[k])
        m = np.stack([np.asarray(a[k, idx], dtype=np.float64) for a in metrics], 1)  # (c, metrics)
        le = (m[:, None, :] <= m[None, :, :]).all(-1)  # le[i, j]: i <= j everywhere
        lt = (m[:, None, :] < m[None, :, :]).any(-1)
        eq = le & le.T
        dom = le & (lt | (eq & (idx[:, None] < idx[None, :])))  # dom[i, j]: i dominates j
        np.fill_diagonal(dom, False)
        out[k, idx[dom.any(0)]] = False
    return out


Row = Tuple[Dict[int, float], float, float]  # sparse coefficients {variable: value}, lower, upper


@dataclass(frozen=True)
class MilpVars:
    """The MILP's variable layout: [y_e (me) | y_s (ms) | z (n+1) | P | xi_A | xi_P | xi_M].  y_e[j] = block ke[j]
    on the edge in layout ge[j]; y_s[j] = block ks[j] on the server in layout gs[j] (undominated choices only);
    ye, ys, zo, iP, iA, iXP, iXM are the offsets / indices, nv the variable count."""
    n: int
    ke: np.ndarray
    ge: np.ndarray
    ks: np.ndarray
    gs: np.ndarray
    me: int
    ms: int
    ye: int
    ys: int
    zo: int
    iP: int
    iA: int
    iXP: int
    iXM: int
    nv: int

    @classmethod
    def of(cls, p: GoalProblem) -> 'MilpVars':
        n = p.num_blocks
        ke, ge = np.nonzero(undominated(p, 'edge'))
        ks, gs = np.nonzero(undominated(p, 'server'))
        zo = ke.size + ks.size
        ip = zo + n + 1
        return cls(n, ke, ge, ks, gs, ke.size, ks.size, 0, ke.size, zo, ip, ip + 1, ip + 2, ip + 3, ip + 4)

    def both_sides(self, table: np.ndarray) -> Dict[int, float]:
        """{variable: table[k, gamma]} over every y_e and y_s variable."""
        return {**{self.ye + j: float(table[self.ke[j], self.ge[j]]) for j in range(self.me)},
                **{self.ys + j: float(table[self.ks[j], self.gs[j]]) for j in range(self.ms)}}


def _milp_rows(p: GoalProblem, v: MilpVars) -> List[Row]:
    """The constraint rows: one side and layout per block, edge blocks exactly those before the split, one split,
    P >= each stage time, the accuracy deviation, the new-prune limit, the throughput target and the memory goal."""
    t, n = p.tables, v.n
    rows: List[Row] = []
    for k in range(n):
        se, ss = np.flatnonzero(v.ke == k), np.flatnonzero(v.ks == k)
        rows.append(({**{v.ye + j: 1.0 for j in se}, **{v.ys + j: 1.0 for j in ss}}, 1.0, 1.0))
        rows.append(({**{v.ye + j: 1.0 for j in se}, **{v.zo + lam: -1.0 for lam in range(k + 1, n + 1)}}, 0.0, 0.0))
    rows.append(({v.zo + lam: 1.0 for lam in range(n + 1)}, 1.0, 1.0))
    edge_row = {v.ye + j: float(t.edge_ms[v.ke[j], v.ge[j]]) for j in range(v.me)}
    edge_row[v.zo + n] = float(t.edge_head_ms)
    edge_row[v.iP] = -1.0
    rows.append((edge_row, -np.inf, 0.0))
    srv_row = {v.ys + j: float(t.server_ms[v.ks[j], v.gs[j]]) for j in range(v.ms)}
    srv_row[v.zo + n] = -float(t.server_head_ms)
    srv_row[v.iP] = -1.0
    rows.append((srv_row, -np.inf, -float(t.server_head_ms)))
    link = t.link_ms()
    rows.append(({**{v.zo + lam: float(link[lam]) for lam in range(n + 1)}, v.iP: -1.0}, -np.inf, 0.0))
    rows.append(({**v.both_sides(p.loss), v.iA: -1.0}, -np.inf, p.loss_budget))
    if p.new_prunes is not None and p.max_new_prunes > 0:  # progressive step: a hard limit (0 new is feasible)
        rows.append((v.both_sides(p.new_prunes), -np.inf, float(p.max_new_prunes)))
    tp = p.target_period_ms
    if tp is not None:
        rows.append(({v.iP: 1.0, v.iXP: -1.0}, -np.inf, tp))
    if p.memory_budget_bytes > 0:
        rows.append(({**{v.ye + j: float(p.weight_bytes[v.ke[j], v.ge[j]] / p.memory_budget_bytes)
                         for j in range(v.me)}, v.iXM: -1.0}, -np.inf, 1.0))
    return rows


def _milp_bounds(p: GoalProblem, v: MilpVars) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, integrality): binaries for y and z, continuous P and deviations (unused ones fixed at 0)."""
    lower = np.zeros(v.nv)
    upper = np.ones(v.nv)
    upper[[v.iP, v.iA, v.iXP, v.iXM]] = np.inf
    if p.target_period_ms is None:
        upper[v.iXP] = 0.0
    if p.memory_budget_bytes <= 0:
        upper[v.iXM] = 0.0
    integrality = np.zeros(v.nv)
    integrality[:v.zo + v.n + 1] = 1
    return lower, upper, integrality


def _milp_levels(p: GoalProblem, v: MilpVars) -> List[Tuple[str, np.ndarray]]:
    """The objective of each priority level, in order: xi_A; the throughput level with the tie-breakers (+ w R + w L);
    xi_M (with a budget); P (with a target)."""
    tp, scale = p.target_period_ms, p.period_scale_ms
    roof = np.zeros(v.nv)
    roof[v.ye:v.ye + v.me] = p.roof_edge[v.ke, v.ge] / v.n
    roof[v.ys:v.ys + v.ms] = p.roof_server[v.ks, v.gs] / v.n
    c_acc = np.zeros(v.nv)
    c_acc[v.iA] = 1.0
    c_thr = p.roofline_weight * roof
    tie = p.tie_loss  # tie-breaker: no pruning that buys no throughput
    c_thr[v.ye:v.ye + v.me] += p.roofline_weight * tie[v.ke, v.ge]
    c_thr[v.ys:v.ys + v.ms] += p.roofline_weight * tie[v.ks, v.gs]
    c_thr[v.iP if tp is None else v.iXP] += 1.0 / scale
    levels = [('xi_accuracy_pct', c_acc), ('throughput_objective', c_thr)]
    if p.memory_budget_bytes > 0:
        c_mem = np.zeros(v.nv)
        c_mem[v.iXM] = 1.0
        levels.append(('xi_memory', c_mem))
    if tp is not None:
        c_p = np.zeros(v.nv)
        c_p[v.iP] = 1.0 / scale
        levels.append(('period_rel', c_p))
    return levels


def _milp_matrix(rows: Sequence[Row], extra: Sequence[Tuple[np.ndarray, float]], nv: int) -> Any:
    """scipy LinearConstraint of the rows plus `extra` (objective c, bound): c @ x <= bound (fixed earlier levels)."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_matrix
    a = lil_matrix((len(rows) + len(extra), nv))
    lo, hi = [], []
    for i, (coefs, l_, h_) in enumerate(rows):
        for j, val in coefs.items():
            a[i, j] = val
        lo.append(l_)
        hi.append(h_)
    for i, (c, bound) in enumerate(extra):
        for j in np.flatnonzero(c):
            a[len(rows) + i, j] = c[j]
        lo.append(-np.inf)
        hi.append(bound)
    return LinearConstraint(a.tocsr(), np.array(lo), np.array(hi))


def _milp_by_level(p: GoalProblem, v: MilpVars, deadline: float,
                   mip_rel_gap: float) -> Tuple[str, Optional[np.ndarray], List[Dict[str, Any]]]:
    """Solve the levels in priority order, each with the earlier levels' optima fixed (within TOL); stops at the
    deadline (perf_counter seconds).  Returns (status, the last level's solution or None, per-level records)."""
    return _solve_levels(_milp_rows(p, v), _milp_bounds(p, v), _milp_levels(p, v), v.nv, deadline, mip_rel_gap)


def _solve_levels(rows: Sequence[Row], bounds: Tuple[np.ndarray, np.ndarray, np.ndarray],
                  levels: List[Tuple[str, np.ndarray]], nv: int, deadline: float,
                  mip_rel_gap: float) -> Tuple[str, Optional[np.ndarray], List[Dict[str, Any]]]:
    """_milp_by_level's loop over any MILP's rows, (lower, upper, integrality) and levels (the chain MILP's too)."""
    from scipy.optimize import Bounds, milp
    lower, upper, integrality = bounds
    fixed: List[Tuple[np.ndarray, float]] = []
    status, x, per_level = 'optimal', None, []
    for name, c in levels:
        left = deadline - time.perf_counter()
        if left <= 0:
            status = 'time_limit'
            break
        res = milp(c, constraints=_milp_matrix(rows, fixed, nv), integrality=integrality,
                   bounds=Bounds(lower, upper),
                   options={'time_limit': left, 'mip_rel_gap': mip_rel_gap, 'disp': False})
        per_level.append({'level': name, 'status': int(res.status), 'message': str(res.message),
                          'objective': None if res.x is None else float(res.fun),
                          'dual_bound': getattr(res, 'mip_dual_bound', None)})
        if res.x is None:
            status = 'time_limit' if res.status == 1 else f'error: {res.message}'
            break
        x = res.x
        if res.status != 0:
            status = 'time_limit'
            break
        fixed.append((c, float(res.fun) + TOL * max(1.0, abs(float(res.fun)))))
    return status, x, per_level


def _milp_decode(v: MilpVars, x: np.ndarray) -> Tuple[np.ndarray, int]:
    """(gammas, lam) of a MILP solution: per block the layout of its largest y, the split of the largest z."""
    gammas = np.zeros(v.n, dtype=np.int64)
    best = np.full(v.n, -1.0)
    for kk, gg, y in ((v.ke, v.ge, x[v.ye:v.ye + v.me]), (v.ks, v.gs, x[v.ys:v.ys + v.ms])):
        for j in range(y.size):
            if y[j] > best[kk[j]]:
                best[kk[j]], gammas[kk[j]] = y[j], gg[j]
    return gammas, int(np.argmax(x[v.zo:v.zo + v.n + 1]))


def solve_milp(p: GoalProblem, time_limit_s: float = 60.0, mip_rel_gap: float = 1e-6) -> GoalResult:
    """Pre-emptive goal program as MILPs over binaries y_e[k, gamma] (block k on the edge with layout gamma),
    y_s[k, gamma] (on the server) and z[lambda] (the split), a period variable P >= T_edge, T_link, T_server and the
    deviations.  Levels: min xi_A; fix it; min the throughput level (+ w R); fix it; min xi_M (with a budget);
    fix it; min P (with a target).  `time_limit_s` bounds all levels together."""
    t0 = time.perf_counter()
    v = MilpVars.of(p)
    status, x, per_level = _milp_by_level(p, v, t0 + time_limit_s, mip_rel_gap)
    wall = time.perf_counter() - t0
    sizes = {'variables': v.nv, 'binaries': v.zo + v.n + 1}
    if x is None:
        return GoalResult('milp', status if status != 'optimal' else 'time_limit', [], -1, {}, wall,
                          {'levels': per_level, **sizes})
    gammas, lam = _milp_decode(v, x)
    ev = evaluate(p, gammas, lam)
    if status == 'optimal' and ev['xi_accuracy_pct'] > TOL:
        status = 'infeasible'
    return GoalResult('milp', status, [int(g) for g in gammas], lam, ev, wall,
                      {'levels': per_level, **sizes, 'time_limit_s': time_limit_s})


# ----------------------------------------------------------------------------------------------------------
# Relaxed: gradient descent, rounding, repair, local search
# ----------------------------------------------------------------------------------------------------------

KEPT_SETS = sorted({lay.branches for lay in LAYOUTS}, key=lambda s: (len(s), sorted(BRANCHES.index(b) for b in s)))
GROUP = np.array([KEPT_SETS.index(lay.branches) for lay in LAYOUTS])  # (14,) kept-set index of each layout


def layout_probabilities(phi: torch.Tensor, theta: torch.Tensor, have: torch.Tensor, allowed: torch.Tensor,
                         tau: float) -> torch.Tensor:
    """p[..., k, gamma] from per-branch keep logits phi (..., N, 3) and layout logits theta (..., N, 14).

    Branch b of block k is kept with probability sigmoid(phi / tau), independently; the kept set S has the product
    probability, conditioned on S being non-empty and allowed; within S the layouts share it by softmax(theta / tau)
    over the layouts of S.  Returned as (..., N, 14), rows summing to 1 over the allowed layouts."""
    lk = torch.nn.functional.logsigmoid(phi / tau)
    lp = torch.nn.functional.logsigmoid(-phi / tau)
    inc = torch.tensor(LAYOUT_BRANCHES, dtype=phi.dtype)  # (14, 3)
    hv = have.to(phi.dtype).unsqueeze(-2)  # (..., N, 1, 3)
    log_set = (inc * lk.unsqueeze(-2) * hv).sum(-1) + ((1 - inc) * lp.unsqueeze(-2) * hv).sum(-1)  # (..., N, 14)
    z = (theta / tau).masked_fill(~allowed, -np.inf)
    within = torch.empty_like(z)
    for gi in range(len(KEPT_SETS)):
        cols = torch.tensor(np.flatnonzero(GROUP == gi))
        sub = z[..., cols]
        lse = torch.logsumexp(sub, -1, keepdim=True)
        within[..., cols] = torch.where(torch.isfinite(lse), sub - lse, torch.full_like(sub, -np.inf))
    return torch.softmax((log_set + within).masked_fill(~allowed, -np.inf), -1)


def _relaxed_loss(p_lay: torch.Tensor, q: torch.Tensor, prob: GoalProblem, rt: RelaxTables, rr: RelaxTables,
                  rm: Optional[RelaxTables], loss_t: torch.Tensor, tau: float, w_acc: float,
                  tie_t: torch.Tensor) -> torch.Tensor:
    te, tl, ts = expected_stage_times(p_lay, rt)
    per = smooth_max(torch.stack([te, tl, ts], -1) / prob.period_scale_ms, tau)  # (R, N + 1)
    tp = prob.target_period_ms
    if tp is not None:
        per = torch.nn.functional.softplus((per - tp / prob.period_scale_ms) / tau) * tau
    re, _, rs = expected_stage_times(p_lay, rr)
    f2 = per + prob.roofline_weight * (re + rs)
    exp_loss = (p_lay * loss_t).sum((-1, -2))
    obj = (q * f2).sum(-1) + prob.roofline_weight * (p_lay * tie_t).sum((-1, -2))
    delta = 0.05
    xi_a = delta * torch.nn.functional.softplus((exp_loss - prob.loss_budget) / delta)
    obj = obj + w_acc * xi_a
    if prob.new_prunes is not None and prob.max_new_prunes > 0:
        exp_new = (p_lay * torch.tensor(prob.new_prunes, dtype=p_lay.dtype)).sum((-1, -2))
        obj = obj + w_acc * delta * torch.nn.functional.softplus((exp_new - prob.max_new_prunes) / delta)
    if rm is not None:
        me, _, _ = expected_stage_times(p_lay, rm)
        obj = obj + 0.01 * (q * torch.relu(me - 1.0)).sum(-1)
    return obj


def _aux_tables(a_edge: np.ndarray, a_server: np.ndarray, allowed: np.ndarray) -> RelaxTables:
    n = allowed.shape[0]
    z = torch.zeros(n + 1, dtype=torch.float64)
    return RelaxTables(torch.tensor(np.where(allowed, a_edge, 0.0)), torch.tensor(np.where(allowed, a_server, 0.0)),
                       torch.tensor(allowed), z, z, z, 1.0)


def repair(p: GoalProblem, gammas: np.ndarray, lam: int) -> Tuple[np.ndarray, int, int]:
    """Restore branches until the surrogate accuracy goal holds (when it can): repeatedly take the single-block layout
    change that lowers the surrogate loss with the smallest throughput-level increase per point regained.  Returns
    (gammas, lam, changes)."""
    g = np.asarray(gammas, dtype=np.int64).copy()
    ks, gs = np.nonzero(p.allowed)
    changes = 0
    for _ in range(4 * p.num_blocks):
        cur = goal_values(p, g[None], np.array([lam]))
        if cur['xi_accuracy_pct'][0] <= TOL:
            break
        cand = np.repeat(g[None], ks.size, 0)
        cand[np.arange(ks.size), ks] = gs
        v = goal_values(p, cand, np.full(ks.size, lam))
        gain = cur['surrogate_loss_pct'][0] - v['surrogate_loss_pct']
        ok = gain > 1e-12
        if not ok.any():
            break
        cost = (v['throughput_objective'] - cur['throughput_objective'][0]) / np.where(ok, gain, 1.0)
        i = int(np.flatnonzero(ok)[np.argmin(cost[ok])])
        g = cand[i]
        changes += 1
    return g, lam, changes


def goal_improvement(p: GoalProblem) -> Improve:
    """Step 3's `improve` for optim.search.local_search: the lexicographically best candidate key if it is strictly
    better than the current configuration's."""
    def improve(cand: np.ndarray, cl: np.ndarray, g: np.ndarray, lam: int) -> Optional[int]:
        cur = lex_keys(goal_values(p, g[None], np.array([lam])))[0]
        keys = lex_keys(goal_values(p, cand, cl))
        i = lex_best(keys)
        return i if lex_better(keys[i], cur) else None
    return improve


def local_search(p: GoalProblem, gammas: np.ndarray, lam: int, max_moves: int = 200,
                 pair_moves: bool = True) -> Tuple[np.ndarray, int, int, str]:
    """optim.search.local_search on the goal program's lexicographic key, with pair moves by default.
    Returns (gammas, lam, moves, status 'converged' | 'move_limit')."""
    return search.local_search(gammas, lam, p.allowed, goal_improvement(p), max_moves, pair_moves)


def split_polish(p: GoalProblem, gammas: np.ndarray, lam: int, key: np.ndarray,
                 status: str) -> Tuple[np.ndarray, int, str, int]:
    """Moving lambda often needs several blocks to change at once, which single and pair moves miss: from every other
    split, start at the un-pruned optimum of that split (each block's fastest layout on its side among those that
    prune nothing with a cost), repair and run a short single-move local search; if some split beats `key`, a full
    local search from the best of them.  Returns (gammas, lam, local-search status, improvements found)."""
    t, n = p.tables, p.num_blocks
    free = p.allowed & (p.loss <= 0)  # layouts that prune nothing with a cost
    free[~free.any(1)] = p.allowed[~free.any(1)]
    fast_e = np.argmin(np.where(free, t.edge_ms, np.inf), 1)
    fast_s = np.argmin(np.where(free, t.server_ms, np.inf), 1)
    best_key, polished = key, 0
    for lam2 in range(n + 1):
        if lam2 == lam:
            continue
        g2 = np.where(np.arange(n) < lam2, fast_e, fast_s)
        g2, _, _ = repair(p, g2, lam2)
        g2, lam2, _, _ = local_search(p, g2, lam2, max_moves=3 * n, pair_moves=False)
        k2 = lex_keys(goal_values(p, g2[None], np.array([lam2])))[0]
        if lex_better(k2, best_key):
            best_key, cand = k2, (g2, lam2)
            polished += 1
    if polished:
        gammas, lam, _, status = local_search(p, cand[0], cand[1])
    return gammas, lam, status, polished


def _descend(p: GoalProblem, generator: torch.Generator, steps: int, restarts: int, lr: float,
             tau: Tuple[float, float], w_acc: Tuple[float, float],
             warm_start: Optional[Tuple[Sequence[int], int]]) -> Tuple[np.ndarray, np.ndarray, List[float]]:
    """Adam on the relaxed objective, all restarts in one batch, temperature and accuracy weight annealed
    geometrically from their (start, end); returns the argmax layouts (R, N), splits (R,) and the loss curve."""
    n = p.num_blocks
    rt = relax_tables(p.tables, p.allowed)
    rr = _aux_tables(p.roof_edge / n, p.roof_server / n, p.allowed)
    rm = _aux_tables(p.weight_bytes / p.memory_budget_bytes, np.zeros_like(p.weight_bytes), p.allowed) \
        if p.memory_budget_bytes > 0 else None
    have_t, allowed_t = torch.tensor(p.have), torch.tensor(p.allowed)
    loss_t = torch.tensor(p.loss, dtype=torch.float64)
    tie_t = torch.tensor(p.tie_loss, dtype=torch.float64)
    phi = torch.randn((restarts, n, 3), generator=generator, dtype=torch.float64) + 2.0  # start mostly kept
    theta = torch.randn((restarts, n, NUM_LAYOUTS), generator=generator, dtype=torch.float64)
    psi = torch.randn((restarts, n + 1), generator=generator, dtype=torch.float64)
    if warm_start is not None:
        wg, wl = warm_start
        theta[0] = 0.0
        theta[0, np.arange(n), np.asarray(wg, dtype=np.int64)] = 3.0
        phi[0] = 3.0
        psi[0] = 0.0
        psi[0, int(wl)] = 3.0
    for v in (phi, theta, psi):
        v.requires_grad_(True)
    opt = torch.optim.Adam([phi, theta, psi], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    curve: List[float] = []
    try:
        for step in range(steps):
            frac = step / max(1, steps - 1)
            tau_now = tau[0] * (tau[1] / tau[0]) ** frac
            w_now = w_acc[0] * (w_acc[1] / w_acc[0]) ** frac
            p_lay = layout_probabilities(phi, theta, have_t, allowed_t, tau_now)
            q = torch.softmax(psi / tau_now, -1)
            loss = _relaxed_loss(p_lay, q, p, rt, rr, rm, loss_t, tau_now, w_now, tie_t)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            if step % max(1, steps // 20) == 0 or step == steps - 1:
                curve.append(float(loss.detach().min()))
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        p_lay = layout_probabilities(phi, theta, have_t, allowed_t, tau[1])
        return p_lay.argmax(-1).numpy(), psi.argmax(-1).numpy(), curve


def solve_gd(p: GoalProblem, generator: torch.Generator, steps: int = 300, restarts: int = 4, lr: float = 0.1,
             tau_start: float = 2.0, tau_end: float = 0.02, w_acc_start: float = 1.0, w_acc_end: float = 100.0,
             warm_start: Optional[Tuple[Sequence[int], int]] = None, search: bool = True) -> GoalResult:
    """The relaxed goal program by Adam (module docstring), R restarts in one batch; restart 0 starts at
    `warm_start` (gammas, lam) when given.  Penalty weights by priority: the accuracy deviation's weight grows
    geometrically from w_acc_start to w_acc_end (per accuracy point, against the throughput level ~1), memory has
    0.01.  Each restart's argmax is repaired (accuracy goal) and improved by local search; the best key wins, then a
    split polish re-runs repair + single-move local search from that choice at every other split."""
    if steps < 1 or restarts < 1 or not lr > 0 or not (tau_start >= tau_end > 0):
        raise GoalError(f'gd: expected steps >= 1, restarts >= 1, lr > 0, tau_start >= tau_end > 0; got {steps}, '
                        f'{restarts}, {lr}, {tau_start}, {tau_end}')
    t0 = time.perf_counter()
    arg_g, arg_l, curve = _descend(p, generator, steps, restarts, lr, (tau_start, tau_end), (w_acc_start, w_acc_end),
                                   warm_start)
    finals, hist = [], []
    for r in range(restarts):
        g, lam = arg_g[r].copy(), int(arg_l[r])
        rounded = lex_keys(goal_values(p, g[None], np.array([lam])))[0]
        g, lam, fixes = repair(p, g, lam)
        moves, st = 0, 'converged'
        if search:
            g, lam, moves, st = local_search(p, g, lam)
        finals.append((g, lam, st))
        hist.append({'restart': r, 'rounded_key': rounded.tolist(), 'repair_changes': fixes, 'local_search_moves': moves,
                     'final_key': lex_keys(goal_values(p, g[None], np.array([lam])))[0].tolist()})
    keys = np.stack([np.array(h['final_key']) for h in hist])
    b = lex_best(keys)
    g, lam, st = finals[b]
    polished = 0
    if search:
        g, lam, st, polished = split_polish(p, g, lam, keys[b], st)
    ev = evaluate(p, g, lam)
    status = 'infeasible' if ev['xi_accuracy_pct'] > TOL else 'converged'
    return GoalResult('gd', status, [int(x) for x in g], int(lam), ev, time.perf_counter() - t0,
                      {'restart': b, 'restarts': hist, 'relaxed_loss_curve': curve, 'local_search': st,
                       'split_polish_improvements': polished,
                       'steps': steps, 'warm_start': warm_start is not None})


def solve(p: GoalProblem, solver: str, generator: torch.Generator, gd_kwargs: Optional[Dict[str, Any]] = None,
          time_limit_s: float = 60.0) -> Dict[str, Any]:
    """Run 'gd', 'milp' or 'both'; returns {'gd': GoalResult|None, 'milp': ..., 'best': GoalResult, 'gap': {...}}."""
    if solver not in ('gd', 'milp', 'both'):
        raise GoalError(f'--solver / joint.solver: expected gd, milp or both, got {solver!r}')
    gd = solve_gd(p, generator, **(gd_kwargs or {})) if solver in ('gd', 'both') else None
    mi = solve_milp(p, time_limit_s) if solver in ('milp', 'both') else None
    return {'gd': gd, 'milp': mi, 'best': best_of([mi, gd]), 'gap': compare(gd, mi)}


# ----------------------------------------------------------------------------------------------------------
# Chains of K devices: the goal program's key under the chain cost
# ----------------------------------------------------------------------------------------------------------

def chain_local_search(p: GoalProblem, chain: ChainTables, gammas: Sequence[int], lams: Sequence[int],
                       max_moves: int = 200, move_split: bool = True) -> Tuple[np.ndarray, np.ndarray, int, str]:
    """Step 3 over a chain: best-improvement moves on the goal program's lexicographic key (goal_values with
    `chain`) from (gammas, lams): every single-block change among p.allowed (split kept; pruning per branch as for
    K = 2) and every split vector (layouts kept).  A local optimum, not an exact one (solve_chain_milp is).
    Returns (gammas, lams, moves, 'converged' | 'move_limit')."""
    g = np.asarray(gammas, dtype=np.int64).copy()
    lam = check_splits(np.asarray(lams, dtype=np.int64)[None], chain.num_blocks, chain.num_devices)[0].copy()
    check_config(p, g, int(lam[0]))
    vectors = split_vectors(chain.num_blocks, chain.num_devices) if move_split else lam[None, :0].reshape(
        0, chain.num_devices - 1)
    ks, gs = np.nonzero(p.allowed)
    for moves in range(max_moves):
        cand = np.repeat(g[None], ks.size + len(vectors), 0)
        cand[np.arange(ks.size), ks] = gs
        cl = np.concatenate([np.repeat(lam[None], ks.size, 0), vectors])
        keys = lex_keys(goal_values(p, cand, cl, chain))
        cur = lex_keys(goal_values(p, g[None], lam[None], chain))[0]
        i = lex_best(keys)
        if not lex_better(keys[i], cur):
            return g, lam, moves, 'converged'
        g, lam = cand[i].copy(), cl[i].copy()
    return g, lam, max_moves, 'move_limit'


def chain_problem(p: GoalProblem, chain: ChainTables) -> GoalProblem:
    """`p` with its choices narrowed to the layouts measurable on every device of `chain` (GoalError when a block
    keeps none); the chain's own times enter through goal_values(..., chain)."""
    from dataclasses import replace
    if chain.num_blocks != p.num_blocks:
        raise GoalError(f'the chain has {chain.num_blocks} blocks, the goal problem {p.num_blocks}')
    return replace(p, allowed=p.allowed & chain.valid)


def chain_evaluate(p: GoalProblem, chain: ChainTables, gammas: Sequence[int], lams: Sequence[int]) -> Dict[str, Any]:
    """JSON-able evaluation of one chain configuration under the goal program (as `evaluate`, with the chain's
    cost): every stage by name (ChainTables.names), the blocks per device, period, latency, throughput, bottleneck,
    surrogate accuracy, deviations and the lexicographic key (LEVELS)."""
    g = np.asarray(gammas, dtype=np.int64)
    lam = check_splits(np.asarray(lams, dtype=np.int64)[None], chain.num_blocks, chain.num_devices)[0]
    check_config(p, g, int(lam[0]))
    v = goal_values(p, g[None], lam[None], chain)
    names = chain.names
    out: Dict[str, Any] = {'gammas': [int(x) for x in g], 'lams': [int(x) for x in lam],
                           'hop_blocks': [list(r) for r in hop_ranges(lam, chain.num_blocks)],
                           'stages_ms': {nm: float(x) for nm, x in zip(names, v['stages_ms'][0])},
                           'bottleneck': names[int(v['bottleneck'][0])]}
    for k in ('period_ms', 'latency_ms', 'throughput_fps', 'accuracy_pct', 'surrogate_loss_pct', 'xi_accuracy_pct',
              'edge_weight_bytes', 'xi_memory_bytes', 'roofline', 'new_prunes'):
        out[k] = float(v[k][0])
    out['key'] = {k: float(v[k][0]) for k in LEVELS}
    out['branches_pruned'] = pruned_count(p, g)
    out['kept'] = kept_sets(g)
    return out


def solve_chain_goal(p: GoalProblem, chain: ChainTables, starts: Sequence[Tuple[Sequence[int], Sequence[int]]],
                     max_moves: int = 200, polish_starts: int = 16, polish_vectors: int = 128) -> Dict[str, Any]:
    """Step 3's goal program over a chain of K >= 3 devices.  Moving a split point often needs several blocks to
    change at once, which single moves miss (as split_polish for two devices): so first, for every split vector
    (the `polish_vectors` whose start is best when there are more), each block in its device's fastest layout
    among those that prune nothing with a cost, improved by single-block moves with that split vector kept; the
    `polish_starts` best of these join `starts` (gammas, lams), and from
    each a full chain_local_search; the lexicographically best local optimum wins (ties: the first start).  Returns {'gammas', 'lams', 'status'
    ('local_optimum' | 'move_limit'), 'start', 'starts': [{'moves', 'status', 'key'}], 'wall_s'}: a local
    optimum of the goal program's key, not a proven optimum (solve_chain_milp is exact)."""
    if not starts:
        raise GoalError('solve_chain_goal: no start configuration')
    t0 = time.perf_counter()
    q = chain_problem(p, chain)
    runs, keys = [], []
    n = q.num_blocks
    free = q.allowed & (q.loss <= 0)  # layouts that prune nothing with a cost
    free[~free.any(1)] = q.allowed[~free.any(1)]
    fastest = np.stack([np.argmin(np.where(free, a, np.inf), 1) for a in chain.device_ms])  # (K, N)
    vectors = split_vectors(n, chain.num_devices)
    first = fastest[(np.arange(n)[None, :, None] >= vectors[:, None, :]).sum(-1), np.arange(n)[None, :]]  # (S, N)
    if len(vectors) > polish_vectors:  # the split vectors whose un-pruned start has the best keys
        keep = np.lexsort(lex_keys(goal_values(q, first, vectors, chain)).T[::-1])[:polish_vectors]
        vectors, first = vectors[np.sort(keep)], first[np.sort(keep)]
    polish = []
    for g0, v in zip(first, vectors):  # its un-pruned fastest layouts, then single-block moves (split kept)
        g, lam, _, _ = chain_local_search(q, chain, g0, v, 3 * n, move_split=False)
        polish.append((g, lam, lex_keys(goal_values(q, g[None], lam[None], chain))[0]))
    order = np.lexsort(np.stack([k for _, _, k in polish]).T[::-1])  # lexicographic, the first level first
    starts = list(starts) + [(polish[i][0], polish[i][1]) for i in order[:polish_starts]]
    for g0, l0 in starts:
        g0 = np.where(q.allowed[np.arange(q.num_blocks), np.asarray(g0, dtype=np.int64)], g0,
                      np.argmax(q.allowed, 1))  # a start layout the chain cannot run: the block's first allowed one
        g, lam, moves, status = chain_local_search(q, chain, g0, l0, max_moves)
        keys.append(lex_keys(goal_values(q, g[None], lam[None], chain))[0])
        runs.append((g, lam, moves, status))
    b = lex_best(np.stack(keys))
    g, lam, _, status = runs[b]
    return {'gammas': [int(x) for x in g], 'lams': [int(x) for x in lam],
            'status': 'local_optimum' if status == 'converged' else status, 'start': b,
            'starts': [{'moves': r[2], 'status': r[3], 'key': k.tolist()} for r, k in zip(runs, keys)],
            'wall_s': time.perf_counter() - t0}


def solve_chain_milp(p: GoalProblem, chain: ChainTables, time_limit_s: float = 60.0,
                     mip_rel_gap: float = 1e-6) -> Dict[str, Any]:
    """Step 3's goal program over a chain of K devices, exact: the two-device MILP with a y per (device, block,
    layout) (undominated on that device: its time, loss, tie-break loss, roofline distance under the edge knee for
    d_1..d_{K-1} and the server knee for d_K, weight bytes on d_1) and a z per (split point j, lambda).  Block k runs
    on d_1..d_j iff lam_j > k (sum_{d <= j} y_d[k] = sum_{lam > k} z_j[lam], which also orders the split vector);
    P >= every device's time (its head when it runs block N - 1) and every hop's occupancy at its lambda; the
    accuracy, new-prune, target and memory (d_1) rows and the priority levels as for two devices.  Returns
    {'gammas', 'lams' (empty without a solution), 'status' (optimal | infeasible | time_limit | error: ..),
    'levels', 'variables', 'binaries', 'wall_s'}."""
    t0 = time.perf_counter()
    q = chain_problem(p, chain)
    n, kd = q.num_blocks, chain.num_devices
    tie = q.tie_loss
    ys = []  # per device (blocks, layouts) of its undominated choices
    for d in range(kd):
        roof = q.roof_server if d == kd - 1 else q.roof_edge
        metrics = [np.where(q.allowed, chain.device_ms[d], 0.0), q.loss, tie, roof] + ([q.weight_bytes] if d == 0
                                                                                      else [])
        ys.append(np.nonzero(undominated_by(q, metrics)))
    off = np.cumsum([0] + [y[0].size for y in ys])
    zo = int(off[-1])
    i_p = zo + (kd - 1) * (n + 1)
    i_a, i_xp, i_xm, nv = i_p + 1, i_p + 2, i_p + 3, i_p + 4

    def y_of(d: int, k: Optional[int] = None) -> List[int]:
        ks = ys[d][0]
        return [int(off[d]) + j for j in range(ks.size) if k is None or ks[j] == k]

    def over_all(table: np.ndarray) -> Dict[int, float]:
        return {int(off[d]) + j: float(table[ys[d][0][j], ys[d][1][j]]) for d in range(kd) for j in range(ys[d][0].size)}
    rows: List[Row] = []
    for k in range(n):
        rows.append(({v: 1.0 for d in range(kd) for v in y_of(d, k)}, 1.0, 1.0))
        for j in range(kd - 1):
            row = {v: 1.0 for d in range(j + 1) for v in y_of(d, k)}
            row.update({zo + j * (n + 1) + lam: -1.0 for lam in range(k + 1, n + 1)})
            rows.append((row, 0.0, 0.0))
    for j in range(kd - 1):
        rows.append(({zo + j * (n + 1) + lam: 1.0 for lam in range(n + 1)}, 1.0, 1.0))
        link = chain.link_ms(j)
        rows.append(({**{zo + j * (n + 1) + lam: float(link[lam]) for lam in range(n + 1)}, i_p: -1.0}, -np.inf, 0.0))
    for d in range(kd):
        ks, gs = ys[d]
        row = {int(off[d]) + j: float(chain.device_ms[d][ks[j], gs[j]]) + (float(chain.head_ms[d]) if ks[j] == n - 1
                                                                          else 0.0) for j in range(ks.size)}
        row[i_p] = -1.0
        rows.append((row, -np.inf, 0.0))
    rows.append(({**over_all(q.loss), i_a: -1.0}, -np.inf, q.loss_budget))
    if q.new_prunes is not None and q.max_new_prunes > 0:
        rows.append((over_all(q.new_prunes), -np.inf, float(q.max_new_prunes)))
    tp, scale = q.target_period_ms, q.period_scale_ms
    if tp is not None:
        rows.append(({i_p: 1.0, i_xp: -1.0}, -np.inf, tp))
    if q.memory_budget_bytes > 0:
        rows.append(({**{v: float(q.weight_bytes[ys[0][0][j], ys[0][1][j]] / q.memory_budget_bytes)
                         for j, v in enumerate(y_of(0))}, i_xm: -1.0}, -np.inf, 1.0))
    lower, upper = np.zeros(nv), np.ones(nv)
    upper[[i_p, i_a, i_xp, i_xm]] = np.inf
    upper[i_xp] = upper[i_xp] if tp is not None else 0.0
    upper[i_xm] = upper[i_xm] if q.memory_budget_bytes > 0 else 0.0
    integrality = np.zeros(nv)
    integrality[:i_p] = 1
    c_acc = np.zeros(nv)
    c_acc[i_a] = 1.0
    c_thr = np.zeros(nv)
    for d in range(kd):
        roof = q.roof_server if d == kd - 1 else q.roof_edge
        ks, gs = ys[d]
        c_thr[int(off[d]):int(off[d + 1])] = q.roofline_weight * (roof[ks, gs] / n + tie[ks, gs])
    c_thr[i_p if tp is None else i_xp] += 1.0 / scale
    levels = [('xi_accuracy_pct', c_acc), ('throughput_objective', c_thr)]
    if q.memory_budget_bytes > 0:
        c_mem = np.zeros(nv)
        c_mem[i_xm] = 1.0
        levels.append(('xi_memory', c_mem))
    if tp is not None:
        c_p = np.zeros(nv)
        c_p[i_p] = 1.0 / scale
        levels.append(('period_rel', c_p))
    status, x, per_level = _solve_levels(rows, (lower, upper, integrality), levels, nv,
                                         t0 + time_limit_s, mip_rel_gap)
    out: Dict[str, Any] = {'gammas': [], 'lams': [], 'status': status if x is not None or status != 'optimal'
                           else 'time_limit', 'levels': per_level, 'variables': nv, 'binaries': i_p}
    if x is not None:
        gammas, best = np.zeros(n, dtype=np.int64), np.full(n, -1.0)
        for d in range(kd):
            for j, v in enumerate(y_of(d)):
                if x[v] > best[ys[d][0][j]]:
                    best[ys[d][0][j]], gammas[ys[d][0][j]] = x[v], ys[d][1][j]
        lams = [int(np.argmax(x[zo + j * (n + 1):zo + (j + 1) * (n + 1)])) for j in range(kd - 1)]
        out['gammas'], out['lams'] = [int(g) for g in gammas], lams
        if status == 'optimal' and goal_values(q, gammas[None], np.array([lams]), chain)['xi_accuracy_pct'][0] > TOL:
            out['status'] = 'infeasible'
    out['wall_s'] = time.perf_counter() - t0
    return out
