"""Step 3 end to end (pseudo) on the synthetic set: artifacts, state file, skip on rerun, resume after an interrupted
round, sensitivities, bad input.  Step 0 runs once on a tiny model (as tests/test_step0.py), the LUT is modelled."""
import json

import numpy as np
import pytest
import torch

from artifacts import load_artifact, write_artifact
from config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from hyper_repvgg import LAYOUTS, build_hyper_repvgg, layouts_for
from pipeline import joint
from accuracy import pruning, training
from timing import lut as L
from timing.profiles import get_profile

WIDTH = (0.25, 0.25, 0.25, 0.25)
SETS = ['--dataset', 'synthetic', '--set', 'model.input_size=32', '--set', 'model.small_input=true',
        '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'data.synthetic_samples=600',
        '--set', 'train.base_train_samples=200', '--set', 'train.base_epochs=1', '--set', 'train.batch_size=32',
        '--set', 'data.num_domains=2']
FAST = ['--set', 'optim.steps=60', '--set', 'optim.restarts=2', '--epsilon_sweep', '1,4', '--max_rounds', '2']


def _cfg(out):
    return Config(model=ModelConfig(input_size=32, small_input=True, width_multiplier=WIDTH),
                  data=DataConfig(dataset='synthetic', num_domains=2, synthetic_samples=600),
                  train=TrainConfig(base_train_samples=200, base_epochs=1, batch_size=32), results_dir=str(out))


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    """Step 0 (tiny, 1 epoch each) and a modelled LUT (TX2 edge, Orin Nano as the 'server') in a results dir."""
    from pipeline import step0_prepare
    out = tmp_path_factory.mktemp('step3')
    torch.set_num_threads(1)
    assert step0_prepare.main(SETS[:-2] + ['--num_domains', '2', '--epochs', '1', '--threads', '1',
                                           '--results_dir', str(out)]) == 0
    cfg = _cfg(out)
    model = L.model_spec(cfg)
    edge = L.modelled_side(get_profile('jetson-tx2'), model, 32, [1], side='edge')
    server = L.modelled_side(get_profile('jetson-orin-nano'), model, 32, [1], side='server')
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete',
                   L.merge(server, edge, L.resolve_link(cfg.lut), 'fp32'), cfg, 'test')
    return out


def _main(argv):
    from pipeline import step_3_joint
    return step_3_joint.main(argv)


@pytest.mark.slow
def test_pseudo_end_to_end_artifacts_state_and_skip(results, capsys):
    from viz.summary import load_domain_result
    args = SETS + FAST + ['--results_dir', str(results), '--all_domains']
    assert _main(args) == 0
    cfg = _cfg(results)
    for d in (0, 1):
        path = joint.joint_path(cfg.path(), d)
        obj = load_artifact(path, 'joint_domain', {'a_ref_pct': float, 'final_accuracy_pct': float, 'rounds': list,
                                                   'pareto': list, 'baselines': dict, 'deviations': dict,
                                                   'roofline': dict, 'solvers': dict})
        r = load_domain_result(path)
        assert r.domain == str(d) and 0 <= r.final_acc_pct <= 100 and r.num_blocks == 22
        for g, kept in zip(r.gammas, r.kept):
            assert kept and g in layouts_for(kept)
        assert set(obj['baselines']) == {'unpruned', 'pruned'}
        assert set(obj['baselines']['unpruned']) >= {'edge_only', 'server_only', 'best_plain_split'}
        assert [p['epsilon'] for p in obj['pareto']] == [1.0, 4.0]
        for p in obj['pareto']:  # every sweep point deployed and measured, with its paired interval
            assert p['accuracy_source'] == 'measured (test)'
            lo, hi = p['accuracy_ci95_pct']
            assert lo <= p['accuracy_pct'] <= hi and p['accepted'] == (p['val_lower_pct'] >= -p['epsilon'] - 1e-9)
        lo, hi = obj['accuracy_drop_ci95_pct']
        assert lo <= obj['accuracy_drop_pct'] <= hi
        assert obj['acceptance']['val']['lower_pct'] >= -obj['epsilon'] - 1e-9 or obj['chosen_round'] == 0
        assert all(rec['accepted'] == (rec['measured']['val']['lower_pct'] >= -obj['epsilon'] - 1e-9)
                   for rec in obj['rounds'])
        assert set(obj['data_roles']) == {'train', 'val', 'test'}
        pts = obj['surrogate']['points']
        assert len(pts) == len(obj['rounds']) + len(obj['pareto'])
        assert obj['surrogate']['held_out']['n'] == sum(p['held_out'] for p in pts)
        names = {'domain model', joint.FINETUNED_REFERENCE, 'pareto eps=1'} | {f'round {rec["round"]}'
                                                                              for rec in obj['rounds']}
        assert (joint.rounds_dir(cfg, d) / 'reference_finetuned.json').is_file()  # a centre, measured first
        for p in obj['pareto']:  # solved in increasing epsilon, each centred on a configuration measured before it
            assert p['budget']['centre'] in names and p['predicted_drop_pct'] <= p['budget']['budget_pct'] + 1e-9
            assert p['measured']['val']['drop_pct'] == p['val_drop_pct']
        assert obj['pareto'][0]['budget']['centre'] != 'pareto eps=1'
        # (a looser floor may now predict less throughput than a tighter one did: the tighter point's measured drop
        # is what the surrogate knows of that configuration when it solves the looser one)
        for rec in obj['rounds']:
            sur = rec['surrogate']
            assert sur['held_out'] == (rec['branches_pruned'] > 0) and sur['recentred'] in (0, 1, 2)
            assert sur['predicted_drop_pct'] <= sur['budget_pct'] + 1e-9
        assert obj['solvers']['gd'] and obj['solvers']['milp'] and 'objective_gap_pct' in obj['solvers']['gap']
        assert set(obj['roofline']) == {'edge', 'server'}
        assert obj['deviations']['xi_accuracy_pct'] >= 0 and 1 <= len(obj['rounds']) <= 2
        # the state file rebuilds the model exactly
        state = json.loads(joint.state_path(cfg, d).read_text())
        m = build_hyper_repvgg('A0', num_classes=10, width_multiplier=WIDTH, small_input=True)
        m.load_hyper_weights(state)
        assert m.layouts() == obj['gammas'] and state['lam'] == obj['lam']
        assert [sorted(m.kept(k)) for k in range(22)] == [sorted(b['kept']) for b in obj['blocks']]
        assert m.blocks[0].alpha.tolist()[:2] == [obj['blocks'][0]['alpha']['D'], obj['blocks'][0]['alpha']['O']]
    out = capsys.readouterr().out
    assert 'domain 0:' in out and 'best plain split' in out
    before = joint.joint_path(cfg.path(), 1).read_bytes()
    assert _main(args) == 0  # finished domains are skipped
    assert joint.joint_path(cfg.path(), 1).read_bytes() == before


@pytest.mark.slow
def test_resume_after_interrupted_round(results, monkeypatch, tmp_path):
    import shutil
    res = tmp_path / 'res'
    shutil.copytree(results, res, ignore=shutil.ignore_patterns('joint_optimization'))
    # (no probes: they would measure what the zeroed sensitivities below hide, and stop the pruning)
    args = SETS + FAST + ['--results_dir', str(res), '--domain_id', '0', '--max_rounds', '3', '--epsilon', '4',
                          '--sensitivity', 'importance', '--set', 'joint.probes=0']
    real_ft = training.fine_tune_alpha
    calls = {'n': 0}

    def interrupted(*a, **k):  # the second round's fine-tuning (the fine-tuned reference's is not a round's)
        calls['n'] += ' round ' in str(k.get('desc', ''))
        if calls['n'] == 2:
            raise KeyboardInterrupt
        return real_ft(*a, **k)
    monkeypatch.setattr(training, 'fine_tune_alpha', interrupted)
    # make every round prune: a surrogate that says pruning costs nothing keeps the loop going
    real_imp = pruning.importance_sensitivities

    def free(*a, **k):
        out = real_imp(*a, **k)
        out['sensitivity_pct'] = out['sensitivity_pct'] * 0.0
        return out
    monkeypatch.setattr(pruning, 'importance_sensitivities', free)
    with pytest.raises(KeyboardInterrupt):
        _main(args)
    rd = joint.rounds_dir(_cfg(res), 0)
    r1 = (rd / 'round_001.json').read_bytes()
    ref = (rd / 'reference.json').read_bytes()
    assert not (rd / 'round_002.json').exists() and not joint.joint_path(_cfg(res).path(), 0).exists()
    monkeypatch.setattr(training, 'fine_tune_alpha', real_ft)
    monkeypatch.setattr(pruning, 'importance_sensitivities', lambda *a, **k: pytest.fail('reference recomputed'))
    assert _main(args) == 0
    assert (rd / 'round_001.json').read_bytes() == r1 and (rd / 'reference.json').read_bytes() == ref
    obj = json.loads(joint.joint_path(_cfg(res).path(), 0).read_text())
    assert obj['rounds'][0]['round'] == 1 and len(obj['rounds']) >= 2
    assert obj['sensitivity']['mode'] == 'importance'
    # the domain file's provenance is the resuming run's; the resumed round keeps its own, listed apart
    first = json.loads(r1)
    assert not set(obj['rounds'][0]) & {'created_at', 'command', 'config', 'kind', 'schema_version'}
    assert obj['resumed_rounds'] == [{'round': 1, 'created_at': first['created_at'], 'command': first['command']}]
    assert obj['created_at'] >= first['created_at'] and obj['kind'] == 'joint_domain'


def test_measured_sensitivities_match_pruning_one_branch():
    torch.manual_seed(0)
    m = build_hyper_repvgg('A0', num_classes=10, width_multiplier=WIDTH, small_input=True).eval()
    for b in m.blocks:  # random BN statistics so that branches matter
        for bn in (b.rbr_dense.bn, b.rbr_1x1.bn):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    s = pruning.measure_sensitivities(m, x, y, mean, std, batch=16)
    assert s['evaluations'] == sum(len(b.kept_set()) for b in m.blocks)
    for k, br in ((3, 'D'), (7, 'O'), (12, 'I')):
        trial = pruning.copy_with(m)
        trial.prune(k, br)
        expect = s['base_acc_pct'] - pruning.accuracy(trial, x, y, mean, std, 16)
        assert s['sensitivity_pct'][k, 'DOI'.index(br)] == pytest.approx(expect)
    assert np.isnan(s['sensitivity_pct'][1, 2])  # block 1 (stride 2) has no identity


def test_surrogate_correction_scales_to_the_measured_loss():
    sens = np.array([[1.0, 0.5, np.nan], [0.0, 0.2, 0.3]])
    pruned = np.array([[True, False, False], [False, True, False]])
    new, rec = pruning.correct_sensitivities(sens, pruned, 2.4)
    assert new[pruned].sum() == pytest.approx(2.4) and rec['factor'] == pytest.approx(2.0)
    assert new[0, 1] == 0.5 and new[1, 2] == 0.3  # unpruned branches untouched
    zero = np.zeros((1, 3))
    new, rec = pruning.correct_sensitivities(zero, np.array([[True, True, False]]), 1.0)
    assert rec['rule'] == 'add' and new[0, :2].tolist() == [0.5, 0.5]


def test_edge_profile_mismatch_and_missing_domain_are_named(results):
    with pytest.raises(L.LutError, match="--edge_profile rpi4: .* profile 'jetson-tx2'; re-run step 1"):
        _main(SETS + ['--results_dir', str(results), '--domain_id', '0', '--edge_profile', 'rpi4'])
    with pytest.raises(ConfigError, match='--domains'):
        _main(SETS + ['--results_dir', str(results), '--domain_id', '5'])
    with pytest.raises(ConfigError, match='joint.solver'):
        _main(SETS + ['--results_dir', str(results), '--domain_id', '0', '--solver', 'simplex'])
    with pytest.raises(ConfigError, match='joint.acceptance'):
        _main(SETS + ['--results_dir', str(results), '--domain_id', '0', '--set', 'joint.acceptance=maybe'])


def test_apply_config_sets_masks_and_layouts():
    m = build_hyper_repvgg('A0', num_classes=10, width_multiplier=WIDTH)
    gammas = [1, 4] + [8 if s.has_identity else 1 for s in m.plan[2:]]
    pruning.apply_config(m, gammas)
    assert m.layouts() == gammas and m.kept(0) == LAYOUTS[1].branches and m.kept(2) == frozenset('OI')
    ident = sum(s.has_identity for s in m.plan[2:])
    assert pruning.pruned_mask(m).sum() == 1 + 0 + ident + (20 - ident)  # D everywhere but block 1
    pruning.apply_config(m, [13 if s.has_identity else 4 for s in m.plan])  # restoring is allowed
    assert not pruning.pruned_mask(m).any()


@pytest.mark.slow
@pytest.mark.network
def test_real_mode_deploys_and_measures_through_a_loopback_worker(results, tmp_path):
    import shutil
    import subprocess
    import sys
    from conftest import REPO
    from config import UserError
    from timing import measure as M
    res = tmp_path / 'res'
    shutil.copytree(results, res, ignore=shutil.ignore_patterns('joint_optimization'))
    real = SETS + FAST + ['--results_dir', str(res), '--domain_id', '1', '--mode', 'real', '--set',
                          'real.connect_timeout_s=60', '--set', 'loop.top_k=2', '--set', 'loop.passes=1',
                          '--set', 'loop.real_samples=16']
    # the modelled edge of the fixture's LUT: real mode refuses to compare a measured run with it, naming step 1
    with pytest.raises(UserError, match='step1_measure_lut.py --mode real'):
        _main(real + ['--port', '1'])
    # an edge side measured on this machine, where the worker runs too
    cfg = _cfg(res)
    lut = L.load_lut(cfg.path('hardware_lut_complete.json'))
    edge = L.side_payload('edge', lut['model'], 32, M.measure_side(lut['model'], 32, [1], repeats=2, warmup=1,
                                                                     threads=1))
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete',
                   L.merge(dict(lut['server'], model=lut['model'], input_size=32), edge, L.resolve_link(cfg.lut),
                           'fp32'), cfg, 'test')
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    worker = subprocess.Popen([sys.executable, str(REPO / 'client_worker.py'), '--port', str(port), '--device', 'cpu',
                               '--threads', '1', '--backoff_max_s', '1'], cwd=str(REPO),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _main(real + ['--port', str(port)]) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(10)
    obj = json.loads(joint.joint_path(_cfg(res).path(), 1).read_text())
    m = obj['measured']
    assert obj['mode'] == 'real' and m['samples'] > 0
    # the worker runs exactly the chosen configuration: its accuracy equals the offline test accuracy
    assert m['accuracy_pct'] == pytest.approx(obj['final_accuracy_pct'])
    assert m['throughput_fps'] > 0 and m['throughput_ratio_measured_over_predicted'] > 0
    loop = obj['closed_loop']  # chosen, baselines and the top-2 measured through the worker
    assert loop['mode'] == 'real' and loop['report']['mode'] == 'real' and loop['worker']['same_device_as_lut']
    roles = {x for r in loop['measurements'] for x in r['roles']}
    assert {'chosen', 'edge_only', 'server_only', 'best_plain_split', 'top1', 'top2'} <= roles
    assert all(r['measured']['kind'] == 'measured' and r['measured']['throughput_fps'] > 0
               for r in loop['measurements'])
    # the worker's memory with the edge part against the full model, in the JSON and in step 4's summary.md
    mem = m['memory']
    # `measured` is the run of the goal program's pick, streamed before the closed loop (docs/artifacts.md): when the
    # loop's race adopted another split, the memory was measured at the pick's lambda
    deployed_lam = (obj.get('optimizer_choice') or {}).get('lam', obj['lam'])
    assert 0 <= mem['edge_part']['weight_bytes'] < mem['full_model']['weight_bytes'] or deployed_lam == 22
    assert mem['full_model']['blocks'] == 22 and mem['edge_part']['blocks'] == deployed_lam
    for case in ('edge_part', 'full_model'):
        assert mem[case]['peak_rss_bytes'] > 0 and mem[case]['part_rss_bytes'] is not None
    from pipeline import step4_visualize_results as step4
    assert step4.main(['--results_dir', str(res), '--formats', 'png']) == 0
    md = (res / 'visualization' / 'summary.md').read_text()
    assert '## Edge device memory' in md and 'peak RSS, full model (MB)' in md
    assert json.loads((res / 'visualization' / 'summary.json').read_text())['edge_memory'][0]['lam'] == deployed_lam


def test_chain_goal_program_and_the_two_device_chain(results, tmp_path, capsys):
    """--chain: K = 2 (edge:wifi,server) makes the same decision as --link wifi without a chain; K = 3 writes the
    goal program over the chain in the artifact's chain field: pruning per branch, a split vector, a layout per
    block valid on its device, the stages by name."""
    import shutil
    from optim import cost as C
    res = tmp_path / 'res'
    shutil.copytree(results, res, ignore=shutil.ignore_patterns('joint_optimization'))
    base = SETS + FAST + ['--results_dir', str(res), '--domain_id', '0', '--max_rounds', '1', '--epsilon_sweep', '1']
    path = joint.joint_path(_cfg(res).path(), 0)
    assert _main(base + ['--link', 'wifi']) == 0
    two = json.loads(path.read_text())
    assert 'chain' not in two
    assert _main(base + ['--chain', 'edge:wifi,server']) == 0
    k2 = json.loads(path.read_text())
    for key in ('gammas', 'lam', 'predicted', 'branches_pruned', 'blocks', 'goal_evaluation', 'link'):
        assert k2[key] == two[key], key
    assert k2['chain']['num_devices'] == 2 and k2['chain']['decision']['lams'] == [two['lam']]
    with pytest.raises(ConfigError, match='a chain of two devices sets the link itself'):
        _main(base + ['--chain', 'edge:wifi,server', '--link', '4g'])
    capsys.readouterr()
    assert _main(base + ['--chain', 'rpi4:wifi,jetson-orin-nano:ethernet,server', '--link', 'wifi']) == 0
    k3 = json.loads(path.read_text())
    assert k3['gammas'] == two['gammas'] and k3['lam'] == two['lam']  # the two-device decision is unchanged
    ch = k3['chain']
    assert ch['description'] == 'rpi4:wifi,jetson-orin-nano:ethernet,server' and ch['num_devices'] == 3
    dec = ch['decision']
    n = len(dec['gammas'])
    assert len(dec['lams']) == 2 and dec['hop_blocks'] == [list(r) for r in C.hop_ranges(dec['lams'], n)]
    assert set(dec['stages_ms']) == {'rpi4', 'link1:wifi', 'jetson-orin-nano', 'link2:ethernet', 'server'}
    avail = [set(a) for a in (b['kept'] + b['pruned'] for b in k3['blocks'])]
    for g, kept, a in zip(dec['gammas'], dec['kept'], avail):
        assert set(kept) <= a and g in layouts_for(kept)
    assert dec['branches_pruned'] == sum(len(a) - len(k) for a, k in zip(avail, dec['kept']))
    assert dec['xi_accuracy_pct'] <= 1e-7 and dec['period_ms'] == pytest.approx(max(dec['stages_ms'].values()))
    for b in ch['baselines'].values():  # the goal program's key is at least as good as each start's
        assert (dec['key']['xi_accuracy_pct'], dec['key']['throughput_objective']) <= \
            (b['key']['xi_accuracy_pct'], b['key']['throughput_objective'] + 1e-7)
    sv = ch['solver']
    assert sv['solvers']['milp']['status'] == 'optimal' and sv['solvers']['local_search']['status'] in (
        'local_optimum', 'move_limit')
    assert sv['gap']['objective_gap_pct'] >= -1e-6 and sv['chosen'] in ('milp', 'local_search')  # the MILP is exact
    assert 'predicted' in ch['how'] and k3['timing']['chain_s'] > 0
    m = ch['measured']  # the decision's pruning deployed, fine-tuned and measured (or a round's of the same pruning)
    lo, hi = m['accuracy_ci95_pct']
    assert lo <= m['accuracy_pct'] <= hi and m['accepted'] == (m['val_lower_pct'] >= -k3['epsilon'] - 1e-9)
    assert (joint.rounds_dir(_cfg(res), 0) / 'chain.json').is_file()
    assert 'domain 0: chain rpi4:wifi,jetson-orin-nano:ethernet,server (predicted' in capsys.readouterr().out


def test_acceptance_rules_bound_and_point():
    from pipeline.joint import accepts
    m = {'val': {'drop_pct': 0.8, 'lower_pct': -1.3}}  # the drop is within 1 point, its 95 % bound is not
    assert not accepts(m, 1.0) and not accepts(m, 1.0, 'bound') and accepts(m, 1.0, 'point')
    assert accepts(m, 1.3, 'bound') and not accepts(m, 0.5, 'point')
