"""Step 3 per domain: goal program + progressive pruning, checkpointed rounds, Pareto sweep
(docs/design.md#progressive-pruning).

`run_domain` does one domain end to end and returns the payload of `joint_optimization/domain_<d>_joint.json`
and of its state file (`domain_<d>_state.json`: HyperRepVGG.hyper_weights() plus gammas and lambda, loadable with
HyperRepVGG.load_hyper_weights).  Files are written only through artifacts.write_artifact (atomic).

Rounds live in `joint_optimization/domain_<d>_rounds/`: `reference.json` (A_ref and the initial sensitivities)
and `round_<r>.json` (the round's solution, measured accuracy, corrected sensitivities and the alpha state after
fine-tuning), and `pareto_<k>.json` (the k-th point of the epsilon sweep, deployed and measured).  A rerun with
the same inputs (fingerprint) resumes after the last finished round and point; solving is deterministic (seeded per
domain, round and point), so a resumed run makes the same decisions.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from artifacts import (COMMON_FIELDS, JOINT_DIR, ArtifactError, file_sha256, fingerprint, joint_path, load_artifact,
                       write_artifact)
from config import Config, ConfigError, UserError
from hyper_repvgg import BRANCHES, HyperRepVGG
from optim import cost, exact, goal
from accuracy import pruning, surrogate
from optim.cost import CostTables

log = logging.getLogger('step3')
JOINT_VERSION = 5  # bump when the goal program or the pruning loop changes what a domain's result is: cached ones are redone
SURROGATE_NOTE = ('surrogate: predicted val drop (points) = the measured val drop of the measured configuration '
                  'nearest the candidate, less the shares of the branches it restores, + rho x the train-split '
                  'sensitivities of the branches it adds; a prediction made before the candidate was measured, '
                  'compared here with its measured val drop')
RECENTRES = 2  # re-solves at most, each centred on the measured configuration nearest the previous solution


def state_path(cfg: Config, d: int) -> Path:
    return cfg.path(JOINT_DIR, f'domain_{d}_state.json')


def rounds_dir(cfg: Config, d: int) -> Path:
    return cfg.path(JOINT_DIR, f'domain_{d}_rounds')


def check_joint_config(cfg: Config) -> None:
    j = cfg.joint
    if j.solver not in ('gd', 'milp', 'both'):
        raise ConfigError(f'--solver / joint.solver: expected gd, milp or both, got {j.solver!r}')
    if j.acceptance not in ACCEPTANCE_RULES:
        raise ConfigError(f'joint.acceptance: expected one of {ACCEPTANCE_RULES}, got {j.acceptance!r}')
    if j.sensitivity not in pruning.SENSITIVITY_MODES:
        raise ConfigError(f'--sensitivity / joint.sensitivity: expected one of {pruning.SENSITIVITY_MODES}, '
                          f'got {j.sensitivity!r}')
    if j.max_rounds < 1 or j.epochs_per_round < 0:
        raise ConfigError(f'--max_rounds / --epochs_per_round: expected >= 1 and >= 0, got {j.max_rounds}, '
                          f'{j.epochs_per_round}')
    if not (j.epsilon >= 0 and all(e >= 0 for e in j.epsilon_sweep)):
        raise ConfigError('--epsilon / --epsilon_sweep: accuracy points must be >= 0')
    for name in ('throughput_target', 'edge_memory_budget_mb', 'roofline_weight', 'milp_time_limit_s',
                 'importance_share', 'min_saving_pct', 'max_new_prunes', 'probes', 'sweep_max_new_prunes',
                 'sweep_rho_prior'):
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
    chain: Optional[cost.ChainTables] = None  # optim.chain of K >= 3 devices (its goal program: payload "chain")
    chain_info: Optional[Dict[str, Any]] = None  # pipeline.chain.chain_tables' info of optim.chain (any K)


def problem_for(inp: Inputs, sens: np.ndarray, a_ref: float, epsilon: float,
                pruned_before: Optional[np.ndarray] = None, max_new: Optional[int] = None) -> goal.GoalProblem:
    """The goal program of one round (`pruned_before` given: at most `max_new`, default joint.max_new_prunes, new
    prunes beyond it; 0: no limit) or of a point without a step limit (`pruned_before` None)."""
    j = inp.cfg.joint
    return goal.build_problem(inp.tables, np.clip(sens, 0.0, None), inp.available, inp.stats, a_ref,
                              epsilon, inp.unpruned.stages['period_ms'], j.roofline_weight, j.throughput_target,
                              j.edge_memory_budget_mb * 1e6, pruned_before=pruned_before,
                              max_new_prunes=(j.max_new_prunes if max_new is None else max_new) if pruned_before is not None else 0)


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


def _round_summary(rec: Dict[str, Any]) -> Dict[str, Any]:
    """A round record as the domain file lists it: without the bulky fields and without the provenance of the
    run that wrote a resumed round's checkpoint (the domain file's own provenance is this run's; resumed rounds
    are listed in 'resumed_rounds' with theirs)."""
    drop = {'hyper_weights', 'fingerprint', 'sensitivity_after_pct', *COMMON_FIELDS}
    return {k: v for k, v in rec.items() if k not in drop}


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
#
# Data roles (docs/artifacts.md, README 'What each split is for'): the train split trains alpha (step 0), fine-tunes
# it (a seeded subset; the rest keeps the best epoch) and measures every sensitivity of the surrogate; the val split
# only accepts configurations (paired one-sided bound against the reference) and picks the round; the test split
# is only reported (paired drop with its interval).
# ----------------------------------------------------------------------------------------------------------

def _sens_array(rows: Sequence[Sequence[Optional[float]]]) -> np.ndarray:
    """Sensitivities as stored in JSON (None: not measured) -> float array with NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def _sens_json(sens: np.ndarray) -> List[List[Optional[float]]]:
    return np.where(np.isnan(sens), None, sens).tolist()


def _pruned_of(inp: Inputs, gammas: Sequence[int]) -> np.ndarray:
    """(N, 3) bool: branches the blocks have and the layouts `gammas` drop."""
    return goal.available_mask(inp.available) & ~goal.LAYOUT_BRANCHES[np.asarray(gammas, dtype=np.int64)]


@dataclass
class DomainData:
    """One domain's images by role: fine-tuning loader and surrogate images (train split), acceptance images (val),
    reported images (test)."""
    train: Any  # shuffled train-split loader: fine-tuning
    x_fit: Any  # train split (first joint.sensitivity_samples): sensitivities and the surrogate's measurements
    y_fit: Any
    x_val: Any  # acceptance and selection
    y_val: Any
    x_test: Any  # reported only
    y_test: Any


@dataclass
class Reference:
    """The domain model's accuracies per split and its per-image correctness on val and test (paired tests)."""
    a_fit: float
    a_val: float
    a_test: float
    val_correct: np.ndarray
    test_correct: np.ndarray


@dataclass
class MeasuredConfig:
    """A configuration whose val drop was measured: a centre of the surrogate for the configurations near it."""
    where: str  # 'domain model', 'round r', 'pareto eps=e'
    pruned: np.ndarray  # (N, 3) bool
    val_drop_pct: float
    measured: Optional[Dict[str, Any]] = None  # as measure() returns (None: the domain model)
    fit_loss_pct: float = 0.0  # its train-split loss (A_ref on the surrogate's images - its accuracy there), points


@dataclass
class LoopState:
    """The progressive-pruning loop's state between rounds."""
    sens: np.ndarray  # surrogate sensitivities around the anchor (points, before the calibration factor)
    warm: Optional[Tuple[Sequence[int], int]]  # the solvers' warm start
    measured: List[MeasuredConfig] = field(default_factory=list)  # the domain model first, then in measured order
    rounds: List[Dict[str, Any]] = field(default_factory=list)
    models: List[HyperRepVGG] = field(default_factory=list)
    pairs: List[Tuple[float, float]] = field(default_factory=list)  # (predicted, measured) increments per round
    se_last: float = 0.0  # standard error of the latest round's paired val difference, points
    stop: str = 'max_rounds'
    a_fit: float = 0.0  # the domain model's accuracy on the surrogate's train-split images, %
    probed: List[Tuple[np.ndarray, float]] = field(default_factory=list)  # probes since sens was last re-measured:
    # (branches pruned together beyond the start model, their joint train-split loss), applied to sens in order

    def remember(self, probes: Sequence[Dict[str, Any]]) -> None:
        """Keeps a solve's probes (centred_solve's budget record 'probes') for the solves after it."""
        for p in probes:
            if p.get('pruned_beyond_start'):
                mask = np.zeros_like(self.sens, dtype=bool)
                mask[tuple(np.asarray(p['pruned_beyond_start'], dtype=np.int64).T)] = True
                self.probed.append((mask, float(p['probe_pct'])))

    def anchor(self) -> Optional[int]:
        """Index of the latest accepted round (None: the domain model is the anchor)."""
        return next((i for i in range(len(self.rounds) - 1, -1, -1) if self.rounds[i]['accepted']), None)


@dataclass
class FinalPick:
    model: HyperRepVGG
    gammas: List[int]
    lam: int
    chosen_round: int
    measured: Dict[str, Any]  # as measure() returns
    evaluation: Dict[str, Any]


def _domain_data(inp: Inputs, d: int) -> DomainData:
    from accuracy.training import seeded_generator
    from data.domains import domain_loader
    cfg, j = inp.cfg, inp.cfg.joint
    ebs = cfg.train.eval_batch_size
    gen = seeded_generator(cfg.seed, 2000 + d)
    train = domain_loader(cfg, inp.partition, d, 'train', cfg.train.batch_size, True, gen)
    xf, yf = pruning.collect(domain_loader(cfg, inp.partition, d, 'train', ebs, False), j.sensitivity_samples)
    xv, yv = pruning.collect(domain_loader(cfg, inp.partition, d, 'val', ebs, False))
    xt, yt = pruning.collect(domain_loader(cfg, inp.partition, d, 'test', ebs, False))
    return DomainData(train, xf, yf, xv, yv, xt, yt)


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


def _sensitivities(inp: Inputs, model: HyperRepVGG, data: DomainData, desc: str) -> Dict[str, Any]:
    """Branch sensitivities of `model` on the train-split images (joint.sensitivity mode)."""
    cfg, j = inp.cfg, inp.cfg.joint
    ebs = cfg.train.eval_batch_size
    if j.sensitivity == 'measured':
        return pruning.measure_sensitivities(model, data.x_fit, data.y_fit, inp.mean, inp.std, ebs, cfg.device,
                                             desc=desc, only=goal.worth_measuring(inp.tables, inp.available,
                                                                                  j.min_saving_pct))
    return pruning.importance_sensitivities(model, cfg.model.input_size, data.x_fit, data.y_fit, inp.mean, inp.std,
                                            j.importance_share, ebs, cfg.device)


def reference_phase(inp: Inputs, model0: HyperRepVGG, data: DomainData, d: int) -> Dict[str, Any]:
    """A_ref on the three splits and the initial branch sensitivities (points, train split) of the domain model."""
    cfg = inp.cfg
    ebs = cfg.train.eval_batch_size
    acc = {s: pruning.accuracy(model0, x, y, inp.mean, inp.std, ebs, cfg.device) for s, x, y in (
        ('fit', data.x_fit, data.y_fit), ('val', data.x_val, data.y_val), ('test', data.x_test, data.y_test))}
    s = _sensitivities(inp, model0, data, f'domain {d} sensitivities')
    return {'a_ref_fit_pct': acc['fit'], 'a_ref_val_pct': acc['val'], 'a_ref_test_pct': acc['test'],
            'mode': cfg.joint.sensitivity, 'sensitivity_samples': int(data.y_fit.numel()),
            'sensitivity_split': 'train', 'sensitivity_pct': _sens_json(s['sensitivity_pct']),
            'evaluations': s['evaluations'], 'details': {k: v for k, v in s.items()
                                                         if k in ('kappa', 'calibration', 'base_acc_pct')}}


def _reference(inp: Inputs, model0: HyperRepVGG, data: DomainData, ref: Dict[str, Any]) -> Reference:
    cfg = inp.cfg
    ebs = cfg.train.eval_batch_size
    return Reference(float(ref['a_ref_fit_pct']), float(ref['a_ref_val_pct']), float(ref['a_ref_test_pct']),
                     pruning.correct_mask(model0, data.x_val, data.y_val, inp.mean, inp.std, ebs, cfg.device),
                     pruning.correct_mask(model0, data.x_test, data.y_test, inp.mean, inp.std, ebs, cfg.device))


def measure(inp: Inputs, model: HyperRepVGG, data: DomainData, ref: Reference, keys: Tuple[int, int]) -> Dict[str, Any]:
    """A configuration's accuracy on the three splits and its paired difference to the reference on val (the
    acceptance test) and on test (reported); bootstraps seeded by (seed, *keys)."""
    from accuracy import stats
    cfg = inp.cfg
    ebs = cfg.train.eval_batch_size
    fit = pruning.accuracy(model, data.x_fit, data.y_fit, inp.mean, inp.std, ebs, cfg.device)
    val = pruning.correct_mask(model, data.x_val, data.y_val, inp.mean, inp.std, ebs, cfg.device)
    test = pruning.correct_mask(model, data.x_test, data.y_test, inp.mean, inp.std, ebs, cfg.device)
    rng = np.random.default_rng([int(cfg.seed), *keys])
    return {'fit_accuracy_pct': fit, 'val_accuracy_pct': 100.0 * float(val.mean()),
            'test_accuracy_pct': 100.0 * float(test.mean()),
            'val': stats.paired_difference(ref.val_correct, val, rng),
            'test': stats.paired_difference(ref.test_correct, test, rng)}


ACCEPTANCE_RULES = ('bound', 'point')


def accepts(m: Dict[str, Any], epsilon: float, rule: str = 'bound') -> bool:
    """The acceptance rule (joint.acceptance): 'bound', the one-sided 95 % lower bound of the paired val difference
    is >= -epsilon; 'point', the val drop itself is <= epsilon (the rule before the bound, kept for ablations)."""
    if rule == 'point':
        return bool(m['val']['drop_pct'] <= float(epsilon) + 1e-9)
    return bool(m['val']['lower_pct'] >= -float(epsilon) - 1e-9)



FINETUNED_REFERENCE = 'domain model, fine-tuned'


def finetuned_reference(inp: Inputs, st: LoopState, model0: HyperRepVGG, data: DomainData, ref: Reference, d: int,
                        fp: str, command: str) -> MeasuredConfig:
    """The domain model, nothing pruned, fine-tuned as a round fine-tunes (joint.epochs_per_round on the seeded
    half of the train split, round index 0) and measured: a centre of the surrogate with what one fine-tuning does
    to the val accuracy before any branch is pruned (docs/design.md#surrogate).  Never deployed: a configuration
    that prunes nothing is the domain model itself (`measured` None, so no point takes its measurement).
    Checkpointed in domain_<d>_rounds/reference_finetuned.json."""
    from accuracy import training
    cfg, j = inp.cfg, inp.cfg.joint
    path = rounds_dir(cfg, d) / 'reference_finetuned.json'
    done = _load_checkpoint(path, 'joint_reference_finetuned', fp)
    if done is None:
        model = pruning.copy_with(model0)
        if j.epochs_per_round > 0:
            tune, select = _split_train(data.train, j.finetune_samples, cfg, d, 0)
            training.fine_tune_alpha(model, tune, select, j.epochs_per_round, cfg.train.alpha_lr, cfg.device, None,
                                     inp.mean, inp.std, desc=f'domain {d} reference fine-tune')
        done = {'fingerprint': fp, 'measured': measure(inp, model, data, ref, (7000 + d, 0))}
        write_artifact(path, 'joint_reference_finetuned', done, cfg, command)
    m = done['measured']
    log.info('domain %d: the domain model fine-tuned as a round, nothing pruned: val drop %.2f points', d,
             m['val']['drop_pct'])
    return MeasuredConfig(FINETUNED_REFERENCE, np.zeros((len(inp.available), 3), dtype=bool),
                          float(m['val']['drop_pct']), None, st_fit_loss(st, m))


def _start_model(st: LoopState, want: np.ndarray, inp: Inputs, model0: HyperRepVGG) -> HyperRepVGG:
    """Progressive: continue from the latest accepted round whose pruned branches are all pruned again (else from
    the domain's model), so that restored branches never meet alphas tuned without them."""
    for old, old_model in reversed(list(zip(st.rounds, st.models))):
        if old['accepted'] and not (_pruned_of(inp, old['gammas']) & ~want).any():
            return old_model
    return model0


def _deploy(inp: Inputs, st: LoopState, model0: HyperRepVGG, data: DomainData, gammas: Sequence[int], d: int,
            r: int, desc: str) -> Tuple[HyperRepVGG, Optional[Dict[str, Any]]]:
    """The configuration as a model: pruned from its start model, alpha fine-tuned when it prunes anything."""
    from accuracy import training
    cfg, j = inp.cfg, inp.cfg.joint
    model = pruning.copy_with(_start_model(st, _pruned_of(inp, gammas), inp, model0), gammas)
    hist = None
    if pruning.pruned_mask(model).any() and j.epochs_per_round > 0:
        tune, select = _split_train(data.train, j.finetune_samples, cfg, d, r)
        hist = training.fine_tune_alpha(model, tune, select, j.epochs_per_round, cfg.train.alpha_lr, cfg.device,
                                        None, inp.mean, inp.std, desc=desc)
    return model, hist


def _budget(inp: Inputs, st: LoopState, ref: Reference, epsilon: float, rho_prior: float = 0.0) -> Dict[str, float]:
    """The solver's loss budget: epsilon less the confidence margin, and the calibration factor rho (fitted on the
    rounds; shrunk towards `rho_prior` when > 0, surrogate.calibration_factor)."""
    from accuracy import stats
    margin = surrogate.margin_pct(epsilon, int(ref.val_correct.size), st.se_last, stats.one_sided_z()) \
        if inp.cfg.joint.acceptance == 'bound' else 0.0
    return {'epsilon': float(epsilon), 'margin_pct': margin, 'budget_pct': max(0.0, float(epsilon) - margin),
            'rho': surrogate.calibration_factor(st.pairs, rho_prior)}


def _anchor_pruned(inp: Inputs, st: LoopState) -> np.ndarray:
    """(N, 3) bool: the branches the latest accepted round prunes (none before any)."""
    anchor = st.anchor()
    return np.zeros((len(inp.available), 3), dtype=bool) if anchor is None else \
        _pruned_of(inp, st.rounds[anchor]['gammas'])


def probe_increment(inp: Inputs, st: LoopState, model0: HyperRepVGG, data: DomainData, gammas: Sequence[int],
                    cache: Dict[int, float]) -> Tuple[float, np.ndarray]:
    """A candidate's train-split probe: the loss (points) that pruning it from the model it would be deployed from
    (`_start_model`) costs before any fine-tuning, measured on the surrogate's train-split images, against that
    model's own loss there; (increment, the branches it prunes beyond that model).  Train split only: the val
    measurement it is checked against comes later.  `cache`: the start models' accuracies by id."""
    cfg = inp.cfg
    ebs = cfg.train.eval_batch_size
    want = _pruned_of(inp, gammas)
    start = _start_model(st, want, inp, model0)
    if id(start) not in cache:
        cache[id(start)] = pruning.accuracy(start, data.x_fit, data.y_fit, inp.mean, inp.std, ebs, cfg.device)
    acc = pruning.accuracy(pruning.copy_with(start, gammas), data.x_fit, data.y_fit, inp.mean, inp.std, ebs,
                           cfg.device)
    return cache[id(start)] - acc, want & ~pruning.pruned_mask(start)


def centred_solve(inp: Inputs, st: LoopState, ref: Reference, eps: float, solve: Any,
                  pruned_before: Optional[np.ndarray] = None, model0: Optional[HyperRepVGG] = None,
                  data: Optional[DomainData] = None, step_limit: int = 0, rho_prior: float = 0.0
                  ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Solve the goal program under the surrogate centred on a measured configuration (accuracy/surrogate.py,
    `centred`): first the one nearest the latest accepted round, then, while the solution is nearer another measured
    configuration, re-centred on that one and solved again (RECENTRES at most; a centre is never revisited).
    With `model0` and `data` (joint.probes > 0), a solution whose branches beyond its start model were never pruned
    together is probed first (`probe_increment`, train split, no fine-tuning): when the probe's increment differs
    from the sum of their sensitivities by more than PROBE_TOLERANCE_PCT, those sensitivities are scaled to it
    (`surrogate.probe_corrected`) and the program solved again (joint.probes probes at most).
    `solve(problem)` returns (its result, the solution's gammas); `pruned_before` given: a round (at most
    joint.max_new_prunes beyond it); else `step_limit` > 0: at most that many branches beyond the centre (a trust
    region for the points solved after the rounds), and `rho_prior` > 0: rho shrunk towards it (`_budget`).  The
    solver's budget is epsilon less the margin: a measured gain (negative drop) of the centre is predicted but never
    spent.  Returns (solve's result, budget record with the
    centre, the probes and the prediction made for the solution, and 'sens': the sensitivities it used)."""
    masks = [m.pruned for m in st.measured]
    idx = surrogate.nearest(_anchor_pruned(inp, st), masks)
    bud = _budget(inp, st, ref, eps, rho_prior)
    sens = st.sens
    for new_, inc_ in st.probed:  # what earlier solves' probes found still holds for these sensitivities
        sens = surrogate.probe_corrected(sens, new_, inc_)
    probes_left = inp.cfg.joint.probes if model0 is not None and data is not None else 0
    probes: List[Dict[str, Any]] = []
    probed: List[np.ndarray] = []
    cache: Dict[int, float] = {}
    tried: List[int] = []
    while True:
        centre = st.measured[idx]
        loss, const = surrogate.centred(sens, centre.pruned, centre.val_drop_pct, bud['rho'])
        # the solver spends no more than both splits leave: the centre's branches cost at least its train-split loss
        spend, _ = surrogate.centred(sens, centre.pruned, max(centre.val_drop_pct, centre.fit_loss_pct), bud['rho'])
        before = pruned_before if pruned_before is not None else (centre.pruned if step_limit > 0 else None)
        out, gammas = solve(problem_for(inp, spend, ref.a_fit, bud['budget_pct'], before,
                                        None if pruned_before is not None else step_limit))
        if idx not in tried:
            tried.append(idx)
        pruned = _pruned_of(inp, gammas)
        nxt = surrogate.nearest(pruned, masks)
        if nxt not in tried and len(tried) <= RECENTRES:
            idx = nxt
            continue
        if probes_left <= 0 or any((pruned == q).all() for q in probed + masks):
            break  # no probes left, probed already, or measured (on val: the prediction is that measurement)
        inc, new = probe_increment(inp, st, model0, data, gammas, cache)
        probed.append(pruned)
        additive = float(np.nansum(np.where(new, np.clip(sens, 0.0, None), 0.0)))
        probes.append({'branches': int(new.sum()), 'additive_pct': additive, 'probe_pct': float(inc),
                       'pruned_beyond_start': np.argwhere(new).tolist()})
        if not new.any() or abs(inc - additive) <= surrogate.PROBE_TOLERANCE_PCT:
            break
        sens = surrogate.probe_corrected(sens, new, inc)
        probes_left -= 1  # none left: solved once more with what the probes found, that solution not probed
    return out, dict(bud, centre=centre.where, centre_val_drop_pct=centre.val_drop_pct, constant_pct=const,
                     centre_distance=surrogate.distance(pruned, centre.pruned), recentred=len(tried) - 1,
                     probes=probes, predicted_drop_pct=surrogate.predict(loss, const, pruned), sens=sens)


def _surrogate_update(inp: Inputs, st: LoopState, model: HyperRepVGG, data: DomainData, ref: Reference,
                      m: Dict[str, Any], before: np.ndarray, rho: float, accepted: bool, d: int, r: int,
                      used: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The surrogate after a measured round: re-centred on it when accepted (marginal sensitivities re-measured on
    it), else its new prunes carry their measured increment.  `used`: the sensitivities the round was predicted
    with (its probes' corrections included; default the loop's), whose increment rho compares with the measured
    one.  Returns (sensitivities, record)."""
    pruned = pruning.pruned_mask(model)
    anchor = st.anchor()
    anchor_loss = 0.0 if anchor is None else ref.a_fit - st.rounds[anchor]['measured']['fit_accuracy_pct']
    pred_inc = surrogate.increment(st.sens if used is None else used, before, pruned)
    meas_inc = (ref.a_fit - m['fit_accuracy_pct']) - anchor_loss
    rec: Dict[str, Any] = {'predicted_increment_pct': pred_inc, 'measured_increment_fit_pct': meas_inc,
                           'rho': rho, 'resensitized': False, 'evaluations': 0}
    if accepted and pruned.any():
        fresh = _sensitivities(inp, model, data, f'domain {d} round {r} sensitivities')
        loss = max(0.0, ref.a_fit - m['fit_accuracy_pct'])
        sens = surrogate.recentre(fresh['sensitivity_pct'], st.sens, pruned, loss)
        rec.update(resensitized=True, evaluations=fresh['evaluations'])
    elif not accepted:
        sens, corr = pruning.correct_sensitivities(st.sens, pruned & ~before, meas_inc / max(rho, 1e-9))
        rec['correction'] = corr
    else:
        sens = st.sens.copy()
    return sens, rec


def round_phase(inp: Inputs, st: LoopState, model0: HyperRepVGG, data: DomainData, ref: Reference, d: int,
                r: int, fp: str) -> Optional[Tuple[Dict[str, Any], HyperRepVGG, np.ndarray]]:
    """One progressive pruning round: solve under the margin-reduced budget, prune, fine-tune alpha, measure,
    accept on the paired val bound, update the surrogate.  Returns (the round's record, its model, the new
    sensitivities), or None when it converged."""
    j = inp.cfg.joint
    tr = time.perf_counter()
    # progressive steps from the latest accepted round (a rejected round is backtracked)
    before = _anchor_pruned(inp, st)

    def solve(p: goal.GoalProblem) -> Tuple[Dict[str, Any], List[int]]:
        out = _solve(inp, p, j.solver, d, r, st.warm)
        return out, out['best'].gammas
    sol, bud = centred_solve(inp, st, ref, j.epsilon, solve, before, model0, data)
    used = bud.pop('sens')  # the sensitivities the solution was predicted with (probes included)
    best = sol['best']
    last = st.rounds[-1] if st.rounds else None
    if last is not None and last['accepted'] and (best.gammas, best.lam) == (list(last['gammas']), last['lam']):
        return None
    model, hist = _deploy(inp, st, model0, data, best.gammas, d, r, f'domain {d} round {r} fine-tune')
    m = measure(inp, model, data, ref, (7000 + d, r))
    accepted = accepts(m, j.epsilon, j.acceptance)
    sens_new, upd = _surrogate_update(inp, st, model, data, ref, m, before, bud['rho'], accepted, d, r, used)
    predicted = bud.pop('predicted_drop_pct')
    rec = {'fingerprint': fp, 'round': r, 'gammas': best.gammas, 'lam': best.lam,
           'branches_pruned': int(pruning.pruned_mask(model).sum()), 'accepted': accepted,
           'val_accuracy_pct': m['val_accuracy_pct'], 'measured': m,
           'xi_accuracy_pct': max(0.0, -j.epsilon - m['val']['lower_pct']),
           'surrogate': dict(bud, predicted_drop_pct=predicted, measured_val_drop_pct=m['val']['drop_pct'],
                             error_pct=predicted - m['val']['drop_pct'], held_out=held_out(inp, best.gammas),
                             update=upd),
           'predicted': {k: best.evaluation[k] for k in ('edge_ms', 'link_ms', 'server_ms', 'latency_ms',
                                                         'throughput_fps', 'bottleneck', 'period_ms')},
           'solvers': _solutions(sol), 'fine_tune': hist, 'sensitivity_after_pct': _sens_json(sens_new),
           'hyper_weights': model.hyper_weights(),
           'bn_state_file': f'{JOINT_DIR}/domain_{d}_rounds/round_{r:03d}_bn.pt' if model.adapt_bn else None,
           'wall_s': time.perf_counter() - tr}
    return rec, model, sens_new


def held_out(inp: Inputs, gammas: Sequence[int]) -> bool:
    """Whether a newly measured configuration checks the surrogate: it prunes something (pruning nothing is the
    domain model itself, measured by the reference, drop 0 by definition)."""
    return bool(_pruned_of(inp, gammas).any())


def st_fit_loss(st: LoopState, m: Dict[str, Any]) -> float:
    """A measured configuration's train-split loss, points (the domain model's fit accuracy is st.a_fit)."""
    return st.a_fit - float(m['fit_accuracy_pct'])


def _absorb(inp: Inputs, st: LoopState, rec: Dict[str, Any], model: HyperRepVGG, sens: np.ndarray) -> None:
    """The loop state after round `rec` (measured now or read from its checkpoint)."""
    st.rounds.append(rec)
    st.measured.append(MeasuredConfig(f'round {rec["round"]}', _pruned_of(inp, rec['gammas']),
                                      float(rec['measured']['val']['drop_pct']), rec['measured'],
                                      st_fit_loss(st, rec['measured'])))
    st.models.append(model)
    st.sens = sens
    upd = rec['surrogate']['update']
    if upd.get('resensitized'):  # re-measured on the new anchor: earlier probes were of other start models
        st.probed.clear()
    else:
        st.remember(rec['surrogate'].get('probes') or [])
    st.pairs.append((upd['predicted_increment_pct'], upd['measured_increment_fit_pct']))
    st.se_last = float(rec['measured']['val']['se_pct'])
    st.warm = (rec['gammas'], rec['lam'])


def _run_rounds(inp: Inputs, st: LoopState, model0: HyperRepVGG, bn_file0: Optional[str], data: DomainData,
                ref: Reference, d: int, fp: str, command: str) -> None:
    """The progressive pruning rounds, each resumed from its checkpoint when one exists with the same inputs."""
    cfg = inp.cfg
    rd = rounds_dir(cfg, d)
    for r in range(1, cfg.joint.max_rounds + 1):
        path = rd / f'round_{r:03d}.json'
        done = _read_checkpoint(path, 'joint_round', fp, model0, cfg, bn_file0)
        if done is not None:
            _absorb(inp, st, done[0], done[1], _sens_array(done[0]['sensitivity_after_pct']))
            log.info('domain %d: round %d resumed from %s', d, r, path)
            continue
        out = round_phase(inp, st, model0, data, ref, d, r, fp)
        if out is None:
            st.stop = 'converged'
            log.info('domain %d: round %d re-solve repeats round %d, which was accepted: converged', d, r, r - 1)
            break
        rec, model, sens_new = out
        _write_checkpoint(path, 'joint_round', rec, cfg, command, model, rec['bn_state_file'])
        v = rec['measured']['val']
        log.info('domain %d: round %d: %d branches pruned, lambda %d, predicted %.1f fps; val drop %.2f points '
                 '(one-sided 95 %% bound %.2f, surrogate predicted %.2f): %s', d, r, rec['branches_pruned'],
                 rec['lam'], rec['predicted']['throughput_fps'], v['drop_pct'], 0.0 - v['lower_pct'],
                 rec['surrogate']['predicted_drop_pct'], 'accepted' if rec['accepted'] else 'rejected')
        _absorb(inp, st, rec, model, sens_new)


def final_pick(inp: Inputs, st: LoopState, model0: HyperRepVGG, data: DomainData, ref: Reference) -> FinalPick:
    """The fastest accepted round, else the unpruned optimum; its measurements and goal evaluation."""
    p_final = problem_for(inp, st.sens, ref.a_fit, inp.cfg.joint.epsilon)
    accepted = [rec for rec in st.rounds if rec['accepted']]
    if accepted:
        pick = max(accepted, key=lambda rec: (rec['predicted']['throughput_fps'], rec['val_accuracy_pct'],
                                              rec['round']))
        model = st.models[st.rounds.index(pick)]
        gammas, lam, chosen_round, m = pick['gammas'], pick['lam'], pick['round'], pick['measured']
    else:
        gammas, lam, chosen_round = inp.unpruned.gammas, inp.unpruned.lam, 0
        model = pruning.copy_with(model0, gammas)
        m = None
    pruning.apply_config(model, gammas)
    if m is None:
        m = measure(inp, model, data, ref, (7000, 0))
    return FinalPick(model, list(gammas), int(lam), chosen_round, m, goal.evaluate(p_final, gammas, lam))


def _interval(ref_pct: float, paired: Dict[str, Any]) -> List[float]:
    """The 95 % interval of an accuracy, from its paired difference to the reference (ref + [lo, hi])."""
    return [ref_pct + paired['ci_pct'][0], ref_pct + paired['ci_pct'][1]]


def _measured_like(st: LoopState, fin: FinalPick, inp: Inputs, gammas: Sequence[int]) -> Optional[Dict[str, Any]]:
    """The measurement of an earlier configuration (a round, an earlier point of the sweep, the final pick) that
    prunes exactly the same branches, if any."""
    want = _pruned_of(inp, gammas)
    for mc in st.measured:
        if mc.measured is not None and (mc.pruned == want).all():
            return mc.measured
    return fin.measured if (_pruned_of(inp, fin.gammas) == want).all() else None


def pareto_path(cfg: Config, d: int, k: int) -> Path:
    """Checkpoint of the k-th point of the epsilon sweep (kind joint_pareto)."""
    return rounds_dir(cfg, d) / f'pareto_{k:03d}.json'


def point_solve(inp: Inputs, st: LoopState, ref: Reference, eps: float, solve: Any,
                model0: Optional[HyperRepVGG] = None, data: Optional[DomainData] = None
                ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A point solved after the rounds (a Pareto point, the chain's decision): centred_solve on the surrogate as it
    stands (the rounds and the sweep's earlier points measured) with the margin-reduced budget for `eps`, at most
    joint.sweep_max_new_prunes branches beyond the centre, rho shrunk towards joint.sweep_rho_prior; (solve's dict,
    budget record)."""
    j = inp.cfg.joint
    out, bud = centred_solve(inp, st, ref, eps, solve, None, model0, data, j.sweep_max_new_prunes, j.sweep_rho_prior)
    bud.pop('sens')
    return out, bud


def measure_point(inp: Inputs, st: LoopState, fin: FinalPick, model0: HyperRepVGG, data: DomainData, ref: Reference,
                  gammas: Sequence[int], d: int, keys: Tuple[int, int, int], desc: str) -> Tuple[Dict[str, Any], bool]:
    """A point's pruning measured: the measurement of a round (or the final pick) that prunes exactly the same
    branches, else deployed (pruned, fine-tuned; seeded by keys[0]) and measured (keys[1:]); (measured, held_out)."""
    m = _measured_like(st, fin, inp, gammas)
    if m is not None:
        return m, False
    model, _ = _deploy(inp, st, model0, data, gammas, d, keys[0], desc)
    return measure(inp, model, data, ref, keys[1:]), True


def pareto_point(inp: Inputs, st: LoopState, fin: FinalPick, model0: HyperRepVGG, data: DomainData,
                 ref: Reference, d: int, k: int, eps: float) -> Dict[str, Any]:
    """One point of the epsilon sweep: solved on the surrogate as it stands (point_solve), deployed (pruned,
    fine-tuned) and measured, or the measurement of a round that prunes exactly the same branches."""
    from accuracy.training import seeded_generator
    j = inp.cfg.joint
    t0 = time.perf_counter()

    def solve(p: goal.GoalProblem) -> Tuple[Any, List[int]]:
        best = goal.solve(p, 'gd' if j.solver == 'gd' else 'milp', seeded_generator(inp.cfg.seed, 4000 + d, k),
                          _gd_kwargs(inp.cfg, (fin.gammas, fin.lam)), j.milp_time_limit_s)['best']
        return best, best.gammas
    sp, bud = point_solve(inp, st, ref, eps, solve, model0, data)
    m, new = measure_point(inp, st, fin, model0, data, ref, sp.gammas, d, (1000 + k, 8000 + d, k),
                           f'domain {d} pareto eps={eps:g}')
    predicted = bud.pop('predicted_drop_pct')
    return {'epsilon': float(eps), 'accuracy_pct': m['test_accuracy_pct'],
            'accuracy_ci95_pct': _interval(ref.a_test, m['test']), 'accuracy_source': 'measured (test)',
            'test_drop_pct': m['test']['drop_pct'], 'val_drop_pct': m['val']['drop_pct'],
            'val_lower_pct': m['val']['lower_pct'], 'accepted': accepts(m, eps, inp.cfg.joint.acceptance),
            'predicted_drop_pct': predicted, 'error_pct': predicted - m['val']['drop_pct'],
            'held_out': new and held_out(inp, sp.gammas), 'budget': bud, 'measured': m,
            'throughput_fps': sp.evaluation['throughput_fps'], 'lam': sp.lam,
            'branches_pruned': sp.evaluation['branches_pruned'], 'gammas': sp.gammas,
            'solver': sp.solver, 'status': sp.status, 'wall_s': time.perf_counter() - t0}


def pareto_phase(inp: Inputs, st: LoopState, fin: FinalPick, model0: HyperRepVGG, data: DomainData,
                 ref: Reference, d: int, fp: str, command: str) -> List[Dict[str, Any]]:
    """The epsilon sweep in increasing epsilon, point by point (pareto_point), each checkpointed in
    domain_<d>_rounds/pareto_<k>.json and resumed from there; each measured point joins the surrogate's measured
    configurations before the next is solved (so every prediction is still made before its own measurement).
    Returns the points in joint.epsilon_sweep's order."""
    pareto: Dict[int, Dict[str, Any]] = {}
    sweep = inp.cfg.joint.epsilon_sweep
    for k in sorted(range(len(sweep)), key=lambda i: (sweep[i], i)):
        eps = sweep[k]
        path = pareto_path(inp.cfg, d, k)
        done = _load_checkpoint(path, 'joint_pareto', fp)
        if done is not None and done['point']['epsilon'] == float(eps):
            point = done['point']
        else:
            point = pareto_point(inp, st, fin, model0, data, ref, d, k, eps)
            write_artifact(path, 'joint_pareto', {'fingerprint': fp, 'index': k, 'point': point}, inp.cfg, command)
        st.remember(point['budget'].get('probes') or [])
        st.measured.append(MeasuredConfig(f'pareto eps={eps:g}', _pruned_of(inp, point['gammas']),
                                          float(point['val_drop_pct']), point['measured'],
                                          ref.a_fit - float(point['measured']['fit_accuracy_pct'])))
        pareto[k] = point
    return [pareto[k] for k in range(len(sweep))]


def pareto_todo(cfg: Config, d: int, fp: str) -> List[int]:
    """Indices of the epsilon sweep without a checkpoint for these inputs."""
    out = []
    for k, eps in enumerate(cfg.joint.epsilon_sweep):
        done = _load_checkpoint(pareto_path(cfg, d, k), 'joint_pareto', fp)
        if done is None or done['point']['epsilon'] != float(eps):
            out.append(k)
    return out


def _measure_real(real_run: Any, fin: FinalPick, data: DomainData) -> Dict[str, Any]:
    """Deploys the final configuration through `real_run` and compares the measurement with the prediction."""
    ev = fin.evaluation
    measured = real_run(fin.model, fin.gammas, fin.lam, data.x_test, data.y_test)
    # steady state (pipeline filled) is what B / max(stage) predicts; the whole-run figure stays in throughput_fps
    steady = measured.get('steady_throughput_fps') or measured['throughput_fps']
    measured['throughput_ratio_measured_over_predicted'] = steady / ev['throughput_fps']
    measured['latency_ratio_measured_over_predicted'] = measured['latency_ms'] / ev['latency_ms']
    measured['accuracy_diff_measured_minus_offline_pct'] = measured['accuracy_pct'] - fin.measured['test_accuracy_pct']
    return measured


def _surrogate_report(st: LoopState, pareto: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Predicted vs measured drop of every evaluated configuration, and the error on those it was not fitted to."""
    points = [{'where': f'round {rec["round"]}', 'predicted_drop_pct': rec['surrogate']['predicted_drop_pct'],
               'measured_val_drop_pct': rec['measured']['val']['drop_pct'],
               'measured_test_drop_pct': rec['measured']['test']['drop_pct'],
               'error_pct': rec['surrogate']['error_pct'], 'held_out': rec['surrogate']['held_out'],
               'centre': rec['surrogate'].get('centre'), 'centre_distance': rec['surrogate'].get('centre_distance')}
              for rec in st.rounds]
    points += [{'where': f'pareto eps={p["epsilon"]:g}', 'predicted_drop_pct': p['predicted_drop_pct'],
                'measured_val_drop_pct': p['val_drop_pct'], 'measured_test_drop_pct': p['test_drop_pct'],
                'error_pct': p['error_pct'], 'held_out': p['held_out'], 'centre': p['budget'].get('centre'),
                'centre_distance': p['budget'].get('centre_distance')} for p in pareto]
    return {'note': SURROGATE_NOTE, 'points': points,
            'held_out': surrogate.error_summary([p for p in points if p['held_out']])}


def _data_roles(data: DomainData) -> Dict[str, Any]:
    return {'train': {'role': 'alpha training (step 0), fine-tuning (a seeded subset; the rest keeps the best epoch), '
                              'sensitivities and the surrogate', 'surrogate_images': int(data.y_fit.numel())},
            'val': {'role': 'acceptance (paired one-sided 95 % bound >= -epsilon) and the pick among accepted rounds',
                    'images': int(data.y_val.numel())},
            'test': {'role': 'reported only (paired drop with its 95 % interval)', 'images': int(data.y_test.numel())}}


def payload_phase(inp: Inputs, d: int, fp: str, ref: Dict[str, Any], st: LoopState, fin: FinalPick,
                  pareto: List[Dict[str, Any]], data: DomainData, measured: Optional[Dict[str, Any]],
                  real: bool) -> Dict[str, Any]:
    """The domain's joint_domain artifact (without `timing`)."""
    from accuracy import stats
    j = inp.cfg.joint
    a_val, a_test = float(ref['a_ref_val_pct']), float(ref['a_ref_test_pct'])
    gammas, lam, ev, m = fin.gammas, fin.lam, fin.evaluation, fin.measured
    available = [sorted(a, key=BRANCHES.index) for a in inp.available]
    kept_final = goal.kept_sets(gammas)
    blocks = fin.model.hyper_weights()['blocks']
    for b, av in zip(blocks, available):
        b['pruned'] = [x for x in av if x not in b['kept']]
    last = st.rounds[-1] if st.rounds else None
    return {
        'domain': d, 'fingerprint': fp, 'mode': 'real' if real else 'pseudo',
        'a_ref_pct': a_test, 'a_ref_val_pct': a_val, 'a_ref_fit_pct': float(ref['a_ref_fit_pct']),
        'final_accuracy_pct': m['test_accuracy_pct'], 'final_val_accuracy_pct': m['val_accuracy_pct'],
        'accuracy_drop_pct': m['test']['drop_pct'],
        'accuracy_drop_ci95_pct': [0.0 - m['test']['ci_pct'][1], 0.0 - m['test']['ci_pct'][0]],
        'final_accuracy_ci95_pct': _interval(a_test, m['test']), 'epsilon': j.epsilon,
        'accuracy_floor_pct': a_test - j.epsilon, 'accuracy_floor_val_pct': a_val - j.epsilon,
        'acceptance': {'rule': f'one-sided {stats.LEVEL:.0%} lower bound of the paired val difference to A_ref '
                               '>= -epsilon' if j.acceptance == 'bound' else
                               'val drop <= epsilon (joint.acceptance = point: no confidence bound, for ablations)',
                       'val': m['val'], 'test': m['test']},
        'data_roles': _data_roles(data),
        'lam': int(lam), 'gammas': [int(g) for g in gammas], 'blocks': blocks,
        'branches_pruned': int(sum(len(a) - len(k) for a, k in zip(available, kept_final))),
        'deviations': {'xi_accuracy_pct': max(0.0, m['test']['drop_pct'] - j.epsilon),
                       'xi_accuracy_val_bound_pct': max(0.0, -j.epsilon - m['val']['lower_pct']),
                       'xi_throughput_fps': ev['deviations']['xi_throughput_fps'],
                       'xi_memory_bytes': ev['deviations']['xi_memory_bytes']},
        'predicted': {k: ev[k] for k in ('edge_ms', 'link_ms', 'server_ms', 'latency_ms', 'throughput_fps',
                                         'bottleneck', 'period_ms')},
        'roofline': side_roofline(inp, gammas, lam), 'edge_weight_bytes': ev['edge_weight_bytes'],
        'goal_evaluation': ev, 'chosen_round': fin.chosen_round, 'stop_reason': st.stop,
        'solvers': (st.rounds[fin.chosen_round - 1] if fin.chosen_round else last or {}).get('solvers'),
        'rounds': [_round_summary(rec) for rec in st.rounds],
        'resumed_rounds': [{'round': rec['round'], 'created_at': rec['created_at'], 'command': rec['command']}
                           for rec in st.rounds if 'created_at' in rec],
        'sensitivity': {'mode': ref['mode'], 'samples': ref['sensitivity_samples'], 'split': 'train',
                        'evaluations': ref['evaluations'], 'initial_pct': ref['sensitivity_pct'],
                        'final_pct': _sens_json(st.sens), 'details': ref['details']},
        'surrogate': _surrogate_report(st, pareto),
        'pareto': pareto,
        'baselines': {'unpruned': cost.plain_baselines(inp.tables, inp.available),
                      'pruned': cost.plain_baselines(inp.tables, kept_final)},
        'unpruned_optimum': dict(inp.unpruned.stages, description='step-2 optimum: layouts and split, nothing pruned'),
        'warm_start': inp.warm_source, 'link': inp.link, 'lut_file': str(inp.lut_file),
        'measured': measured, 'state_file': str(state_path(inp.cfg, d).relative_to(inp.cfg.path())),
    }


def adopt_measured(inp: Inputs, payload: Dict[str, Any]) -> bool:
    """The domain's payload and state file after its closed loop (`payload['closed_loop']`): when the loop adopted
    a configuration that measured faster (closed_loop.confirm_choice: same pruning, other layouts / split), it
    becomes the decision (gammas, lam, predicted, roofline, edge_weight_bytes and goal_evaluation's stage times)
    and the goal program's pick moves to 'optimizer_choice'; the state file that export_parts deploys follows.
    The accuracy figures hold for both: the top-k keep the chosen pruning.  Returns whether it adopted."""
    from pipeline import closed_loop as CL
    row = CL.adopted_row(payload.get('closed_loop') or {})
    if row is None:
        return False
    g, lam = [int(x) for x in row['gammas']], int(row['lam'])
    payload['optimizer_choice'] = {k: payload[k] for k in ('gammas', 'lam', 'predicted', 'roofline',
                                                            'edge_weight_bytes')}
    payload['optimizer_choice']['note'] = 'the goal program\'s pick on the LUT; the closed loop measured a faster one'
    d = cost.describe(g, lam, inp.tables)
    pred = {k: d[k] for k in CL.PREDICTED_KEYS}
    payload.update(gammas=g, lam=lam, predicted=pred, roofline=side_roofline(inp, g, lam),
                   edge_weight_bytes=CL.edge_weight_bytes(inp, g, lam))
    payload['goal_evaluation'] = dict(payload.get('goal_evaluation') or {}, **pred,
                                      edge_weight_bytes=payload['edge_weight_bytes'])
    path = state_path(inp.cfg, int(payload['domain']))
    obj = load_artifact(path, 'joint_state', {'gammas': list, 'lam': int})
    state = {k: v for k, v in obj.items() if k not in CL.ARTIFACT_FIELDS}
    state.update(gammas=g, lam=lam, optimizer_choice={'gammas': payload['optimizer_choice']['gammas'],
                                                      'lam': payload['optimizer_choice']['lam']})
    write_artifact(path, 'joint_state', state, inp.cfg, obj.get('command') or 'step 3 closed loop')
    return True


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


def run_domain(inp: Inputs, d: int, command: str, force: bool = False, real_run: Optional[Any] = None,
               phase: str = 'all') -> Dict[str, Any]:
    """Step 3 for domain d; returns {'payload', 'state', 'skipped'}.  `real_run(model, gammas, lam, x, y)` (real
    mode) deploys the configuration and returns the measured dict.  Every phase resumes from its checkpoints, so
    the domain can also run in pieces (pipeline/tasks.py, one Ray task each): phase 'rounds' stops after the
    rounds ('pareto_todo': the sweep indices still to do), phase 'pareto' computes the sweep ('points': its points,
    in increasing epsilon each solved after the earlier ones were measured), and phase 'all' then assembles the
    result from the checkpoints."""
    from accuracy import training
    cfg, j = inp.cfg, inp.cfg.joint
    t_start = time.perf_counter()
    hw_entry = load_artifact(training.hyper_weights_path(cfg), 'trained_hyper_weights', {'domains': dict})['domains']
    if str(d) not in hw_entry:
        raise UserError(f'{training.hyper_weights_path(cfg)}: no hyper-weights for domain {d}; run step 0 for it')
    fp = fingerprint([inp.base_fingerprint, hw_entry[str(d)], d])
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

    if phase not in ('all', 'rounds', 'pareto'):
        raise ValueError(f'run_domain: phase {phase!r}')
    t0 = time.perf_counter()  # reference accuracy and initial sensitivities (checkpointed: the most expensive step)
    done_ref = _read_checkpoint(rd / 'reference.json', 'joint_reference', fp)
    if done_ref is None:
        _clear(rd)
        ref = dict(fingerprint=fp, **reference_phase(inp, model0, data, d))
        _write_checkpoint(rd / 'reference.json', 'joint_reference', ref, cfg, command)
    else:
        ref = done_ref[0]
    refs = _reference(inp, model0, data, ref)
    timing['reference_s'] = time.perf_counter() - t0
    log.info('domain %d: A_ref %.2f %% (train) / %.2f %% (val, %d images) / %.2f %% (test); accepted: %s <= %.2f '
             'points', d, refs.a_fit, refs.a_val, refs.val_correct.size, refs.a_test,
             'one-sided 95 % bound of the paired val drop' if j.acceptance == 'bound' else 'the val drop (point rule)',
             j.epsilon)

    st = LoopState(sens=_sens_array(ref['sensitivity_pct']), warm=inp.warm, a_fit=refs.a_fit,
                   measured=[MeasuredConfig('domain model', np.zeros((len(inp.available), 3), dtype=bool), 0.0)])
    if j.reference_finetune:
        st.measured.append(finetuned_reference(inp, st, model0, data, refs, d, fp, command))
    _run_rounds(inp, st, model0, bn_file0, data, refs, d, fp, command)
    timing['rounds_s'] = float(sum(rec['wall_s'] for rec in st.rounds))
    if phase == 'rounds':
        return {'payload': None, 'state': None, 'skipped': False, 'pareto_todo': pareto_todo(cfg, d, fp)}

    fin = final_pick(inp, st, model0, data, refs)
    pareto = pareto_phase(inp, st, fin, model0, data, refs, d, fp, command)
    if phase == 'pareto':
        return {'payload': None, 'state': None, 'skipped': False, 'points': pareto}
    timing['pareto_s'] = float(sum(p['wall_s'] for p in pareto))
    measured = _measure_real(real_run, fin, data) if real_run is not None else None
    payload = payload_phase(inp, d, fp, ref, st, fin, pareto, data, measured, real_run is not None)
    chain = chain_phase(inp, st, fin, model0, data, refs, d, fp, command)
    if chain is not None:
        payload['chain'] = chain
        timing['chain_s'] = float(chain.get('wall_s', 0.0))
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


def plain_split_only(cfg: Config) -> Optional[str]:
    """None for a RepVGG; for a plain network (nets.is_plain), the one line step 3 prints instead of pruning: branch
    pruning is RepVGG-only, and the result is step 2's split (initial_throughput_config.json, predicted figures)."""
    import nets
    if not nets.is_plain(cfg.model.name):
        return None
    path = cfg.path('initial_throughput_config.json')
    s2 = load_artifact(path, 'initial_throughput_config', {'lam': int, 'num_blocks': int, 'exact': dict,
                                                           'baselines': dict, 'model': dict})
    name = nets.canonical_name(cfg.model.name)
    if s2['model'].get('name') != name:
        raise ArtifactError(f'{path}: field "model" is {s2["model"].get("name")!r}, this run is {name}; re-run step 2 '
                            'with the same model flags')
    lam, n, b = s2['lam'], s2['num_blocks'], s2['baselines']
    names = [spec.name for spec in nets.plan_of({'name': cfg.model.name,
                                                 'width_multiplier': cfg.model.width_multiplier})]
    edge = f'blocks {names[0]}..{names[lam - 1]} on the edge' if lam else 'nothing on the edge'
    return (f'step 3: branch pruning is RepVGG-only; {name} is a plain network, so its '
            f'result is the split of step 2 ({path.name}): lambda {lam} of {n} ({edge}), '
            f'{s2["exact"]["throughput_fps"]:.1f} fps predicted ({s2["exact"]["bottleneck"]}-bound) vs edge-only '
            f'{b["edge_only"]["throughput_fps"]:.1f} fps and server-only {b["server_only"]["throughput_fps"]:.1f} fps')


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
    chain, chain_info = None, None
    if cfg.optim.chain:  # docs/design.md#device-chains: K = 2 is the two-device program under the chain's link
        from pipeline import chain as CH
        hops = CH.parse_chain(cfg.optim.chain)
        chain, chain_info = CH.chain_tables(lut, hops, cfg.optim.batch_size, cfg.lut.feature_dtype)
        if chain.num_devices == 2:
            if link_flag_given and cfg.lut.link != hops[0].link:
                raise ConfigError(f'--link {cfg.lut.link} and --chain {cfg.optim.chain}: a chain of two devices '
                                  'sets the link itself; give one of them')
            link, chain = CH.two_device_link(hops), None
    t = L.cost_tables(lut, cfg.optim.batch_size, link, cfg.lut.feature_dtype)
    available = cost.measured_kept(t)
    valid = cost.valid_mask(available)
    unpruned = exact.solve_exact(t, valid)
    warm, why = step2_warm_start(cfg.path('initial_throughput_config.json'), t.num_blocks, valid)
    hw = load_artifact(hyper_weights_path(cfg), 'trained_hyper_weights', {'domains': dict, 'fingerprint': str})
    partition = load_partition(cfg.path('partition_info.json'), cfg)
    mean, std = dataset_stats(cfg)
    c = cfg.to_dict()
    base_fp = fingerprint([file_sha256(lut_file), link.to_dict(), hw['fingerprint'], c['joint'], c['optim'], c['train'],
                           c['model'], c['data'], c['lut']['feature_dtype'], cfg.seed, warm, cost.COST_MODEL_VERSION,
                           JOINT_VERSION])
    return Inputs(cfg, lut, Path(lut_file), t, L.block_stats(lut), available, unpruned, warm, why, partition,
                  mean, std, base_fp, link.to_dict(), chain, chain_info)


def chain_phase(inp: Inputs, st: LoopState, fin: FinalPick, model0: HyperRepVGG, data: DomainData, ref: Reference,
                d: int, fp: str, command: str) -> Optional[Dict[str, Any]]:
    """The domain's "chain" field (None without optim.chain): for two devices the decision itself (the chain was
    the two-device program), for K >= 3 the goal program over the chain (pipeline.chain.goal_section) as a Pareto
    point at joint.epsilon (the final surrogate, its margin-reduced budget), its pruning deployed, fine-tuned and
    measured like one (or a round's measurement of the same pruning); checkpointed in domain_<d>_rounds/chain.json."""
    if inp.chain_info is None:
        return None
    if inp.chain is None:
        n = inp.tables.num_blocks
        return dict(inp.chain_info, num_devices=2, decision={'gammas': fin.gammas, 'lams': [fin.lam],
                                                             'hop_blocks': [[0, fin.lam], [fin.lam, n]]},
                    how='two devices: the domain\'s decision itself, made on the chain\'s tables')
    from pipeline import chain as CH
    path = rounds_dir(inp.cfg, d) / 'chain.json'
    done = _load_checkpoint(path, 'joint_chain', fp)
    if done is not None:
        return done['chain']
    t0 = time.perf_counter()
    j = inp.cfg.joint

    def solve(p: goal.GoalProblem) -> Tuple[Dict[str, Any], List[int]]:
        out = CH.goal_section(p, inp.chain, inp.chain_info, fin.gammas, fin.lam, inp.available, j.solver,
                              j.milp_time_limit_s)
        return out, out['decision']['gammas']
    sec, bud = point_solve(inp, st, ref, j.epsilon, solve, model0, data)
    m, new = measure_point(inp, st, fin, model0, data, ref, sec['decision']['gammas'], d, (3000, 9000 + d, 0),
                           f'domain {d} chain')
    predicted = bud.pop('predicted_drop_pct')
    sec['budget'] = bud
    sec['measured'] = {'accuracy_pct': m['test_accuracy_pct'], 'accuracy_ci95_pct': _interval(ref.a_test, m['test']),
                       'test_drop_pct': m['test']['drop_pct'], 'val_drop_pct': m['val']['drop_pct'],
                       'val_lower_pct': m['val']['lower_pct'], 'accepted': accepts(m, j.epsilon, j.acceptance),
                       'held_out': new and held_out(inp, sec['decision']['gammas']), 'predicted_drop_pct': predicted,
                       'source': 'measured (test): the decision\'s pruning deployed and fine-tuned here'
                       if new else 'measured (test): a round that pruned the same branches'}
    sec['wall_s'] = time.perf_counter() - t0
    write_artifact(path, 'joint_chain', {'fingerprint': fp, 'chain': sec}, inp.cfg, command)
    return sec


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
        out['memory'] = edge_memory(session, cfg, model, int(lam), mean, std)
        return out
    return run


def edge_memory(session: Any, cfg: Config, model: HyperRepVGG, lam: int, mean: Sequence[float],
                std: Sequence[float]) -> Dict[str, Any]:
    """The worker's peak RSS (and CUDA peak) holding the deployed edge part against the full model, each loaded
    from its part file (comm/parts.py) by a fresh process on the device (comm.session.measure_memory)."""
    from comm import parts
    from comm.session import measure_memory
    edge, server = (parts.part_bytes(model, lam, p, cfg.model.input_size, mean, std, cfg.lut.feature_dtype)
                    for p in parts.PARTS)
    return measure_memory(session, edge, server, cfg.optim.batch_size)
