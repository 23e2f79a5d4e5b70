"""Step 3 per domain: goal program + progressive pruning, checkpointed rounds, Pareto sweep
(docs/design.md#progressive-pruning).

`run_domain` does one domain end to end and returns the payload of `joint_optimization/domain_<d>_joint.json`
and of its state file (`domain_<d>_state.json`: HyperRepVGG.hyper_weights() plus gammas and lambda, loadable with
HyperRepVGG.load_hyper_weights).  Files are written only through artifacts.write_artifact (atomic).

Rounds live in `joint_optimization/domain_<d>_rounds/`: `reference.json` (A_ref and the initial sensitivities)
and `round_<r>.json` (the round's solution, measured accuracy, corrected sensitivities and the alpha state after
fine-tuning).  A rerun with the same inputs (fingerprint) resumes after the last finished round; solving is
deterministic (seeded per domain and round), so a resumed run makes the same decisions.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from artifacts import JOINT_DIR, ArtifactError, joint_path, load_artifact, write_artifact
from config import Config, ConfigError, UserError
from hyper_repvgg import BRANCHES, HyperRepVGG
from optim import cost, exact, goal
from accuracy import pruning
from optim.cost import CostTables

log = logging.getLogger('step3')
JOINT_VERSION = 2  # bump when the goal program or the pruning loop changes what a domain's result is: cached ones are redone
SURROGATE_NOTE = ('surrogate: A_ref(test) minus the summed corrected branch sensitivities of the final round; '
                  'predicted, not measured')


def state_path(cfg: Config, d: int) -> Path:
    return cfg.path(JOINT_DIR, f'domain_{d}_state.json')


def rounds_dir(cfg: Config, d: int) -> Path:
    return cfg.path(JOINT_DIR, f'domain_{d}_rounds')


def _canon(o: Any) -> Any:
    if isinstance(o, dict):
        return tuple(sorted((str(k), _canon(v)) for k, v in o.items()))
    if isinstance(o, (list, tuple)):
        return tuple(_canon(v) for v in o)
    return o


def fingerprint(*parts: Any) -> str:
    """A stable digest of plain data (dicts, lists, numbers, strings)."""
    return hashlib.sha256(repr(_canon(list(parts))).encode()).hexdigest()


def check_joint_config(cfg: Config) -> None:
    j = cfg.joint
    if j.solver not in ('gd', 'milp', 'both'):
        raise ConfigError(f'--solver / joint.solver: expected gd, milp or both, got {j.solver!r}')
    if j.sensitivity not in pruning.SENSITIVITY_MODES:
        raise ConfigError(f'--sensitivity / joint.sensitivity: expected one of {pruning.SENSITIVITY_MODES}, '
                          f'got {j.sensitivity!r}')
    if j.max_rounds < 1 or j.epochs_per_round < 0:
        raise ConfigError(f'--max_rounds / --epochs_per_round: expected >= 1 and >= 0, got {j.max_rounds}, '
                          f'{j.epochs_per_round}')
    if not (j.epsilon >= 0 and all(e >= 0 for e in j.epsilon_sweep)):
        raise ConfigError('--epsilon / --epsilon_sweep: accuracy points must be >= 0')
    for name in ('throughput_target', 'edge_memory_budget_mb', 'roofline_weight', 'milp_time_limit_s',
                 'importance_share', 'min_saving_pct', 'max_new_prunes'):
        if not getattr(j, name) >= 0:
            raise ConfigError(f'joint.{name}: expected a number >= 0, got {getattr(j, name)}')
    if not 0 < j.importance_share <= 1:
        raise ConfigError(f'joint.importance_share: expected a share in (0, 1], got {j.importance_share}')


@dataclass
class Inputs:
    """Everything that is shared by the domains of one step-3 run."""
    cfg: Config
    lut: Dict[str, Any]
    lut_file: Path
    tables: CostTables
    stats: Dict[str, Any]
    available: List[frozenset]  # per block, every branch it has
    unpruned: exact.ExactResult  # step-2 optimum (all branches kept): the period scale and round 0
    warm: Optional[Tuple[List[int], int]]  # step-2 configuration (warm start), when its artifact fits
    warm_source: str
    partition: Dict[str, Any]
    mean: Sequence[float]
    std: Sequence[float]
    base_fingerprint: str
    link: Dict[str, Any]  # the link the cost tables use (timing.lut.LinkSpec.to_dict())


def problem_for(inp: Inputs, sens: np.ndarray, a_ref: float, epsilon: float,
                pruned_before: Optional[np.ndarray] = None) -> goal.GoalProblem:
    """The goal program of one round (`pruned_before` given: at most joint.max_new_prunes new prunes) or of a
    Pareto point (no step limit)."""
    j = inp.cfg.joint
    return goal.build_problem(inp.tables, np.clip(sens, 0.0, None), inp.available, inp.stats, a_ref,
                              epsilon, inp.unpruned.stages['period_ms'], j.roofline_weight, j.throughput_target,
                              j.edge_memory_budget_mb * 1e6, pruned_before=pruned_before,
                              max_new_prunes=j.max_new_prunes if pruned_before is not None else 0)


def _gd_kwargs(cfg: Config, warm: Optional[Tuple[Sequence[int], int]]) -> Dict[str, Any]:
    o = cfg.optim
    return {'steps': o.steps, 'restarts': o.restarts, 'lr': o.lr, 'tau_start': o.tau_start, 'tau_end': o.tau_end,
            'warm_start': warm}


def _solve(inp: Inputs, p: goal.GoalProblem, solver: str, d: int, r: int,
           warm: Optional[Tuple[Sequence[int], int]]) -> Dict[str, Any]:
    from accuracy.training import seeded_generator
    return goal.solve(p, solver, seeded_generator(inp.cfg.seed, 3000 + d, r), _gd_kwargs(inp.cfg, warm),
                      inp.cfg.joint.milp_time_limit_s)


def _solutions(sol: Dict[str, Any]) -> Dict[str, Any]:
    return {'gd': sol['gd'].to_dict() if sol['gd'] is not None else None,
            'milp': sol['milp'].to_dict() if sol['milp'] is not None else None,
            'gap': sol['gap'], 'chosen': sol['best'].solver}


def side_roofline(inp: Inputs, gammas: Sequence[int], lam: int) -> Dict[str, Any]:
    """Per side: FLOPs / bytes (weights read once + activations x batch) over the side's blocks, its knee, the
    ratio, and the mean |log10(I_block / knee)| of its blocks (the tie-breaker's term)."""
    s, b = inp.stats, inp.tables.batch
    g = np.asarray(gammas, dtype=np.int64)
    rows = np.arange(g.size)
    out = {}
    for side, sel in (('edge', rows < lam), ('server', rows >= lam)):
        knee = s[f'knee_{side}']
        if not sel.any():
            out[side] = {'blocks': 0, 'knee_flop_per_byte': knee}
            continue
        fl = float((s['flops'][rows, g] * b)[sel].sum())
        by = float((s['weight_bytes'][rows, g] + s['act_bytes'][rows, g] * b)[sel].sum())
        per = goal.roofline_distance(s['flops'][rows, g], s['weight_bytes'][rows, g], s['act_bytes'][rows, g], knee, b)
        out[side] = {'blocks': int(sel.sum()), 'flops': fl, 'bytes': by, 'intensity_flop_per_byte': fl / by,
                     'knee_flop_per_byte': knee, 'intensity_over_knee': fl / by / knee,
                     'mean_abs_log10_distance': float(per[sel].mean())}
    return out


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def _clear(directory: Path) -> None:
    if directory.is_dir():
        for f in sorted(directory.iterdir()):
            if f.is_file() and (f.suffix in ('.json', '.pt') or f.name.endswith('.tmp')):
                f.unlink()


def _load_checkpoint(path: Path, kind: str, fp: str) -> Optional[Dict[str, Any]]:
    try:
        obj = load_artifact(path, kind, {'fingerprint': str})
    except ArtifactError:
        return None
    return obj if obj['fingerprint'] == fp else None


def _model_from(base: HyperRepVGG, hyper: Dict[str, Any], cfg: Config, bn_file: Optional[str]) -> HyperRepVGG:
    m = pruning.copy_with(base)
    m.load_hyper_weights(hyper)
    if bn_file:
        from accuracy.training import load_state_dict_file
        merged = m.state_dict()
        merged.update(load_state_dict_file(cfg.path(bn_file), bn_file))
        m.load_state_dict(merged, strict=True)
    return m.eval()


def _split_train(loader: Any, samples: int, cfg: Config, d: int, r: int) -> Tuple[Any, Any]:
    """(fine-tuning loader over a seeded random subset of `samples` train items, selection loader over the other
    train items).  Fine-tuning keeps its best state on the selection loader, so the validation split that checks
    the accuracy goal plays no part in the selection.  `samples` 0 or too large: half of the train split each."""
    import torch

    from accuracy.training import seeded_generator
    n = len(loader.dataset)
    samples = samples if 0 < samples < n else n // 2
    perm = torch.randperm(n, generator=seeded_generator(cfg.seed, 5000 + d, r)).tolist()

    def make(idx: List[int], shuffle: bool) -> Any:
        sub = torch.utils.data.Subset(loader.dataset, idx)
        sub.mean, sub.std = loader.dataset.mean, loader.dataset.std
        return torch.utils.data.DataLoader(sub, batch_size=loader.batch_size if shuffle else cfg.train.eval_batch_size,
                                           shuffle=shuffle, generator=seeded_generator(cfg.seed, 6000 + d, r),
                                           num_workers=cfg.data.num_workers)
    return make(perm[:samples], True), make(perm[samples:], False)


# ----------------------------------------------------------------------------------------------------------
# One domain: data, reference and sensitivities, rounds, final pick, Pareto sweep, payload
# ----------------------------------------------------------------------------------------------------------

def _sens_array(rows: Sequence[Sequence[Optional[float]]]) -> np.ndarray:
    """Sensitivities as stored in JSON (None: not measured) -> float array with NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def _sens_json(sens: np.ndarray) -> List[List[Optional[float]]]:
    return np.where(np.isnan(sens), None, sens).tolist()


@dataclass
class DomainData:
    """One domain's images: the train loader (fine-tuning) and the collected val, sensitivity and test arrays."""
    train: Any
    x_val: Any
    y_val: Any
    x_sens: Any
    y_sens: Any
    x_test: Any
    y_test: Any
    generator: Any  # shared by the train loader's shuffling and the fine-tuning


@dataclass
class LoopState:
    """The progressive-pruning loop's state between rounds."""
    sens: np.ndarray  # corrected sensitivities after the latest round (points)
    warm: Optional[Tuple[Sequence[int], int]]  # the solvers' warm start
    rounds: List[Dict[str, Any]] = field(default_factory=list)
    models: List[HyperRepVGG] = field(default_factory=list)
    prev_cfg: Optional[Tuple[Sequence[int], int]] = None
    prev_met: bool = False
    stop: str = 'max_rounds'


@dataclass
class FinalPick:
    model: HyperRepVGG
    gammas: List[int]
    lam: int
    chosen_round: int
    val_acc: float
    test_acc: float
    evaluation: Dict[str, Any]


def _domain_data(inp: Inputs, d: int) -> DomainData:
    from accuracy.training import seeded_generator
    from data.domains import domain_loader
    cfg, j = inp.cfg, inp.cfg.joint
    gen = seeded_generator(cfg.seed, 2000 + d)
    ebs = cfg.train.eval_batch_size
    train = domain_loader(cfg, inp.partition, d, 'train', cfg.train.batch_size, True, gen)
    val = domain_loader(cfg, inp.partition, d, 'val', ebs, False)
    xv, yv = pruning.collect(val)
    xs, ys = pruning.collect(val, j.sensitivity_samples) if j.sensitivity_samples else (xv, yv)
    xt, yt = pruning.collect(domain_loader(cfg, inp.partition, d, 'test', ebs, False))
    return DomainData(train, xv, yv, xs, ys, xt, yt, gen)


def _read_checkpoint(path: Path, kind: str, fp: str, model0: Optional[HyperRepVGG] = None, cfg: Optional[Config] = None,
                     bn_file0: Optional[str] = None) -> Optional[Tuple[Dict[str, Any], Optional[HyperRepVGG]]]:
    """A checkpoint written with the same inputs: (record, its model rebuilt from model0 when given), else None."""
    rec = _load_checkpoint(path, kind, fp)
    if rec is None:
        return None
    model = None
    if model0 is not None:
        model = _model_from(model0, rec['hyper_weights'], cfg, rec.get('bn_state_file') or bn_file0)
    return rec, model


def _write_checkpoint(path: Path, kind: str, rec: Dict[str, Any], cfg: Config, command: str,
                      model: Optional[HyperRepVGG] = None, bn_rel: Optional[str] = None) -> None:
    """Writes a checkpoint record (and first the model's BN state to `bn_rel`, when it adapts BN)."""
    from accuracy import training
    if model is not None and bn_rel is not None:
        training.save_state_dict(training.bn_state(model), cfg.path(bn_rel))
    write_artifact(path, kind, rec, cfg, command)


def reference_phase(inp: Inputs, model0: HyperRepVGG, data: DomainData, d: int) -> Dict[str, Any]:
    """A_ref on val and test and the initial branch sensitivities (points) of the domain model."""
    cfg, j = inp.cfg, inp.cfg.joint
    ebs = cfg.train.eval_batch_size
    a_val = pruning.accuracy(model0, data.x_val, data.y_val, inp.mean, inp.std, ebs, cfg.device)
    a_test = pruning.accuracy(model0, data.x_test, data.y_test, inp.mean, inp.std, ebs, cfg.device)
    if j.sensitivity == 'measured':
        s = pruning.measure_sensitivities(model0, data.x_sens, data.y_sens, inp.mean, inp.std, ebs, cfg.device,
                                          desc=f'domain {d} sensitivities', only=goal.worth_measuring(
                                              inp.tables, inp.available, j.min_saving_pct))
    else:
        s = pruning.importance_sensitivities(model0, cfg.model.input_size, data.x_sens, data.y_sens, inp.mean,
                                             inp.std, j.importance_share, ebs, cfg.device)
    return {'a_ref_val_pct': a_val, 'a_ref_test_pct': a_test, 'mode': j.sensitivity,
            'sensitivity_samples': int(data.y_val.numel() if not j.sensitivity_samples else data.y_sens.numel()),
            'sensitivity_pct': _sens_json(s['sensitivity_pct']),
            'evaluations': s['evaluations'], 'details': {k: v for k, v in s.items()
                                                         if k in ('kappa', 'calibration', 'base_acc_pct')}}


def _start_model(p: goal.GoalProblem, st: LoopState, want: np.ndarray, model0: HyperRepVGG) -> HyperRepVGG:
    """Progressive: continue from the latest round that met the goal and whose pruned branches are all pruned again
    (else from the domain's model), so that restored branches never meet alphas tuned without them."""
    for old, old_model in reversed(list(zip(st.rounds, st.models))):
        if old['goal_met'] and not (goal.pruned_mask_of(p, old['gammas']) & ~want).any():
            return old_model
    return model0


def round_phase(inp: Inputs, st: LoopState, model0: HyperRepVGG, data: DomainData, a_val: float, d: int,
                r: int, fp: str) -> Optional[Tuple[Dict[str, Any], HyperRepVGG, np.ndarray]]:
    """One progressive pruning round: solve, prune, fine-tune alpha, measure on val, correct the sensitivities.
    Returns (the round's record, its model, the corrected sensitivities), or None when it converged."""
    from accuracy import training
    cfg, j = inp.cfg, inp.cfg.joint
    tr = time.perf_counter()
    floor = a_val - j.epsilon
    # progressive steps from the latest round that met the goal (a missed round is backtracked)
    anchor = next((i for i in range(len(st.rounds) - 1, -1, -1) if st.rounds[i]['goal_met']), None)
    before = np.zeros((len(inp.available), 3), dtype=bool) if anchor is None else \
        goal.pruned_mask_of(problem_for(inp, st.sens, a_val, j.epsilon), st.rounds[anchor]['gammas'])
    p = problem_for(inp, st.sens, a_val, j.epsilon, before)
    sol = _solve(inp, p, j.solver, d, r, st.warm)
    best = sol['best']
    if st.prev_cfg is not None and st.prev_met and (best.gammas, best.lam) == (list(st.prev_cfg[0]), st.prev_cfg[1]):
        return None
    model = pruning.copy_with(_start_model(p, st, goal.pruned_mask_of(p, best.gammas), model0), best.gammas)
    pruned = pruning.pruned_mask(model)
    hist = None
    if pruned.any() and j.epochs_per_round > 0:
        tune, select = _split_train(data.train, j.finetune_samples, cfg, d, r)
        hist = training.fine_tune_alpha(model, tune, select, j.epochs_per_round, cfg.train.alpha_lr, cfg.device,
                                        data.generator, inp.mean, inp.std, desc=f'domain {d} round {r} fine-tune')
    acc = pruning.accuracy(model, data.x_val, data.y_val, inp.mean, inp.std, cfg.train.eval_batch_size, cfg.device)
    predicted_loss = float(best.evaluation['surrogate_loss_pct'])
    sens_new, corr = pruning.correct_sensitivities(st.sens, pruned, a_val - acc)
    met = acc >= floor - 1e-9
    bn_rel = f'{JOINT_DIR}/domain_{d}_rounds/round_{r:03d}_bn.pt' if model.adapt_bn else None
    rec = {'fingerprint': fp, 'round': r, 'gammas': best.gammas, 'lam': best.lam,
           'branches_pruned': int(pruned.sum()), 'surrogate_accuracy_pct': a_val - predicted_loss,
           'val_accuracy_pct': acc, 'goal_met': bool(met), 'floor_pct': floor,
           'predicted': {k: best.evaluation[k] for k in ('edge_ms', 'link_ms', 'server_ms', 'latency_ms',
                                                         'throughput_fps', 'bottleneck', 'period_ms')},
           'solvers': _solutions(sol), 'correction': corr, 'fine_tune': hist,
           'sensitivity_after_pct': _sens_json(sens_new),
           'hyper_weights': model.hyper_weights(), 'bn_state_file': bn_rel,
           'wall_s': time.perf_counter() - tr}
    return rec, model, sens_new


def _run_rounds(inp: Inputs, st: LoopState, model0: HyperRepVGG, bn_file0: Optional[str], data: DomainData,
                a_val: float, d: int, fp: str, command: str) -> None:
    """The progressive pruning rounds, each resumed from its checkpoint when one exists with the same inputs."""
    cfg = inp.cfg
    rd = rounds_dir(cfg, d)
    for r in range(1, cfg.joint.max_rounds + 1):
        path = rd / f'round_{r:03d}.json'
        done = _read_checkpoint(path, 'joint_round', fp, model0, cfg, bn_file0)
        if done is not None:
            rec, model = done
            st.rounds.append(rec)
            st.models.append(model)
            st.sens = _sens_array(rec['sensitivity_after_pct'])
            st.prev_cfg, st.prev_met = (rec['gammas'], rec['lam']), rec['goal_met']
            st.warm = (rec['gammas'], rec['lam'])
            log.info('domain %d: round %d resumed from %s', d, r, path)
            continue
        out = round_phase(inp, st, model0, data, a_val, d, r, fp)
        if out is None:
            st.stop = 'converged'
            log.info('domain %d: round %d re-solve repeats round %d, which met the goal: converged', d, r, r - 1)
            break
        rec, model, sens_new = out
        _write_checkpoint(path, 'joint_round', rec, cfg, command, model, rec['bn_state_file'])
        log.info('domain %d: round %d: %d branches pruned, lambda %d, predicted %.1f fps; val %.2f %% (surrogate '
                 '%.2f %%), goal %s', d, r, rec['branches_pruned'], rec['lam'], rec['predicted']['throughput_fps'],
                 rec['val_accuracy_pct'], rec['surrogate_accuracy_pct'], 'met' if rec['goal_met'] else 'missed')
        st.rounds.append(rec)
        st.models.append(model)
        st.sens, st.prev_cfg, st.prev_met = sens_new, (rec['gammas'], rec['lam']), rec['goal_met']
        st.warm = (rec['gammas'], rec['lam'])


def final_pick(inp: Inputs, st: LoopState, model0: HyperRepVGG, data: DomainData, a_val: float) -> FinalPick:
    """The fastest round that met the goal, else the unpruned optimum; its test accuracy and goal evaluation."""
    cfg = inp.cfg
    p_final = problem_for(inp, st.sens, a_val, cfg.joint.epsilon)
    feasible = [rec for rec in st.rounds if rec['goal_met']]
    if feasible:
        pick = max(feasible, key=lambda rec: (rec['predicted']['throughput_fps'], rec['val_accuracy_pct'],
                                              rec['round']))
        model = st.models[st.rounds.index(pick)]
        gammas, lam, chosen_round, val_acc = pick['gammas'], pick['lam'], pick['round'], pick['val_accuracy_pct']
    else:
        gammas, lam, chosen_round, val_acc = inp.unpruned.gammas, inp.unpruned.lam, 0, a_val
        model = pruning.copy_with(model0, gammas)
    pruning.apply_config(model, gammas)
    test_acc = pruning.accuracy(model, data.x_test, data.y_test, inp.mean, inp.std, cfg.train.eval_batch_size,
                                cfg.device)
    return FinalPick(model, gammas, lam, chosen_round, val_acc, test_acc, goal.evaluate(p_final, gammas, lam))


def pareto_phase(inp: Inputs, sens: np.ndarray, a_val: float, a_test: float, d: int,
                 warm: Tuple[Sequence[int], int]) -> List[Dict[str, Any]]:
    """The epsilon sweep solved on the corrected surrogate (no training)."""
    from accuracy.training import seeded_generator
    j = inp.cfg.joint
    pareto = []
    sweep_solver = 'gd' if j.solver == 'gd' else 'milp'
    for k, eps in enumerate(j.epsilon_sweep):
        sp = goal.solve(problem_for(inp, sens, a_val, eps), sweep_solver, seeded_generator(inp.cfg.seed, 4000 + d, k),
                        _gd_kwargs(inp.cfg, warm), j.milp_time_limit_s)['best']
        pareto.append({'epsilon': float(eps), 'accuracy_pct': a_test - sp.evaluation['surrogate_loss_pct'],
                       'throughput_fps': sp.evaluation['throughput_fps'], 'lam': sp.lam,
                       'branches_pruned': sp.evaluation['branches_pruned'], 'gammas': sp.gammas,
                       'solver': sp.solver, 'status': sp.status, 'accuracy_source': 'surrogate'})
    return pareto


def _measure_real(real_run: Any, fin: FinalPick, data: DomainData) -> Dict[str, Any]:
    """Deploys the final configuration through `real_run` and compares the measurement with the prediction."""
    ev = fin.evaluation
    measured = real_run(fin.model, fin.gammas, fin.lam, data.x_test, data.y_test)
    # steady state (pipeline filled) is what B / max(stage) predicts; the whole-run figure stays in throughput_fps
    steady = measured.get('steady_throughput_fps') or measured['throughput_fps']
    measured['throughput_ratio_measured_over_predicted'] = steady / ev['throughput_fps']
    measured['latency_ratio_measured_over_predicted'] = measured['latency_ms'] / ev['latency_ms']
    measured['accuracy_diff_measured_minus_offline_pct'] = measured['accuracy_pct'] - fin.test_acc
    return measured


def payload_phase(inp: Inputs, d: int, fp: str, ref: Dict[str, Any], st: LoopState, fin: FinalPick,
                  pareto: List[Dict[str, Any]], measured: Optional[Dict[str, Any]], real: bool) -> Dict[str, Any]:
    """The domain's joint_domain artifact (without `timing`)."""
    j = inp.cfg.joint
    a_val, a_test = float(ref['a_ref_val_pct']), float(ref['a_ref_test_pct'])
    floor = a_val - j.epsilon
    gammas, lam, ev = fin.gammas, fin.lam, fin.evaluation
    available = [sorted(a, key=BRANCHES.index) for a in inp.available]
    kept_final = goal.kept_sets(gammas)
    blocks = fin.model.hyper_weights()['blocks']
    for b, av in zip(blocks, available):
        b['pruned'] = [x for x in av if x not in b['kept']]
    last = st.rounds[-1] if st.rounds else None
    return {
        'domain': d, 'fingerprint': fp, 'mode': 'real' if real else 'pseudo',
        'a_ref_pct': a_test, 'a_ref_val_pct': a_val, 'final_accuracy_pct': fin.test_acc,
        'final_val_accuracy_pct': fin.val_acc,
        'accuracy_drop_pct': a_test - fin.test_acc, 'epsilon': j.epsilon, 'accuracy_floor_val_pct': floor,
        'lam': int(lam), 'gammas': [int(g) for g in gammas], 'blocks': blocks,
        'branches_pruned': int(sum(len(a) - len(k) for a, k in zip(available, kept_final))),
        'deviations': {'xi_accuracy_pct': max(0.0, floor - fin.val_acc),
                       'xi_accuracy_test_pct': max(0.0, a_test - j.epsilon - fin.test_acc),
                       'xi_throughput_fps': ev['deviations']['xi_throughput_fps'],
                       'xi_memory_bytes': ev['deviations']['xi_memory_bytes']},
        'predicted': {k: ev[k] for k in ('edge_ms', 'link_ms', 'server_ms', 'latency_ms', 'throughput_fps',
                                         'bottleneck', 'period_ms')},
        'roofline': side_roofline(inp, gammas, lam), 'edge_weight_bytes': ev['edge_weight_bytes'],
        'goal_evaluation': ev, 'chosen_round': fin.chosen_round, 'stop_reason': st.stop,
        'solvers': (st.rounds[fin.chosen_round - 1] if fin.chosen_round else last or {}).get('solvers'),
        'rounds': [{k: v for k, v in rec.items() if k not in ('hyper_weights', 'fingerprint', 'sensitivity_after_pct')}
                   for rec in st.rounds],
        'sensitivity': {'mode': ref['mode'], 'samples': ref['sensitivity_samples'], 'evaluations': ref['evaluations'],
                        'initial_pct': ref['sensitivity_pct'],
                        'final_pct': _sens_json(st.sens), 'details': ref['details']},
        'pareto': pareto, 'pareto_note': SURROGATE_NOTE,
        'baselines': {'unpruned': cost.plain_baselines(inp.tables, inp.available),
                      'pruned': cost.plain_baselines(inp.tables, kept_final)},
        'unpruned_optimum': dict(inp.unpruned.stages, description='step-2 optimum: layouts and split, nothing pruned'),
        'warm_start': inp.warm_source, 'link': inp.link, 'lut_file': str(inp.lut_file),
        'measured': measured, 'state_file': str(state_path(inp.cfg, d).relative_to(inp.cfg.path())),
    }


def _state(inp: Inputs, d: int, fp: str, fin: FinalPick) -> Dict[str, Any]:
    """The domain's joint_state artifact (writes the BN state file it names when the model adapts BN)."""
    from accuracy import training
    state = dict(fin.model.hyper_weights(), gammas=[int(g) for g in fin.gammas], lam=int(fin.lam), domain=d,
                 fingerprint=fp)
    if fin.model.adapt_bn:
        rel = f'{JOINT_DIR}/domain_{d}_bn.pt'
        training.save_state_dict(training.bn_state(fin.model), inp.cfg.path(rel))
        state['bn_state_file'] = rel
    return state


def run_domain(inp: Inputs, d: int, command: str, force: bool = False,
               real_run: Optional[Any] = None) -> Dict[str, Any]:
    """Step 3 for domain d; returns {'payload', 'state', 'skipped'}.  `real_run(model, gammas, lam, x, y)` (real
    mode) deploys the configuration and returns the measured dict."""
    from accuracy import training
    cfg, j = inp.cfg, inp.cfg.joint
    t_start = time.perf_counter()
    hw_entry = load_artifact(training.hyper_weights_path(cfg), 'trained_hyper_weights', {'domains': dict})['domains']
    if str(d) not in hw_entry:
        raise UserError(f'{training.hyper_weights_path(cfg)}: no hyper-weights for domain {d}; run step 0 for it')
    fp = fingerprint(inp.base_fingerprint, hw_entry[str(d)], d)
    if not force:
        done = _load_checkpoint(joint_path(cfg.path(), d), 'joint_domain', fp)
        if done is not None and (real_run is None or isinstance(done.get('measured'), dict)):
            log.info('domain %d: finished earlier with the same inputs, skipped (--force redoes it)', d)
            return {'payload': done, 'state': None, 'skipped': True}
    rd = rounds_dir(cfg, d)
    if force:
        _clear(rd)
    model0 = training.load_domain_model(cfg, d).to(cfg.device)
    bn_file0 = hw_entry[str(d)].get('bn_state_file')
    data = _domain_data(inp, d)
    timing: Dict[str, float] = {}

    t0 = time.perf_counter()  # reference accuracy and initial sensitivities (checkpointed: the most expensive step)
    done_ref = _read_checkpoint(rd / 'reference.json', 'joint_reference', fp)
    if done_ref is None:
        _clear(rd)
        ref = dict(fingerprint=fp, **reference_phase(inp, model0, data, d))
        _write_checkpoint(rd / 'reference.json', 'joint_reference', ref, cfg, command)
    else:
        ref = done_ref[0]
    timing['reference_s'] = time.perf_counter() - t0
    a_val, a_test = float(ref['a_ref_val_pct']), float(ref['a_ref_test_pct'])
    log.info('domain %d: A_ref %.2f %% (val) / %.2f %% (test); goal: val accuracy >= %.2f %%', d, a_val, a_test,
             a_val - j.epsilon)

    t0 = time.perf_counter()
    st = LoopState(sens=_sens_array(ref['sensitivity_pct']), warm=inp.warm)
    _run_rounds(inp, st, model0, bn_file0, data, a_val, d, fp, command)
    timing['rounds_s'] = time.perf_counter() - t0

    fin = final_pick(inp, st, model0, data, a_val)
    t0 = time.perf_counter()
    pareto = pareto_phase(inp, st.sens, a_val, a_test, d, (fin.gammas, fin.lam))
    timing['pareto_s'] = time.perf_counter() - t0
    measured = _measure_real(real_run, fin, data) if real_run is not None else None
    payload = payload_phase(inp, d, fp, ref, st, fin, pareto, measured, real_run is not None)
    payload['timing'] = dict(timing, wall_s=time.perf_counter() - t_start)
    return {'payload': payload, 'state': _state(inp, d, fp, fin), 'skipped': False}


def step2_warm_start(path: Path, n: int, valid: np.ndarray) -> Tuple[Optional[Tuple[List[int], int]], str]:
    """Step 2's configuration as a warm start when its artifact exists and fits this LUT, else (None, why)."""
    if not path.is_file():
        return None, f'none ({path.name} absent; round 1 of the gradient descent starts from random restarts only)'
    try:
        obj = load_artifact(path, 'initial_throughput_config', {'gammas': list, 'lam': int})
    except ArtifactError as e:
        try:
            obj = load_artifact(path, None, {'gammas': list, 'lam': int})
        except ArtifactError:
            return None, f'none ({e})'
    g = [int(x) for x in obj['gammas']]
    if len(g) != n or not 0 <= obj['lam'] <= n or not all(valid[k, x] for k, x in enumerate(g)):
        return None, f'none ({path.name} does not fit this LUT / model)'
    return (g, int(obj['lam'])), f'{path.name} (lambda {obj["lam"]})'


def prepare_inputs(cfg: Config, lut_file: Path, edge_profile_explicit: bool = False,
                   link_flag_given: bool = False) -> Inputs:
    """Load and check the LUT, the step-2 warm start, the partition and the dataset statistics."""
    from data.datasets import dataset_stats
    from data.domains import load_partition
    from timing import lut as L
    from accuracy.training import hyper_weights_path
    check_joint_config(cfg)
    lut = L.load_lut(lut_file)
    spec = L.model_spec(cfg)
    if lut['model'] != spec or lut['input_size'] != cfg.model.input_size:
        raise ConfigError(f'{lut_file}: the LUT is for {lut["model"]} at {lut["input_size"]} px, this run uses {spec} '
                          f'at {cfg.model.input_size} px; re-run step 1 with the same model flags')
    from pipeline.throughput import check_edge_profile, link_for, requested_profile
    check_edge_profile(lut, requested_profile(edge_profile_explicit, cfg), str(lut_file))
    link, _ = link_for(lut, cfg.lut, link_flag_given)  # the same link as step 2: the LUT's own unless --link
    t = L.cost_tables(lut, cfg.optim.batch_size, link, cfg.lut.feature_dtype)
    available = cost.measured_kept(t)
    valid = cost.valid_mask(available)
    unpruned = exact.solve_exact(t, valid)
    warm, why = step2_warm_start(cfg.path('initial_throughput_config.json'), t.num_blocks, valid)
    hw = load_artifact(hyper_weights_path(cfg), 'trained_hyper_weights', {'domains': dict, 'fingerprint': str})
    partition = load_partition(cfg.path('partition_info.json'), cfg)
    mean, std = dataset_stats(cfg)
    c = cfg.to_dict()
    base_fp = fingerprint(hashlib.sha256(Path(lut_file).read_bytes()).hexdigest(), link.to_dict(), hw['fingerprint'],
                          c['joint'], c['optim'], c['train'], c['model'], c['data'], c['lut']['feature_dtype'],
                          cfg.seed, warm, cost.COST_MODEL_VERSION, JOINT_VERSION)
    return Inputs(cfg, lut, Path(lut_file), t, L.block_stats(lut), available, unpruned, warm, why, partition,
                  mean, std, base_fp, link.to_dict())


def real_runner(session: Any, cfg: Config, mean: Sequence[float], std: Sequence[float], threads: int = 0) -> Any:
    """A callable (model, gammas, lam, x_uint8, y) -> measured dict that deploys the configuration to the worker
    through `session` (comm.session.ServerSession) and streams the images through the real split pipeline."""
    from hyper_repvgg import deploy_part

    def run(model: HyperRepVGG, gammas: Sequence[int], lam: int, x: Any, y: Any) -> Dict[str, Any]:
        if cfg.real.run_samples:
            x, y = x[:cfg.real.run_samples], y[:cfg.real.run_samples]
        deployed = session.deploy(model, [int(g) for g in gammas], int(lam), list(mean), list(std),
                                  feature_dtype=cfg.lut.feature_dtype, threads=threads)
        server = None if lam == model.num_blocks else deploy_part(model.split(int(lam))[1])
        res = session.run(server, x, y, cfg.optim.batch_size)
        out = {k: float(res[k]) for k in ('accuracy_pct', 'throughput_fps', 'latency_ms', 'edge_ms', 'link_ms',
                                          'server_ms', 'steady_throughput_fps') if res.get(k) is not None}
        missing = {'accuracy_pct', 'throughput_fps', 'latency_ms'} - set(out)
        if missing:
            raise UserError(f'real run: the worker session returned no {sorted(missing)} (got {sorted(res)})')
        out['samples'] = int(y.shape[0])
        out['deploy'] = {k: v for k, v in (deployed or {}).items() if isinstance(v, (int, float, str, bool))}
        out['extra'] = {k: v for k, v in res.items() if k not in out and isinstance(v, (int, float, str, bool))}
        return out
    return run
