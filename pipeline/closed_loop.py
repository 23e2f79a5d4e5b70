"""Closed loop of steps 2 and 3: decisions that survive the LUT's noise, and what is chosen, measured.

Two questions a step-2 / step-3 answer must face (issue 13, docs/design.md "Closed loop"):

1. Does the decision survive noise?  `decision(...)` lists, beside the chosen configuration, the runners-up whose
   predicted throughput lies within the LUT's uncertainty band of the chosen one's, and says when the choice among
   them is a coin toss.  The band (percent of the chosen configuration's predicted throughput) is

       band_pct = max(spread_pct, noise_floor_pct, estimation_error_pct)

   * spread_pct: half the relative width of the chosen configuration's predicted throughput between the LUT with
     every entry at its p90 (slow) and every entry at its p10 (fast).  The entries are taken as fully correlated
     (a loaded machine slows a whole pass, not one block): the conservative reading of the LUT's own repeats.
     Modelled entries (a device profile) carry no spread: p10 = p90 = median.
   * noise_floor_pct: the pass-to-pass noise floor of step 1's validation (lut_validation.json), when it recorded
     one: how far a second measurement of the same whole configuration lands from the first.
   * estimation_error_pct: the LUT's own error on whole configurations its fit never saw, in the same validation
     (summary.total.median_abs_error_pct): how far the LUT's sum lands from a measurement, beyond the repeats'
     spread.

   The candidates are the best configuration at every split lambda (the exact split scan's per-lambda optimum, the
   chosen kept sets fixed): configurations at the same lambda differ only by layouts of non-bottleneck blocks, so
   one per lambda is what a decision is about.  A coin toss: at least one other split predicts within the band.

2. Is what was chosen really faster?  `measure(...)` measures end to end the chosen configuration, the baselines
   it is compared with (edge only, server only, best plain split) and the `top_k` best-predicted configurations
   (one per lambda), in `passes` interleaved passes (forward, then reverse order: drift hits all alike):

   * pseudo mode: the server part (blocks [lambda, N) + head) runs here, timed as one module
     (`time_configuration`); the edge part and the link stay the LUT's / the cost model's: the result is labelled
     `server measured here, edge modelled (LUT)` and the bottleneck says whether it was a measured stage.
   * real mode: the whole split pipeline, deployed to client_worker.py through comm.session and streamed over the
     link (steady-state throughput of `samples` images; spread over windows of the run and over the passes).

   `loop_report(...)` states the closed-loop figures: the chosen configuration's measured throughput as a share
   of the best measured among the top-k predicted, and the measured gain over the measured best plain split,
   beside the predicted gain.  Every figure carries `kind` ('measured' / 'predicted') and the load average.

Timing figures from a shared machine move 5-70 % pass to pass (README); the report gives the passes' own
disagreement (`pass_to_pass_pct`) so a reader can tell a real difference from noise.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from optim import cost as C
from optim.exact import split_gammas

BASELINE_KEYS = ('edge_only', 'server_only', 'best_plain_split')
PSEUDO_LABEL = 'server part measured here, edge part and link modelled (LUT / cost model)'
REAL_LABEL = ('whole split pipeline measured through client_worker.py and the link, at the stream\'s median '
              'period')


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages of this machine (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------
# Decisions that survive noise
# ----------------------------------------------------------------------------------------------------------

def quantile_lut(lut: Dict[str, Any], q: str) -> Dict[str, Any]:
    """A copy of `lut` whose entries (both sides, blocks and head) carry their `q` ('p10_ms' | 'p90_ms') time as
    median_ms; entries without that field keep their median."""
    out = dict(lut)
    for side in ('edge', 'server'):
        part = dict(lut[side])
        for group in ('entries', 'head'):
            part[group] = {k: dict(e, median_ms=float(e.get(q, e['median_ms']))) for k, e in lut[side][group].items()}
        out[side] = part
    return out


def spread_tables(lut: Dict[str, Any], t: C.CostTables) -> Tuple[C.CostTables, C.CostTables]:
    """(fast, slow): cost tables of the LUT at every entry's p10 and p90, with `t`'s batch and link."""
    from timing import lut as L
    out = []
    for q in ('p10_ms', 'p90_ms'):
        qt = L.cost_tables(quantile_lut(lut, q), t.batch)
        out.append(C.CostTables(qt.edge_ms, qt.server_ms, qt.edge_head_ms, qt.server_head_ms, t.link_bytes,
                                t.bandwidth_mbps, t.latency_ms, t.batch, t.serialize_ms_per_mb))
    return out[0], out[1]


def validation_uncertainty(path: Any) -> Tuple[Optional[float], Optional[float]]:
    """(pass-to-pass noise floor, the LUT's median |error| on unseen whole configurations), percent, that step 1's
    validation recorded in `path` (lut_validation.json: summary.noise.pass_to_pass_pct, summary.total.
    median_abs_error_pct; docs/artifacts.md); None for a figure or a file that is absent (older validations measured
    one pass)."""
    from pathlib import Path
    from artifacts import ArtifactError, load_artifact
    if path is None or not Path(path).is_file():
        return None, None
    try:
        obj = load_artifact(Path(path), 'lut_validation', {'summary': dict})
    except ArtifactError:
        return None, None

    def pct(group: str, key: str) -> Optional[float]:
        g = obj['summary'].get(group)
        v = g.get(key) if isinstance(g, dict) else None
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    return pct('noise', 'pass_to_pass_pct'), pct('total', 'median_abs_error_pct')


def split_candidates(t: C.CostTables, valid: np.ndarray) -> List[Dict[str, Any]]:
    """The best configuration at every split lambda = 0..N (fastest valid layout of each block on its side), as
    cost.describe() dicts, best predicted throughput first (ties: lower latency, then lower lambda)."""
    g = split_gammas(t, valid)
    rows = [C.describe(g[lam], lam, t) for lam in range(t.num_blocks + 1)]
    return sorted(rows, key=lambda r: (-r['throughput_fps'], r['latency_ms'], r['lam']))


def throughput_interval(gammas: Sequence[int], lam: int, fast: C.CostTables, slow: C.CostTables) -> Tuple[float, float]:
    """(low, high) predicted throughput of one configuration: at every entry's p90, at every entry's p10."""
    return C.evaluate(gammas, lam, slow)['throughput_fps'], C.evaluate(gammas, lam, fast)['throughput_fps']


def decision(chosen: Dict[str, Any], candidates: Sequence[Dict[str, Any]], fast: C.CostTables, slow: C.CostTables,
             noise_floor_pct: Optional[float], estimation_error_pct: Optional[float] = None) -> Dict[str, Any]:
    """The chosen configuration's uncertainty band and the runners-up inside it (see the module docstring).

    `chosen`: a describe() dict (gammas, lam, throughput_fps); `candidates`: split_candidates() rows."""
    lo, hi = throughput_interval(chosen['gammas'], chosen['lam'], fast, slow)
    fps = float(chosen['throughput_fps'])
    spread = 50.0 * (hi - lo) / fps if fps > 0 else 0.0
    band = max(spread, noise_floor_pct or 0.0, estimation_error_pct or 0.0)
    runners = []
    for c in candidates:
        if c['lam'] == chosen['lam']:
            continue
        diff = 100.0 * (c['throughput_fps'] - fps) / fps
        if abs(diff) <= band:
            clo, chi = throughput_interval(c['gammas'], c['lam'], fast, slow)
            runners.append({'lam': int(c['lam']), 'gammas': [int(x) for x in c['gammas']],
                            'throughput_fps': float(c['throughput_fps']), 'diff_pct': diff,
                            'throughput_interval_fps': [clo, chi], 'bottleneck': c['bottleneck']})
    return {'kind': 'predicted', 'lam': int(chosen['lam']), 'throughput_fps': fps,
            'throughput_interval_fps': [lo, hi], 'spread_pct': spread, 'noise_floor_pct': noise_floor_pct,
            'estimation_error_pct': estimation_error_pct,
            'band_pct': band, 'runners_up': runners, 'coin_toss': bool(runners),
            'definition': 'band_pct = max(spread_pct: half the relative width of the predicted throughput between '
                          'the LUT at every entry\'s p90 and at every entry\'s p10; noise_floor_pct: step 1\'s '
                          'validation pass-to-pass noise floor, when recorded; estimation_error_pct: the LUT\'s '
                          'median |error| on whole configurations its fit never saw, same validation); runners-up: '
                          'the best configuration '
                          'of another split whose predicted throughput is within band_pct of the chosen one\'s'}


def decision_line(d: Dict[str, Any]) -> str:
    """One console / summary line for a decision() result."""
    how = f'spread of the LUT entries {d["spread_pct"]:.1f} %'
    if d['noise_floor_pct'] is not None:
        how += f', validation noise floor {d["noise_floor_pct"]:.1f} %'
    if d.get('estimation_error_pct') is not None:
        how += f', LUT error on unseen configurations {d["estimation_error_pct"]:.1f} %'
    head = f'decision: lambda {d["lam"]} at {d["throughput_fps"]:.1f} fps (predicted); uncertainty band ' \
           f'+/-{d["band_pct"]:.1f} % ({how})'
    if not d['runners_up']:
        return head + ': no other split predicts within it, the decision survives the LUT\'s noise'
    shown = sorted(d['runners_up'], key=lambda r: -r['throughput_fps'])
    rs = ', '.join(f'lambda {r["lam"]} ({r["diff_pct"]:+.1f} %)' for r in shown[:5])
    if len(shown) > 5:
        rs += f' and {len(shown) - 5} more splits'
    return head + f': a coin toss on the LUT alone among it and {rs}; the measured ranking shows which is faster here'


# ----------------------------------------------------------------------------------------------------------
# Measurement: what is chosen, its baselines, the top-k predicted
# ----------------------------------------------------------------------------------------------------------

def _key(gammas: Sequence[int], lam: int) -> Tuple[Tuple[int, ...], int]:
    return tuple(int(g) for g in gammas), int(lam)


def plan_measurements(chosen: Dict[str, Any], baselines: Dict[str, Dict[str, Any]],
                      candidates: Sequence[Dict[str, Any]], top_k: int) -> List[Dict[str, Any]]:
    """The configurations to measure, each once: [{'gammas', 'lam', 'predicted', 'roles'}]; roles name it 'chosen',
    a baseline key and/or 'top<i>' (its rank among the top_k best-predicted, the chosen one ranked with them)."""
    out: Dict[Tuple[Tuple[int, ...], int], Dict[str, Any]] = {}

    def add(c: Dict[str, Any], role: str) -> None:
        k = _key(c['gammas'], c['lam'])
        row = out.setdefault(k, {'gammas': list(k[0]), 'lam': k[1], 'predicted': {
            f: c[f] for f in ('edge_ms', 'link_ms', 'server_ms', 'latency_ms', 'throughput_fps', 'bottleneck')},
            'roles': []})
        row['roles'].append(role)

    add(chosen, 'chosen')
    for name in BASELINE_KEYS:
        if name in baselines:
            add(baselines[name], name)
    ranked = [chosen] + [c for c in candidates if c['lam'] != chosen['lam']]
    ranked.sort(key=lambda r: (-r['throughput_fps'], r['latency_ms'], r['lam']))
    for i, c in enumerate(ranked[:max(1, int(top_k))]):
        add(c, f'top{i + 1}')
    return list(out.values())


def pseudo_record(pred: Dict[str, Any], server: Dict[str, Any], batch: int) -> Dict[str, Any]:
    """Measured throughput of one configuration in pseudo mode: B / max(edge (LUT), link (model), server measured
    here), with the interval from the server's p90 / p10 times."""
    e, li = float(pred['edge_ms']), float(pred['link_ms'])
    s, s10, s90 = (float(server[k]) for k in ('median_ms', 'p10_ms', 'p90_ms'))
    stages = {'edge': e, 'link': li, 'server': s}
    bottleneck = max(stages, key=lambda k: stages[k])
    return {'kind': 'measured', 'how': PSEUDO_LABEL, 'edge_ms': e, 'link_ms': li, 'server_ms': s,
            'server_p10_ms': s10, 'server_p90_ms': s90, 'throughput_fps': batch * 1e3 / max(e, li, s),
            'p10_fps': batch * 1e3 / max(e, li, s90), 'p90_fps': batch * 1e3 / max(e, li, s10),
            'bottleneck': bottleneck, 'bottleneck_source': 'measured' if bottleneck == 'server' else 'modelled',
            'server_n': int(server.get('n', 0))}


def window_fps(per_batch: Sequence[Dict[str, Any]], windows: int = 5) -> List[float]:
    """Throughput of `windows` consecutive stretches of a real run (after its first batch) at each stretch's median
    period (comm.session.period_fps), frames/s."""
    from comm.session import period_fps
    rows = list(per_batch)
    if len(rows) < 3:
        return []
    bounds = np.linspace(0, len(rows) - 1, min(windows, len(rows) - 1) + 1).round().astype(int)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        fps = period_fps(rows[a:b + 1]) if b - a >= 2 else None
        if fps is not None:
            out.append(fps)
    return out


def pass_pace(values: Sequence[float], quantile: float = 50.0) -> float:
    """A configuration's throughput over its passes: the `quantile` percentile of the passes' figures (50: the
    median).  Real mode reads it at loop.pace_quantile (90): the local stand-in's streams fall into episodes of
    10-20 s in which every stream runs 20-45 % slower, clustered in time and not in configurations (docs/design.md
    "Closed loop"); interference only slows a stream, so an upper percentile reads the configuration's own pace
    (timeit's reason for its minimum) while the median follows whichever configurations an episode hit."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), float(quantile)))


def real_record(pred: Dict[str, Any], runs: Sequence[Dict[str, Any]], quantile: float = 50.0) -> Dict[str, Any]:
    """Measured throughput of one configuration in real mode from its runs (comm.session.ServerSession.run
    results): the `quantile` percentile (pass_pace; 50: the median) over the runs of each one's pace at its median
    period (period_throughput_fps; runs without it: the steady throughput); p10 / p90 over those paces (the
    figure read lies among them), or over windows of the run when there is one; 'steady_fps' keeps the median
    steady-state throughput (samples / span, every pause included) beside it."""
    pace = [r.get('period_throughput_fps') or r.get('steady_throughput_fps') or r['throughput_fps'] for r in runs]
    steady = [r.get('steady_throughput_fps') or r['throughput_fps'] for r in runs]
    spread = pace if len(pace) >= 2 else sorted(w for r in runs for w in window_fps(r.get('per_batch') or []))
    med = pass_pace(pace, quantile)
    q = (lambda p: float(np.percentile(spread, p))) if spread else (lambda p: med)

    def stage(k: str) -> Optional[float]:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        return float(statistics.median(vals)) if vals else None
    stages = {k: stage(f'{k}_ms') for k in ('edge', 'link', 'server')}
    known = {k: v for k, v in stages.items() if v is not None}
    over = 'the median' if float(quantile) == 50.0 else f'the {float(quantile):g}th percentile'
    return {'kind': 'measured', 'how': f'{REAL_LABEL}, {over} over the passes',
            **{f'{k}_ms': v for k, v in stages.items()},
            'latency_ms': stage('latency_ms'), 'throughput_fps': med, 'steady_fps': float(statistics.median(steady)),
            'p10_fps': q(10), 'p90_fps': q(90),
            'bottleneck': max(known, key=lambda k: known[k]) if known else None, 'bottleneck_source': 'measured',
            'runs_fps': pace, 'pace_quantile': float(quantile),
            'samples': int(runs[0].get('samples', 0)) if runs else 0,
            'worker_threads': runs[0].get('worker_threads') if runs else None,
            'server_threads': runs[0].get('server_threads') if runs else None}


def real_combine(quantile: float) -> Callable[[Dict[str, Any], List[Dict[str, Any]]], Dict[str, Any]]:
    """combine for measure() in real mode: real_record at the `quantile` percentile of the passes."""
    return lambda pred, runs: real_record(pred, runs, quantile)


TimePasses = Callable[[Sequence[Dict[str, Any]], int, Any], List[List[Dict[str, Any]]]]


def sequential_passes(run_one: Callable[[Dict[str, Any]], Dict[str, Any]]) -> TimePasses:
    """time_passes for measure() from a per-configuration run (real mode: one deployment and stream each): pass p
    runs every configuration once, odd passes in reverse order (a deployment takes seconds; drift hits all alike)."""
    def time_passes(plan: Sequence[Dict[str, Any]], passes: int, bar: Any) -> List[List[Dict[str, Any]]]:
        results: List[List[Dict[str, Any]]] = [[] for _ in plan]
        for p in range(passes):
            order = range(len(plan)) if p % 2 == 0 else reversed(range(len(plan)))
            for i in order:
                results[i].append(run_one(plan[i]))
                if bar is not None:
                    bar.update(1)
        return results
    return time_passes


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """This process's torch threads set to `threads` (> 0; 0: left as they are) inside the block, then given back."""
    import torch
    old = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def pseudo_passes(model_spec: Dict[str, Any], input_size: int, batch: int, device: str, rounds: int, seed: int,
                  threads: int = 0) -> TimePasses:
    """time_passes for measure() in pseudo mode: the server parts of all planned configurations (blocks [lam, N) +
    head, random weights: the timing does not depend on them) timed here together by
    timing.measure.measure_configurations, in `rounds` fine-grained interleaved rounds (the protocol of step 1's
    validation, docs/design.md "Measurement protocol"), with `threads` torch threads (0: leave as is) as the
    LUT's server side.  One result per configuration and pass: the server part's stats in that pass."""
    def time_passes(plan: Sequence[Dict[str, Any]], passes: int, bar: Any) -> List[List[Dict[str, Any]]]:
        from timing import measure as M
        model = M.random_model(model_spec, seed)
        with torch_threads(threads):
            res = M.measure_configurations(model, input_size, [{'gammas': r['gammas'], 'lam': r['lam']} for r in plan],
                                           batch, device, 1, rounds, passes, seed, sides=('server',))
        if bar is not None:
            bar.update(passes * len(plan))
        return [[p['server'] for p in r['passes']] for r in res]
    return time_passes


def measure(plan: Sequence[Dict[str, Any]], time_passes: TimePasses,
            combine: Callable[[Dict[str, Any], List[Dict[str, Any]]], Dict[str, Any]], passes: int = 2,
            progress: Optional[str] = None, keep_runs: bool = False) -> List[Dict[str, Any]]:
    """Measure every planned configuration in `passes` passes (`time_passes`: sequential_passes or pseudo_passes)
    and attach `combine(predicted, [one result per pass])` as its 'measured' record, with the passes'
    disagreement; `keep_runs`: each record also keeps its raw per-pass results under '_runs' (for
    confirm_choice; not JSON: drop it before writing)."""
    passes = max(1, int(passes))
    load_before = load_average()
    t0 = time.perf_counter()
    results = _timed_with_bar(time_passes, plan, passes, progress)
    out = []
    for row, res in zip(plan, results):
        m = combine(row['predicted'], res)
        per_pass = [combine(row['predicted'], [r])['throughput_fps'] for r in res]
        m['passes_fps'] = per_pass
        m['pass_to_pass_pct'] = _spread_pct(per_pass)
        out.append(dict(row, measured=m, **({'_runs': list(res)} if keep_runs else {})))
    for r in out:
        r['measured']['load_average'] = {'before': load_before, 'after': load_average()}
    out_wall = time.perf_counter() - t0
    for r in out:
        r['measured']['wall_s_all'] = out_wall
    return out


RACE_MIN_PASSES = 3  # passes (first + fresh) a configuration has before it can be eliminated
RACE_NOISE_FLOOR = 0.005  # smallest per-pass sd of log-throughput differences the race assumes (0.5 %)
RACE_DRAWS = 400  # bootstrap draws of the passes behind each elimination's standard error


def eliminated(passes_fps: Dict[int, Sequence[float]], leader: int, z: float,
               floor: float = RACE_NOISE_FLOOR, quantile: float = 50.0) -> List[int]:
    """The configurations measured slower than `leader` beyond the race's noise: for each other one j, the
    difference of the paces D = log(pass_pace(j) / pass_pace(leader)) at `quantile` (50: the median; real mode:
    loop.pace_quantile) over the passes both were measured in; j is out when D < -z * se, se the bootstrap standard
    error of D (RACE_DRAWS draws of whole passes with replacement, j's and the leader's figure of a pass drawn
    together, so that a pass's common shift cancels; at least `floor` / sqrt(n), n the passes).  Its own se, not a
    pooled one: a link-bound configuration's steady figures would make a pooled one too small for the noisy ones.
    `passes_fps`: configuration -> its throughput per pass (equal lengths, >= 2, the same passes in the same
    order).  Seeded by n: the same figures give the same verdict."""
    lead = np.log(np.asarray(passes_fps[leader], dtype=np.float64))
    n = len(lead)
    idx = np.random.default_rng(n).integers(0, n, (RACE_DRAWS, n))
    q = float(quantile)
    lead_draws = np.percentile(lead[idx], q, axis=1)
    lead_pace = float(np.percentile(lead, q))
    out = []
    for j, v in passes_fps.items():
        if j == leader:
            continue
        x = np.log(np.asarray(v, dtype=np.float64))
        d = float(np.percentile(x, q)) - lead_pace
        se = max(float(floor) / math.sqrt(n), float(np.std(np.percentile(x[idx], q, axis=1) - lead_draws)))
        if d < -float(z) * se:
            out.append(j)
    return out


def confirm_choice(records: Sequence[Dict[str, Any]], time_passes: TimePasses,
                   combine: Callable[[Dict[str, Any], List[Dict[str, Any]]], Dict[str, Any]], confirm: int,
                   passes: int, progress: Optional[str] = None,
                   eligible: Optional[Callable[[Dict[str, Any]], bool]] = None, z: float = 2.0,
                   quantile: float = 50.0) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Measured choice among the top-k (a race by successive elimination): the predicted choice and the top-k
    configurations (at most `confirm` of them, the fastest measured in measure()'s passes first; all of them by
    default, so none is picked for being lucky and their first passes count) race.  Each round adds one fresh
    interleaved pass of the configurations still in (alternating order); from RACE_MIN_PASSES passes on, the leader
    is the best pace over all its passes (pass_pace at `quantile`: the median, or real mode's upper percentile) and
    any configuration measured slower than the leader beyond the race's noise (`eliminated`: the paces' difference
    beyond `z` bootstrap standard errors over the passes, drawn pass by pass) is out.  The race ends when one is left
    or after `passes` fresh passes.  The predicted choice stays the decision unless it was eliminated (the model's
    answer, overruled only by a measured difference beyond the noise: an upper percentile among near-ties favours
    whichever had a lucky pass); then the leader of the ones still in is.

    Why (docs/design.md "Closed loop"): a stream's throughput moves 5-15 % pass to pass on the local stand-in and
    whole passes shift together; a shortlist cut on two passes left the truly fastest configuration out of the race
    (bench_closed_loop 2026-12-07 18:16, domain 2), and a race of fixed length spends as much on clear losers as on
    near-ties.  Pairing within a pass cancels the pass's shift; elimination spends the passes on the close ones.
    `eligible(record)`: whether a configuration may be adopted (step 3: within the edge memory budget).

    Returns (the records, the raced ones re-combined over all their passes and the role 'chosen' moved to the
    adopted one, the model's pick keeping 'predicted_choice'; the adoption record: 'adopted', 'source'
    ('measured' / 'predicted'), 'z', 'fresh_passes', the shortlist with each one's first / confirmation / pooled
    throughput and the pass after which it was eliminated)."""
    recs = [dict(r, roles=list(r['roles'])) for r in records]
    pick = next(i for i, r in enumerate(recs) if 'chosen' in r['roles'])
    fps = lambda r: float(r['measured']['throughput_fps'])  # noqa: E731
    top = [i for i, r in enumerate(recs) if any(x.startswith('top') for x in r['roles'])]
    racing = sorted((i for i in top if i != pick and (eligible is None or eligible(recs[i]))),
                    key=lambda i: -fps(recs[i]))[:max(0, int(confirm))]
    out: Dict[str, Any] = {'adopted': False, 'source': 'predicted', 'confirm': int(confirm), 'passes': int(passes),
                           'z': float(z), 'pace_quantile': float(quantile)}
    if not racing:
        out['why'] = 'no other top-k configuration may be adopted' if confirm > 0 else 'loop.confirm is 0'
        return recs, out
    short = [pick] + racing
    if any(recs[i].get('_runs') is None for i in short):
        raise ValueError('confirm_choice: measure() records need keep_runs=True')
    first = {i: list(recs[i]['_runs']) for i in short}
    fresh: Dict[int, List[Dict[str, Any]]] = {i: [] for i in short}
    per_pass = {i: [float(combine(recs[i]['predicted'], [r])['throughput_fps']) for r in first[i]] for i in short}
    out_after: Dict[int, int] = {}
    alive = list(short)
    bar = _bar(progress, max(1, int(passes)) * len(short))
    try:
        for rnd in range(max(0, int(passes)) + 1):
            if len(per_pass[alive[0]]) >= RACE_MIN_PASSES:
                leader = _race_leader(alive, per_pass, pick, quantile)
                for j in eliminated({i: per_pass[i] for i in alive}, leader, z, quantile=quantile):
                    alive.remove(j)
                    out_after[j] = len(per_pass[j])
            if len(alive) == 1 or rnd == int(passes):
                break
            order = alive if rnd % 2 == 0 else list(reversed(alive))
            plan = [{k: recs[i][k] for k in ('gammas', 'lam', 'predicted', 'roles')} for i in order]
            for i, res in zip(order, time_passes(plan, 1, None)):
                fresh[i].append(res[0])
                per_pass[i].append(float(combine(recs[i]['predicted'], [res[0]])['throughput_fps']))
            if bar is not None:
                bar.update(len(order))
    finally:
        if bar is not None:
            bar.close()
    win = pick if pick in alive else _race_leader(alive, per_pass, pick, quantile)
    rows = []
    for i in short:
        pooled = combine(recs[i]['predicted'], first[i] + fresh[i])
        conf = combine(recs[i]['predicted'], fresh[i])['throughput_fps'] if fresh[i] else None
        rows.append({'lam': int(recs[i]['lam']), 'roles': list(recs[i]['roles']), 'first_fps': fps(recs[i]),
                     'confirmation_fps': None if conf is None else float(conf),
                     'confirmation_passes_fps': per_pass[i][len(first[i]):], 'pooled_fps': float(pooled['throughput_fps']),
                     'eliminated_after_passes': out_after.get(i)})
        if fresh[i]:
            old = recs[i]['measured']
            recs[i]['measured'] = dict(pooled, passes_fps=per_pass[i], pass_to_pass_pct=_spread_pct(per_pass[i]),
                                       load_average=old.get('load_average'), wall_s_all=old.get('wall_s_all'),
                                       confirmed=True)
    if win != pick:
        recs[pick]['roles'] = ['predicted_choice' if x == 'chosen' else x for x in recs[pick]['roles']]
        recs[win]['roles'].append('chosen')
        out.update(adopted=True, source='measured')
    out['fresh_passes'] = max(len(v) for v in fresh.values())
    out['shortlist'] = rows
    out['how'] = (f'the predicted choice and {len(racing)} top-k configurations raced by successive elimination: one '
                  f'fresh interleaved pass at a time (at most {int(passes)}), a configuration out once it measured '
                  f'slower than the leader beyond {z:g} bootstrap standard errors (whole passes drawn, both figures of a '
                  f'pass together) of the difference of their {quantile:g}th percentiles over the passes; the predicted '
                  'choice stays unless it was eliminated, then the leader of the ones still in is the choice')
    return recs, out


def _race_leader(alive: Sequence[int], per_pass: Dict[int, List[float]], pick: int, quantile: float) -> int:
    """The configuration still in the race with the best pace over its passes (pass_pace at `quantile`; ties: the
    predicted choice)."""
    return max(alive, key=lambda i: (pass_pace(per_pass[i], quantile), i == pick))


def _bar(desc: Optional[str], total: int) -> Any:
    """A tqdm bar of `total` steps named `desc`; None without a name or without tqdm."""
    if not desc:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def evaluate_choice(records: Sequence[Dict[str, Any]], time_passes: TimePasses,
                    combine: Callable[[Dict[str, Any], List[Dict[str, Any]]], Dict[str, Any]], passes: int,
                    progress: Optional[str] = None, quantile: float = 50.0) -> Dict[str, Any]:
    """The decision judged on measurements it never saw: the chosen configuration, the predicted choice and every
    top-k configuration measured again together in `passes` fresh interleaved passes (loop.evaluate_passes); the
    chosen one's and the optimizer's pick's throughput as a share of the best of them there.  Every configuration
    meets the same passes, so no one of them is favoured by the passes that chose it.  `quantile`: the percentile
    `combine` reads a configuration's passes at (pass_pace), recorded for the judge's interval."""
    idx = [i for i, r in enumerate(records)
           if any(x.startswith('top') or x in ('chosen', 'predicted_choice') for x in r['roles'])]
    plan = [{k: records[i][k] for k in ('gammas', 'lam', 'predicted', 'roles')} for i in idx]
    raw = _timed_with_bar(time_passes, plan, passes, progress)
    rows = [{'lam': int(p['lam']), 'roles': list(p['roles']), 'fps': float(combine(p['predicted'], list(res))[
        'throughput_fps']), 'passes_fps': [float(combine(p['predicted'], [r])['throughput_fps']) for r in res]}
        for p, res in zip(plan, raw)]
    best = max(rows, key=lambda r: r['fps'])
    chosen_i = next(i for i, r in enumerate(rows) if 'chosen' in r['roles'])
    pi = next((i for i, r in enumerate(rows) if 'predicted_choice' in r['roles']), chosen_i)
    chosen, pick = rows[chosen_i], rows[pi]
    halves = [[combine(p['predicted'], list(res)[h::2])['throughput_fps'] for p, res in zip(plan, raw)]
              for h in (0, 1)] if passes >= 2 else None
    ev = {'kind': 'measured', 'passes': int(passes), 'pace_quantile': float(quantile), 'configurations': rows,
            'best': {'lam': best['lam'], 'fps': best['fps']},
            'chosen_over_best_pct': 100.0 * chosen['fps'] / best['fps'],
            'optimizer_pick_over_best_pct': 100.0 * pick['fps'] / best['fps'],
            'chosen_over_best_crossfit_pct': crossfit_share_pct(halves, chosen_i) if halves else None,
            'optimizer_pick_over_best_crossfit_pct': crossfit_share_pct(halves, pi) if halves else None,
            'pass_to_pass_median_pct': _median_or_none(_spread_pct(r['passes_fps']) for r in rows),
            'load_average': load_average(),
            'how': 'the chosen configuration, the optimizer\'s pick and the top-k measured again together in fresh '
                   'interleaved passes that no decision saw'}
    ev['chosen_over_best_crossfit_ci95_pct'] = evaluation_interval(ev)
    return ev


def evaluation_interval(ev: Dict[str, Any]) -> Optional[List[float]]:
    """crossfit_interval_pct of an evaluation record's chosen configuration from its per-pass figures (seeded by the
    number of passes, so a re-read gives the artifact's figure); None with fewer than 4 passes."""
    rows = ev['configurations']
    if int(ev['passes']) < 4:
        return None
    i = next(k for k, r in enumerate(rows) if 'chosen' in r['roles'])
    return crossfit_interval_pct(np.array([r['passes_fps'] for r in rows], dtype=np.float64), i,
                                 np.random.default_rng(int(ev['passes'])), quantile=float(ev.get('pace_quantile', 50.0)))


def crossfit_share_pct(halves: Sequence[Sequence[float]], i: int) -> float:
    """Configuration i's throughput as a share of the best one's, without the winner's curse: the best is picked
    on one half of the passes (halves[h][j]: configuration j's throughput on half h) and both are valued on the
    other half, then the two ways round are averaged, percent.  The plain max over the same passes that value it is
    biased up when configurations are tied within the noise (the max of noisy figures), so it under-rates any
    choice among near-ties; this is the throughput of picking by measurement, measured."""
    out = []
    for pick_on, value_on in ((0, 1), (1, 0)):
        j = max(range(len(halves[pick_on])), key=lambda k: halves[pick_on][k])
        out.append(100.0 * halves[value_on][i] / halves[value_on][j])
    return float(statistics.mean(out))


def crossfit_interval_pct(passes_fps: np.ndarray, i: int, rng: np.random.Generator, draws: int = 2000,
                          quantile: float = 50.0) -> List[float]:
    """The 95 % bootstrap interval of configuration i's cross-fitted share (crossfit_share_pct), percent: the judge's
    own noise.  `passes_fps` (configurations, passes): each configuration's throughput in each evaluation pass; the
    halves are the even and the odd passes, and each draw resamples whole passes (every configuration's figure of a
    pass together, so the pass's common shift stays paired) with replacement within each half, takes each
    configuration's pace over the drawn passes (its `quantile` percentile, as the evaluation read it; 50: the median)
    and computes the share.  Needs >= 2 passes per half."""
    x = np.asarray(passes_fps, dtype=np.float64)
    halves = [x[:, 0::2], x[:, 1::2]]
    if min(h.shape[1] for h in halves) < 2:
        raise ValueError(f'crossfit_interval_pct: needs >= 2 passes per half, got {x.shape[1]} passes')
    shares = []
    for _ in range(int(draws)):
        drawn = [np.percentile(h[:, rng.integers(0, h.shape[1], h.shape[1])], float(quantile), axis=1)
                 for h in halves]
        shares.append(crossfit_share_pct([d.tolist() for d in drawn], i))
    return [float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))]


def _timed_with_bar(time_passes: TimePasses, plan: Sequence[Dict[str, Any]], passes: int,
                    desc: Optional[str]) -> List[List[Dict[str, Any]]]:
    """time_passes(plan, passes, bar) with a progress bar named `desc` (none when `desc` is None)."""
    bar = _bar(desc, passes * len(plan))
    try:
        return time_passes(plan, passes, bar)
    finally:
        if bar is not None:
            bar.close()


def _spread_pct(per_pass: Sequence[float]) -> Optional[float]:
    """(max - min) / mean of the passes' throughputs, percent; None for one pass."""
    return 100.0 * (max(per_pass) - min(per_pass)) / statistics.mean(per_pass) if len(per_pass) > 1 else None


def pseudo_combine(batch: int) -> Callable[[Dict[str, Any], List[Dict[str, Any]]], Dict[str, Any]]:
    """combine for measure() in pseudo mode: the server part's median, p10 and p90 each the median over the
    passes'."""
    def combine(pred: Dict[str, Any], res: List[Dict[str, Any]]) -> Dict[str, Any]:
        server = {k: float(statistics.median(float(r[k]) for r in res)) for k in ('median_ms', 'p10_ms', 'p90_ms')}
        server['n'] = sum(int(r.get('n', 0)) for r in res)
        return pseudo_record(pred, server, batch)
    return combine


def real_runner(session: Any, model_spec: Dict[str, Any], input_size: int, batch: int, samples: int,
                feature_dtype: str, device: str, seed: int, threads: Optional[int] = None,
                server_threads: Optional[int] = None) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """run_one for measure() in real mode: deploy the configuration (random weights, kept sets from its layouts)
    to the worker and stream `samples` random uint8 images through the split pipeline; `threads`: the worker's
    torch threads (the LUT's edge side's; None: the worker's own); `server_threads`: this side's torch threads
    while it streams (the LUT's server side's, as pseudo mode times it; None: as they are)."""
    import torch

    from hyper_repvgg import apply_config, deploy_part
    from timing import measure as M
    model = M.random_model(model_spec, seed)
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 7)
    images = torch.randint(0, 256, (max(3 * batch, int(samples)), 3, input_size, input_size), dtype=torch.uint8,
                           generator=gen)
    labels = torch.zeros(len(images), dtype=torch.long)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]

    def run(row: Dict[str, Any]) -> Dict[str, Any]:
        apply_config(model, [int(g) for g in row['gammas']])  # kept sets from the layouts; a plain net: checked
        lam = int(row['lam'])
        extra = {} if threads is None else {'threads': int(threads)}
        dep = session.deploy(model, list(row['gammas']), lam, mean, std, feature_dtype=feature_dtype, **extra)
        server = None if lam == model.num_blocks else deploy_part(model.split(lam)[1]).to(device).eval()
        with torch_threads(server_threads or 0):
            res = session.run(server, images, labels, batch)
            res['server_threads'] = torch.get_num_threads()
        res = {k: v for k, v in res.items() if k not in ('predictions',)}
        res['worker_threads'] = dep.get('threads')
        return res
    return run


# ----------------------------------------------------------------------------------------------------------
# Real mode: the runtime's own per-frame cost, measured once (step 1)
# ----------------------------------------------------------------------------------------------------------

CALIBRATION_SPLITS = (0.125, 0.25, 0.5, 0.75, 0.875)  # where the calibration configurations split, fractions of N
CALIBRATION_PASSES = 6  # streams per calibration split, in alternating order (~25 s in all: longer than one of the
# stand-in's 10-20 s slow episodes); each split's pace is their loop.pace_quantile percentile
LINK_BOUND = 0.9  # a calibration stream whose link occupancy is this share of its period or more may be link-bound


def runtime_overhead(records: Sequence[Dict[str, Any]], batch: int) -> Dict[str, Any]:
    """The split runtime's per-frame cost on each side beyond the LUT's part times, as the pipelined period shows it,
    from configurations streamed through the worker (records: {'lam', 'gammas', 'predicted': cost.describe() on the
    LUT without overhead, 'measured': real_record()}; ms per batch of `batch`).

    A stream's period (batch / measured throughput) is set by its slowest side: the one whose measured stage is the
    longer (unless the link's occupancy comes within LINK_BOUND of the period).  That side's cost per frame is the
    period minus its LUT sum: its compute beyond the LUT plus what its other threads take from the same cores
    (sending, receiving, decoding and authenticating frames), which the stage's own timer does not see.  Each side's
    overhead is the median of that over the streams it bounds; a side that bounds none falls back to its stage
    timer's excess (measured - predicted stage time, the rule before: development measurement on the local stand-in
    device, 2026-12-07, docs/design.md "Closed loop").  Clamped at 0."""
    rows = []
    for r in records:
        m, p = r['measured'], r['predicted']
        fps = m.get('throughput_fps')
        period = 1000.0 * int(batch) / float(fps) if isinstance(fps, (int, float)) and fps > 0 else None
        stages = {k: m[f'{k}_ms'] for k in ('edge', 'server') if isinstance(m.get(f'{k}_ms'), (int, float))}
        bound = max(stages, key=lambda k: stages[k]) if stages else None
        if period is None or float(p.get('link_ms') or 0.0) >= LINK_BOUND * period:
            bound = 'link' if period is not None else None
        rows.append((r, period, bound))

    def over(side: str) -> Tuple[float, str]:
        d = [period - r['predicted'][f'{side}_ms'] for r, period, bound in rows if bound == side]
        if d:
            return max(0.0, float(statistics.median(d))), 'period'
        d = [r['measured'][f'{side}_ms'] - r['predicted'][f'{side}_ms'] for r, _, _ in rows
             if isinstance(r['measured'].get(f'{side}_ms'), (int, float))]
        return (max(0.0, float(statistics.median(d))) if d else 0.0), 'stage'
    (edge, edge_from), (server, server_from) = over('edge'), over('server')
    return {'kind': 'measured', 'edge_ms': edge, 'server_ms': server, 'batch': int(batch),
            'from': {'edge': edge_from, 'server': server_from},
            'how': 'per side, the median over the calibration streams that side bounds of the measured period minus '
                   'the LUT\'s sum for its stage (from "period"; a side that bounds none: its stage timer\'s excess, '
                   'from "stage"); added to every edge / server stage of the cost model at this batch size '
                   '(timing.lut.cost_tables)',
            'configurations': [{'lam': int(r['lam']), 'gammas': [int(g) for g in r['gammas']],
                                'bound': bound, 'period_ms': period,
                                'predicted': {k: r['predicted'][k] for k in ('edge_ms', 'server_ms', 'link_ms',
                                                                             'throughput_fps')},
                                'measured': {k: r['measured'].get(k) for k in ('edge_ms', 'server_ms', 'link_ms',
                                                                               'throughput_fps')}}
                               for r, period, bound in rows]}


def calibrate_runtime(session: Any, lut: Dict[str, Any], cfg: Any, batch: int) -> Dict[str, Any]:
    """Step 1 --mode real: stream the unpruned fused model split at CALIBRATION_SPLITS of its blocks through the
    worker (cfg.loop.real_samples images each, CALIBRATION_PASSES times in alternating order: at lambda 11 one
    stream's period minus the server's LUT sum was 0.47 ms in one run and about 0.27 in another on the local
    stand-in device, as large a change as the overhead itself) and measure
    the runtime's per-frame overhead (runtime_overhead)."""
    from timing import lut as L
    t = L.cost_tables(lut, batch, runtime=False)
    gammas = C.fused_gammas(C.measured_kept(t))
    n = t.num_blocks
    lams = sorted({min(n - 1, max(1, int(round(f * n)))) for f in CALIBRATION_SPLITS})
    run = real_runner(session, lut['model'], lut['input_size'], batch, cfg.loop.real_samples, lut['feature_dtype'],
                      cfg.device, cfg.seed, edge_threads(lut), lut_threads(lut, 'server'))
    plan = [{'gammas': gammas, 'lam': lam} for lam in lams]
    raw = sequential_passes(run)(plan, CALIBRATION_PASSES, None)
    records = [{'lam': row['lam'], 'gammas': gammas, 'predicted': C.describe(gammas, row['lam'], t),
                'measured': real_record({}, runs, cfg.loop.pace_quantile)} for row, runs in zip(plan, raw)]
    return dict(runtime_overhead(records, batch), passes=CALIBRATION_PASSES)


def runtime_line(ov: Dict[str, Any]) -> str:
    return (f'runtime overhead per frame (measured: {len(ov["configurations"])} configurations streamed through the '
            f'worker, batch {ov["batch"]}): edge +{ov["edge_ms"]:.3f} ms, server +{ov["server_ms"]:.3f} ms beyond '
            'the LUT\'s part times' + _overhead_sources(ov) + '; the cost model adds them to every edge / server stage')


def _overhead_sources(ov: Dict[str, Any]) -> str:
    src = ov.get('from') or {}
    words = {'period': 'from the periods of the streams it bounds', 'stage': 'from its stage timer (it bounded none)'}
    parts = [f'{side} {words[src[side]]}' for side in ('edge', 'server') if src.get(side) in words]
    return f' ({"; ".join(parts)})' if parts else ''


# ----------------------------------------------------------------------------------------------------------
# The closed-loop figures
# ----------------------------------------------------------------------------------------------------------

def _with_role(records: Sequence[Dict[str, Any]], role: str) -> Optional[Dict[str, Any]]:
    return next((r for r in records if role in r['roles']), None)


def paired_ratio(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    """Record a's measured throughput over record b's on the passes both were measured in: the first min(n_a, n_b)
    of their passes_fps (measure()'s passes, then the race's rounds, which every configuration still in shares),
    each read at its pace_quantile (pseudo mode: the median).  Comparing pooled figures instead set a configuration
    whose later race passes fell into a slow episode against one eliminated before it (domain 0 of the fresh-clone
    pipeline, 2026-12-08 01:06: 78.6 % of the best and a measured gain of x0.77, both x1.03 on the shared passes)."""
    pa = list(a['measured'].get('passes_fps') or [a['measured']['throughput_fps']])
    pb = list(b['measured'].get('passes_fps') or [b['measured']['throughput_fps']])
    m = min(len(pa), len(pb))
    q = float(a['measured'].get('pace_quantile', 50.0))
    return pass_pace(pa[:m], q) / pass_pace(pb[:m], q)


def loop_report(records: Sequence[Dict[str, Any]], mode: str, top_k: int) -> Dict[str, Any]:
    """The closed-loop figures of measure()'s records (kinds say measured / predicted; see the module docstring).
    The chosen configuration's share of the best of the top-k and its gain over the best plain split compare it
    with each on the passes both were measured in (paired_ratio); the best is the one it trails most there."""
    chosen = _with_role(records, 'chosen')
    top = [r for r in records if any(x.startswith('top') for x in r['roles'])]
    best = min(top, key=lambda r: (paired_ratio(chosen, r), -r['measured']['throughput_fps']))
    plain = _with_role(records, 'best_plain_split')
    cm, bm = chosen['measured']['throughput_fps'], best['measured']['throughput_fps']
    out: Dict[str, Any] = {
        'mode': mode, 'how': chosen['measured']['how'], 'top_k': len(top),
        'chosen': {'lam': chosen['lam'], 'predicted_fps': chosen['predicted']['throughput_fps'],
                   'measured_fps': cm, 'measured_p10_fps': chosen['measured']['p10_fps'],
                   'measured_p90_fps': chosen['measured']['p90_fps']},
        'best_measured_of_top_k': {'lam': best['lam'], 'roles': best['roles'], 'measured_fps': bm,
                                   'predicted_fps': best['predicted']['throughput_fps']},
        'chosen_over_best_measured_pct': 100.0 * paired_ratio(chosen, best),
        'pass_to_pass_median_pct': _median_or_none(r['measured']['pass_to_pass_pct'] for r in records
                                                   if r['measured']['bottleneck_source'] == 'measured'),
        'load_average': chosen['measured']['load_average'],
    }
    if plain is not None:
        pm = plain['measured']['throughput_fps']
        out['best_plain_split'] = {'lam': plain['lam'], 'predicted_fps': plain['predicted']['throughput_fps'],
                                   'measured_fps': pm}
        out['gain_over_best_plain_split'] = {
            'measured_x': paired_ratio(chosen, plain), 'predicted_x': chosen['predicted']['throughput_fps'] /
            plain['predicted']['throughput_fps']}
    pc = _with_role(records, 'predicted_choice')
    if pc is not None:  # confirm_choice adopted a faster measured configuration
        out['predicted_choice'] = {'lam': pc['lam'], 'predicted_fps': pc['predicted']['throughput_fps'],
                                   'measured_fps': pc['measured']['throughput_fps']}
    if mode == 'pseudo':
        out['chosen']['bottleneck_source'] = chosen['measured']['bottleneck_source']
    return out


def _median_or_none(values: Any) -> Optional[float]:
    vals = [v for v in values if isinstance(v, (int, float))]
    return float(statistics.median(vals)) if vals else None


def report_line(rep: Dict[str, Any]) -> str:
    """One console line: chosen measured vs best measured of the top-k, measured vs predicted gain."""
    c, b = rep['chosen'], rep['best_measured_of_top_k']
    line = (f'closed loop ({rep["mode"]}: {rep["how"]}): chosen lambda {c["lam"]} measured {c["measured_fps"]:.1f} '
            f'fps (p10-p90 {c["measured_p10_fps"]:.1f}-{c["measured_p90_fps"]:.1f}; predicted {c["predicted_fps"]:.1f})'
            f' = {rep["chosen_over_best_measured_pct"]:.1f} % of the best measured (on the passes both ran) among the '
            f'{rep["top_k"]} '
            f'best-predicted (lambda {b["lam"]}, {b["measured_fps"]:.1f} fps)')
    pc = rep.get('predicted_choice')
    if pc:
        line += (f'; adopted on measurement over the predicted choice lambda {pc["lam"]} ({pc["measured_fps"]:.1f} '
                 f'fps measured, {pc["predicted_fps"]:.1f} predicted): it won the race on fresh passes')
    g = rep.get('gain_over_best_plain_split')
    if g:
        line += f'; gain over the best plain split: x{g["measured_x"]:.2f} measured, x{g["predicted_x"]:.2f} predicted'
    ev = rep.get('evaluation')
    if ev:
        line += (f'; on {ev["passes"]} fresh evaluation passes no decision saw: chosen = '
                 f'{ev["chosen_over_best_pct"]:.1f} % of the best (lambda {ev["best"]["lam"]})')
        if ev.get('chosen_over_best_crossfit_pct') is not None:
            line += (f', {ev["chosen_over_best_crossfit_pct"]:.1f} % of the one measured best on the other half of '
                     'them')
            if ev.get('chosen_over_best_crossfit_ci95_pct'):
                lo, hi = ev['chosen_over_best_crossfit_ci95_pct']
                line += f' (95 % interval over the passes {lo:.1f}-{hi:.1f} %)'
    if rep.get('pass_to_pass_median_pct') is not None:
        line += f'; passes disagree by a median {rep["pass_to_pass_median_pct"]:.1f} %'
    la = (rep.get('load_average') or {}).get('before')
    if la:
        line += f'; load average {la[0]:.2f}'
    if rep['mode'] == 'pseudo' and c.get('bottleneck_source') == 'modelled':
        line += ' (the chosen bottleneck is a modelled stage: its measured figure is the model\'s)'
    return line


def measured_table(records: Sequence[Dict[str, Any]]) -> str:
    """Aligned text table of measure()'s records: roles, lambda, predicted and measured fps with p10-p90."""
    head = ['configuration', 'lambda', 'pred. fps', 'meas. fps', 'p10-p90 fps', 'meas/pred', 'bottleneck (meas.)']
    rows = []
    for r in sorted(records, key=lambda r: -r['predicted']['throughput_fps']):
        m, p = r['measured'], r['predicted']
        rows.append([','.join(r['roles']), str(r['lam']), f'{p["throughput_fps"]:.1f}', f'{m["throughput_fps"]:.1f}',
                     f'{m["p10_fps"]:.1f}-{m["p90_fps"]:.1f}', f'{m["throughput_fps"] / p["throughput_fps"]:.2f}',
                     f'{m["bottleneck"]} ({m["bottleneck_source"]})'])
    widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(head)]
    lines = ['  '.join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ['  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------
# One step's closed loop
# ----------------------------------------------------------------------------------------------------------

def server_device(device: str) -> Dict[str, Any]:
    """What the "server" of these measurements is: the torch device, its name, and on a CPU a note saying so."""
    from timing.measure import device_metadata
    meta = device_metadata(device)
    out = {'device': meta['device'], 'device_name': meta['device_name'], 'threads': meta['threads']}
    if meta['device'] == 'cpu':
        out['note'] = f'the "server" is this CPU ({meta["device_name"]}), not a GPU server'
    return out


def check_real_lut(lut: Dict[str, Any], lut_file: Any, step: str) -> None:
    """Real mode compares measured runs with the LUT: its edge side must have been measured through the worker.
    A UserError gives the command that measures it otherwise."""
    from errors import UserError
    edge = lut['edge']
    if edge.get('source') != 'measured':
        prof = (edge.get('profile') or {}).get('name')
        raise UserError(f'{step} --mode real: the edge side of {lut_file} is modelled (device profile {prof!r}), not '
                        'measured on the device; a measured run would be compared with a model.  Measure it '
                        'through the worker first: python pipeline/step1_measure_lut.py --mode real (with '
                        'client_worker.py connected; bash run_pipeline.sh --mode real does it)')


def edge_threads(lut: Dict[str, Any]) -> Optional[int]:
    """The torch thread count the LUT's edge side was measured with (None when modelled / not recorded)."""
    return lut_threads(lut, 'edge')


def lut_threads(lut: Dict[str, Any], side: str) -> Optional[int]:
    """The torch thread count the LUT's `side` ('edge' / 'server') was measured with (None when modelled / not
    recorded)."""
    t = (lut[side].get('metadata') or {}).get('threads')
    return int(t) if isinstance(t, int) and t > 0 else None


def pseudo_skip_reason(lut: Dict[str, Any], device: str) -> Optional[str]:
    """Why pseudo mode cannot measure against this LUT (None when it can): its server side must have been measured
    on this machine and torch device, else a measurement here is compared with another device's (or a model's)."""
    import platform
    meta = lut['server'].get('metadata') or {}
    if lut['server'].get('source') != 'measured':
        return ('the LUT\'s server side is modelled, not measured: there is nothing here to compare a measurement '
                'with (step 1 --mode pseudo measures it on this machine)')
    host = meta.get('host')
    if host and host != platform.node():
        return f'the LUT\'s server side was measured on {host}, this machine is {platform.node()}'
    if meta.get('device') and str(meta['device']).split(':')[0] != str(device).split(':')[0]:
        return f'the LUT\'s server side was measured on device {meta["device"]}, this run uses --device {device}'
    return None


def run_closed_loop(cfg: Any, lut: Dict[str, Any], t: C.CostTables, valid: np.ndarray, chosen: Dict[str, Any],
                    baselines: Dict[str, Dict[str, Any]], mode: str, session: Any = None,
                    validation_file: Any = None, label: str = 'closed loop',
                    eligible: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Dict[str, Any]:
    """Decision band, measurements and report of one chosen configuration (step 2, or one step-3 domain).

    `chosen` and `baselines` are cost.describe() dicts under `t`; `valid` is the chosen kept sets' layout mask (the
    runners-up and the top-k keep the chosen pruning).  cfg.loop: top_k, passes, real_samples."""
    lp = cfg.loop
    cands = split_candidates(t, valid)
    fast, slow = spread_tables(lut, t)
    dec = decision(chosen, cands, fast, slow, *validation_uncertainty(validation_file))
    plan = plan_measurements(chosen, baselines, cands, lp.top_k)
    q = float(lp.pace_quantile) if mode == 'real' else 50.0  # pseudo: fine-grained rounds, read at their median
    if mode == 'real':
        if session is None:
            raise ValueError('real mode needs a session')
        time_passes = sequential_passes(real_runner(session, lut['model'], lut['input_size'], t.batch,
                                                    lp.real_samples, lut['feature_dtype'], cfg.device, cfg.seed,
                                                    edge_threads(lut), lut_threads(lut, 'server')))
        combine: Callable[[Dict[str, Any], List[Dict[str, Any]]], Dict[str, Any]] = real_combine(q)
    else:
        time_passes = pseudo_passes(lut['model'], lut['input_size'], t.batch, cfg.device, cfg.lut.rounds, cfg.seed,
                                    lut_threads(lut, 'server') or 0)
        combine = pseudo_combine(t.batch)
    records = measure(plan, time_passes, combine, lp.passes, progress=label, keep_runs=True)
    records, adoption = confirm_choice(records, time_passes, combine, lp.confirm, lp.confirm_passes,
                                       f'{label} race', eligible, lp.confirm_z, q)
    for r in records:
        r.pop('_runs', None)
    report = dict(loop_report(records, mode, lp.top_k), decision_source=adoption['source'])
    if lp.evaluate_passes > 0:
        report['evaluation'] = evaluate_choice(records, time_passes, combine, lp.evaluate_passes,
                                               f'{label} evaluation', q)
    return {'decision': dec, 'measurements': records, 'adoption': adoption, 'report': report,
            'server_device': server_device(cfg.device),
            'settings': {'top_k': lp.top_k, 'passes': lp.passes, 'real_samples': lp.real_samples,
                         'confirm': lp.confirm, 'confirm_passes': lp.confirm_passes,
                         'confirm_z': lp.confirm_z, 'evaluate_passes': lp.evaluate_passes, 'pace_quantile': q}}


def closed_loop_or_skip(cfg: Any, lut: Dict[str, Any], t: C.CostTables, valid: np.ndarray, chosen: Dict[str, Any],
                        baselines: Dict[str, Dict[str, Any]], mode: str, session: Any = None,
                        validation_file: Any = None, label: str = 'closed loop',
                        eligible: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Dict[str, Any]:
    """run_closed_loop, or {'skipped': why, 'decision': ...} (the band needs no measurement) when cfg.loop.measure
    is off or pseudo mode has nothing to measure against."""
    why = None if cfg.loop.measure else 'loop.measure is off'
    if why is None and mode != 'real':
        why = pseudo_skip_reason(lut, cfg.device)
    if why is None:
        return dict(run_closed_loop(cfg, lut, t, valid, chosen, baselines, mode, session, validation_file, label,
                                    eligible), mode=mode)
    fast, slow = spread_tables(lut, t)
    return {'mode': mode, 'skipped': why, 'decision': decision(chosen, split_candidates(t, valid), fast, slow,
                                                               *validation_uncertainty(validation_file))}


def closed_loop_lines(loop: Dict[str, Any], table: bool = True) -> List[str]:
    """The console lines of one closed loop: decision, measured table, report (or why nothing was measured)."""
    lines = [decision_line(loop['decision'])]
    if loop.get('skipped'):
        return lines + [f'closed loop: nothing measured ({loop["skipped"]}); every throughput above is predicted']
    if table:
        lines.append(measured_table(loop['measurements']))
    lines.append(report_line(loop['report']))
    note = loop['server_device'].get('note')
    if note:
        lines.append(f'server: {note}')
    return lines


def measure_domain(inp: Any, payload: Dict[str, Any], mode: str, session: Any = None) -> Dict[str, Any]:
    """Step 3's closed loop of one domain's result (`payload`: domain_<d>_joint.json's fields): the chosen pruned
    configuration, the unpruned plain baselines it is compared with, and the top-k of the chosen pruning."""
    from optim import goal
    gammas, lam = [int(g) for g in payload['gammas']], int(payload['lam'])
    valid = C.valid_mask(goal.kept_sets(gammas))
    chosen = C.describe(gammas, lam, inp.tables)
    budget = float(inp.cfg.joint.edge_memory_budget_mb) * 1e6
    eligible = None if budget <= 0 else (lambda r: edge_weight_bytes(inp, r['gammas'], r['lam']) <= budget)
    return closed_loop_or_skip(inp.cfg, inp.lut, inp.tables, valid, chosen, payload['baselines']['unpruned'], mode,
                               session, inp.cfg.path('lut_validation.json'), f'domain {payload["domain"]} closed loop',
                               eligible)


def edge_weight_bytes(inp: Any, gammas: Sequence[int], lam: int) -> float:
    """Bytes of the deployed kernels on the edge (blocks < lam) of one configuration (step 3's memory goal)."""
    w = np.asarray(inp.stats['weight_bytes'], dtype=np.float64)
    return float(sum(w[k, int(g)] for k, g in enumerate(gammas) if k < int(lam)))


PREDICTED_KEYS = ('edge_ms', 'link_ms', 'server_ms', 'latency_ms', 'throughput_fps', 'bottleneck', 'period_ms')


def adopted_row(loop: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The measurement record a closed loop adopted over the predicted choice (confirm_choice), else None."""
    if not (loop.get('adoption') or {}).get('adopted'):
        return None
    return _with_role(loop['measurements'], 'chosen')


def adopt_step2(payload: Dict[str, Any], loop: Dict[str, Any], t: C.CostTables) -> bool:
    """Step 2's payload after its closed loop: when the loop adopted a measured-faster configuration, it becomes
    the decision (gammas, lam, layouts, predicted) and the optimizer's pick moves to 'optimizer_choice'."""
    from hyper_repvgg import LAYOUTS
    row = adopted_row(loop)
    if row is None:
        return False
    payload['optimizer_choice'] = {k: payload[k] for k in ('gammas', 'lam', 'layouts', 'predicted')}
    payload['optimizer_choice']['note'] = 'the optimizer\'s pick on the LUT; the closed loop measured a faster one'
    g, lam = [int(x) for x in row['gammas']], int(row['lam'])
    payload.update(gammas=g, lam=lam, layouts=[LAYOUTS[x].description for x in g], predicted=C.describe(g, lam, t))
    return True


def open_session(cfg: Any, stack: Any, lut: Dict[str, Any], lut_file: Any, step: str) -> Tuple[Any, Dict[str, Any]]:
    """Real mode: check the LUT's edge side was measured, open the session (closed by `stack`), wait for the worker;
    (session, worker facts for the artifact: its hello next to what the LUT's edge side was measured on)."""
    import logging

    from comm.session import session_from_config
    check_real_lut(lut, lut_file, step)
    session = stack.enter_context(session_from_config(cfg))
    logging.getLogger(step.replace(' ', '')).info('waiting up to %g s for client_worker.py on %s:%d',
                                                   cfg.real.connect_timeout_s, cfg.real.host, session.port)
    hello = session.accept()
    meta = lut['edge'].get('metadata') or {}
    worker = {k: hello.get(k) for k in ('device', 'device_name', 'host', 'threads', 'python_version', 'torch_version',
                                        'power_mode')}
    worker['lut_edge_measured_on'] = {k: meta.get(k) for k in ('device', 'device_name', 'host', 'threads')}
    worker['same_device_as_lut'] = (hello.get('host'), hello.get('device_name')) == (meta.get('host'),
                                                                                     meta.get('device_name'))
    return session, worker


def step2_closed_loop(cfg: Any, lut: Dict[str, Any], lut_file: Any, t: C.CostTables, valid: np.ndarray,
                      payload: Dict[str, Any], mode: str) -> Dict[str, Any]:
    """Step 2's closed loop on its payload (solve_step2's): the chosen configuration and its plain baselines;
    real mode opens the session for it."""
    import contextlib
    chosen = C.describe(payload['gammas'], payload['lam'], t)
    with contextlib.ExitStack() as stack:
        session, worker = (open_session(cfg, stack, lut, lut_file, 'step 2') if mode == 'real' and cfg.loop.measure
                           else (None, None))
        loop = closed_loop_or_skip(cfg, lut, t, valid, chosen, payload['baselines'], mode, session,
                                   cfg.path('lut_validation.json'), 'step 2 closed loop')
    adopt_step2(payload, loop, t)
    if worker is not None:
        loop['worker'] = worker
    return loop


ARTIFACT_FIELDS = ('schema_version', 'kind', 'created_at', 'command', 'config')  # artifacts.write_artifact's own


def domain_closed_loop(inp: Any, out: Dict[str, Any], mode: str, session: Any = None,
                       worker: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Attach step 3's closed loop of one domain (joint.run_domain's `out`) to out['payload']: for a new result,
    and for a finished one that has none for `mode` (then it is measured now).  Returns the payload to write
    (without the artifact's own fields), or None when the finished file already holds this mode's loop."""
    payload = out['payload']
    loop = payload.get('closed_loop')
    if out['skipped'] and isinstance(loop, dict) and loop.get('mode') == mode:
        return None
    payload['closed_loop'] = dict(measure_domain(inp, payload, mode, session), **({'worker': worker} if worker else {}))
    return {k: v for k, v in payload.items() if k not in ARTIFACT_FIELDS}
