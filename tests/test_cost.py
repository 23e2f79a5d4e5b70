"""The pipelined cost model (optim/cost.py) against hand-computed cases, and its input checks."""
import numpy as np
import pytest

from optim import cost as C
from pipeline.throughput import random_tables

NAN = np.nan


def _tables(batch=1, serialize=0.0, bandwidth=8.0, latency=1.0):
    """Two blocks: block 0 has only {D, O} (layouts 3, 4), block 1 has {D, O, I} (9..13, only 9 and 13 timed
    here, the rest NaN as 'not measurable').  Link: 8 Mbit/s = 1 byte/us, so 1000 bytes = 1 ms."""
    edge = np.full((2, 14), NAN)
    server = np.full((2, 14), NAN)
    edge[0, [3, 4]] = [10.0, 8.0]
    server[0, [3, 4]] = [2.0, 1.0]
    edge[1, [9, 13]] = [20.0, 12.0]
    server[1, [9, 13]] = [3.0, 4.0]
    return C.CostTables(edge, server, edge_head_ms=0.5, server_head_ms=0.25,
                        link_bytes=np.array([3000.0, 6000.0, 500.0]), bandwidth_mbps=bandwidth,
                        latency_ms=latency, batch=batch, serialize_ms_per_mb=serialize)


def test_stage_times_hand_computed():
    t = _tables()
    g = np.array([[4, 13], [4, 13], [3, 9]])
    st = C.stage_times(g, np.array([0, 1, 2]), t)
    # lam = 0: server runs both blocks + head; link occupancy = 3000 B at 1 B/us = 3 ms (+ 1 ms latency in latency)
    # lam = 1: edge block 0 (8), link 6, server block 1 (4) + head 0.25
    # lam = 2: edge 10 + 20 + edge head 0.5, link 0.5, server 0
    np.testing.assert_allclose(st.edge_ms, [0.0, 8.0, 30.5])
    np.testing.assert_allclose(st.link_ms, [3.0, 6.0, 0.5])
    np.testing.assert_allclose(st.server_ms, [5.25, 4.25, 0.0])
    np.testing.assert_allclose(st.latency_ms, [9.25, 19.25, 32.0])
    np.testing.assert_allclose(st.throughput_fps, [1e3 / 5.25, 1e3 / 8.0, 1e3 / 30.5])
    assert C.bottleneck_names(st) == ['server', 'edge', 'edge']
    np.testing.assert_allclose(C.period_ms(st), [5.25, 8.0, 30.5])
    ev = C.evaluate([4, 13], 1, t)
    assert ev == {'edge_ms': 8.0, 'link_ms': 6.0, 'server_ms': 4.25, 'latency_ms': 19.25,
                  'throughput_fps': 125.0, 'bottleneck': 'edge'}


def test_link_latency_is_paid_per_frame_not_per_batch_in_the_period():
    # a 50 ms one-way latency: every frame waits for it, but streamed batches overlap it, so the period of a
    # link-bound split is the occupancy bytes / bandwidth (bench/bench_runtime.py measures this on the runtime)
    t = _tables(latency=50.0, bandwidth=0.8)  # 0.1 byte/us: 6000 B = 60 ms, 3000 B = 30 ms
    st = C.stage_times(np.array([[4, 13]]), np.array([1]), t)
    np.testing.assert_allclose(st.link_ms, [60.0])
    np.testing.assert_allclose(st.throughput_fps, [1e3 / 60.0])
    np.testing.assert_allclose(st.latency_ms, [8.0 + 50.0 + 60.0 + 4.25])


def test_batch_and_serialization_scale_the_link():
    t = _tables(batch=4, serialize=2.0)
    # 4 x 6000 B = 24 kB: 24 ms on the wire + 0.024 MB x 2 ms/MB; times in the LUT are per batch
    np.testing.assert_allclose(t.link_ms()[1], 24.0 + 0.048)
    st = C.stage_times(np.array([[4, 13]]), np.array([1]), t)
    np.testing.assert_allclose(st.throughput_fps, [4 * 1e3 / 24.048])


def test_objectives_and_gap():
    t = _tables()
    st = C.stage_times(np.array([[4, 13], [4, 13]]), np.array([0, 1]), t)
    np.testing.assert_allclose(C.objective_values(st, 'throughput'), [5.25, 8.0])
    np.testing.assert_allclose(C.objective_values(st, 'latency'), [9.25, 19.25])
    np.testing.assert_allclose(C.objective_values(st, 'weighted', 0.25), [0.25 * 9.25 + 0.75 * 5.25,
                                                                          0.25 * 19.25 + 0.75 * 8.0])
    assert C.gap_pct(10.5, 10.0) == pytest.approx(5.0)
    with pytest.raises(C.CostError, match='valid choices: throughput, latency, weighted'):
        C.objective_values(st, 'fps')
    with pytest.raises(C.CostError, match='--omega'):
        C.objective_values(st, 'weighted', 1.5)


def test_best_split_and_plain_baselines():
    t = _tables()
    kept = [('D', 'O'), ('D', 'O', 'I')]
    assert C.fused_gammas(kept) == [4, 13]
    assert C.best_split([4, 13], t) == 0  # periods 5.25, 8.0, 12 + 8 + 0.5 = 20.5
    assert C.best_split([4, 13], t, 'latency') == 0
    b = C.plain_baselines(t, kept)
    assert (b['edge_only']['lam'], b['server_only']['lam'], b['best_plain_split']['lam']) == (2, 0, 0)
    assert b['edge_only']['gammas'] == [4, 13] and b['edge_only']['edge_ms'] == pytest.approx(20.5)
    assert b['server_only']['link_ms'] == pytest.approx(3.0) and b['server_only']['period_ms'] == pytest.approx(5.25)


def test_valid_mask_and_check_valid():
    v = C.valid_mask([('D', 'O'), ('D', 'O', 'I'), ('I',)])
    assert np.flatnonzero(v[0]).tolist() == [3, 4]
    assert np.flatnonzero(v[1]).tolist() == [9, 10, 11, 12, 13]
    assert np.flatnonzero(v[2]).tolist() == [2]
    with pytest.raises(C.CostError, match='block 0: kept branch set'):
        C.valid_mask([()])
    t = _tables()
    with pytest.raises(C.CostError, match='no edge time for block 1, layout gamma=10'):
        C.check_valid(t, C.valid_mask([('D', 'O'), ('D', 'O', 'I')]))


def test_bad_inputs_are_named():
    t = _tables()
    with pytest.raises(C.CostError, match='no LUT entry for block 1 on the server'):
        C.stage_times(np.array([[4, 10]]), np.array([1]), t)  # layout 10 not timed for block 1
    with pytest.raises(C.CostError, match='split lambda must be in 0..2'):
        C.stage_times(np.array([[4, 13]]), np.array([3]), t)
    with pytest.raises(C.CostError, match=r'gammas must be \(M, 2\)'):
        C.stage_times(np.array([[4, 13, 13]]), np.array([1]), t)
    for kw, msg in (({'bandwidth': -1.0}, 'bandwidth_mbps must be a positive number'),
                    ({'bandwidth': 0.0}, 'bandwidth_mbps'), ({'latency': -2.0}, 'latency_ms must be >= 0'),
                    ({'batch': 0}, 'batch must be >= 1')):
        with pytest.raises(C.CostError, match=msg):
            _tables(**kw)
    with pytest.raises(C.CostError, match='link_bytes must have N \\+ 1 = 3 entries'):
        C.CostTables(t.edge_ms, t.server_ms, 0.0, 0.0, np.ones(2), 1.0, 0.0)
    bad = t.edge_ms.copy()
    bad[0, 3] = -1.0
    with pytest.raises(C.CostError, match='edge_ms must hold times >= 0'):
        C.CostTables(bad, t.server_ms, 0.0, 0.0, t.link_bytes, 1.0, 0.0)


def test_vectorized_matches_one_by_one():
    t, valid = random_tables(np.random.default_rng(3), 12)
    rng = np.random.default_rng(4)
    g = np.array([[rng.choice(np.flatnonzero(valid[k])) for k in range(12)] for _ in range(50)])
    lams = rng.integers(0, 13, 50)
    st = C.stage_times(g, lams, t)
    for i in range(50):
        ev = C.evaluate(g[i], int(lams[i]), t)
        assert ev['latency_ms'] == pytest.approx(st.latency_ms[i])
        assert ev['throughput_fps'] == pytest.approx(st.throughput_fps[i])
        edge = sum(t.edge_ms[k, g[i, k]] for k in range(lams[i])) + (t.edge_head_ms if lams[i] == 12 else 0.0)
        assert ev['edge_ms'] == pytest.approx(edge)
