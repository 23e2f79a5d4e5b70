"""Timing of RepVGG blocks, layouts, the head and whole configurations on a torch device
(docs/design.md#lut-measurement).

DEVICE-SIDE module: the Jetson's client_worker imports it.  Python 3.6 + torch 1.10 + numpy, no dataclasses,
no torchvision, prints nothing; tqdm is used for progress only when importable.  Every function returns
plain dicts / lists (JSON-able).

What is timed is what the device runs: `hyper_repvgg.deploy_block(block, gamma)` (the precomputed kernels of
layout gamma) on an input of the block's true shape, the blocks built with random weights and random
BatchNorm statistics (the timing does not depend on the values).  A layout is measured for a block when its
branch set is a subset of the block's branches (blocks without identity: layouts 0, 1, 3, 4); the others are
absent from the result, never zero.
"""
import datetime
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence  # noqa: F401 - used in type comments

import torch
import torch.nn as nn

from hyper_repvgg import HyperRepVGG, HyperRepVGGBlock  # noqa: F401 - used in type comments
import nets
from hyper_repvgg import LAYOUTS, SplitPart, apply_config, deploy_block, deploy_part
from timing.flops import block_input_hw, measurable_layouts, out_hw

MIN_TIMED_RUNS = 3  # a time budget never cuts an entry below this many timed runs
TIMING_METHODS = ('fit', 'chain', 'isolated')
CLOCKS = ('wall', 'thread')


def clock_fn(clock='wall'):
    # type: (str) -> Callable[[], float]
    """The timer of `clock`, in seconds: 'wall' = time.perf_counter (what throughput is made of); 'thread' = this
    thread's CPU time (CLOCK_THREAD_CPUTIME_ID: time the thread was descheduled by other work is not counted;
    meaningful for CPU timing with one torch thread only, since torch's worker threads are not counted)."""
    if clock == 'wall':
        return time.perf_counter
    if clock == 'thread':
        if not (hasattr(time, 'clock_gettime') and hasattr(time, 'CLOCK_THREAD_CPUTIME_ID')):
            raise ValueError("clock 'thread' needs time.clock_gettime(CLOCK_THREAD_CPUTIME_ID) (POSIX)")
        cid = time.CLOCK_THREAD_CPUTIME_ID
        return lambda: time.clock_gettime(cid)
    raise ValueError('clock must be one of {}, got {!r}'.format(', '.join(CLOCKS), clock))


def machine_state():
    # type: () -> Dict[str, object]
    """What makes timings noisy, now: 1/5/15-minute load average and per-CPU frequency (kHz) and governor from
    /sys/devices/system/cpu/cpu*/cpufreq (None where absent, e.g. in most VMs), with a timestamp."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    freqs, governors = [], set()
    base = Path('/sys/devices/system/cpu')
    for d in sorted(base.glob('cpu[0-9]*/cpufreq')) if base.is_dir() else []:
        try:
            freqs.append(int((d / 'scaling_cur_freq').read_text().strip()))
            governors.add((d / 'scaling_governor').read_text().strip())
        except (OSError, ValueError):
            continue
    cpufreq = None
    if freqs:
        s = sorted(freqs)
        cpufreq = {'cpus': len(s), 'cur_khz_min': s[0], 'cur_khz_median': s[len(s) // 2], 'cur_khz_max': s[-1],
                   'governors': sorted(governors)}
    return {'load_average': load, 'cpufreq': cpufreq, 'timestamp': _now_iso()}


def _now_iso():
    # type: () -> str
    return datetime.datetime.utcnow().replace(microsecond=0).isoformat() + 'Z'


def _percentile(sorted_values, q):
    # type: (Sequence[float], float) -> float
    """Linear-interpolated percentile (0..100) of an already sorted list."""
    if not sorted_values:
        raise ValueError('no values')
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(samples_ms):
    # type: (Sequence[float]) -> Dict[str, object]
    """{'median_ms', 'p10_ms', 'p90_ms', 'mean_ms', 'min_ms', 'n'} of a list of times in ms."""
    s = sorted(float(v) for v in samples_ms)
    return {'median_ms': _percentile(s, 50), 'p10_ms': _percentile(s, 10), 'p90_ms': _percentile(s, 90),
            'mean_ms': sum(s) / len(s), 'min_ms': s[0], 'n': len(s)}


def _sync(device):
    # type: (torch.device) -> None
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_callable(fn, device, warmup=5, repeats=20, max_time_s=0.0, min_sample_ms=0.2, clock='wall'):
    # type: (Callable[[], object], torch.device, int, int, float, float, str) -> Dict[str, object]
    """Median / p10 / p90 of the time of one call of `fn` in ms, after `warmup` untimed calls.

    Calls shorter than `min_sample_ms` are repeated `inner` times per timed sample (the sample is the mean
    over them), so that timer resolution does not dominate.  GPU work is synchronized before and after every
    sample.  `max_time_s` > 0 stops repeating once that much time is spent (at least MIN_TIMED_RUNS samples).
    `clock`: see clock_fn.
    """
    device = torch.device(device)
    tick = clock_fn(clock)
    with torch.no_grad():
        for _ in range(max(0, int(warmup))):
            fn()
        _sync(device)
        t0 = tick()
        fn()
        _sync(device)
        once = tick() - t0
        inner = max(1, int(math.ceil(min_sample_ms / 1e3 / max(once, 1e-9)))) if min_sample_ms > 0 else 1
        samples = []
        start = time.perf_counter()
        for _ in range(max(1, int(repeats))):
            _sync(device)
            t0 = tick()
            for _ in range(inner):
                fn()
            _sync(device)
            samples.append((tick() - t0) * 1e3 / inner)
            if max_time_s > 0 and len(samples) >= MIN_TIMED_RUNS and time.perf_counter() - start > max_time_s:
                break
    out = summarize_ms(samples)
    out['inner'] = inner
    return out


def randomize_bn_(module, generator):
    # type: (nn.Module, torch.Generator) -> nn.Module
    """Random BatchNorm statistics and affine parameters (as RepVGG's verify.py does), in place."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
    return module


def random_model(arch, seed=0):
    # type: (Dict[str, object], int) -> HyperRepVGG
    """The network of spec `arch` (nets.build_model: a HyperRepVGG or a plain ChainNet) with random weights and BN
    stats, eval."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = nets.build_model(arch)
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 1)
    return randomize_bn_(model, gen).eval()


def deployed_layout(block, gamma):
    # type: (HyperRepVGGBlock, int) -> nn.Module
    """deploy_block of `block` with its kept set made equal to layout gamma's branches (block left unchanged)."""
    return deploy_block(block, gamma, LAYOUTS[gamma].branches)


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _fallback_layout(spec, gamma):
    # type: (object, int) -> int
    """gamma where the block can run it, else the block's deploy form (13, or 4 without identity)."""
    if gamma in measurable_layouts(spec):
        return gamma
    return measurable_layouts(spec)[0] if getattr(spec, 'plain', False) else (13 if spec.has_identity else 4)


def plan_layouts(plan):
    # type: (Sequence[object]) -> List[int]
    """The layouts some block of `plan` can run (all 14 for RepVGG; [0] for a plain network)."""
    return [lay.gamma for lay in LAYOUTS if any(lay.gamma in measurable_layouts(s) for s in plan)]


def _time_chain(modules, x, device, warmup, repeats, budget_s, clock='wall'):
    # type: (Sequence[nn.Module], torch.Tensor, torch.device, int, int, float, str) -> List[List[float]]
    """Run modules[0] .. modules[-1] as one forward pass, `repeats` times after `warmup` passes, timing every
    module inside the pass (device synchronized around each).  Returns per-module lists of times in ms."""
    tick = clock_fn(clock)
    samples = [[] for _ in modules]
    with torch.no_grad():
        for _ in range(max(0, int(warmup))):
            y = x
            for m in modules:
                y = m(y)
        _sync(device)
        start = time.perf_counter()
        for r in range(max(1, int(repeats))):
            y = x
            for i, m in enumerate(modules):
                _sync(device)
                t0 = tick()
                y = m(y)
                _sync(device)
                samples[i].append((tick() - t0) * 1e3)
            if budget_s > 0 and r + 1 >= MIN_TIMED_RUNS and time.perf_counter() - start > budget_s:
                break
    return samples


def _deploy_getter(model, device, keep):
    # type: (HyperRepVGG, torch.device, bool) -> Callable[[int, int], nn.Module]
    """get(k, gamma): block k deployed in layout gamma on `device`; kept for reuse when `keep` (the fit reuses
    every entry: memory = the weights of all block x layout entries, e.g. 0.23 GB for A0, 4 GB for B3)."""
    cache = {}  # type: Dict[tuple, nn.Module]

    def get(k, gamma):
        key = (int(k), int(gamma))
        m = cache.get(key)
        if m is None:
            m = deployed_layout(model.blocks[key[0]], key[1]).to(device).eval()
            if keep:
                cache[key] = m
        return m
    return get


def _part_input(plan, input_size, lam, batch, gen, device):
    # type: (list, int, int, int, torch.Generator, torch.device) -> torch.Tensor
    """A random input of the part that starts at block lam (the image for lam = 0; the timing does not depend
    on the values)."""
    if lam == 0:
        return torch.randn(int(batch), 3, int(input_size), int(input_size), generator=gen).to(device)
    hw = block_input_hw(plan, input_size)
    if lam < len(plan):
        return torch.randn(int(batch), plan[lam].in_channels, hw[lam][0], hw[lam][1], generator=gen).to(device)
    ho, wo = out_hw(plan[-1], hw[-1])
    return torch.randn(int(batch), plan[-1].out_channels, ho, wo, generator=gen).to(device)


def _time_parts(parts, device, rounds, burst, warmup, seed, clock='wall', budget_s=0.0, bar=None):
    # type: (Sequence[tuple], torch.device, int, int, int, int, str, float, object) -> List[List[List[float]]]
    """Time callables in interleaved rounds: parts[i] = (fn, x).  Every round visits each part once, in an order
    shuffled by random.Random(seed) (so that drift and load hit all parts alike): `warmup` untimed calls, then
    `burst` timed calls.  `budget_s` > 0 stops after the first round that ends past it.  Returns
    samples[i][round] = the burst's times in ms."""
    rnd = random.Random(int(seed))
    tick = clock_fn(clock)
    samples = [[] for _ in parts]  # type: List[List[List[float]]]
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(max(1, int(rounds))):
            order = list(range(len(parts)))
            rnd.shuffle(order)
            for i in order:
                fn, x = parts[i]
                for _ in range(max(0, int(warmup))):
                    fn(x)
                got = []
                for _ in range(max(1, int(burst))):
                    _sync(device)
                    t0 = tick()
                    fn(x)
                    _sync(device)
                    got.append((tick() - t0) * 1e3)
                samples[i].append(got)
            if bar is not None:
                bar.update(1)
            if budget_s > 0 and time.perf_counter() - start > budget_s:
                break
    return samples


def _median(values):
    # type: (Sequence[float]) -> float
    return _percentile(sorted(values), 50)


def pass_to_pass_pct(first, second):
    # type: (Sequence[float], Sequence[float]) -> Optional[float]
    """The noise floor: median over items of |first - second| / second, in % (how well one pass of a
    measurement predicts another); None without items."""
    d = [100.0 * abs(a - b) / b for a, b in zip(first, second) if b > 0]
    return _median(d) if d else None


def _nnls(h, g, tol=1e-10, max_iter=None):
    # type: (object, object, float, Optional[int]) -> object
    """argmin_z 0.5 z'Hz - g'z subject to z >= 0 (Lawson-Hanson active set on the normal equations; H positive
    definite).  numpy only (the device has no scipy)."""
    import numpy as np
    n = len(g)
    z = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    eps = tol * max(1.0, float(np.abs(g).max()))
    for _ in range(max_iter or 3 * n + 10):
        w = g - h.dot(z)
        if passive.all() or w[~passive].max() <= eps:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            idx = np.flatnonzero(passive)
            s = np.zeros(n)
            s[idx] = np.linalg.solve(h[np.ix_(idx, idx)], g[idx])
            if s[idx].min() > 0:
                z = s
                break
            neg = idx[s[idx] <= 0]
            alpha = float(np.min(z[neg] / (z[neg] - s[neg])))
            z = z + alpha * (s - z)
            passive &= z > eps
            z[~passive] = 0.0
            if not passive.any():
                break
    return z


def fit_entry_costs(rows, times_ms, num_cols, prior_ms=None, prior_rel=0.25, noise_rel=0.02, lower_ms=None,
                    huber_k=2.0, iterations=3):
    # type: (Sequence[Sequence[int]], Sequence[float], int, Optional[Sequence[float]], float, float, Optional[Sequence[float]], float, int) -> tuple
    """Per-entry marginal costs c (ms) from timings of whole parts: t_i ~ sum of c_j over j in rows[i].

    Least squares in relative terms (row i has standard deviation noise_rel * t_i), robust (Huber: rows whose
    residual exceeds huber_k standard deviations are down-weighted, `iterations` reweightings), subject to
    c >= lower_ms (default 0; Lawson-Hanson).  With `prior_ms` (e.g. chain timings) each entry also has a
    Gaussian prior c_j ~ s * prior_j with standard deviation prior_rel * max(s * prior_j, median(s * prior)),
    s = median(t_i / prior sum of row i): entries the timings determine follow the timings, the others keep
    their prior's shape at the timings' scale.  Without a prior a tiny ridge only keeps the system solvable.
    Returns (costs, info) with info = {'scale', 'noise_rel', 'prior_rel', 'rows', 'cols', 'at_lower',
    'residual_median_abs_pct', 'down_weighted'}.
    """
    import numpy as np
    t = np.asarray(times_ms, dtype=float)
    if len(rows) != t.size or t.size == 0 or not np.all(t > 0):
        raise ValueError('fit_entry_costs: need one positive time per row, got {} rows and {} times'.format(
            len(rows), t.size))
    a = np.zeros((t.size, int(num_cols)))
    for i, r in enumerate(rows):
        for j in r:
            a[i, int(j)] += 1.0
    lower = np.zeros(int(num_cols)) if lower_ms is None else np.asarray(lower_ms, dtype=float)
    noise_rel = max(float(noise_rel), 1e-4)
    if prior_ms is not None:
        p = np.asarray(prior_ms, dtype=float)
        ap = a.dot(p)
        scale = float(np.median(t[ap > 0] / ap[ap > 0])) if np.any(ap > 0) else 1.0
        target = scale * p
        sd = prior_rel * np.maximum(target, float(np.median(target)))
    else:
        scale, target = None, np.zeros(int(num_cols))
        sd = np.full(int(num_cols), 1e6 * max(1.0, float(t.max())))
    w = 1.0 / (noise_rel * t)
    hub = np.ones(t.size)
    c = lower.copy()
    for _ in range(max(0, int(iterations)) + 1):
        ww = w * np.sqrt(hub)
        aw = a * ww[:, None]
        h = aw.T.dot(aw) + np.diag(1.0 / sd ** 2)
        g = aw.T.dot(ww * (t - a.dot(lower))) + (target - lower) / sd ** 2
        c = lower + _nnls(h, g)
        r = np.abs(a.dot(c) - t) * w
        hub = np.minimum(1.0, huber_k / np.maximum(r, 1e-12))
    rel = 100.0 * np.abs(a.dot(c) - t) / t
    info = {'scale': scale, 'noise_rel': noise_rel, 'prior_rel': prior_rel if prior_ms is not None else None,
            'rows': int(t.size), 'cols': int(num_cols), 'at_lower': int(np.sum(c <= lower + 1e-12)),
            'residual_median_abs_pct': float(np.median(rel)), 'down_weighted': int(np.sum(hub < 1.0))}
    return [float(v) for v in c], info


DEPLOY_HEAVY_EVERY = 3  # every third configuration of a fit or validation sample is deploy-heavy (sample_configuration)


def sample_configuration(plan, rnd, deploy_heavy=False):
    # type: (list, random.Random, bool) -> Dict[str, object]
    """One random configuration: a measurable layout per block and a split, uniform.  `deploy_heavy`: each block
    takes its deploy form (_fallback_layout(., 13): one fused kernel, the layout the optimizer picks for most
    blocks) with a probability drawn from [0.5, 1], else a uniform layout.  Why: fitted on uniform configurations
    alone (a deploy form in 1 of 14 blocks), the LUT over-predicted the server part of all-deploy configurations by
    +7.5 % (median of six splits, 2026-12-08 00:41) while uniform ones were within +0.2 %: the decisions live where
    the sample was thin (docs/design.md "Measurement protocol")."""
    p = rnd.uniform(0.5, 1.0) if deploy_heavy else 0.0
    gammas = [_fallback_layout(s, 13) if p > 0 and rnd.random() < p else rnd.choice(measurable_layouts(s))
              for s in plan]
    return {'gammas': gammas, 'lam': rnd.randint(0, len(plan))}


def random_fit_configurations(plan, count, seed):
    # type: (list, int, int) -> List[Dict[str, object]]
    """`count` random configurations for the fit (sample_configuration), every DEPLOY_HEAVY_EVERY-th deploy-heavy."""
    rnd = random.Random(int(seed))
    return [sample_configuration(plan, rnd, i % DEPLOY_HEAVY_EVERY == DEPLOY_HEAVY_EVERY - 1)
            for i in range(int(count))]


def _config_parts(plan, get, head, gammas, lam):
    # type: (list, Callable[[int, int], nn.Module], tuple, Sequence[int], int) -> tuple
    """(edge part or None, server part) of a configuration, as deployed (SplitPart of DeployedBlocks)."""
    n = len(plan)
    edge = SplitPart([get(k, gammas[k]) for k in range(lam)], None).eval() if lam > 0 else None
    server = SplitPart([get(k, gammas[k]) for k in range(lam, n)], head).eval()
    return edge, server


def _fit_batch(model, plan, input_size, batch, device, get, head_part, prior, prior_head, configurations, rounds,
               burst, seed, clock, budget_s, bar, holdout=(), holdout_visits=2, passes=2):
    # type: (...) -> tuple
    """Time the parts of random configurations at one batch size and fit the entries (see measure_blocks).  The
    parts of the `holdout` configurations are timed in the same rounds, `holdout_visits` times per round, and left
    out of the fit; their results (configuration_results, `passes` passes) come last in the returned tuple."""
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 5)
    inputs = [_part_input(plan, input_size, lam, batch, gen, device) for lam in range(len(plan) + 1)]
    head = (head_part.gap, head_part.linear)
    confs = random_fit_configurations(plan, configurations, int(seed) + 11 + int(batch))
    parts = []
    for c in confs:
        edge, server = _config_parts(plan, get, head, c['gammas'], c['lam'])
        if edge is not None:
            parts.append((edge, inputs[0]))
        parts.append((server, inputs[c['lam']]))
    n_fit = len(parts)
    held, owner = _configuration_parts(plan, get, head, holdout, lambda lam: inputs[lam])
    visits = max(1, int(holdout_visits))
    for part in held:
        parts.extend([part] * visits)
    samples = _time_parts(parts, device, rounds, burst, 1, int(seed) + 13 + int(batch), clock, budget_s, bar)
    held_samples = [_visits_in_order(samples[n_fit + i * visits:n_fit + (i + 1) * visits]) for i in range(len(held))]
    held_results = configuration_results(holdout, owner, held_samples, passes) if holdout else []
    samples = samples[:n_fit]
    times = [_median([v for r in s for v in r]) for s in samples]
    done = min(len(s) for s in samples)
    halves = [split_passes(s[:done], 2) for s in samples]
    noise = pass_to_pass_pct([_median(h[0]) for h in halves], [_median(h[1]) for h in halves]) \
        if done >= 2 else None
    costs, head_cost, counts, head_count, info = fit_part_costs(plan, confs, times, prior, prior_head,
                                                                max(0.005, (noise or 2.0) / 100.0))
    info.update({'configurations': len(confs), 'parts': n_fit, 'rounds': done, 'burst': int(burst),
                 'pass_to_pass_pct': noise, 'batch': int(batch)})
    if holdout:
        info.update({'holdout_configurations': len(holdout), 'holdout_parts': len(held),
                     'holdout_visits_per_round': visits})
    return costs, head_cost, counts, head_count, info, confs, held_results


def fit_part_costs(plan, confs, times_ms, prior, prior_head, noise_rel, edge_offsets=True):
    # type: (list, Sequence[Dict[str, object]], Sequence[float], Dict[tuple, float], float, float, bool) -> tuple
    """The fit of measure_blocks from the parts of configurations `confs` (each cut into its edge part, when
    lam > 0, then its server part: times_ms in that order, ms): the entries {(block, gamma): marginal cost in a
    server part}, the head's cost (with the server part's per-call overhead), the parts that include each, and
    info (fit_entry_costs' plus 'edge_part_offset_ms': block k's extra cost in an edge part, and
    'edge_part_offset_parts': the edge parts that include block k).  `prior` {(block, gamma): ms} and `prior_head`
    (chain timings) shape what the timings leave undetermined; the offsets' prior is 0, their floor minus half the
    block's cheapest prior (an edge-part cost stays positive).  `edge_offsets` False: without them (step 1's fit
    before bench/bench_lut_terms.py measured what they buy; info then has no offsets)."""
    n = len(plan) if edge_offsets else 0
    cols = [(s.index, g) for s in plan for g in measurable_layouts(s)]
    col = {key: j for j, key in enumerate(cols)}
    head_col = len(cols)
    off_col = head_col + 1  # off_col + k: block k's edge-part offset
    rows = []
    for c in confs:
        g, lam = c['gammas'], int(c['lam'])
        if lam > 0:
            rows.append([col[(k, g[k])] for k in range(lam)] + [off_col + k for k in range(lam) if k < n])
        rows.append([col[(k, g[k])] for k in range(lam, len(plan))] + [head_col])
    prior_vec = [prior[key] for key in cols] + [prior_head] + [0.0] * n
    cheapest = [min(prior[(k, g)] for g in measurable_layouts(plan[k])) for k in range(n)]
    lower = [0.1 * v for v in prior_vec[:len(cols)]] + [0.0] + [-0.5 * v for v in cheapest]
    costs, info = fit_entry_costs(rows, times_ms, len(cols) + 1 + n, prior_vec, noise_rel=noise_rel,
                                  lower_ms=lower)
    counts = [0] * (len(cols) + 1 + n)
    for r in rows:
        for j in r:
            counts[j] += 1
    if edge_offsets:
        info.update({'edge_part_offset_ms': [float(v) for v in costs[off_col:off_col + n]],
                     'edge_part_offset_parts': counts[off_col:off_col + n]})
    return dict(zip(cols, costs)), costs[head_col], dict(zip(cols, counts)), counts[head_col], info


def _chain_batch(plan, x, device, get, head_part, warmup, repeats, max_entry_s, clock, bar):
    # type: (Sequence[object], torch.Tensor, torch.device, Callable, nn.Module, int, int, float, str, object) -> tuple
    """Chain timings at one batch size (see measure_blocks): one whole pass per layout gamma, every block timed
    inside it.  Returns ({(block, gamma): summary}, head summary over all passes)."""
    chain, head_samples = {}, []
    for gamma in plan_layouts(plan):
        lay = LAYOUTS[gamma]
        recorded = [s.index for s in plan if lay.gamma in measurable_layouts(s)]
        modules = [get(s.index, _fallback_layout(s, lay.gamma)) for s in plan] + [head_part]
        samples = _time_chain(modules, x, device, warmup, repeats, max_entry_s * len(recorded), clock)
        for k in recorded:
            chain[(k, lay.gamma)] = summarize_ms(samples[k])
        head_samples.extend(samples[-1])
        if bar is not None:
            bar.update(1)
    return chain, summarize_ms(head_samples)


def _isolated_batch(model, in_hw, batch, gen, device, head_part, warmup, repeats, max_entry_s, clock, bar):
    # type: (HyperRepVGG, Sequence[object], int, torch.Generator, torch.device, nn.Module, int, int, float, str, object) -> tuple
    """Isolated timings at one batch size (see measure_blocks): each block x measurable layout alone in a loop
    on a random input from `gen`, then the head.  Returns (entry rows, head row)."""
    plan = model.plan
    entries = []
    for spec, block, hw in zip(plan, model.blocks, in_hw):
        xb = torch.randn(int(batch), spec.in_channels, hw[0], hw[1], generator=gen).to(device)
        for gamma in measurable_layouts(spec):
            deployed = deployed_layout(block, gamma).to(device).eval()
            stats = time_callable(lambda d=deployed, v=xb: d(v), device, warmup, repeats, max_entry_s,
                                  clock=clock)
            row = {'block': spec.index, 'layout': gamma, 'batch': int(batch)}
            row.update(stats)
            entries.append(row)
            if bar is not None:
                bar.update(1)
    last = plan[-1]
    ho, wo = out_hw(last, in_hw[-1])
    h = torch.randn(int(batch), last.out_channels, ho, wo, generator=gen).to(device)
    stats = time_callable(lambda p=head_part, v=h: p(v), device, warmup, repeats, max_entry_s, clock=clock)
    head_row = {'batch': int(batch)}
    head_row.update(stats)
    if bar is not None:
        bar.update(1)
    return entries, head_row


def measure_blocks(arch, input_size, batch_sizes=(1,), device='cpu', warmup=5, repeats=20, max_entry_s=0.0,
                   seed=0, progress=False, timing='fit', clock='wall', fit_configurations=0, fit_rounds=10,
                   fit_burst=2, holdout=(), holdout_visits=2):
    # type: (Dict[str, object], int, Sequence[int], str, int, int, float, int, bool, str, str, int, int, int, Sequence[Dict[str, object]], int) -> Dict[str, object]
    """Time every block x measurable layout x batch size, and the head (pooling + classifier) per batch size.

    timing='fit' (default): each entry is its MARGINAL cost in a deployed part.  Random configurations (a
    measurable layout per block and a split; `fit_configurations`, 0 = twice as many as there are entries) are cut
    into their edge part (blocks [0, lam)) and server part (blocks [lam, N) + head), each part runs as deployed
    (hyper_repvgg.SplitPart of DeployedBlocks, no timer inside) in `fit_rounds` interleaved rounds of one
    untimed and `fit_burst` timed calls, and the entries are fitted to the parts' median times by robust
    non-negative least squares (fit_entry_costs) with the chain timings as prior.  The entries are the
    blocks' marginal costs in a server part (its per-call overhead lands in the head); each block also gets an
    edge-part offset (fit info 'edge_part_offset_ms', one per block, >= -half its cheapest chain time), its extra
    cost in an edge part: the edge part's own per-call overhead, and what cutting the network at lam costs the
    part that ends there (a per-split term, telescoped into per-block offsets; docs/design.md "Measurement
    protocol").  A LUT sum predicts a part: the entries for a server part, entries + offsets for an edge part.
    Budget: max_entry_s x
    entries for the rounds (>= 1 round).  timing='chain': for each layout gamma, a whole forward pass runs
    with every block in gamma (blocks that cannot run gamma use their deploy form and are not recorded) and
    each block is timed inside the pass.  timing='isolated': each block runs alone in a loop on its input.
    `clock`: 'wall' or 'thread' (clock_fn).
    `holdout` (fit only): whole configurations ({'gammas', 'lam'}) the fit never sees, their parts timed in the
    fit's own rounds, `holdout_visits` times per round at shuffled positions (measure_configurations' records,
    two passes = alternate visits): the LUT's validation in its own time window, so that the machine's drift
    between windows cannot pass for an error of the LUT (docs/design.md "Measurement protocol").
    Returns {'entries': [{'block', 'layout', 'batch', 'median_ms', 'p10_ms', 'p90_ms', 'mean_ms', 'n', ...}],
    'head': [{'batch', 'median_ms', ...}], 'fit': {batch: info} (fit only), 'holdout': {batch: [record]} (fit
    with holdout only)}.
    """
    if timing not in TIMING_METHODS:
        raise ValueError('timing must be one of {}, got {!r}'.format(', '.join(TIMING_METHODS), timing))
    clock_fn(clock)
    device = torch.device(device)
    model = random_model(arch, seed)
    plan = model.plan
    in_hw = block_input_hw(plan, input_size)
    entries, head = [], []
    fits, held_out = {}, {}
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 2)
    n_entries = sum(len(measurable_layouts(s)) for s in plan)
    if timing == 'isolated':
        total = len(batch_sizes) * (n_entries + 1)
    else:
        total = len(batch_sizes) * (len(plan_layouts(plan)) + (int(fit_rounds) if timing == 'fit' else 0))
    get = _deploy_getter(model, device, keep=timing == 'fit')
    bar = _progress(total, progress, 'LUT {} ({})'.format(device, timing))
    try:
        for batch in batch_sizes:
            x = torch.randn(int(batch), 3, int(input_size), int(input_size), generator=gen).to(device)
            head_part = SplitPart([], (model.gap, model.linear)).to(device).eval()
            if timing == 'isolated':
                rows, head_row = _isolated_batch(model, in_hw, batch, gen, device, head_part, warmup, repeats,
                                                 max_entry_s, clock, bar)
                entries.extend(rows)
                head.append(head_row)
                continue
            chain, head_chain = _chain_batch(plan, x, device, get, head_part, warmup, repeats, max_entry_s, clock,
                                             bar)
            if timing == 'chain':
                for (k, g), st in chain.items():
                    row = {'block': k, 'layout': g, 'batch': int(batch)}
                    row.update(st)
                    entries.append(row)
                head.append(dict(head_chain, batch=int(batch)))
                continue
            prior = {key: st['median_ms'] for key, st in chain.items()}
            costs, head_cost, counts, head_count, info, confs, held = _fit_batch(
                model, plan, input_size, batch, device, get, head_part, prior, head_chain['median_ms'],
                int(fit_configurations) or 2 * n_entries, fit_rounds, fit_burst, seed, clock,
                max_entry_s * n_entries, bar, holdout, holdout_visits)
            if holdout:
                held_out[str(int(batch))] = held
            for key, st in chain.items():
                entries.append(_fitted_row(st, costs[key], counts[key], block=key[0], layout=key[1],
                                           batch=int(batch)))
            head.append(_fitted_row(head_chain, head_cost, head_count, batch=int(batch)))
            info['configurations_used'] = confs
            fits[str(int(batch))] = info
    finally:
        if bar is not None:
            bar.close()
    entries.sort(key=lambda e: (e['batch'], e['block'], e['layout']))
    out = {'entries': entries, 'head': head}
    if timing == 'fit':
        out['fit'] = fits
        if holdout:
            out['holdout'] = held_out
    return out


def _fitted_row(chain_stats, cost, count, **ids):
    # type: (Dict[str, object], float, int, **object) -> Dict[str, object]
    """An entry of the fit: median_ms = the fitted marginal cost; p10/p90/mean/min = the chain timing's spread
    scaled to it; n = the timed parts that include the entry; prior_ms = the chain median it started from."""
    med = float(chain_stats['median_ms'])
    f = cost / med if med > 0 else 1.0
    row = dict(ids)
    row.update({'median_ms': cost, 'p10_ms': f * chain_stats['p10_ms'], 'p90_ms': f * chain_stats['p90_ms'],
                'mean_ms': f * chain_stats['mean_ms'], 'min_ms': f * chain_stats['min_ms'], 'n': int(count),
                'prior_ms': med, 'chain_n': int(chain_stats['n'])})
    return row


def deploy_configuration(model, gammas, lam):
    # type: (HyperRepVGG, Sequence[int], int) -> tuple
    """(edge, server) deployed parts of `model` with block k's kept set = layout gammas[k]'s branches, split lam."""
    apply_config(model, gammas)
    edge, server = model.split(int(lam))
    return deploy_part(edge), deploy_part(server)


def interleaved_rounds(rounds, passes):
    # type: (int, int) -> int
    """`rounds` rounded up to a positive multiple of `passes` (every interleaved pass gets as many rounds)."""
    passes = max(1, int(passes))
    return int(math.ceil(max(1, int(rounds)) / float(passes))) * passes


def split_passes(rounds_samples, passes):
    # type: (Sequence[Sequence[float]], int) -> List[List[float]]
    """Interleaved passes of one part's samples[round] (from _time_parts): pass p holds the rounds r with
    r % passes == p, so that every pass spans the whole measurement and drift hits all passes alike."""
    return [[v for r, burst in enumerate(rounds_samples) if r % int(passes) == p for v in burst]
            for p in range(int(passes))]


def measure_configurations(model, input_size, configs, batch=1, device='cpu', warmup=1, rounds=20, passes=2,
                           seed=0, clock='wall', progress=False, burst=2, sides=('edge', 'server')):
    # type: (HyperRepVGG, int, Sequence[Dict[str, object]], int, str, int, int, int, int, str, bool, int, Sequence[str]) -> List[Dict[str, object]]
    """Measure whole configurations end to end on this device, as deployed: for each configuration
    {'gammas': layout per block (its kept branches are the layout's), 'lam': split}, its edge part (blocks
    [0, lam), none when lam = 0) and its server part (blocks [lam, N) + head) each run as one
    hyper_repvgg.SplitPart of DeployedBlocks with no timer inside; `sides` = the parts to time.

    Fine-grained interleaving (the machine's speed drifts in episodes of ~0.5 s, docs/design.md "Measurement
    protocol"): `rounds` rounds (rounded up to a multiple of `passes`), each visiting every part once in an order
    shuffled with `seed`, `warmup` untimed calls then `burst` timed calls per visit; pass p = the rounds
    r with r % passes == p (split_passes), so two passes are two samples of the same stretch of time and their
    disagreement (pass_to_pass_pct) is the measurement's own noise, not drift.  Nothing of `model` is changed.

    Returns one dict per configuration, in order: {'gammas', 'lam', 'edge': stats or None, 'server': stats
    or None, 'total': stats of edge + server sample pairs, 'passes': [{'edge_ms', 'server_ms' (medians per pass),
    'total_ms' (their sum), 'edge' and 'server' stats per pass}], 'rounds' (visits per part), 'burst'}, stats =
    summarize_ms (median_ms, p10_ms, p90_ms, mean_ms, min_ms, n) in ms (a part not timed counts 0).
    """
    device = torch.device(device)
    plan = model.plan
    get = _deploy_getter(model, device, keep=True)
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 3)
    inputs = {}

    def part_input(start):
        if start not in inputs:
            inputs[start] = _part_input(plan, input_size, start, batch, gen, device)
        return inputs[start]
    parts, owner = _configuration_parts(plan, get, (model.gap, model.linear), configs, part_input, sides)
    rounds = interleaved_rounds(rounds, passes)
    bar = _progress(rounds, progress, 'configurations ({} x {} parts)'.format(len(configs), len(parts)))
    try:
        samples = _time_parts([(p.to(device), x) for p, x in parts], device, rounds, burst, warmup, seed, clock,
                              0.0, bar)
    finally:
        if bar is not None:
            bar.close()
    return configuration_results(configs, owner, samples, passes)


def _configuration_parts(plan, get, head, configs, part_input, sides=('edge', 'server')):
    # type: (list, Callable[[int, int], nn.Module], tuple, Sequence[Dict[str, object]], Callable[[int], torch.Tensor], Sequence[str]) -> tuple
    """The deployed parts to time for whole configurations (checked): ([(part, input)], [(configuration index,
    'edge' | 'server')]); `part_input(start)` gives the input of a part that starts at block `start`."""
    parts, owner = [], []
    for ci, c in enumerate(configs):
        gammas, lam = [int(g) for g in c['gammas']], int(c['lam'])
        if len(gammas) != len(plan) or not 0 <= lam <= len(plan):
            raise ValueError('configuration {}: need {} layouts and 0 <= lam <= {}, got {} layouts, lam {}'.format(
                ci, len(plan), len(plan), len(gammas), lam))
        for k, g in enumerate(gammas):
            if g not in measurable_layouts(plan[k]):
                raise ValueError('configuration {}: block {} cannot run layout {}'.format(ci, k, g))
        edge, server = _config_parts(plan, get, head, gammas, lam)
        for part, start, name in ((edge, 0, 'edge'), (server, lam, 'server')):
            if part is None or name not in sides:
                continue
            parts.append((part, part_input(start)))
            owner.append((ci, name))
    return parts, owner


def _visits_in_order(copies):
    # type: (Sequence[List[List[float]]]) -> List[List[float]]
    """One part timed as several copies per round (samples[copy][round]) as one list of visits, round by round."""
    rounds = min(len(c) for c in copies) if copies else 0
    return [c[r] for r in range(rounds) for c in copies]


def configuration_results(configs, owner, samples, passes):
    # type: (Sequence[Dict[str, object]], Sequence[tuple], Sequence[List[List[float]]], int) -> List[Dict[str, object]]
    """measure_configurations' records from the visits of each configuration part (samples[i][visit] = a burst's
    times in ms, owner[i] = (configuration index, 'edge' | 'server')): pass p = the visits v with v % passes == p.
    A pass's total_ms is the sum of its parts' medians, the quantity a LUT sum predicts (each entry a part's typical
    time); `total` is the distribution of per-visit sums (its spread; under right-skewed noise its median lies
    about 1 % above the sum of the medians, development measurement on the embedded default)."""
    got = [{'edge': None, 'server': None} for _ in configs]
    for (ci, name), s in zip(owner, samples):
        got[ci][name] = split_passes(s, passes)
    visits = min((len(s) for s in samples), default=0)
    burst = len(samples[0][0]) if samples and samples[0] else 0
    out = []
    for c, g in zip(configs, got):
        timed = [g[k] for k in ('edge', 'server') if g[k] is not None]
        per_pass = [[sum(vals) for vals in zip(*[part[p] for part in timed])] for p in range(int(passes))]
        flat = {k: [v for p in g[k] for v in p] if g[k] is not None else None for k in ('edge', 'server')}
        passes_out = []
        for p in range(int(passes)):
            parts = {k: _median(g[k][p]) if g[k] is not None else 0.0 for k in ('edge', 'server')}
            passes_out.append({'edge_ms': parts['edge'], 'server_ms': parts['server'],
                               'total_ms': parts['edge'] + parts['server'],
                               'edge': summarize_ms(g['edge'][p]) if g['edge'] is not None else None,
                               'server': summarize_ms(g['server'][p]) if g['server'] is not None else None})
        out.append({'gammas': [int(v) for v in c['gammas']], 'lam': int(c['lam']),
                    'edge': summarize_ms(flat['edge']) if flat['edge'] is not None else None,
                    'server': summarize_ms(flat['server']) if flat['server'] is not None else None,
                    'total': summarize_ms([v for p in per_pass for v in p]), 'passes': passes_out,
                    'rounds': visits, 'burst': burst})
    return out


def measure_configuration(model, input_size, gammas, lam, batch=1, device='cpu', warmup=1, rounds=20,
                          passes=2, seed=0, clock='wall'):
    # type: (HyperRepVGG, int, Sequence[int], int, int, str, int, int, int, int, str) -> Dict[str, object]
    """End-to-end time of ONE configuration on this device, as deployed (layout gammas[k] per block, its kept
    branches the layout's, split lam, batch): measure_configurations with a single configuration.  Returns
    {'edge': stats or None (lam = 0), 'server': stats, 'total': stats, 'passes': [...], 'gammas', 'lam'};
    stats = {'median_ms', 'p10_ms', 'p90_ms', 'mean_ms', 'min_ms', 'n'} in ms.  To compare several
    configurations (a choice and its baselines), time them together with measure_configurations: interleaved,
    drift and load hit them alike."""
    return measure_configurations(model, input_size, [{'gammas': gammas, 'lam': lam}], batch, device, warmup,
                                  rounds, passes, seed, clock)[0]


def roofline_microbenchmark(device='cpu', matmul_n=None, copy_mb=None, repeats=10):
    # type: (str, Optional[int], Optional[float], int) -> Dict[str, object]
    """This device's own peak FLOP/s (large fp32 matmul) and memory bandwidth (large copy): the roofline knee.

    Copy bandwidth counts read + write bytes; both use the fastest of the repeats.  Returns peak_flops_per_s, mem_bandwidth_bytes_per_s,
    knee_flop_per_byte and the sizes used; all measured.
    """
    device = torch.device(device)
    cuda = device.type == 'cuda'
    n = int(matmul_n or (4096 if cuda else 1024))
    mb = float(copy_mb or (512.0 if cuda else 128.0))
    gen = torch.Generator()
    gen.manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    c = torch.empty(n, n, device=device)
    mm = time_callable(lambda: torch.mm(a, b, out=c), device, warmup=2, repeats=repeats)
    elems = int(mb * 1e6 / 4)
    src = torch.ones(elems, device=device)
    dst = torch.empty(elems, device=device)
    cp = time_callable(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    peak = 2.0 * n ** 3 / (mm['min_ms'] / 1e3)  # a peak is the best run, not the typical one
    bw = 2.0 * elems * 4 / (cp['min_ms'] / 1e3)
    return {'peak_flops_per_s': peak, 'mem_bandwidth_bytes_per_s': bw, 'knee_flop_per_byte': peak / bw,
            'matmul_n': n, 'copy_mb': mb, 'matmul_ms': mm['min_ms'], 'copy_ms': cp['min_ms'],
            'source': 'measured'}


def _power_mode():
    # type: () -> Optional[str]
    """Jetson power mode: `nvpmodel -q` output, else the default line of /etc/nvpmodel.conf, else None."""
    exe = shutil.which('nvpmodel')
    if exe is not None:
        try:
            res = subprocess.run([exe, '-q'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True, timeout=10)
            text = ' | '.join(line.strip() for line in res.stdout.splitlines() if line.strip())
            if text:
                return text
        except (OSError, subprocess.SubprocessError):
            pass
    conf = Path('/etc/nvpmodel.conf')
    if conf.is_file():
        try:
            for line in conf.read_text().splitlines():
                if 'PM_CONFIG' in line:
                    return 'nvpmodel.conf: ' + line.strip()
        except (OSError, UnicodeDecodeError):
            pass
        return 'nvpmodel.conf present, mode unknown'
    return None


def cpu_name():
    # type: () -> str
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.lower().startswith(('model name', 'hardware')):
                return line.split(':', 1)[1].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return platform.processor() or platform.machine()


def device_metadata(device='cpu'):
    # type: (str) -> Dict[str, object]
    """Device name, torch / python versions, threads, timestamp, host and Jetson power mode (None elsewhere)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()
    return {'device': str(device), 'device_name': name, 'torch_version': torch.__version__,
            'python_version': platform.python_version(), 'threads': torch.get_num_threads(),
            'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'host': platform.node(),
            'timestamp': _now_iso(), 'power_mode': _power_mode()}


def set_threads(threads):
    # type: (int) -> int
    """torch.set_num_threads(threads) when threads > 0; returns the number of threads in use."""
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def measure_side(arch, input_size, batch_sizes=(1,), device='cpu', warmup=5, repeats=20, threads=0,
                 max_entry_s=0.0, seed=0, progress=False, microbenchmark=True, timing='fit', clock='wall',
                 fit_configurations=0, fit_rounds=10, fit_burst=2, holdout=(), holdout_visits=2):
    # type: (Dict[str, object], int, Sequence[int], str, int, int, int, float, int, bool, bool, str, str, int, int, int, Sequence[Dict[str, object]], int) -> Dict[str, object]
    """Everything one side contributes to the LUT, measured here: block entries, head, roofline, metadata (with
    machine_state() before and after the measurement), settings; with timing='fit' also `fit` (per batch) and,
    given `holdout` configurations, their timings in the fit's rounds (`holdout`, see measure_blocks)."""
    used = set_threads(threads)
    plan = nets.plan_of(arch)
    before = machine_state()
    result = measure_blocks(arch, input_size, batch_sizes, device, warmup, repeats, max_entry_s, seed, progress,
                            timing, clock, fit_configurations, fit_rounds, fit_burst, holdout, holdout_visits)
    after = machine_state()
    result['roofline'] = roofline_microbenchmark(device) if microbenchmark else None
    meta = device_metadata(device)
    meta['threads'] = used
    meta['machine_state_before'], meta['machine_state_after'] = before, after
    result['metadata'] = meta
    result['settings'] = {'warmup': int(warmup), 'repeats': int(repeats), 'max_entry_s': float(max_entry_s),
                          'batch_sizes': [int(b) for b in batch_sizes], 'input_size': int(input_size),
                          'num_blocks': len(plan), 'seed': int(seed), 'timing': timing, 'clock': clock}
    if timing == 'fit':
        result['settings'].update({'fit_configurations': int(fit_configurations), 'fit_rounds': int(fit_rounds),
                                   'fit_burst': int(fit_burst)})
        if holdout:
            result['settings']['holdout_visits'] = int(holdout_visits)
    return result
