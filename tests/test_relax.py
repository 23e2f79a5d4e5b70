"""Step-2 solvers: the relaxed LUT gradient descent (optim/relax.py) against the exact split scan and brute force
(optim/exact.py) on seeded random instances and tiny models; analytic gradient against autograd."""
import numpy as np
import pytest
import torch

from optim import cost as C
from optim.exact import brute_force, side_best, solve_exact
from optim.relax import (exact_improvement, gibbs_split, masked_softmax, relax_tables, relaxed_value_grad,
                         solve_relaxed, split_objective)
from optim.search import local_search
from pipeline.throughput import random_tables

QUICK = dict(steps=150, restarts=2)  # small settings for the many-instance tests (defaults: 300 x 4)
OBJECTIVES = (('throughput', 0.5), ('latency', 0.5), ('weighted', 0.3))


def _check(t, valid, r, optimum_ms, objective='throughput', omega=0.5):
    """Within 1 % of the optimum, only valid layouts, and the reported numbers are the exact cost's."""
    assert r.objective_ms <= optimum_ms * 1.01, f'gap {C.gap_pct(r.objective_ms, optimum_ms):.3f} %'
    assert r.objective_ms >= optimum_ms * (1 - 1e-12)
    assert all(valid[k, g] for k, g in enumerate(r.gammas)), 'an invalid layout was chosen'
    assert all(valid[k, g] for k, g in enumerate(r.gd_gammas))
    assert r.stages == C.describe(r.gammas, r.lam, t, objective, omega)
    assert r.stages['objective_ms'] == pytest.approx(r.objective_ms)


@pytest.mark.parametrize('objective,omega', OBJECTIVES)
def test_analytic_gradient_matches_autograd(objective, omega):
    t, valid = random_tables(np.random.default_rng(11), 7)
    rt = relax_tables(t, valid)
    theta = np.random.default_rng(12).standard_normal((2, 3, 7, 14))
    for tau in (1.0, 0.05):
        loss, grad, q = relaxed_value_grad(theta, rt, objective, omega, tau)
        th = torch.tensor(theta, requires_grad=True)
        p = masked_softmax(th, rt.mask, tau)
        q_t, loss_t = gibbs_split(split_objective(p[0], rt, objective, omega, tau, p_server=p[1]), tau)
        loss_t.sum().backward()
        np.testing.assert_allclose(loss, loss_t.detach().numpy(), rtol=1e-10)
        np.testing.assert_allclose(q, q_t.detach().numpy(), rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(grad, th.grad.numpy(), rtol=1e-7, atol=1e-12)


def test_exact_equals_brute_force_and_relaxed_reaches_it_on_tiny_models():
    """Tiny models (4-5 blocks: up to 5^4 x 2 layout combinations x 6 splits) where brute force is possible."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        n = 4 + seed % 2
        t, valid = random_tables(rng, n)
        for objective, omega in OBJECTIVES:
            bf = brute_force(t, valid, objective, omega)
            ex = solve_exact(t, valid, objective, omega)
            assert ex.objective_ms == pytest.approx(bf.objective_ms, rel=1e-12)
            np.testing.assert_allclose(ex.per_split_objective_ms, bf.per_split_objective_ms, rtol=1e-12)
            r = solve_relaxed(t, valid, objective, omega, rng=np.random.default_rng(seed), **QUICK)
            _check(t, valid, r, bf.objective_ms, objective, omega)


def _many(count, n, settings, seed0=0):
    gaps, gd_gaps = [], []
    for seed in range(seed0, seed0 + count):
        t, valid = random_tables(np.random.default_rng(seed), n)
        ex = solve_exact(t, valid)
        r = solve_relaxed(t, valid, rng=np.random.default_rng(seed), **settings)
        _check(t, valid, r, ex.objective_ms)
        gaps.append(C.gap_pct(r.objective_ms, ex.objective_ms))
        gd_gaps.append(C.gap_pct(r.gd_objective_ms, ex.objective_ms))
    return np.array(gaps), np.array(gd_gaps)


def test_relaxed_reaches_exact_on_random_luts():
    gaps, gd_gaps = _many(100, 6, QUICK)
    assert gaps.max() <= 1.0
    assert np.median(gd_gaps) == 0.0  # gradient descent alone usually lands on the optimum already


@pytest.mark.slow
def test_relaxed_reaches_exact_on_random_b3_size_luts():
    """200 B3-size instances (28 blocks) with the default settings, the gradient descent alone included."""
    gaps, gd_gaps = _many(200, 28, {}, seed0=1000)
    assert gaps.max() <= 1.0
    assert gd_gaps.max() <= 1.0


def test_invalid_layouts_never_chosen_even_when_fastest():
    """Layouts of a branch SUBSET (e.g. 0 = the 3x3 alone) are in the LUT and much faster, but not valid for an
    unpruned block: neither solver may pick them."""
    t, valid = random_tables(np.random.default_rng(5), 6)
    edge, server = t.edge_ms.copy(), t.server_ms.copy()
    for k in range(6):
        sub = [0, 1, 2, 3, 4] if valid[k, 9] else [0, 1]
        edge[k, sub] = 1e-3
        server[k, sub] = 1e-4
    t2 = C.CostTables(edge, server, t.edge_head_ms, t.server_head_ms, t.link_bytes, t.bandwidth_mbps, t.latency_ms)
    ex = solve_exact(t2, valid)
    assert all(valid[k, g] for k, g in enumerate(ex.gammas))
    r = solve_relaxed(t2, valid, rng=np.random.default_rng(0), **QUICK)
    _check(t2, valid, r, ex.objective_ms)
    e_best, s_best = side_best(t2, valid)
    assert valid[np.arange(6), e_best].all() and valid[np.arange(6), s_best].all()


def test_deterministic_for_a_seed_and_needs_a_generator():
    t, valid = random_tables(np.random.default_rng(7), 10)
    a = solve_relaxed(t, valid, rng=np.random.default_rng(3), **QUICK)
    b = solve_relaxed(t, valid, rng=np.random.default_rng(3), **QUICK)
    assert (a.gammas, a.lam, a.history) == (b.gammas, b.lam, b.history)
    with pytest.raises(C.CostError, match='explicit numpy Generator'):
        solve_relaxed(t, valid)
    with pytest.raises(C.CostError, match='steps >= 1'):
        solve_relaxed(t, valid, steps=0, rng=np.random.default_rng(0))


def test_local_search_improves_a_bad_start():
    t, valid = random_tables(np.random.default_rng(9), 8)
    ex = solve_exact(t, valid)
    worst = np.argmax(np.where(valid, t.edge_ms + t.server_ms, -np.inf), 1)
    st0 = C.stage_times(worst[None], np.array([0]), t)
    g, lam, moves, status = local_search(worst, 0, valid, exact_improvement(t, 'throughput', 0.5))
    st = C.stage_times(g[None], np.array([lam]), t)
    obj0, obj = C.objective_values(st0)[0], C.objective_values(st)[0]
    assert status == 'converged' and moves > 0 and ex.objective_ms <= obj <= obj0
    assert (obj, st.latency_ms[0]) < (obj0, st0.latency_ms[0])  # better objective, or equal and lower latency
    assert valid[np.arange(8), g].all()


def test_brute_force_refuses_large_models():
    t, valid = random_tables(np.random.default_rng(0), 12)
    with pytest.raises(C.CostError, match='exceeds max_configs'):
        brute_force(t, valid)
