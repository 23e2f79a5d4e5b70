"""The one configuration of the pipeline: defaults, strict overrides, and the flags every step shares.

Resolution order: dataclass defaults < `--config FILE` (JSON, nested by section) < `--set section.key=value`
< explicit flags (`--model`, `--link`, ...).  An unknown section or key, or a value of the wrong type, is a
`ConfigError` naming it.  The resolved `Config` is frozen and embedded in every artifact.

Relative paths (results_dir, data_root, checkpoints) are resolved against the repository root, so a step
gives the same result when run from the root or from inside `pipeline/`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from errors import UserError, one_line  # noqa: E402,F401 - re-exported: the one base of every user-facing error

REPO_ROOT = Path(__file__).resolve().parent


class ConfigError(UserError, ValueError):
    """A configuration file, key, flag or value that is not acceptable; the message names it."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = 'RepVGG-A0'  # architecture (RepVGG-A0..B3g4; 'A0' works too)
    width_multiplier: Optional[Tuple[float, float, float, float]] = (0.25, 0.25, 0.25, 0.5)  # stage widths; None = arch default
    small_input: bool = False  # stage0 stride 1 (for 32x32 inputs)
    input_size: int = 64  # input resolution in pixels (images are resized to input_size x input_size)
    checkpoint: Optional[str] = None  # base checkpoint (official train-time layout); None = train/reuse our own
    adapt_bn: bool = False  # let per-domain training adapt BN statistics (then saved with alpha)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = 'fashion-mnist'  # fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic
    data_root: str = 'data'  # where dataset files are looked up / downloaded
    num_domains: int = 10  # number of Non-IID domains K
    partition: str = 'class-slices'  # class-slices | dirichlet
    dirichlet_alpha: float = 0.5  # concentration of the Dirichlet label skew (smaller = more skewed)
    samples_per_domain: int = 0  # cap per domain (0 = all samples the partition assigns)
    min_classes_per_domain: int = 3  # class-slices: a domain's window covers at least this many classes
    corruption_severity: int = 2  # severity level 1..3 of every domain's corruption (table in data/domains.py)
    val_fraction: float = 0.35  # share of a domain's samples in its val split: step 3's acceptance and selection only
    test_fraction: float = 0.25  # share of a domain's samples in its test split: reported only
    synthetic_samples: int = 2000  # size of the synthetic dataset (tests)
    num_workers: int = 0  # DataLoader worker processes


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128  # images per training batch
    base_epochs: int = 4  # epochs of base-model training when no checkpoint is given
    base_lr: float = 0.1  # SGD learning rate of base training (warm-up, then cosine schedule)
    base_train_samples: int = 40000  # base-training samples (0 = whole train set); the rest join the domain pool
    base_split_seed: int = 0  # seed of the base-training subset, apart from --seed: one base model serves every domain seed without leakage
    alpha_epochs: int = 3  # epochs of per-domain hyper-weight training
    alpha_lr: float = 0.01  # Adam learning rate for alpha
    eval_batch_size: int = 256  # images per evaluation batch
    threads: int = 0  # torch CPU threads for training and evaluation (0 = one per CPU core)


@dataclass(frozen=True)
class LutConfig:
    batch_sizes: Tuple[int, ...] = (1,)  # batch sizes measured in the LUT
    warmup: int = 5  # untimed runs before timing each entry
    repeats: int = 20  # timed runs per entry
    threads: int = 1  # torch threads for measurement (1 = reproducible on a shared CPU; 0 = leave torch's default)
    edge_profile: str = 'jetson-tx2'  # device profile of the simulated edge device (pseudo mode)
    link: str = 'ethernet'  # link preset: 3g | 4g | wifi | ethernet (default: see README 'Why these defaults')
    bandwidth_mbps: Optional[float] = None  # explicit uplink bandwidth in Mbit/s (overrides the preset)
    rtt_ms: Optional[float] = None  # explicit round-trip time in ms (overrides the preset)
    feature_dtype: str = 'fp32'  # dtype of activations crossing the link: fp32 | fp16
    validation_samples: int = 20  # whole configurations compared end to end in LUT validation
    max_entry_s: float = 0.0  # stop repeating one LUT entry after this many seconds (>= 3 timed runs kept; 0 = no limit)
    timing: str = 'fit'  # fit: each entry its marginal cost, fitted to timed deployed parts of random configurations (chain timings as prior) | chain: blocks timed inside whole forward passes | isolated: each block alone in a loop
    fit_configurations: int = 0  # timing=fit: random configurations whose edge and server parts are timed (0 = twice as many as there are entries)
    fit_rounds: int = 20  # timing=fit: interleaved rounds over the fit's parts (each visits every part once: 1 untimed + 2 timed calls, shuffled order)
    holdout_visits: int = 1  # timing=fit: visits per fit round of each validation configuration's parts, timed in the fit's own rounds (alternate visits are its two passes)
    later_check: bool = True  # step 1: also re-time the validation configurations and 4 fit configurations in a window of their own after the LUT (the machine's speed drift since, `later` in lut_validation.json)
    rounds: int = 20  # whole-configuration timing (LUT validation, closed loop in pseudo mode): interleaved rounds over all parts (each visit 1 untimed + 2 timed calls); even and odd rounds are the two passes


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 1  # batch B of the cost model (frames per pipeline step)
    objective: str = 'throughput'  # throughput | latency | weighted
    omega: float = 0.5  # weight of latency in the weighted objective (0..1)
    steps: int = 300  # Adam steps per restart of the relaxed solvers
    restarts: int = 4  # random restarts of the relaxed solvers
    lr: float = 0.1  # Adam learning rate of the relaxed solvers
    tau_start: float = 2.0  # initial softmax / smooth-max temperature
    tau_end: float = 0.02  # final temperature (geometric annealing)
    step2_tau_end: float = 0.001  # final temperature of step 2's solver (lower: smooth max ends nearly exact)
    chain: str = ''  # device chain for step 2, 'dev:link,dev:link,dev' (dev = edge | server | a device profile, link = a link preset) or a JSON file; '' = the two-device LUT only (docs/design.md#device-chains)


@dataclass(frozen=True)
class JointConfig:
    epsilon: float = 1.0  # allowed accuracy drop below A_ref, in accuracy points
    epsilon_sweep: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # epsilons of the Pareto front
    throughput_target: float = 0.0  # throughput goal in frames/s (0 = maximize)
    edge_memory_budget_mb: float = 0.0  # edge weight-memory goal in MB (0 = none)
    roofline_weight: float = 0.01  # weight w of the tie-breakers in the throughput goal: roofline distance (decades) + surrogate loss (points)
    solver: str = 'both'  # gd | milp | both
    acceptance: str = 'bound'  # bound: the one-sided 95 % bound of the paired val drop <= epsilon (solver budget less a confidence margin) | point: the val drop itself <= epsilon, no margin (the rule before the bound; for ablations)
    sensitivity: str = 'measured'  # measured | importance
    max_rounds: int = 5  # progressive pruning rounds at most
    epochs_per_round: int = 1  # alpha fine-tuning epochs per round
    milp_time_limit_s: float = 60.0  # HiGHS time limit per MILP solve in seconds
    sensitivity_samples: int = 0  # train-split samples the sensitivities and the surrogate use (0 = the whole train split)
    importance_share: float = 0.02  # --sensitivity importance: share of branches pruned together for its one calibration measurement (>= 1)
    threads: int = 1  # torch CPU threads of step 3 (small batches: 1 avoids thread stalls on a shared CPU; 0 = one per core)
    finetune_samples: int = 0  # train samples per fine-tuning epoch (seeded subset per round; the rest selects the best state; 0 = half)
    min_saving_pct: float = 2.0  # sensitivities only for branches whose removal saves >= this % of a block's best time on a side (others stay kept)
    max_new_prunes: int = 3  # progressive step: at most this many branches newly pruned per round (0 = no limit)
    probes: int = 3  # train-split probes per solve: a solution's new prunes evaluated together, before fine-tuning, and their sensitivities scaled to it when it disagrees with their sum (0 = none; docs/design.md#surrogate)
    reference_finetune: bool = True  # step 3: also measure the domain model fine-tuned as a round, nothing pruned, as a centre of the surrogate (docs/design.md#surrogate)
    sweep_max_new_prunes: int = 2  # epsilon sweep / chain decision: at most this many branches pruned beyond the measured configuration the surrogate is centred on (0 = no limit)
    sweep_rho_prior: float = 0.6  # epsilon sweep / chain decision: rho is the rounds' measured / predicted increments shrunk towards this prior (weight surrogate.RHO_PRIOR_WEIGHT_PCT points; 0 = the rounds' rho unchanged, 1 before any evidence; docs/design.md#surrogate)


@dataclass(frozen=True)
class RealConfig:
    host: str = '127.0.0.1'  # address the server listens on (other than loopback needs --allow_remote)
    port: int = 6006  # TCP port of the server session
    token: Optional[str] = None  # shared secret for HMAC authentication (or env HYPERREPVGG_TOKEN)
    connect_timeout_s: float = 60.0  # how long the server waits for the worker to connect
    io_timeout_s: float = 120.0  # timeout of one request/response
    max_frame_mb: float = 512.0  # largest accepted frame in MB
    probe_sizes_kb: Tuple[int, ...] = (1, 16, 64, 256, 1024)  # link-probe payload sizes in KB
    run_samples: int = 0  # test samples streamed in a real run (0 = whole test split)
    allow_remote: bool = False  # allow real.host other than loopback (logs a warning; use a token then)
    probe_repeats: int = 3  # link-probe repetitions per payload size
    calibrate_runtime: bool = True  # step 1 --mode real: measure the runtime's per-frame cost (3 streamed splits)
    handshake_timeout_s: float = 10.0  # the whole handshake of one connection, before authentication (LoginGraceTime)
    chain_port: int = 0  # real mode with optim.chain: worker hop k dials chain_port + k (0 = port + 1: beside the two-device worker's port)
    chain_next: Tuple[str, ...] = ()  # real mode with optim.chain: HOST:PORT at which hop k reaches hop k + 1's --listen, one per hop but the last worker hop ('' or none = 127.0.0.1:<the port it listens on>: same machine, or a tunnel to it)


@dataclass(frozen=True)
class ClusterConfig:
    executor: str = 'local'  # local: per-domain tasks one after another in this process | ray: tasks on a Ray cluster
    ray_address: Optional[str] = None  # Ray cluster to join, e.g. HEAD_IP:6379 or auto (None = start a local one)
    local_cpus: int = 0  # CPUs of the local Ray cluster started when ray_address is None (0 = every core)
    cpus_per_task: int = 1  # CPUs Ray reserves per task; also the task's torch threads when the step's threads key is 0
    gpus_per_task: float = 1.0  # GPUs Ray reserves per task with --device cuda (fractions share a GPU; unused on cpu)
    max_retries: int = 2  # reruns of a task whose worker process died (killed, out of memory) before it is reported failed


@dataclass(frozen=True)
class LoopConfig:
    measure: bool = True  # steps 2 and 3 measure what they choose (pseudo: the server part here; real: through the worker)
    top_k: int = 10  # best-predicted configurations measured beside the chosen one (one per split lambda)
    passes: int = 2  # interleaved measurement passes (the second in reverse order)
    real_samples: int = 240  # real mode: images streamed per measured configuration and pass
    confirm: int = 10  # at most this many top-k configurations race the predicted choice (fastest measured first; 10 = all of the default top-k; 0 = never adopt)
    confirm_z: float = 2.0  # the race eliminates a configuration whose log-throughput over its passes (read at pace_quantile in real mode, else the median) lies below the leader's by more than this many bootstrap standard errors (whole passes drawn)
    confirm_passes: int = 8  # at most this many fresh interleaved passes of the race (one per round, over the configurations still in; docs/design.md "Closed loop")
    pace_quantile: float = 90.0  # real mode: a configuration's throughput over its passes is this percentile of the passes' paces (interference only slows a stream; 50 = the median; docs/design.md "Closed loop")
    evaluate_passes: int = 0  # > 0: the decision, the optimizer's pick and the top-k measured again in this many fresh passes no decision saw (report.evaluation; bench_closed_loop)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lut: LutConfig = field(default_factory=LutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    real: RealConfig = field(default_factory=RealConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    results_dir: str = 'results'  # where artifacts are written (relative = to the repository root)
    device: str = 'auto'  # torch device for server-side compute: auto (cuda when there is a GPU, else cpu) | cpu | cuda | cuda:N
    seed: int = 0  # seed of every random choice

    def __post_init__(self) -> None:
        if self.device == 'auto':  # resolved once, here: every consumer and every artifact sees cpu or cuda
            object.__setattr__(self, 'device', auto_device())

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def path(self, *parts: str) -> Path:
        """A path under results_dir."""
        return resolve_path(self.results_dir).joinpath(*parts)


def resolve_path(p: str) -> Path:
    """Relative paths are relative to the repository root."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a JSON (or string, from --set) value to the annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ('none', 'null')):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(',') if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{where}: expected a list, got {value!r}')
        inner = args[0]
        items = tuple(_coerce(v, inner, f'{where}[{i}]') for i, v in enumerate(value))
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f'{where}: expected {len(args)} values, got {len(items)}')
        return items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', '1', 'yes', 'false', '0', 'no'):
            return value.lower() in ('true', '1', 'yes')
        raise ConfigError(f'{where}: expected true/false, got {value!r}')
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f'{where}: expected an integer, got {value!r}')
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f'{where}: expected an integer, got {value!r}')
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f'{where}: expected a finite number, got {value!r}')
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f'{where}: expected a string, got {value!r}')
    raise ConfigError(f'{where}: unsupported type {tp}')  # pragma: no cover - config schema bug


# The range of every numeric key (each element of a tuple): (lowest, highest, lowest excluded); None = open.
# Checked where a value enters (--config, --set, a flag), so a bad one fails before any work starts.
RANGES: Dict[str, Tuple[Optional[float], Optional[float], bool]] = {
    'model.width_multiplier': (0, None, True), 'model.input_size': (8, None, False),
    'data.num_domains': (1, None, False), 'data.dirichlet_alpha': (0, None, True),
    'data.samples_per_domain': (0, None, False), 'data.min_classes_per_domain': (1, None, False),
    'data.corruption_severity': (1, 3, False), 'data.val_fraction': (0, 1, False), 'data.test_fraction': (0, 1, False),
    'data.synthetic_samples': (1, None, False), 'data.num_workers': (0, None, False),
    'train.batch_size': (1, None, False), 'train.base_epochs': (0, None, False), 'train.base_lr': (0, None, True),
    'train.base_train_samples': (0, None, False), 'train.alpha_epochs': (0, None, False),
    'train.alpha_lr': (0, None, True), 'train.eval_batch_size': (1, None, False), 'train.threads': (0, None, False),
    'lut.batch_sizes': (1, None, False), 'lut.warmup': (0, None, False), 'lut.repeats': (1, None, False),
    'lut.threads': (0, None, False), 'lut.bandwidth_mbps': (0, None, True), 'lut.rtt_ms': (0, None, False),
    'lut.validation_samples': (0, None, False), 'lut.max_entry_s': (0, None, False),
    'lut.fit_rounds': (2, None, False), 'lut.rounds': (2, None, False), 'lut.holdout_visits': (1, None, False),
    'optim.batch_size': (1, None, False), 'optim.omega': (0, 1, False), 'optim.steps': (1, None, False),
    'optim.restarts': (1, None, False), 'optim.lr': (0, None, True), 'optim.tau_start': (0, None, True),
    'optim.tau_end': (0, None, True), 'optim.step2_tau_end': (0, None, True),
    'joint.epsilon': (0, None, False), 'joint.epsilon_sweep': (0, None, False),
    'joint.throughput_target': (0, None, False), 'joint.edge_memory_budget_mb': (0, None, False),
    'joint.roofline_weight': (0, None, False), 'joint.max_rounds': (0, None, False),
    'joint.epochs_per_round': (0, None, False), 'joint.milp_time_limit_s': (0, None, True),
    'joint.sensitivity_samples': (0, None, False), 'joint.importance_share': (0, 1, True),
    'joint.threads': (0, None, False), 'joint.finetune_samples': (0, None, False),
    'joint.min_saving_pct': (0, 100, False), 'joint.max_new_prunes': (0, None, False),
    'joint.probes': (0, None, False), 'joint.sweep_max_new_prunes': (0, None, False),
    'joint.sweep_rho_prior': (0, None, False),
    'real.port': (0, 65535, False), 'real.connect_timeout_s': (0, None, True), 'real.io_timeout_s': (0, None, True),
    'real.max_frame_mb': (0, None, True), 'real.probe_sizes_kb': (0, None, False), 'real.run_samples': (0, None, False),
    'real.probe_repeats': (1, None, False), 'real.handshake_timeout_s': (0, None, True),
    'real.chain_port': (0, 65535, False),
    'loop.top_k': (1, None, False), 'loop.passes': (1, None, False), 'loop.real_samples': (1, None, False),
    'loop.confirm': (0, None, False), 'loop.confirm_passes': (1, None, False),
    'loop.confirm_z': (0, None, True), 'loop.evaluate_passes': (0, None, False),
    'loop.pace_quantile': (0, 100, True),
}
NON_EMPTY = ('lut.batch_sizes', 'real.probe_sizes_kb')


def _check_range(key: str, value: Any, where: str) -> None:
    rule = RANGES.get(key)
    if rule is None or value is None:
        return
    lo, hi, open_lo = rule
    want = ' and '.join(t for t in (None if lo is None else f'{">" if open_lo else ">="} {lo:g}',
                                    None if hi is None else f'<= {hi:g}') if t)
    for v in value if isinstance(value, tuple) else (value,):
        if (lo is not None and (v <= lo if open_lo else v < lo)) or (hi is not None and v > hi):
            raise ConfigError(f'{where}: expected {"values" if isinstance(value, tuple) else "a value"} {want}, '
                              f'got {v!r}')
    if key in NON_EMPTY and isinstance(value, tuple) and not value:
        raise ConfigError(f'{where}: expected at least one value, got none')


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


# keys renamed since artifacts were first written: an old config file gets an error naming the new key
RENAMED_KEYS = {'client_profile': 'lut.edge_profile'}


def _replace(cfg: Any, key_path: List[str], value: Any, where: str, prefix: str = '') -> Any:
    """Return a copy of dataclass `cfg` with the field at key_path set (strictly typed, within RANGES)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    head = key_path[0]
    if head in RENAMED_KEYS and head not in names:
        raise ConfigError(f'{where}: key {head!r} was renamed; use {RENAMED_KEYS[head]!r}')
    if head not in names:
        raise ConfigError(f'{where}: unknown key {head!r}; valid keys: {", ".join(sorted(names))}')
    tp = _hints(type(cfg))[head]
    if len(key_path) == 1:
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f'{where}: section {head!r} needs an object of keys')
            sub = getattr(cfg, head)
            for k, v in value.items():
                sub = _replace(sub, [k], v, f'{where}.{k}', f'{prefix}{head}.')
            return dataclasses.replace(cfg, **{head: sub})
        coerced = _coerce(value, tp, where)
        _check_range(prefix + head, coerced, where)
        return dataclasses.replace(cfg, **{head: coerced})
    if not dataclasses.is_dataclass(tp):
        raise ConfigError(f'{where}: {head!r} is not a section')
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), key_path[1:], value, where,
                                                      f'{prefix}{head}.')})


def apply_overrides(cfg: Config, overrides: Dict[str, Any], source: str) -> Config:
    """Apply nested {section: {key: value}} or flat {'section.key': value} overrides; strict."""
    for key, value in overrides.items():
        cfg = _replace(cfg, key.split('.'), value, f'{source}: {key}')
    return cfg


MAX_JSON_DEPTH = 64  # artifacts and configs nest a handful of levels; anything deeper is not one of ours


def _json_problem(obj: Any, max_depth: int) -> Optional[str]:
    """The first non-finite number (by its field path) or a nesting deeper than max_depth in parsed JSON."""
    stack: List[Tuple[Any, Tuple[Any, ...]]] = [(obj, ())]
    while stack:
        o, path = stack.pop()
        if isinstance(o, float) and not math.isfinite(o):
            field = ''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in path).lstrip('.')
            return f'field {field or "(top level)"} is {o} (only finite numbers are accepted)'
        if isinstance(o, (dict, list)):
            if len(path) >= max_depth:
                return f'JSON nests deeper than {max_depth} levels'
            items = o.items() if isinstance(o, dict) else enumerate(o)
            stack.extend((v, path + (k,)) for k, v in items)
    return None


def parse_json_bytes(data: bytes, where: str, error: type = ValueError, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON of a file's bytes: UTF-8, finite numbers, at most max_depth levels; else `error` naming `where` and
    the field."""
    try:
        obj = json.loads(data.decode('utf-8'))
    except UnicodeDecodeError as e:
        raise error(f'{where}: not UTF-8 text (byte {e.start}: {e.reason})') from None
    except RecursionError:
        raise error(f'{where}: JSON nests deeper than {max_depth} levels') from None
    except ValueError as e:  # json.JSONDecodeError, and integers beyond Python's digit limit
        raise error(f'{where}: not valid JSON ({e})') from None
    problem = _json_problem(obj, max_depth)
    if problem:
        raise error(f'{where}: {problem}')
    return obj


def load_config_file(path: str) -> Dict[str, Any]:
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f'--config: {p} ' + ('is a directory, expected a JSON file' if p.is_dir()
                                               else 'does not exist'))
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f'--config: cannot read {p} ({e.strerror})') from None
    data = parse_json_bytes(raw, f'--config: {p}', ConfigError)
    if isinstance(data, dict) and 'config' in data and 'schema_version' in data:
        data = data['config']  # an artifact: reuse the config it recorded
    if not isinstance(data, dict):
        raise ConfigError(f'--config: {p} must hold a JSON object')
    return data


# Flags shared by every step script: flag -> (config key, help without the default, which comes from Config()).
COMMON_FLAGS: Dict[str, Tuple[str, str]] = {
    'results_dir': ('results_dir', 'artifact directory, relative to the repository root'),
    'model': ('model.name', 'RepVGG architecture, e.g. RepVGG-A0 or B3'),
    'dataset': ('data.dataset', 'fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic'),
    'data_root': ('data.data_root', 'dataset directory, relative to the repository root'),
    'device': ('device', 'torch device for server-side compute: cpu | cuda | auto (unset = auto: cuda when torch '
                         'sees a GPU, else cpu; the default shown is what auto resolved to here)'),
    'seed': ('seed', 'random seed'),
}


def default_of(key: str) -> Any:
    """Config()'s value of a dotted key such as 'train.alpha_epochs': the default a flag's --help shows."""
    value: Any = Config()
    for part in key.split('.'):
        value = getattr(value, part)
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--config, --set and the common flags (docs/design.md#artifacts-and-steps)."""
    g = parser.add_argument_group('common configuration')
    g.add_argument('--config', metavar='FILE', help='JSON config file (nested by section) or an artifact whose '
                   'config to reuse (default: none, built-in defaults)')
    g.add_argument('--set', metavar='SECTION.KEY=VALUE', action='append', default=[],
                   help='override one config key, repeatable, e.g. --set optim.steps=500 (default: none)')
    for flag, (key, help_text) in COMMON_FLAGS.items():
        g.add_argument(f'--{flag}', default=None, help=f'{help_text} (default: {default_of(key)})')


LINK_FLAGS: Dict[str, str] = {'link': 'lut.link', 'bandwidth_mbps': 'lut.bandwidth_mbps', 'rtt_ms': 'lut.rtt_ms'}


def add_link_args(parser: argparse.ArgumentParser, reevaluate: bool) -> None:
    """--link, --bandwidth_mbps, --rtt_ms (config keys LINK_FLAGS).  `reevaluate`: the step reads a finished LUT,
    whose own link is the default (steps 2 and 3); otherwise the preset is (step 1)."""
    d = Config().lut
    default = 'the link recorded in the LUT by step 1' if reevaluate else d.link
    parser.add_argument('--link', help=f'link preset: 3g | 4g | wifi | ethernet (default: {default})')
    keep = "the link's"
    parser.add_argument('--bandwidth_mbps', help='uplink bandwidth in Mbit/s, overrides the link\'s (default: '
                        f'{d.bandwidth_mbps or keep})')
    parser.add_argument('--rtt_ms', help=f'round-trip time in ms, overrides the link\'s (default: {d.rtt_ms or keep})')


EXECUTOR_FLAGS: Dict[str, str] = {'executor': 'cluster.executor', 'ray_address': 'cluster.ray_address'}


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """--executor and --ray_address (config keys EXECUTOR_FLAGS) of the steps whose per-domain work fans out."""
    c = Config().cluster
    parser.add_argument('--executor', help='local: per-domain tasks one after another in this process | ray: each '
                        f'domain a task on a Ray cluster (default: {c.executor})')
    parser.add_argument('--ray_address', help='with --executor ray: address of a running cluster to join, e.g. '
                        f'HEAD:6379 or auto (default: {c.ray_address or "none, start a local cluster"})')


def resolve_config(args: argparse.Namespace, flag_keys: Optional[Dict[str, str]] = None) -> Config:
    """Build the frozen Config from defaults, --config, --set and flags (common + `flag_keys`)."""
    cfg = Config()
    if getattr(args, 'config', None):
        cfg = apply_overrides(cfg, load_config_file(args.config), f'--config {args.config}')
    for item in getattr(args, 'set', []) or []:
        if '=' not in item:
            raise ConfigError(f'--set {item!r}: expected SECTION.KEY=VALUE')
        key, value = item.split('=', 1)
        cfg = apply_overrides(cfg, {key.strip(): value}, '--set')
    mapping = {flag: key for flag, (key, _) in COMMON_FLAGS.items()}
    mapping.update(flag_keys or {})
    for flag, key in mapping.items():
        value = getattr(args, flag, None)
        if value is not None:
            cfg = apply_overrides(cfg, {key: value}, f'--{flag}')
    check_results_dir(cfg.results_dir)
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError(f'data.val_fraction + data.test_fraction must leave training samples (< 1), got '
                          f'{cfg.data.val_fraction:g} + {cfg.data.test_fraction:g}')
    return cfg


def auto_device() -> str:
    """'cuda' when torch sees a GPU, else 'cpu' (device = auto)."""
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def check_results_dir(results_dir: str) -> Path:
    """results_dir is a directory this process can write into, or can be created; ConfigError naming it."""
    path = resolve_path(results_dir)
    where = f'--results_dir / results_dir {results_dir!r}'
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f'{where}: {probe} is not a directory')
    try:  # a real write (and its removal): os.access says yes to root even on /proc or a read-only mount
        tempfile.TemporaryFile(dir=str(probe)).close()
    except OSError as e:
        raise ConfigError(f'{where}: cannot write into {probe} ({e.strerror or e})') from None
    return path


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command that produced an artifact, as it could be retyped."""
    import shlex
    parts = [Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv)
    return ' '.join(shlex.quote(p) for p in parts)


def run_cli(main: typing.Callable[[Optional[Sequence[str]]], Optional[int]]) -> None:
    """Run a step's main(); bad input (UserError) prints 'error: ...' to stderr and exits 2, no traceback."""
    try:
        code = main(None)
    except UserError as e:
        print(f'error: {one_line(str(e))}', file=sys.stderr)  # noqa: T201 - the step scripts' CLI runner reports to stderr
        code = 2
    except KeyboardInterrupt:
        print('interrupted; finished work is kept and the step resumes on the next run', file=sys.stderr)  # noqa: T201
        code = 130
    sys.exit(code or 0)
