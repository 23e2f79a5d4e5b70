"""The step-3 goal program (optim/goal.py): known optima, validity of the repaired GD result, infeasible floors."""
import itertools

import numpy as np
import pytest
import torch

from hyper_repvgg import LAYOUTS, layouts_for
from optim import goal
from optim.cost import CostTables

HAS = {'D', 'O', 'I'}
NO_D = np.array(['D' not in lay.branches for lay in LAYOUTS])


def _tables(edge, server, link_bytes, bandwidth=8.0, latency=0.0, edge_head=0.0, server_head=0.0):
    return CostTables(np.asarray(edge, float), np.asarray(server, float), edge_head, server_head,
                      np.asarray(link_bytes, float), bandwidth, latency)


def _stats(n, knee_edge=10.0, knee_server=10.0):
    return {'flops': np.full((n, 14), 100.0), 'weight_bytes': np.full((n, 14), 4.0), 'act_bytes': np.full((n, 14), 6.0),
            'knee_edge': knee_edge, 'knee_server': knee_server}


def _hand_problem(eps):
    """Two blocks with every branch; the edge runs a D-free layout in 0.2 ms instead of 1 ms; the server is 10x slower
    and the link costs 100 ms except at lambda = 2 (edge only): the optimum is edge-only with D pruned wherever the
    accuracy budget allows.  Sensitivities: D 0.6 (block 0) / 0.3 (block 1), O and I 0.05."""
    edge = np.where(NO_D, 0.2, 1.0)[None].repeat(2, 0)
    server = 10 * edge
    t = _tables(edge, server, [1e5, 1e5, 0.0])  # 1e5 bytes at 8 Mbit/s = 100 ms
    sens = np.array([[0.6, 0.05, 0.05], [0.3, 0.05, 0.05]])
    return goal.build_problem(t, sens, [HAS, HAS], _stats(2), a_ref=90.0, epsilon=eps, period_scale_ms=1.0)


@pytest.mark.parametrize('eps, period, d_pruned', [(0.0, 2.0, (False, False)), (0.35, 1.2, (False, True)),
                                                    (0.95, 0.4, (True, True))])
def test_hand_made_optimum_found_by_both_solvers(eps, period, d_pruned):
    p = _hand_problem(eps)
    res = goal.solve(p, 'both', torch.Generator().manual_seed(0), {'steps': 150, 'restarts': 2})
    for r in (res['gd'], res['milp']):
        assert r.lam == 2 and r.evaluation['period_ms'] == pytest.approx(period)
        assert tuple('D' not in LAYOUTS[g].branches for g in r.gammas) == d_pruned
        assert r.evaluation['xi_accuracy_pct'] == 0.0 and r.evaluation['accuracy_pct'] >= 90.0 - eps - 1e-9
    assert res['milp'].status == 'optimal' and res['gd'].status == 'converged'
    assert res['gap']['objective_gap_pct'] == pytest.approx(0.0, abs=1e-9)


def _random_problem(rng, n=3, identity=(True, False, True), eps=1.0, w=0.05):
    have = [HAS if i else {'D', 'O'} for i in identity[:n]]
    fits = np.array([[lay.branches <= h for lay in LAYOUTS] for h in have])
    edge = np.where(fits, rng.uniform(0.1, 2.0, (n, 14)), np.nan)
    server = np.where(fits, rng.uniform(0.05, 1.0, (n, 14)), np.nan)
    t = _tables(edge, server, rng.uniform(0, 2e3, n + 1), bandwidth=8.0, latency=0.1, edge_head=0.05,
                server_head=0.02)
    sens = rng.uniform(0.0, 1.0, (n, 3))
    st = _stats(n)
    st['flops'] = rng.uniform(10, 1000, (n, 14))
    return goal.build_problem(t, sens, have, st, a_ref=80.0, epsilon=eps, period_scale_ms=2.0, roofline_weight=w)


def _brute_force(p):
    n = p.num_blocks
    choices = [np.flatnonzero(p.allowed[k]) for k in range(n)]
    g = np.array(list(itertools.product(*choices)))
    gs = np.repeat(g, n + 1, 0)
    lams = np.tile(np.arange(n + 1), g.shape[0])
    keys = goal.lex_keys(goal.goal_values(p, gs, lams))
    return keys[goal.lex_best(keys)]


@pytest.mark.parametrize('seed', range(4))
def test_milp_is_exact_and_gd_valid_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    p = _random_problem(rng, eps=float(rng.uniform(0.2, 2.0)))
    best = _brute_force(p)
    mi = goal.solve_milp(p, 30)
    assert mi.status == 'optimal'
    np.testing.assert_allclose(mi.key(), best, atol=1e-6)
    gd = goal.solve_gd(p, torch.Generator().manual_seed(seed), steps=100, restarts=2)
    goal.check_config(p, gd.gammas, gd.lam)
    for g, kept in zip(gd.gammas, goal.kept_sets(gd.gammas)):
        assert kept and g in layouts_for(kept)
    assert gd.evaluation['xi_accuracy_pct'] == 0.0
    assert not goal.lex_better(gd.key(), best)  # never better than the optimum


@pytest.mark.parametrize('seed', range(6))
def test_repaired_gd_rounding_is_always_valid(seed):
    """No local search, few steps, a tight budget: rounding + repair alone must give a valid, feasible choice."""
    rng = np.random.default_rng(100 + seed)
    p = _random_problem(rng, n=3, eps=0.05)
    gd = goal.solve_gd(p, torch.Generator().manual_seed(seed), steps=5, restarts=3, tau_start=5.0, tau_end=2.0,
                       search=False)
    goal.check_config(p, gd.gammas, gd.lam)
    for g, kept in zip(gd.gammas, goal.kept_sets(gd.gammas)):
        assert 1 <= len(kept) and g in layouts_for(kept)
    assert gd.evaluation['xi_accuracy_pct'] == 0.0  # nothing pruned is always within the floor


def test_infeasible_floor_gives_deviation_not_crash():
    p = goal.with_floor(_hand_problem(1.0), 91.5)  # 1.5 points above the unpruned accuracy
    res = goal.solve(p, 'both', torch.Generator().manual_seed(0), {'steps': 50, 'restarts': 2}, time_limit_s=20)
    for r in (res['gd'], res['milp']):
        assert r.status == 'infeasible'
        assert r.evaluation['xi_accuracy_pct'] == pytest.approx(1.5)
        assert r.evaluation['accuracy_pct'] == pytest.approx(90.0)  # the best reachable: nothing pruned
        assert r.evaluation['branches_pruned'] == 0


def test_throughput_target_and_memory_budget_are_goals():
    p = _hand_problem(0.95)
    from dataclasses import replace
    slow = replace(p, throughput_target_fps=500.0)  # period 2 ms suffices: pruning is not needed for the target
    mi = goal.solve_milp(slow)
    assert mi.evaluation['deviations']['xi_throughput_fps'] == 0.0 and mi.evaluation['goals_met']['throughput']
    assert mi.evaluation['period_ms'] == pytest.approx(0.4)  # the last level still maximizes throughput
    tight = replace(p, throughput_target_fps=5000.0)  # 0.2 ms is out of reach: best effort, deviation reported
    mi = goal.solve_milp(tight)
    assert mi.evaluation['deviations']['xi_throughput_fps'] == pytest.approx(5000.0 - 1e3 / 0.4)
    mem = replace(p, memory_budget_bytes=4.0)  # edge-only needs 8 bytes of weights: a memory deviation remains
    mi = goal.solve_milp(mem)
    assert mi.evaluation['xi_memory_bytes'] == pytest.approx(4.0) and mi.evaluation['period_ms'] == pytest.approx(0.4)


def test_undominated_layouts_keep_every_optimum():
    rng = np.random.default_rng(7)
    p = _random_problem(rng)
    for side in ('edge', 'server'):
        keep = goal.undominated(p, side)
        assert (keep <= p.allowed).all() and keep.any(1).all()


def test_bad_problem_is_named():
    p = _hand_problem(1.0)
    with pytest.raises(goal.GoalError, match='gamma=14 .* block 1'):
        goal.evaluate(p, [2, 14], 2)
    with pytest.raises(goal.GoalError, match='lambda=3'):
        goal.evaluate(p, [2, 2], 3)
    with pytest.raises(goal.GoalError, match='solver'):
        goal.solve(p, 'simplex', torch.Generator())


def test_only_branches_that_save_time_need_a_sensitivity():
    """A fused block costs the same with or without its 1x1 / identity branch: only D's removal saves time."""
    cost3, cost1 = 1.0, 0.3
    fits = np.ones((2, 14), bool)
    fits[1] = [lay.branches <= {'D', 'O'} for lay in LAYOUTS]
    ms = np.where(fits, [cost3 if 'D' in lay.branches else cost1 for lay in LAYOUTS], np.nan)
    t = _tables(ms, ms, [0, 0, 0])
    need = goal.worth_measuring(t, [HAS, {'D', 'O'}], 2.0)
    assert need.tolist() == [[True, False, False], [True, False, False]]
    sens = np.where(need, 0.5, np.nan)
    p = goal.build_problem(t, sens, [HAS, {'D', 'O'}], _stats(2), 90.0, 5.0, 1.0)
    kept_o = [g for g in range(14) if p.allowed[0, g]]
    assert all({'O', 'I'} <= LAYOUTS[g].branches for g in kept_o)  # unmeasured branches are never pruned


def test_progressive_step_limits_new_prunes():
    base = _hand_problem(0.95)  # unlimited: both D branches pruned (period 0.4)
    t = base.tables
    sens = np.array([[0.6, 0.05, 0.05], [0.3, 0.05, 0.05]])
    step = goal.build_problem(t, sens, [HAS, HAS], _stats(2), 90.0, 0.95, 1.0, pruned_before=np.zeros((2, 3), bool),
                              max_new_prunes=1)
    res = goal.solve(step, 'both', torch.Generator().manual_seed(0), {'steps': 100, 'restarts': 2})
    for r in (res['gd'], res['milp']):
        assert r.evaluation['branches_pruned'] == 1 and r.evaluation['period_ms'] == pytest.approx(1.2)
    before = np.array([[True, False, False], [False, False, False]])  # block 0's D went in an earlier round
    nxt = goal.build_problem(t, sens, [HAS, HAS], _stats(2), 90.0, 0.95, 1.0, pruned_before=before, max_new_prunes=1)
    assert goal.solve_milp(nxt).evaluation['period_ms'] == pytest.approx(0.4)


def test_no_branch_is_pruned_when_pruning_buys_no_throughput():
    # link-bound at every split: the period is the link's whatever the layouts, and the sensitivities measured ~0
    # (noise on a small val split) with roofline terms that favour the pruned layouts: nothing may be pruned
    n = 2
    edge = np.where(NO_D, 0.2, 1.0)[None].repeat(n, 0)
    t = _tables(edge, edge, [1e5, 1e5, 1e5])  # 100 ms on the link at every split
    st = _stats(n)
    st['flops'] = np.where(NO_D, 1000.0, 10.0)[None].repeat(n, 0)  # D-free layouts sit at the knee
    p = goal.build_problem(t, np.zeros((n, 3)), [HAS, HAS], st, a_ref=90.0, epsilon=2.0, period_scale_ms=1.0,
                           roofline_weight=0.01)
    res = goal.solve(p, 'both', torch.Generator().manual_seed(0), {'steps': 150, 'restarts': 2})
    for r in (res['gd'], res['milp']):
        assert r.evaluation['branches_pruned'] == 0, r.gammas
