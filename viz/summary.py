"""Step-4 inputs as plain records, and the paper table (summary.md / summary.json) built from them.

`load_*` functions read the step 0-3 artifacts (through artifacts.load_artifact, so a missing file or field
is an ArtifactError naming it) and return the records below; `summary_rows` / `summary_markdown` are pure.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from artifacts import JOINT_DIR, ArtifactError, joint_path, load_artifact

log = logging.getLogger(__name__)

JOINT_RE = re.compile(r'^domain_(.+)_joint\.json$')
BASELINE_KEYS = ('best_plain_split', 'edge_only', 'server_only')


@dataclass(frozen=True)
class Stage:
    """Predicted (or measured) stage times of one configuration, ms per batch, and its throughput."""
    edge_ms: float
    link_ms: float
    server_ms: float
    latency_ms: float
    throughput_fps: float
    bottleneck: str


@dataclass(frozen=True)
class ParetoPoint:
    epsilon: float  # allowed accuracy drop, points
    accuracy_pct: float  # accuracy of the point, % (which split: DomainResult.accuracy_source)
    throughput_fps: float  # predicted throughput, frames/s
    lam: Optional[int] = None
    branches_pruned: Optional[int] = None
    accuracy_ci_pct: Optional[Tuple[float, float]] = None  # 95 % interval of the accuracy (measured points)
    measured: bool = False  # accuracy measured on the deployed configuration (else: a surrogate prediction)


@dataclass(frozen=True)
class DomainResult:
    """One domain's step-3 outcome, accuracies in %."""
    domain: str
    a_ref_pct: float
    final_acc_pct: float
    epsilon: float
    lam: int
    num_blocks: int
    gammas: Tuple[int, ...]
    alpha: Tuple[Dict[str, float], ...]  # per block: alpha of the branches the block has
    kept: Tuple[Tuple[str, ...], ...]  # per block: kept branches
    predicted: Stage
    baselines: Dict[str, Stage]  # best_plain_split / edge_only / server_only on the unpruned plain model
    baseline_lam: Dict[str, int]
    pareto: Tuple[ParetoPoint, ...] = ()
    measured: Optional[Dict[str, float]] = None  # real mode: measured values beside 'predicted'
    loop: Optional[Dict[str, Any]] = None  # the closed loop (pipeline/closed_loop.py): decision, report, measurements
    source: str = ''  # the artifact file
    corruption: str = ''  # the domain's corruption (step 0's training_results.json), '' when unknown
    final_ci_pct: Optional[Tuple[float, float]] = None  # 95 % interval of final_acc_pct (paired to A_ref)

    @property
    def title(self) -> str:
        return f'domain {self.domain}' + (f' ({self.corruption})' if self.corruption else '')

    @property
    def drop_pct(self) -> float:
        return self.a_ref_pct - self.final_acc_pct

    @property
    def floor_pct(self) -> float:
        """The accuracy floor A_ref - epsilon, %."""
        return self.a_ref_pct - self.epsilon

    @property
    def drop_ci_pct(self) -> Optional[Tuple[float, float]]:
        if self.final_ci_pct is None:
            return None
        return self.a_ref_pct - self.final_ci_pct[1], self.a_ref_pct - self.final_ci_pct[0]

    @property
    def branches_pruned(self) -> int:
        return sum(len(a) - len(k) for a, k in zip(self.alpha, self.kept))

    @property
    def gain_x(self) -> Optional[float]:
        plain = self.baselines.get('best_plain_split')
        if plain is None or not plain.throughput_fps > 0:
            return None
        return self.predicted.throughput_fps / plain.throughput_fps

    @property
    def report(self) -> Optional[Dict[str, Any]]:
        """The closed-loop report (measured figures), None when nothing was measured."""
        return (self.loop or {}).get('report')

    @property
    def measured_gain_x(self) -> Optional[float]:
        g = (self.report or {}).get('gain_over_best_plain_split')
        return float(g['measured_x']) if g else None


@dataclass(frozen=True)
class LutView:
    """One batch size of the LUT as arrays, with where each side's numbers come from."""
    edge_ms: np.ndarray  # (N, 14), NaN = no entry
    server_ms: np.ndarray
    batch: int
    edge_source: str  # 'measured' | 'modelled' | 'mixed' (+ how)
    server_source: str
    edge_device: str
    server_device: str
    link: str = ''  # the link the LUT's cost tables use, in words


@dataclass(frozen=True)
class Step2View:
    gammas: Tuple[int, ...]
    lam: int
    chosen: Stage
    baselines: Dict[str, Stage]
    baseline_lam: Dict[str, int]
    exact_throughput_fps: Optional[float] = None
    gap_pct: Optional[float] = None
    loop: Optional[Dict[str, Any]] = None  # the closed loop (pipeline/closed_loop.py)
    chain: Optional[Dict[str, Any]] = None  # the chain section (--chain, pipeline/chain.py), predicted


# ----------------------------------------------------------------------------------------------------------
# Field access with errors that name the file and the field
# ----------------------------------------------------------------------------------------------------------

def _get(obj: Mapping[str, Any], key: str, where: str, types: Any = None) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise ArtifactError(f'{where}: missing field {key!r}')
    value = obj[key]
    if types is not None and (not isinstance(value, types) or isinstance(value, bool) and types is not bool):
        raise ArtifactError(f'{where}: field {key!r} has type {type(value).__name__}')
    return value


def _num(obj: Mapping[str, Any], key: str, where: str) -> float:
    v = _get(obj, key, where, (int, float))
    return float(v)


def stage_from(obj: Mapping[str, Any], where: str) -> Stage:
    """A Stage from a dict with edge_ms/link_ms/server_ms/throughput_fps (as optim.cost.evaluate returns)."""
    e, li, s = (_num(obj, k, where) for k in ('edge_ms', 'link_ms', 'server_ms'))
    lat = float(obj['latency_ms']) if isinstance(obj.get('latency_ms'), (int, float)) else e + li + s
    fps = _num(obj, 'throughput_fps', where)
    bottleneck = obj.get('bottleneck')
    if bottleneck not in ('edge', 'link', 'server'):
        bottleneck = ('edge', 'link', 'server')[int(np.argmax([e, li, s]))]
    return Stage(e, li, s, lat, fps, str(bottleneck))


def to_pct(value: float, scale: float) -> float:
    return float(value) * scale


# ----------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------

def find_domains(results_dir: Path) -> List[str]:
    """Domains with a step-3 result, in numeric order where they are numbers."""
    d = Path(results_dir) / JOINT_DIR
    found = [m.group(1) for p in d.glob('domain_*_joint.json') if (m := JOINT_RE.match(p.name))] \
        if d.is_dir() else []
    return sorted(found, key=lambda s: (0, int(s), '') if s.isdigit() else (1, 0, s))


def load_domain_result(path: Path) -> DomainResult:
    """Read one `domain_<d>_joint.json` (step 3)."""
    obj = load_artifact(path, fields={'domain': (int, str), 'a_ref_pct': float, 'final_accuracy_pct': float,
                                      'lam': int, 'gammas': list, 'blocks': list, 'predicted': dict,
                                      'baselines': dict})
    where = str(path)
    blocks = obj['blocks']
    alpha = tuple({str(b): float(v) for b, v in _get(e, 'alpha', f'{where}: blocks[{k}]', dict).items()}
                  for k, e in enumerate(blocks))
    kept = tuple(tuple(_get(e, 'kept', f'{where}: blocks[{k}]', list)) for k, e in enumerate(blocks))
    unpruned = _get(obj['baselines'], 'unpruned', f'{where}: baselines', dict)
    base = {k: stage_from(_get(unpruned, k, f'{where}: baselines.unpruned', dict), f'{where}: baselines.unpruned.{k}')
            for k in BASELINE_KEYS if k in unpruned}
    base_lam = {k: int(unpruned[k]['lam']) for k in base if isinstance(unpruned[k].get('lam'), int)}
    pareto = tuple(ParetoPoint(_num(p, 'epsilon', f'{where}: pareto[{i}]'),
                               _num(p, 'accuracy_pct', f'{where}: pareto[{i}]'),
                               _num(p, 'throughput_fps', f'{where}: pareto[{i}]'),
                               p.get('lam'), p.get('branches_pruned'), _interval(p.get('accuracy_ci95_pct')),
                               str(p.get('accuracy_source', '')).startswith('measured'))
                   for i, p in enumerate(obj.get('pareto') or []))
    measured = obj.get('measured') if isinstance(obj.get('measured'), dict) else None
    loop = obj.get('closed_loop') if isinstance(obj.get('closed_loop'), dict) else None
    return DomainResult(domain=str(obj['domain']), a_ref_pct=float(obj['a_ref_pct']),
                        final_acc_pct=float(obj['final_accuracy_pct']),
                        epsilon=float(obj.get('epsilon', obj['config'].get('joint', {}).get('epsilon', float('nan')))),
                        lam=int(obj['lam']), num_blocks=len(blocks), gammas=tuple(int(g) for g in obj['gammas']),
                        alpha=alpha, kept=kept, predicted=stage_from(obj['predicted'], f'{where}: predicted'),
                        baselines=base, baseline_lam=base_lam, pareto=pareto, measured=measured, loop=loop,
                        source=where, final_ci_pct=_interval(obj.get('final_accuracy_ci95_pct')))


def _interval(v: Any) -> Optional[Tuple[float, float]]:
    """[lo, hi] of two numbers as a tuple; None for anything else (artifacts from before intervals)."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return float(v[0]), float(v[1])
    return None


def load_step2(path: Path) -> Step2View:
    """Read `initial_throughput_config.json` (step 2)."""
    obj = load_artifact(path, fields={'gammas': list, 'lam': int, 'predicted': dict, 'baselines': dict})
    where = str(path)
    base = {k: stage_from(obj['baselines'][k], f'{where}: baselines.{k}') for k in BASELINE_KEYS
            if k in obj['baselines']}
    base_lam = {k: int(obj['baselines'][k]['lam']) for k in base if isinstance(obj['baselines'][k].get('lam'), int)}
    exact = obj.get('exact') if isinstance(obj.get('exact'), dict) else {}
    return Step2View(tuple(int(g) for g in obj['gammas']), int(obj['lam']),
                     stage_from(obj['predicted'], f'{where}: predicted'), base, base_lam,
                     exact.get('throughput_fps'), obj.get('gap_pct'),
                     obj.get('closed_loop') if isinstance(obj.get('closed_loop'), dict) else None,
                     obj.get('chain') if isinstance(obj.get('chain'), dict) else None)


def side_source(lut: Mapping[str, Any], side: str, batch: int) -> Tuple[str, str]:
    """('measured' | 'modelled (profile P)' | 'mixed: i measured, j modelled', device name) of one LUT side."""
    part = lut[side]
    srcs = [e.get('source') for e in part['entries'].values() if e.get('batch') == batch]
    n_meas = sum(1 for x in srcs if x == 'measured')
    if srcs and n_meas == len(srcs):
        source = 'measured'
    elif n_meas == 0:
        profile = (part.get('profile') or {}).get('name')
        source = f'modelled, profile {profile}' if profile else 'modelled'
    else:
        source = f'mixed: {n_meas} measured, {len(srcs) - n_meas} modelled entries'
    device = str((part.get('metadata') or {}).get('device_name') or side)
    return source, device.split(' (')[0]


def load_lut_view(path: Path, batch: int) -> LutView:
    """One batch size of hardware_lut_complete.json, read through timing.lut (the one reader of the format)."""
    from timing import lut as lut_mod
    lut = lut_mod.load_lut(path)
    if batch not in lut['batch_sizes']:
        raise ArtifactError(f'{path}: field "batch_sizes" is {lut["batch_sizes"]}, it has no batch {batch} '
                            '(choose one with --batch)')
    t = lut_mod.cost_tables(lut, batch)
    (e_src, e_dev), (s_src, s_dev) = side_source(lut, 'edge', batch), side_source(lut, 'server', batch)
    if (lut['server'].get('metadata') or {}).get('device') == 'cpu':
        s_dev += ' (a CPU: the "server" of these figures is this CPU, not a GPU server)'
    link = (f'{lut["link"].get("name", "link")}: {t.bandwidth_mbps:g} Mbit/s uplink, one-way latency '
            f'{t.latency_ms:g} ms, features as {lut["feature_dtype"]}')
    return LutView(t.edge_ms, t.server_ms, batch, e_src, s_src, e_dev, s_dev, link)


def lut_validation_note(path: Path) -> Optional[str]:
    """One line from lut_validation.json (step 1), or None when there is none."""
    if not Path(path).is_file():
        return None
    obj = load_artifact(path, 'lut_validation', {'summary': dict})
    tot = _get(obj['summary'], 'total', f'{path}: summary', dict)
    share, med = tot.get('share_within_tol'), tot.get('median_abs_error_pct')
    if not isinstance(share, (int, float)) or not isinstance(med, (int, float)):
        return None
    tol = obj['summary'].get('tolerance_pct', 10.0)
    where = 'timed in the fit\'s own rounds' if obj.get('window') == 'fit' else 'timed after the LUT'
    line = (f'LUT validation ({obj.get("side", "?")} side, {obj.get("device", "?")}, {tot.get("count")} unseen whole '
            f'configurations measured end to end, {where}): {100 * share:.0f} % within ±{tol:g} % of the LUT sum, '
            f'median |error| {med:.1f} %, median signed error {tot.get("median_signed_error_pct", 0.0):+.1f} %')
    noise = obj['summary'].get('noise') or {}
    if isinstance(noise.get('pass_to_pass_pct'), (int, float)):
        line += (f', noise floor {noise["pass_to_pass_pct"]:.1f} % pass to pass (LUT vs pass 2: '
                 f'{noise["lut_vs_pass2_median_abs_pct"]:.1f} %)')
    later = obj.get('later') if isinstance(obj.get('later'), dict) else None
    if later is not None:
        lt = (later.get('summary') or {}).get('total') or {}
        sp = later.get('speed') or {}
        if isinstance(lt.get('median_signed_error_pct'), (int, float)):
            line += f'; in a later window of its own the signed error was {lt["median_signed_error_pct"]:+.1f} %'
            if isinstance(sp.get('factor'), (int, float)):
                line += f' (the machine ran x{sp["factor"]:.3f} the LUT\'s time there: drift, measured)'
        obj = later
    speed, anch = obj.get('speed'), (obj.get('anchored') or {}).get('total') or {}
    if isinstance(speed, dict) and isinstance(anch.get('median_abs_error_pct'), (int, float)):
        line += (f'; re-anchored to the validation window\'s speed (x{speed["factor"]:.3f}, from '
                 f'{speed["anchors"]} re-timed fit configurations): {100 * anch["share_within_tol"]:.0f} % within '
                 f'±{tol:g} %, median |error| {anch["median_abs_error_pct"]:.1f} %')
    return line + '.'


@dataclass
class Inputs:
    """Everything the figures and the table are drawn from."""
    lut: LutView
    step2: Optional[Step2View]
    domains: List[DomainResult]
    accuracy_source: str  # the split of the final accuracy: 'test' (step 3 reports held-out test accuracy)
    notes: List[str] = field(default_factory=list)
    lut_lines: List[str] = field(default_factory=list)  # where the LUT numbers come from, and its validation


def collect(results_dir: Path, domains: Optional[str], batch: int) -> Inputs:
    """Load the step-4 inputs; the LUT is required, the rest optional (a note says what is missing)."""
    results_dir = Path(results_dir)
    notes: List[str] = []
    lut = load_lut_view(results_dir / 'hardware_lut_complete.json', batch)
    lut_lines = [f'edge side: {lut.edge_device}, {lut.edge_source}',
                 f'server side: {lut.server_device}, {lut.server_source}', f'link: {lut.link}']
    val = lut_validation_note(results_dir / 'lut_validation.json')
    lut_lines.append(val or 'no lut_validation.json: the LUT was not validated end to end')
    s2_path = results_dir / 'initial_throughput_config.json'
    step2 = load_step2(s2_path) if s2_path.is_file() else None
    if step2 is None:
        notes.append(f'no {s2_path.name} (step 2): the step-2 table and bars are left out')
    if domains:
        wanted = [d.strip() for d in domains.split(',') if d.strip()]
        missing = [d for d in wanted if not joint_path(results_dir, d).is_file()]
        if missing:
            raise ArtifactError(f'--domains: no step-3 result for domain(s) {", ".join(missing)} '
                                f'(expected {joint_path(results_dir, missing[0])}); run step 3 for them first')
    else:
        wanted = find_domains(results_dir)
        if not wanted:
            notes.append(f'no {JOINT_DIR}/domain_<d>_joint.json (step 3): the per-domain figures and table are '
                         'left out')
    corruptions = domain_corruptions(results_dir / 'training_results.json')
    results = [replace(r, corruption=corruptions.get(r.domain, '')) for r in
               (load_domain_result(joint_path(results_dir, d)) for d in wanted)]
    return Inputs(lut, step2, results, 'test', notes, lut_lines)


def domain_corruptions(path: Path) -> Dict[str, str]:
    """domain -> corruption name from step 0's training_results.json ({} when absent: labels only)."""
    if not Path(path).is_file():
        return {}
    obj = load_artifact(path, 'training_results', {'domains': dict})
    out = {}
    for d, r in obj['domains'].items():
        c = r.get('corruption') if isinstance(r, dict) else None
        if isinstance(c, dict) and c.get('name'):
            out[str(d)] = str(c['name']) + (f' s{c["severity"]}' if c.get('severity') is not None else '')
    return out


# ----------------------------------------------------------------------------------------------------------
# The paper table
# ----------------------------------------------------------------------------------------------------------

COLUMNS = (  # key, header, format
    ('domain', 'domain', '{}'),
    ('corruption', 'corruption', '{}'),
    ('a_ref_pct', 'A_ref (%)', '{:.2f}'),
    ('final_acc_pct', 'final acc. (%)', '{:.2f}'),
    ('drop_pct', 'drop (pts)', '{:.2f}'),
    ('drop_ci95_pct', 'drop 95 % interval (pts)', '[{0[0]:.2f}, {0[1]:.2f}]'),
    ('epsilon', 'ε (pts)', '{:g}'),
    ('lam', 'λ', '{}'),
    ('branches_pruned', 'branches pruned', '{:.3g}'),
    ('throughput_fps', 'pred. throughput (fps)', '{:.2f}'),
    ('measured_fps', 'meas. throughput (fps)', '{:.2f}'),
    ('measured_spread', 'meas. p10–p90 (fps)', '{}'),
    ('plain_split_fps', 'pred. best plain split (fps)', '{:.2f}'),
    ('measured_plain_fps', 'meas. best plain split (fps)', '{:.2f}'),
    ('gain_x', 'pred. gain (x)', '{:.2f}'),
    ('measured_gain_x', 'meas. gain (x)', '{:.2f}'),
    ('of_best_pct', 'meas. % of best top-k', '{:.1f}'),
    ('runners_up', 'splits in band', '{}'),
    ('bottleneck', 'bottleneck', '{}'),
)
TEXT_COLUMNS = ('domain', 'corruption', 'configuration', 'bottleneck', 'measured_spread', 'runners_up')


def loop_cells(loop: Optional[Mapping[str, Any]], role: str = 'chosen') -> Dict[str, Any]:
    """The measured cells of one configuration (role 'chosen' or a baseline key) of a closed loop, and the decision's
    runners-up ('λ 12, 13' or 'none'); None cells when nothing was measured."""
    loop = loop or {}
    rec = next((r for r in loop.get('measurements') or [] if role in r['roles']), None)
    m = rec['measured'] if rec else None
    dec = loop.get('decision') or {}
    runners = dec.get('runners_up')
    rep = loop.get('report') or {}
    return {'measured_fps': m['throughput_fps'] if m else None,
            'measured_spread': f'{m["p10_fps"]:.1f}–{m["p90_fps"]:.1f}' if m else None,
            'runners_up': None if runners is None else ('none' if not runners else
                                                         'λ ' + ', '.join(str(r['lam']) for r in runners)),
            'of_best_pct': rep.get('chosen_over_best_measured_pct') if role == 'chosen' else None}


def domain_row(r: DomainResult) -> Dict[str, Any]:
    plain = r.baselines.get('best_plain_split')
    return {'domain': r.domain, 'corruption': r.corruption or None, 'a_ref_pct': r.a_ref_pct, 'final_acc_pct': r.final_acc_pct, 'drop_pct': r.drop_pct,
            'drop_ci95_pct': list(r.drop_ci_pct) if r.drop_ci_pct else None,
            'epsilon': r.epsilon, 'lam': r.lam, 'branches_pruned': r.branches_pruned,
            'throughput_fps': r.predicted.throughput_fps,
            'plain_split_fps': plain.throughput_fps if plain else None, 'gain_x': r.gain_x,
            'measured_gain_x': r.measured_gain_x,
            'measured_plain_fps': ((r.report or {}).get('best_plain_split') or {}).get('measured_fps'),
            **loop_cells(r.loop), 'bottleneck': r.predicted.bottleneck}


def aggregate_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The mean row and the worst-domain row (largest accuracy drop; ties: smallest gain)."""
    if not rows:
        return []
    mean: Dict[str, Any] = {'domain': 'mean'}
    for key, _, _ in COLUMNS[1:]:
        vals = [r[key] for r in rows if isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        mean[key] = float(np.mean(vals)) if vals and len(vals) == len(rows) else None
    for key in ('gain_x', 'measured_gain_x'):
        vals = [r[key] for r in rows if r.get(key) is not None]
        mean[key] = float(np.exp(np.mean(np.log(vals)))) if vals and len(vals) == len(rows) else None
    mean['lam'] = mean['corruption'] = mean['bottleneck'] = mean['measured_spread'] = mean['runners_up'] = None
    worst = max(rows, key=lambda r: (r['drop_pct'], -(r['gain_x'] or 0.0)))
    return [mean, {**worst, 'domain': f'worst ({worst["domain"]})'}]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '–'
    return fmt.format(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    text = TEXT_COLUMNS
    lines = ['| ' + ' | '.join(h for _, h, _ in columns) + ' |',
             '|' + '|'.join(':---' if k in text else '---:' for k, _, _ in columns) + '|']
    for r in rows:
        lines.append('| ' + ' | '.join(_cell(r.get(k), f) for k, _, f in columns) + ' |')
    return '\n'.join(lines)


STEP2_COLUMNS = (
    ('configuration', 'configuration', '{}'),
    ('lam', 'λ', '{}'),
    ('edge_ms', 'edge (ms)', '{:.2f}'),
    ('link_ms', 'link (ms)', '{:.2f}'),
    ('server_ms', 'server (ms)', '{:.2f}'),
    ('latency_ms', 'latency (ms)', '{:.2f}'),
    ('throughput_fps', 'pred. throughput (fps)', '{:.2f}'),
    ('measured_fps', 'meas. throughput (fps)', '{:.2f}'),
    ('measured_spread', 'meas. p10–p90 (fps)', '{}'),
    ('bottleneck', 'bottleneck', '{}'),
)


MEMORY_COLUMNS = (('domain', 'domain', '{}'), ('lam', 'λ', '{}'),
                  ('edge_weights_mb', 'edge part weights (MB)', '{:.3f}'),
                  ('full_weights_mb', 'full model weights (MB)', '{:.3f}'),
                  ('edge_rss_mb', 'RSS growth, edge part (MB)', '{:.1f}'),
                  ('full_rss_mb', 'RSS growth, full model (MB)', '{:.1f}'),
                  ('edge_peak_rss_mb', 'peak RSS, edge part (MB)', '{:.1f}'),
                  ('full_peak_rss_mb', 'peak RSS, full model (MB)', '{:.1f}'),
                  ('edge_cuda_mb', 'CUDA peak, edge part (MB)', '{:.1f}'),
                  ('full_cuda_mb', 'CUDA peak, full model (MB)', '{:.1f}'))


def memory_rows(results: Sequence[DomainResult]) -> List[Dict[str, Any]]:
    """Real mode: per domain the worker's memory holding the edge part against the full model (MB = 1e6 bytes)."""
    def mb(v: Any) -> Optional[float]:
        return None if v is None else float(v) / 1e6
    rows = []
    for r in results:
        mem = (r.measured or {}).get('memory')
        if not isinstance(mem, dict) or 'edge_part' not in mem or 'full_model' not in mem:
            continue
        e, f = mem['edge_part'], mem['full_model']
        # the split the memory was measured at: the goal program's pick, streamed before a closed loop that may have
        # adopted another split (docs/artifacts.md, `measured`); its edge part holds blocks [0, lambda)
        rows.append({'domain': r.domain, 'lam': int(e.get('blocks', r.lam)), 'edge_weights_mb': mb(e.get('weight_bytes')),
                     'full_weights_mb': mb(f.get('weight_bytes')), 'edge_rss_mb': mb(e.get('part_rss_bytes')),
                     'full_rss_mb': mb(f.get('part_rss_bytes')), 'edge_peak_rss_mb': mb(e.get('peak_rss_bytes')),
                     'full_peak_rss_mb': mb(f.get('peak_rss_bytes')),
                     'edge_cuda_mb': mb(e.get('cuda_max_memory_allocated_bytes')),
                     'full_cuda_mb': mb(f.get('cuda_max_memory_allocated_bytes')), 'device': mem.get('device')})
    return rows


def step2_rows(s2: Step2View) -> List[Dict[str, Any]]:
    def meas(role: str) -> Dict[str, Any]:
        c = loop_cells(s2.loop, role)
        return {'measured_fps': c['measured_fps'], 'measured_spread': c['measured_spread']}
    rows = [{'configuration': 'chosen (γ, λ by LUT gradient descent)', 'lam': s2.lam, **asdict(s2.chosen),
             **meas('chosen')}]
    for key, st in s2.baselines.items():
        rows.append({'configuration': key.replace('_', ' '), 'lam': s2.baseline_lam.get(key), **asdict(st),
                     **meas(key)})
    return rows


def loop_lines(label: str, loop: Optional[Mapping[str, Any]]) -> List[str]:
    """Closed-loop lines of one step-2 / step-3 result for summary.md: the decision and the measured report."""
    if not loop:
        return [f'{label}: no closed loop recorded (an artifact from before it): every throughput is predicted']
    from pipeline.closed_loop import decision_line, report_line
    out = [f'{label}: {decision_line(loop["decision"])}']
    if loop.get('skipped'):
        out.append(f'{label}: nothing measured ({loop["skipped"]})')
    else:
        out.append(f'{label}: {report_line(loop["report"])}')
        note = (loop.get('server_device') or {}).get('note')
        if note:
            out.append(f'{label}: {note}')
    return out


@dataclass
class Summary:
    accuracy_source: str = 'test'
    domains: List[Dict[str, Any]] = field(default_factory=list)
    aggregate: List[Dict[str, Any]] = field(default_factory=list)
    step2: List[Dict[str, Any]] = field(default_factory=list)
    step2_gap_pct: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    lut: List[str] = field(default_factory=list)
    loop: List[str] = field(default_factory=list)  # closed-loop lines: decisions and measured reports
    memory: List[Dict[str, Any]] = field(default_factory=list)

    def to_payload(self) -> Dict[str, Any]:
        """summary.json: the same numbers as summary.md (accuracies in %, throughput predicted, frames/s)."""
        def clean(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
            return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                    for r in rows]
        return {'accuracy_source': self.accuracy_source,
                'throughput_kind': {'throughput_fps': 'predicted', 'plain_split_fps': 'predicted',
                                    'gain_x': 'predicted', 'measured_fps': 'measured', 'measured_plain_fps': 'measured',
                                    'measured_gain_x': 'measured', 'of_best_pct': 'measured'},
                'closed_loop': list(self.loop),
                'domains': clean(self.domains), 'mean': clean(self.aggregate[:1])[0] if self.aggregate else None,
                'worst': clean(self.aggregate[1:])[0] if self.aggregate else None, 'step2': clean(self.step2),
                'step2_gap_pct': self.step2_gap_pct, 'lut': list(self.lut), 'notes': list(self.notes),
                'edge_memory': clean(self.memory)}


def build_summary(inputs: 'Inputs', notes: Sequence[str] = ()) -> Summary:
    rows = [domain_row(r) for r in inputs.domains]
    s2 = inputs.step2
    loop = loop_lines('step 2', s2.loop) if s2 else []
    for r in inputs.domains:
        loop += loop_lines(f'domain {r.domain}', r.loop)
    return Summary(accuracy_source=inputs.accuracy_source, domains=rows, aggregate=aggregate_rows(rows),
                   step2=step2_rows(s2) if s2 else [], step2_gap_pct=s2.gap_pct if s2 else None,
                   notes=list(inputs.notes) + list(notes), lut=list(inputs.lut_lines),
                   memory=memory_rows(inputs.domains), loop=loop)


def console_lines(s: Summary) -> List[str]:
    """A few lines for the terminal: the mean and worst domain."""
    out = []
    for r in s.aggregate:
        gain = '–' if r.get('gain_x') is None else f'{r["gain_x"]:.2f}x'
        mgain = '–' if r.get('measured_gain_x') is None else f'{r["measured_gain_x"]:.2f}x'
        meas = '–' if r.get('measured_fps') is None else f'{r["measured_fps"]:.2f}'
        out.append(f'{r["domain"]}: final accuracy {r["final_acc_pct"]:.2f} % (drop {r["drop_pct"]:.2f} pts), '
                   f'predicted {r["throughput_fps"]:.2f} frames/s, measured {meas} frames/s; gain over best plain '
                   f'split {gain} predicted, {mgain} measured')
    return out


def summary_markdown(s: Summary, title: str = 'Results summary') -> str:
    out = [f'# {title}', '']
    if s.domains:
        out += [f'## Joint optimization per domain (step 3; final accuracy on the {s.accuracy_source} split, '
                'throughput predicted by the LUT cost model and measured in the closed loop)', '',
                markdown_table(s.domains + s.aggregate, COLUMNS), '',
                'pred. gain = predicted throughput of the joint configuration / predicted best split of the plain '
                '(unpruned, fused) model on the same LUT and link; meas. gain = the same ratio of their measured '
                'throughputs on the passes both were measured in (closed loop: see below for what was measured); '
                'meas. % of best top-k = the chosen configuration\'s measured throughput / the best measured among '
                'the top-k best-predicted, each compared on the passes both ran (where the '
                'closed loop\'s race on fresh passes chose another top-k configuration, that one is the '
                'decision: λ and throughputs are its own, the optimizer\'s pick is the artifact\'s optimizer_choice); '
                'splits in '
                'band = other splits whose predicted throughput lies within the LUT\'s uncertainty band (a coin toss '
                'on the LUT alone).  The mean row gives geometric mean gains; the worst row is the domain with the '
                'largest accuracy drop; the drop interval is the 95 % paired bootstrap interval against A_ref on the '
                'same test images.', '']
    if s.step2:
        out += ['## Initial throughput optimization (step 2, unpruned model)', '',
                markdown_table(s.step2, STEP2_COLUMNS), '']
        if s.step2_gap_pct is not None:
            out += [f'Gap of the gradient-descent result to the exact optimum: {s.step2_gap_pct:.3g} %.', '']
    if s.loop:
        out += ['## Closed loop: decisions against the LUT\'s noise, and what was chosen, measured', ''] + \
            [f'- {n}' for n in s.loop] + ['']
    if s.memory:
        out += ['## Edge device memory (real mode, measured on the worker)', '',
                markdown_table(s.memory, MEMORY_COLUMNS), '',
                'Each case is a fresh process on the device that loads the part file(s) (comm/parts.py) and runs one '
                'batch: the edge part alone against the full model (edge + server parts, the network unsplit). RSS '
                'growth = resident set after minus after importing torch; peak RSS = getrusage ru_maxrss, which '
                'includes torch\'s own import peak.', '']
    if s.lut:
        out += ['## Cost model inputs (step 1)', ''] + [f'- {n}' for n in s.lut] + ['']
    if s.notes:
        out += ['## Notes', ''] + [f'- {n}' for n in s.notes] + ['']
    return '\n'.join(out)
