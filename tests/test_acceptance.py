"""Step 3's acceptance statistics and surrogate maths (accuracy/stats.py, accuracy/surrogate.py): the paired bound
covers the true difference at its level, the surrogate re-centres on the measured loss, the calibration factor."""
import numpy as np
import pytest

from accuracy import stats, surrogate


def _pair(rng, n, p_ref_only, p_new_only):
    """Correctness masks of two models on n images with the given discordance probabilities."""
    u = rng.random(n)
    ref = rng.random(n) < 0.85
    new = ref.copy()
    flip_down = ref & (u < p_ref_only / 0.85)
    flip_up = ~ref & (u < p_new_only / 0.15)
    new[flip_down] = False
    new[flip_up] = True
    return ref, new


def test_paired_difference_counts_and_standard_error():
    ref = np.array([1, 1, 1, 0, 0, 1, 1, 0], dtype=bool)
    new = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    out = stats.paired_difference(ref, new, np.random.default_rng(0), resamples=4000)
    assert (out['n'], out['ref_only'], out['new_only']) == (8, 2, 1)
    assert out['diff_pct'] == pytest.approx(-12.5) and out['drop_pct'] == pytest.approx(12.5)
    d = new.astype(float) - ref.astype(float)
    assert out['se_pct'] == pytest.approx(100 * d.std() / np.sqrt(8))
    assert out['ci_pct'][0] <= out['lower_pct'] <= out['diff_pct'] <= out['ci_pct'][1]
    same = stats.paired_difference(ref, ref, np.random.default_rng(0))
    assert same['ci_pct'] == [0.0, 0.0] and same['lower_pct'] == 0.0 and same['drop_pct'] == 0.0
    again = stats.paired_difference(ref, new, np.random.default_rng(0), resamples=4000)
    assert again == out  # seeded: the same bound every time
    with pytest.raises(ValueError, match='equal non-empty'):
        stats.paired_difference(ref, new[:3], np.random.default_rng(0))


@pytest.mark.parametrize('p_down,p_up', [(0.02, 0.01), (0.01, 0.0), (0.04, 0.03)])
def test_one_sided_bound_covers_the_true_difference(p_down, p_up):
    """Over 400 simulated validation sets of 1000 images the true difference is below the lower bound in at most
    ~5 % of them (binomial slack: <= 8.5 %), and the paired bound is tighter than an unpaired one."""
    rng = np.random.default_rng(1)
    true_diff = 100.0 * (p_up - p_down)
    misses, widths = 0, []
    for _ in range(400):
        ref, new = _pair(rng, 1000, p_down, p_up)
        out = stats.paired_difference(ref, new, rng, resamples=2000)
        misses += out['lower_pct'] > true_diff
        widths.append(out['diff_pct'] - out['lower_pct'])
    assert misses / 400 <= 0.085
    unpaired = 1.645 * 100 * np.sqrt(2 * 0.85 * 0.15 / 1000)
    assert np.mean(widths) < 0.7 * unpaired


def test_prior_standard_error_and_margin():
    assert stats.prior_se_pct(1.0, 1000) == pytest.approx(100 * np.sqrt(0.01 * 0.99 / 1000))
    assert stats.one_sided_z() == pytest.approx(1.6449, abs=1e-4)
    z = stats.one_sided_z()
    assert surrogate.margin_pct(1.0, 1000, 0.0, z) == pytest.approx(z * stats.prior_se_pct(1.0, 1000))
    assert surrogate.margin_pct(1.0, 1000, 0.6, z) == pytest.approx(z * 0.6)  # a measured larger se wins


def test_recentre_puts_the_measured_loss_on_the_pruned_branches():
    prev = np.array([[0.5, 0.1, np.nan], [0.2, 0.3, 0.0], [np.nan, np.nan, np.nan]])
    pruned = np.array([[True, False, False], [False, True, False], [False, False, False]])
    fresh = np.array([[np.nan, 0.4, np.nan], [0.9, np.nan, 0.05], [np.nan, np.nan, np.nan]])
    out = surrogate.recentre(fresh, prev, pruned, 1.6)
    assert out[pruned].sum() == pytest.approx(1.6)
    assert out[0, 0] == pytest.approx(1.0) and out[1, 1] == pytest.approx(0.6)  # shares keep the ratio 0.5 : 0.3
    assert out[0, 1] == 0.4 and out[1, 0] == 0.9 and out[1, 2] == 0.05 and np.isnan(out[2]).all()
    want = pruned.copy()
    want[1, 2] = want[0, 1] = True
    assert surrogate.increment(out, pruned, want) == pytest.approx(0.45)


def test_centred_surrogate_predicts_from_the_measured_centre():
    sens = np.array([[0.5, 0.1, np.nan], [0.2, 0.3, -0.4], [np.nan, np.nan, np.nan]])
    centre = np.array([[True, False, False], [False, True, False], [False, False, False]])
    loss, const = surrogate.centred(sens, centre, 1.6, 0.5)
    assert const == 0.0 and loss[0, 0] == pytest.approx(1.0) and loss[1, 1] == pytest.approx(0.6)
    assert loss[0, 1] == pytest.approx(0.05) and loss[1, 2] == 0.0 and np.isnan(loss[2]).all()  # rho x sens >= 0
    assert surrogate.predict(loss, const, centre) == pytest.approx(1.6)  # the centre itself: its measured drop
    more = centre.copy()
    more[1, 0] = True
    assert surrogate.predict(loss, const, more) == pytest.approx(1.7)  # + rho x 0.2
    fewer = centre.copy()
    fewer[0, 0] = False
    assert surrogate.predict(loss, const, fewer) == pytest.approx(0.6)  # restores a branch: its share goes
    # a measured gain (negative drop) is the constant; shares of nothing; sensitivities all <= 0 share equally
    loss, const = surrogate.centred(sens, centre, -0.8, 1.0)
    assert const == pytest.approx(-0.8) and loss[centre].sum() == 0.0
    assert surrogate.predict(loss, const, more) == pytest.approx(-0.6)
    zero = np.where(np.isnan(sens), np.nan, 0.0)
    loss, _ = surrogate.centred(zero, centre, 1.0, 1.0)
    assert loss[0, 0] == pytest.approx(0.5) and loss[1, 1] == pytest.approx(0.5)


def test_nearest_measured_configuration_counts_restored_branches_twice():
    none = np.zeros((2, 3), dtype=bool)
    a = none.copy()
    a[0, 0] = True
    b = a.copy()
    b[1, 0] = b[1, 1] = True
    want = a.copy()
    want[1, 0] = True  # one more than a; b prunes one branch `want` restores
    assert surrogate.distance(want, a) == 1 and surrogate.distance(want, b) == 2
    assert surrogate.nearest(want, [none, a, b]) == 1
    assert surrogate.nearest(a, [none, a, b, a]) == 3  # ties: the latest
    with pytest.raises(ValueError):
        surrogate.nearest(a, [])


def test_calibration_factor_needs_evidence_and_is_clipped():
    assert surrogate.calibration_factor([]) == 1.0
    assert surrogate.calibration_factor([(0.1, 0.0)]) == 1.0  # below RHO_MIN_EVIDENCE_PCT
    assert surrogate.calibration_factor([(1.0, 0.5), (1.0, 0.3)]) == pytest.approx(0.4)
    assert surrogate.calibration_factor([(1.0, 10.0)]) == surrogate.RHO_RANGE[1]
    assert surrogate.calibration_factor([(1.0, -1.0)]) == surrogate.RHO_RANGE[0]
    # a prior: shrunk towards it, by RHO_PRIOR_WEIGHT_PCT points of pseudo-evidence, instead of 1 without evidence
    w = surrogate.RHO_PRIOR_WEIGHT_PCT
    assert surrogate.calibration_factor([], 0.6) == pytest.approx(0.6)
    assert surrogate.calibration_factor([(0.1, 0.0)], 0.6) == pytest.approx(0.6 * w / (0.1 + w))
    assert surrogate.calibration_factor([(1.0, 0.5), (1.0, 0.3)], 0.6) == pytest.approx((0.8 + 0.6 * w) / (2 + w))
    assert surrogate.calibration_factor([(100.0, 100.0)], 0.6) == pytest.approx(1.0, abs=0.01)  # evidence outweighs
    assert surrogate.calibration_factor([(1.0, -1.0)], 0.1) == surrogate.RHO_RANGE[0]  # still clipped
    summary = surrogate.error_summary([{'error_pct': 0.2}, {'error_pct': -1.0}, {'error_pct': None}])
    assert summary['n'] == 2 and summary['median_abs_error_pct'] == pytest.approx(0.6)
    assert summary['max_abs_error_pct'] == 1.0 and surrogate.error_summary([])['n'] == 0


def test_probe_corrected_replaces_the_sum_of_the_new_branches():
    sens = np.array([[0.1, np.nan, 0.2], [0.3, 0.0, np.nan], [-0.2, 0.5, 0.0]])
    new = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    out = surrogate.probe_corrected(sens, new, 2.0)
    assert out[new].sum() == pytest.approx(2.0) and out[0, 0] == pytest.approx(0.5)  # in proportion: 0.1 : 0.3
    assert out[2, 1] == pytest.approx(0.5) and out[2, 0] == 0.0 and np.isnan(out[0, 1])  # others: clipped, NaN kept
    zero = surrogate.probe_corrected(np.zeros((2, 3)), np.array([[1, 0, 0], [1, 0, 0]], dtype=bool), 1.0)
    assert zero[:, 0].tolist() == [0.5, 0.5]  # all <= 0: shared equally
    assert surrogate.probe_corrected(sens, new, -1.0)[new].sum() == 0.0  # a probe gain prunes for free, no credit


def _probe_setup(monkeypatch, probes, probe_pct, **joint_kw):
    """centred_solve on 4 blocks whose 3x3 branches cost 0.1 alone, with a stub solver that prunes every 3x3 branch
    cheaper than 0.3 points (within the budget) and a stub probe that says pruning >= 2 of them together costs
    `probe_pct`."""
    from dataclasses import replace
    from types import SimpleNamespace

    from config import Config
    from pipeline import joint
    cfg = Config()
    cfg = replace(cfg, joint=replace(cfg.joint, acceptance='point', probes=probes, **joint_kw))
    inp = SimpleNamespace(cfg=cfg, available=[frozenset('DOI')] * 4)
    monkeypatch.setattr(joint, '_pruned_of', lambda inp, g: np.asarray(g, dtype=bool))
    monkeypatch.setattr(joint, 'problem_for', lambda inp, spend, a, budget, before=None, max_new=None:
                        (np.asarray(spend), budget))
    calls = []

    def probe(inp, st, model0, data, gammas, cache):
        calls.append(np.asarray(gammas).sum())
        return (probe_pct if np.asarray(gammas).sum() >= 2 else 0.1), np.asarray(gammas, dtype=bool)
    monkeypatch.setattr(joint, 'probe_increment', probe)

    def solve(p):
        spend, budget = p
        g = np.zeros((4, 3), dtype=bool)
        for k in range(4):
            if spend[k, 0] < 0.3 and spend[g].sum() + spend[k, 0] <= budget:
                g[k, 0] = True
        return 'sol', g
    sens = np.full((4, 3), np.nan)
    sens[:, 0] = 0.1
    st = joint.LoopState(sens=sens, warm=None, measured=[joint.MeasuredConfig('domain model',
                                                                             np.zeros((4, 3), dtype=bool), 0.0)])
    ref = SimpleNamespace(a_fit=95.0, val_correct=np.ones(1000, dtype=bool))
    out, bud = joint.centred_solve(inp, st, ref, 1.0, solve, None, object(), object())
    bud['point'] = joint.point_solve(inp, st, ref, 1.0, solve)[1]  # the same solve as a sweep point would make it
    if probes:  # the next solve starts from what this one's probes found: no probe needed, nothing pruned
        st.remember(bud['probes'])
        _, again = joint.centred_solve(inp, st, ref, 1.0, solve, None, object(), object())
        bud['again'] = again
    return out, bud, calls


def test_a_probe_that_finds_an_interaction_changes_the_solution(monkeypatch):
    _, bud, calls = _probe_setup(monkeypatch, 0, 5.0)  # no probes: the additive sum, 4 x 0.1
    assert bud['predicted_drop_pct'] == pytest.approx(0.4) and calls == [] and bud['probes'] == []
    _, bud, calls = _probe_setup(monkeypatch, 3, 5.0)  # the 4 together cost 5 points: scaled to 1.25 each, none pruned
    p = bud['probes'][0]
    assert (p['branches'], p['additive_pct'], p['probe_pct']) == (4, pytest.approx(0.4), 5.0)
    assert p['pruned_beyond_start'] == [[0, 0], [1, 0], [2, 0], [3, 0]]
    assert bud['predicted_drop_pct'] == pytest.approx(0.0) and calls == [4]
    assert (bud['sens'][:, 0] == pytest.approx(1.25))
    assert bud['again']['probes'] == [] and bud['again']['sens'][:, 0] == pytest.approx(1.25)
    _, bud, calls = _probe_setup(monkeypatch, 3, 0.5)  # the probe agrees within PROBE_TOLERANCE_PCT: kept as it was
    assert bud['predicted_drop_pct'] == pytest.approx(0.4) and calls == [4, 4] and len(bud['probes']) == 1
    # (remembered, the agreeing probe leaves the 4 branches at 0.125 each: the same solution, probed once more)
    assert bud['again']['predicted_drop_pct'] == pytest.approx(0.5)


def test_the_sweep_shrinks_rho_towards_its_prior_and_the_rounds_do_not(monkeypatch):
    """Without round evidence a round keeps rho = 1 while a sweep point (point_solve) takes joint.sweep_rho_prior:
    fine-tuning recovers part of what the probes and sensitivities (before fine-tuning) predict."""
    _, bud, _ = _probe_setup(monkeypatch, 0, 5.0)  # the default prior, 0.6: 4 x 0.1 x 0.6
    assert bud['rho'] == 1.0 and bud['predicted_drop_pct'] == pytest.approx(0.4)
    assert bud['point']['rho'] == pytest.approx(0.6) and bud['point']['predicted_drop_pct'] == pytest.approx(0.24)
    _, bud, _ = _probe_setup(monkeypatch, 0, 5.0, sweep_rho_prior=0.0)  # 0: the rounds' rho, as before
    assert bud['point']['rho'] == 1.0 and bud['point']['predicted_drop_pct'] == pytest.approx(0.4)
