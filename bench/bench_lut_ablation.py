"""LUT bias ablation: where the chain LUT's over-prediction of whole configurations comes from.

Each factor is measured with and without it, on the same random configurations (a random measurable layout per
block, the whole network and the head on this CPU, batch 1).  Whole configurations are timed in interleaved
bursts (one untimed pass, then `burst` timed passes of the same configuration, the order of configuration x
condition shuffled every round with a seeded generator) so that drift and load hit every condition alike.

Conditions of the whole-configuration passes: `whole` (hyper_repvgg.SplitPart forward, no timer inside, what a
deployed part runs), `timed` (a timer around every block, as the chain LUT times them; also gives the blocks'
in-situ times), `bare` (each block's forward() called directly, no nn.Module.__call__), `nohead` (blocks only),
`threads2` (2 torch threads), `pinned` (process pinned to one core), `thread_clock` (timed by this thread's
CPU time instead of the wall clock).  LUTs: `chain` (timing.measure, step 1's method before this bench)
measured before and after the passes (drift), `chain` without warm-up, `isolated`, `chain` at 2 threads, and
`fit` (step 1's method now, the remedy); `sequential` re-times each configuration as timing.lut.validate_side
did (warm-up, then all repeats of one configuration before the next).  Two more factors attribute the noise and
the loaded-machine bias: the interleaving granularity (the same calls as 2 coarse rounds, step 1's validation
until now, vs fine rounds of 2 calls with passes = even / odd rounds, timing.measure now: the noise floor of
each), and a competing process (one torch thread of convolutions, stopped and continued by alternating rounds)
beside the whole passes and beside a chain LUT measurement.

Effects are exp(mean over configurations of log(ratio)) - 1, in %, so that the three factors of the chain
LUT's error (layout context x untimed gaps x timer overhead) multiply to the whole; each is given with the
samples' medians (what LUTs use) and their minima (the fastest run: other work only adds time, so minima show
the systematic effects on a loaded machine too).  The machine's load
average is recorded before and after; on a loaded machine the table says so.  Writes
bench/results/lut_ablation.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_lut import cases  # noqa: E402
from config import ConfigError, run_cli  # noqa: E402

log = logging.getLogger('bench_lut_ablation')
NAME = 'lut_ablation'
CONDITIONS = ('whole', 'timed', 'bare', 'nohead', 'threads2', 'pinned', 'thread_clock')


def _geo_pct(ratios: Sequence[float]) -> Optional[float]:
    r = [x for x in ratios if x is not None and x > 0 and math.isfinite(x)]
    return 100.0 * (math.exp(sum(math.log(x) for x in r) / len(r)) - 1.0) if r else None


def _pass(cond: str, blocks: List[Any], head: Any, x: Any) -> Dict[str, Any]:
    """One timed forward pass under condition `cond`: {'wall_ms', 'blocks_ms' (timed only)}; thread_clock:
    the pass's thread CPU time (timing.measure.clock_fn('thread')) in 'wall_ms'."""
    import torch

    from timing.measure import clock_fn
    with torch.no_grad():
        if cond == 'thread_clock':
            tick = clock_fn('thread')
            t0 = tick()
            y = x
            for m in blocks:
                y = m(y)
            head(y)
            return {'wall_ms': (tick() - t0) * 1e3}
        if cond == 'timed':
            per = []
            t_start = time.perf_counter()
            y = x
            for m in blocks:
                t0 = time.perf_counter()
                y = m(y)
                per.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            head(y)
            per.append((time.perf_counter() - t0) * 1e3)
            return {'wall_ms': (time.perf_counter() - t_start) * 1e3, 'blocks_ms': per}
        t0 = time.perf_counter()
        y = x
        if cond == 'bare':
            for m in blocks:
                y = m.forward(y)
            head.forward(y)
        else:
            for m in blocks:
                y = m(y)
            if cond != 'nohead':
                head(y)
        return {'wall_ms': (time.perf_counter() - t0) * 1e3}


class _Head:
    """Pooling + classifier as one callable (its __call__ / forward as a deployed SplitPart head runs them)."""

    def __init__(self, gap: Any, linear: Any) -> None:
        import torch
        self.gap, self.linear, self.torch = gap, linear, torch

    def __call__(self, y: Any) -> Any:
        return self.linear(self.torch.flatten(self.gap(y), 1))

    def forward(self, y: Any) -> Any:
        return self.linear.forward(self.torch.flatten(self.gap.forward(y), 1))


def _setup(case: Any, configs: int, seed: int) -> Dict[str, Any]:
    """The random model, `configs` random configurations (a measurable layout per block), their deployed
    blocks {(block, layout): module}, the head and the input."""
    import torch

    from timing import measure as M
    from timing.flops import measurable_layouts
    model = M.random_model(case.arch, seed)
    plan = model.plan
    rng = np.random.default_rng(seed)
    cfgs = [[int(rng.choice(measurable_layouts(s))) for s in plan] for _ in range(configs)]
    dep: Dict[Any, Any] = {}
    for g in cfgs:
        for k, gk in enumerate(g):
            if (k, gk) not in dep:
                dep[(k, gk)] = M.deployed_layout(model.blocks[k], gk).eval()
    head = _Head(model.gap, model.linear)
    gen = torch.Generator()
    gen.manual_seed(seed + 3)
    x = torch.randn(1, 3, case.input_size, case.input_size, generator=gen)
    return {'plan': plan, 'cfgs': cfgs, 'dep': dep, 'head': head, 'x': x}


def _lut(case: Any, seed: int, **kw: Any) -> Dict[str, Any]:
    """A server-side LUT of the case's model measured by timing.measure.measure_blocks (batch 1, this CPU);
    `kw` overrides its arguments, `threads` sets torch's threads for this measurement only."""
    import torch

    from timing import lut as L
    from timing import measure as M
    args = dict(arch=case.arch, input_size=case.input_size, batch_sizes=(1,), device='cpu', warmup=case.warmup,
                repeats=case.repeats, max_entry_s=case.max_entry_s, seed=seed, timing='chain')
    threads = kw.pop('threads', 1)
    args.update(kw)
    torch.set_num_threads(threads)
    try:
        res = M.measure_blocks(**args)
    finally:
        torch.set_num_threads(1)
    return L.side_payload('server', case.arch, case.input_size, dict(res, settings={'batch_sizes': [1]},
                                                                     metadata={}, roofline={}))


def _interleaved(su: Dict[str, Any], rounds: int, burst: int, seed: int) -> Any:
    """Interleaved bursts of whole configurations x CONDITIONS.  Returns (samples {(config, condition): wall
    ms}, insitu {config: per-pass block times of the timed condition})."""
    import torch
    cfgs, dep, head, x = su['cfgs'], su['dep'], su['head'], su['x']
    configs = len(cfgs)
    samples: Dict[Any, List[float]] = {(c, cond): [] for c in range(configs) for cond in CONDITIONS}
    insitu: Dict[int, List[Any]] = {c: [] for c in range(configs)}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
    order_rng = np.random.default_rng(seed + 7)
    pairs = [(c, cond) for c in range(configs) for cond in CONDITIONS]
    for _ in range(rounds):
        for i in order_rng.permutation(len(pairs)):
            c, cond = pairs[int(i)]
            blocks = [dep[(k, gk)] for k, gk in enumerate(cfgs[c])]
            if cond == 'threads2':  # torch threads for this burst only
                torch.set_num_threads(2)
            if cond == 'pinned' and cpus:
                os.sched_setaffinity(0, {cpus[-1]})
            try:
                _pass('whole' if cond in ('threads2', 'pinned') else cond, blocks, head, x)  # untimed
                for _ in range(burst):
                    s = _pass('whole' if cond in ('threads2', 'pinned') else cond, blocks, head, x)
                    samples[(c, cond)].append(s['wall_ms'])
                    if cond == 'timed':
                        insitu[c].append(s['blocks_ms'])
            finally:
                torch.set_num_threads(1)
                if cond == 'pinned' and cpus:
                    os.sched_setaffinity(0, set(cpus))
    return samples, insitu


def _sequential(su: Dict[str, Any], case: Any) -> List[Dict[str, Any]]:
    """Sequential re-timing as validate_side did (warm-up, all repeats of one configuration, next)."""
    from timing import measure as M
    seq = []
    for g in su['cfgs']:
        part = [su['dep'][(k, gk)] for k, gk in enumerate(g)]
        seq.append(M.time_callable(lambda b=part: _pass('whole', b, su['head'], su['x']), 'cpu', case.warmup,
                                   case.repeats, min_sample_ms=0))
    return seq


COMPETITOR = ('import torch\n'
              'torch.set_num_threads(1)\n'
              'x = torch.randn(1, 64, 56, 56)\n'
              'c = torch.nn.Conv2d(64, 64, 3, padding=1)\n'
              'with torch.no_grad():\n'
              '    while True:\n'
              '        c(x)\n')


def _whole_parts(su: Dict[str, Any]) -> List[Any]:
    """(callable, input) per configuration: its whole pass as a deployed part runs it (timing.measure._time_parts)."""
    return [(lambda x, b=[su['dep'][(k, gk)] for k, gk in enumerate(g)]: _pass('whole', b, su['head'], x), su['x'])
            for g in su['cfgs']]


def _granularity(su: Dict[str, Any], calls: int, seed: int) -> Dict[str, Any]:
    """The same configurations, the same number of timed calls each, in two protocols: coarse (2 rounds of
    calls / 2 consecutive calls: step 1's validation until now, one pass per round) and fine (calls / 2 rounds of
    2 calls, passes = even / odd rounds: timing.measure now).  Returns {protocol: [(pass 1, pass 2) samples per
    configuration]}."""
    import torch

    from timing import measure as M
    parts = _whole_parts(su)
    coarse = M._time_parts(parts, torch.device('cpu'), 2, max(2, calls // 2), 1, seed + 21)
    fine = M._time_parts(parts, torch.device('cpu'), max(2, calls // 2), 2, 1, seed + 23)
    return {'coarse': [(s[0], s[1]) for s in coarse], 'fine': [tuple(M.split_passes(s, 2)) for s in fine]}


def _competing(su: Dict[str, Any], rounds: int, seed: int) -> Dict[str, Any]:
    """Whole passes with and without a competing process (one torch thread of 3x3 convolutions, the kind of
    work a second job on this machine runs), alternating by rounds: the competitor is stopped (SIGSTOP) in even
    rounds and running (SIGCONT) in odd ones, so drift hits both alike.  Returns {'alone': [...], 'competing':
    [...]} samples per configuration, or None where the process cannot be controlled (no SIGSTOP)."""
    import signal
    import subprocess

    import torch

    from timing import measure as M
    if not hasattr(signal, 'SIGSTOP'):
        return None
    parts = _whole_parts(su)
    proc = subprocess.Popen([sys.executable, '-c', COMPETITOR], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    alone: List[List[float]] = [[] for _ in parts]
    busy: List[List[float]] = [[] for _ in parts]
    try:
        time.sleep(1.0)  # let it import torch and start
        for r in range(max(2, rounds)):
            proc.send_signal(signal.SIGSTOP if r % 2 == 0 else signal.SIGCONT)
            time.sleep(0.05)
            got = M._time_parts(parts, torch.device('cpu'), 1, 2, 1, seed + 31 + r)
            for i, s in enumerate(got):
                (alone if r % 2 == 0 else busy)[i].extend(s[0])
    finally:
        proc.kill()
        proc.wait()
    return {'alone': alone, 'competing': busy}


def _with_competitor(fn: Any) -> Any:
    """fn() while the competing process of _competing runs."""
    import subprocess
    proc = subprocess.Popen([sys.executable, '-c', COMPETITOR], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        return fn()
    finally:
        proc.kill()
        proc.wait()


def _ratio(a: Sequence[float], b: Sequence[float]) -> List[float]:
    return [x / y for x, y in zip(a, b)]


def _at(side: Dict[str, Any], field: str) -> Dict[str, Any]:
    """The LUT side with `field` (median_ms or min_ms) as every entry's median_ms."""
    return dict(side, entries={k: dict(e, median_ms=e[field]) for k, e in side['entries'].items()},
                head={k: dict(e, median_ms=e[field]) for k, e in side['head'].items()})


def _table_for(ms: Dict[str, Any], agg: Any, field: str) -> Dict[str, Any]:
    """The rows' effects with one statistic per sample set: medians (what the LUT uses) or minima (the
    fastest run: preemption by other work only adds time, so minima show the systematic effects even on a
    loaded machine).  `ms`: the measurements (samples, insitu, luts, seq, cfgs, n_mod)."""
    from timing import lut as L
    samples, insitu, luts, seq, cfgs, n_mod = (ms[k] for k in ('samples', 'insitu', 'luts', 'seq', 'cfgs', 'n_mod'))
    configs = len(cfgs)
    med = {k: float(agg(v)) for k, v in samples.items()}
    whole = [med[(c, 'whole')] for c in range(configs)]
    timed = [med[(c, 'timed')] for c in range(configs)]
    sum_blk = [float(np.sum(agg(np.asarray(insitu[c]), axis=0))) for c in range(configs)]
    blk_sum = [float(agg(np.sum(np.asarray(insitu[c]), axis=1))) for c in range(configs)]
    w = samples
    half = [(float(agg(w[(c, 'whole')][:len(w[(c, 'whole')]) // 2])),
             float(agg(w[(c, 'whole')][len(w[(c, 'whole')]) // 2:]))) for c in range(configs)]
    pred = {k: [L.predict_parts(_at(v, field), g, 0, 1)['total_ms'] for g in cfgs] for k, v in luts.items()}
    p = pred['chain_before']
    head_chain = float(luts['chain_before']['head'][L.lut_key('head', None, 1)][field])
    head_marg = float(np.median([med[(c, 'whole')] - med[(c, 'nohead')] for c in range(configs)]))
    call_us = float(np.median([(med[(c, 'whole')] - med[(c, 'bare')]) / n_mod * 1e3 for c in range(configs)]))
    cond = {k: [med[(c, k)] for c in range(configs)] for k in CONDITIONS}
    effects = [
        _geo_pct(_ratio(p, whole)), _geo_pct(_ratio(p, sum_blk)), _geo_pct(_ratio(sum_blk, timed)),
        _geo_pct(_ratio(timed, whole)), _geo_pct(_ratio(sum_blk, blk_sum)), _geo_pct(_ratio(whole, cond['bare'])),
        100.0 * (head_chain - head_marg) / float(np.median(whole)), _geo_pct(_ratio(cond['threads2'], whole)),
        _geo_pct(_ratio(pred['chain_2_threads'], p)), _geo_pct(_ratio(cond['pinned'], whole)),
        _geo_pct(_ratio(pred['chain_no_warmup'], p)), _geo_pct(_ratio(pred['chain_after'], p)),
        _geo_pct(_ratio([s[field] for s in seq], whole)), _geo_pct(_ratio(pred['isolated'], p)),
        float(np.median([abs(a - b) / b * 100 for a, b in half])), _geo_pct(_ratio(cond['thread_clock'], whole)),
        _geo_pct(_ratio(pred['fit'], whole))]
    gran = ms['granularity']
    for proto in ('coarse', 'fine'):
        effects.append(float(np.median([abs(float(agg(a)) - float(agg(b))) / float(agg(b)) * 100
                                        for a, b in gran[proto]])))
    comp = ms['competing']
    effects.append(_geo_pct([float(agg(b)) / float(agg(a)) for a, b in zip(comp['alone'], comp['competing'])])
                   if comp else None)
    effects.append(_geo_pct(_ratio(pred['chain_competing'], p)) if 'chain_competing' in pred else None)
    return {'effects': effects, 'whole': whole, 'timed': timed, 'insitu_sum': sum_blk, 'pred': pred,
            'head_chain': head_chain, 'head_marg': head_marg, 'call_us': call_us}


def _labels(case: Any, n_mod: int, md: Dict[str, Any]) -> List[List[str]]:
    """Each row's factor, its 'with' and 'without' sides and its note (the effects go between)."""
    return [
        ['LUT sum (chain, step 1 until now) vs whole configuration', 'chain LUT', 'whole pass', 'the error to explain'],
        ['  a. layout context: chain LUT vs the same blocks timed inside the configuration', 'chain LUT',
         'in-situ block sum', 'uniform-layout chain vs mixed configuration, drift'],
        ['  b. untimed gaps: in-situ block sum vs timed pass wall', 'in-situ sum', 'timed wall',
         'code between the timers'],
        ['  c. timer calls inside the pass', 'timed wall', 'whole pass', f'{n_mod} perf_counter pairs'],
        ['statistic: per-block statistic summed vs statistic of per-pass sums (timed)', 'sum of stats',
         'stat of sums', 'preemption hits whole passes more often than 0.1 ms blocks'],
        ['Python call overhead: nn.Module __call__ vs forward()', 'whole', 'bare',
         f'{md["call_us"]:.1f} us per module, medians (in both)'],
        ['head: chain entry vs its marginal cost in the whole pass', f'{md["head_chain"]:.3f} ms',
         f'{md["head_marg"]:.3f} ms', '% of the median whole pass (medians)'],
        ['threads: whole pass at 2 threads vs 1', '2 threads', '1 thread', 'LUT and validation run at lut.threads'],
        ['threads: chain LUT at 2 threads vs 1', '2 threads', '1 thread', ''],
        ['affinity: whole pass pinned to one core vs free', 'pinned', 'free', ''],
        ['warm-up: chain LUT without vs with warm-up', 'warmup 0', f'warmup {case.warmup}', ''],
        ['drift: chain LUT after vs before the passes', 'after', 'before', 'minutes apart'],
        ['order: sequential (validate_side until now) vs interleaved bursts', 'sequential', 'interleaved', ''],
        ['isolated LUT (each block alone in a loop) vs chain LUT', 'isolated', 'chain', ''],
        ['noise floor: whole pass, first vs second half of the rounds', 'half 1', 'half 2', 'median |h1 - h2| / h2'],
        ['clock: thread CPU time vs wall time of the whole pass', 'thread CPU', 'wall', ''],
        ['remedy: fit LUT (timing=fit, step 1 now) vs whole configuration', 'fit LUT', 'whole pass',
         'entries fitted to timed parts'],
        ['noise floor, coarse passes: 2 rounds of consecutive calls (step 1 validation until now)', 'pass 1',
         'pass 2', 'median |p1 - p2| / p2, same calls as the next row'],
        ['noise floor, fine interleaving: rounds of 2 calls, passes = even / odd rounds (now)', 'pass 1', 'pass 2',
         'median |p1 - p2| / p2'],
        ['load: whole pass with a competing process (1 torch thread of convolutions) vs alone', 'competing',
         'alone', 'alternating rounds, SIGSTOP / SIGCONT'],
        ['load: chain LUT measured beside the competing process vs alone', 'competing', 'alone',
         'a LUT measured on a busy machine'],
    ]


def run_case(case: Any, configs: int, rounds: int, burst: int, seed: int) -> Dict[str, Any]:
    import torch
    t_case = time.perf_counter()
    torch.set_num_threads(1)
    load_before = common.load_average()
    su = _setup(case, configs, seed)
    luts = {'chain_before': _lut(case, seed)}
    samples, insitu = _interleaved(su, rounds, burst, seed)
    seq = _sequential(su, case)
    luts['chain_after'] = _lut(case, seed)
    luts['chain_no_warmup'] = _lut(case, seed, warmup=0)
    luts['isolated'] = _lut(case, seed, timing='isolated')
    luts['chain_2_threads'] = _lut(case, seed, threads=2)
    luts['fit'] = _lut(case, seed, timing='fit', fit_configurations=case.fit_configurations,
                       fit_rounds=case.fit_rounds, fit_burst=case.fit_burst)
    granularity = _granularity(su, 2 * rounds * burst, seed)
    load_after = common.load_average()  # before the competing process adds its own load
    competing = _competing(su, 2 * rounds, seed)
    if competing is not None:
        luts['chain_competing'] = _with_competitor(lambda: _lut(case, seed))
    n_mod = len(su['plan']) + 1
    ms = {'samples': samples, 'insitu': insitu, 'luts': luts, 'seq': seq, 'cfgs': su['cfgs'], 'n_mod': n_mod,
          'granularity': granularity, 'competing': competing}
    md, mn = _table_for(ms, np.median, 'median_ms'), _table_for(ms, np.min, 'min_ms')
    rows = [lab[:3] + [e1, e2] + lab[3:] for lab, e1, e2 in zip(_labels(case, n_mod, md), md['effects'],
                                                                 mn['effects'])]
    whole, timed, sum_med, pred = md['whole'], md['timed'], md['insitu_sum'], md['pred']
    head_chain, head_marg, call_us = md['head_chain'], md['head_marg'], md['call_us']
    loaded = common.is_loaded(load_before) or common.is_loaded(load_after, own=1.0)
    out = {'label': case.label, 'model': case.arch, 'input_size_px': case.input_size, 'configurations': configs,
           'rounds': rounds, 'burst': burst, 'warmup': case.warmup, 'repeats': case.repeats,
           'load_average_before': load_before, 'load_average_after': load_after, 'loaded': loaded,
           'median_whole_ms': float(np.median(whole)), 'head_chain_ms': head_chain, 'head_marginal_ms': head_marg,
           'call_overhead_us_per_module': call_us, 'rows': rows, 'wall_s': time.perf_counter() - t_case,
           'per_config': {'whole_ms': whole, 'timed_ms': timed, 'insitu_sum_ms': sum_med,
                          'sequential_ms': [s['median_ms'] for s in seq], 'predicted_ms': pred,
                          'whole_min_ms': mn['whole'], 'predicted_min_ms': mn['pred']}}
    log.info('%s: chain LUT vs whole %+.1f %% (load %s -> %s, %.0f s)', case.label, rows[0][3], load_before,
             load_after, out['wall_s'])
    return out


COLUMNS = ['factor', 'with', 'without', 'effect, medians (%)', 'effect, minima (%)', 'note']


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_lut_ablation: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--models', default=None, help='comma-separated subset of default,a0_224,b3_224 '
                   '(default: default,a0_224; with --quick: the tiny model)')
    p.add_argument('--configs', type=int, default=None, help='random configurations (default: 12; quick: 3)')
    p.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default: 8; quick: 2)')
    p.add_argument('--burst', type=int, default=3, help='timed passes per burst after one untimed (default: 3)')
    p.add_argument('--seed', type=int, default=0, help='seed of weights, configurations and order (default: 0)')
    args = p.parse_args(argv)
    available = cases(args.quick)
    keys = ['tiny'] if args.quick else ['default', 'a0_224']
    if args.models:
        keys = [k.strip() for k in args.models.split(',') if k.strip()]
    bad = [k for k in keys if k not in available]
    if bad or not keys:
        raise ConfigError(f'--models {args.models!r}: valid choices are {", ".join(available)}')
    configs = args.configs or (3 if args.quick else 12)
    rounds = args.rounds or (2 if args.quick else 8)
    machine = common.machine_info()
    results = {k: run_case(available[k], configs, rounds, args.burst, args.seed) for k in keys}
    tables, headline = [], []
    for r in results.values():
        flag = ' (LOADED MACHINE: effects below are not properties)' if r['loaded'] else ''
        tables.append(common.table(f'{r["label"]}: chain-LUT bias ablation, {r["configurations"]} configurations x '
                                   f'{r["rounds"]} rounds, load average {r["load_average_before"]} -> '
                                   f'{r["load_average_after"]}{flag}', COLUMNS, r['rows']))
        headline.append([f'{r["label"]}: chain LUT sum vs whole configuration, medians (ablation, load '
                         f'{common.fmt((r["load_average_before"] or [None])[0])})', r['rows'][0][3], '%'])
        headline.append([f'{r["label"]}: chain LUT sum vs whole configuration, minima (ablation)', r['rows'][0][4],
                         '%'])
    path = common.write_result(args.out_dir, NAME, {'models': results}, machine, args.quick, headline, tables, argv)
    common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
