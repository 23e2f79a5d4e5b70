"""Step 2: layouts and split of the unpruned model for pipelined throughput, from the LUT
(docs/design.md#step-2-solvers).

`solve_step2(tables, valid, ...)` runs the relaxed LUT gradient descent (optim/relax.py), the exact split scan
(optim/exact.py) and the plain-model baselines (optim/cost.py) on the same cost tables and returns the JSON-able
payload of `initial_throughput_config.json` (fields documented in docs/artifacts.md).  `link_for` and
`check_edge_profile` check the step's flags against the LUT; `random_tables` draws seeded random instances
for the tests and bench/bench_optimizer.py.  No I/O here: the LUT comes in as the dict timing.lut.load_lut returns.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from config import Config, LutConfig, OptimConfig
from hyper_repvgg import LAYOUTS, NUM_LAYOUTS
from optim import cost as C
from optim.exact import objective_choices, solve_exact
from timing.lut import LinkSpec, LutError, link_from_dict, resolve_link
from timing.profiles import get_profile
from optim.relax import solve_relaxed

BASELINES = ('edge_only', 'server_only', 'best_plain_split')
TABLE_ROWS = (('chosen', 'chosen (gradient descent + local search)'), ('exact', 'exact optimum'),
              ('edge_only', 'edge only'), ('server_only', 'server only'), ('best_plain_split', 'best plain split'),
              ('min_latency', 'min latency (exact)'), ('max_throughput', 'max throughput (exact)'))


def unpruned_valid(lut: Dict[str, Any]) -> np.ndarray:
    """(N, 14) bool: per block the layouts that run ALL of its branches (step 2 prunes nothing), from the LUT's
    block table (`blocks[k].available_layouts`, the measurable layouts of the model's structure)."""
    kept = []
    for row in lut['blocks']:
        kept.append(frozenset(b for g in row['available_layouts'] for b in LAYOUTS[int(g)].branches))
    return C.valid_mask(kept)


def link_for(lut: Dict[str, Any], lut_cfg: LutConfig, link_flag_given: bool) -> Tuple[LinkSpec, str]:
    """The link steps 2 and 3 evaluate the LUT under: the LUT's own (measured by step 1 in real mode, the preset
    step 1 used in pseudo mode) unless --link was given or the config names another preset than the default; an
    explicit bandwidth / RTT overrides either."""
    explicit = link_flag_given or lut_cfg.link != LutConfig().link
    link = resolve_link(lut_cfg, None if explicit else link_from_dict(lut['link'], 'LUT field "link"'))
    source = f'preset {lut_cfg.link} (--link)' if explicit else 'the LUT\'s link (step 1)'
    given = [f for f, v in (('--bandwidth_mbps', lut_cfg.bandwidth_mbps), ('--rtt_ms', lut_cfg.rtt_ms)) if v is not None]
    return link, source + (' with explicit ' + ', '.join(given) if given else '')


def edge_info(lut: Dict[str, Any]) -> Dict[str, Any]:
    """How the LUT's edge side was obtained: source, device profile name (modelled) and device name."""
    edge = lut['edge']
    return {'source': edge.get('source'), 'profile': (edge.get('profile') or {}).get('name'),
            'device_name': (edge.get('metadata') or {}).get('device_name')}


def requested_profile(flag_given: bool, cfg: Config) -> Optional[str]:
    """The edge device profile a step was asked for: lut.edge_profile when --edge_profile was given or a config
    file / --set changed it from its default; None when nothing was asked (the LUT's own edge side is used)."""
    if flag_given or cfg.lut.edge_profile != Config().lut.edge_profile:
        return cfg.lut.edge_profile
    return None


def check_edge_profile(lut: Dict[str, Any], requested: Optional[str], lut_file: str) -> None:
    """The one profile rule of steps 2 and 3.  Nothing requested (`requested_profile` is None): the LUT's edge side
    is used as it is, modelled or measured.  A requested profile must be the one the LUT's edge side was modelled
    from; a measured edge side refuses any profile.  LutError otherwise; an unknown name is a ProfileError."""
    if requested is None:
        return
    get_profile(requested)
    info = edge_info(lut)
    if info['source'] == 'modelled' and info['profile'] == requested:
        return
    if info['source'] == 'modelled':
        raise LutError(f'--edge_profile {requested}: the LUT {lut_file} models the edge device with profile '
                       f'{info["profile"]!r}; re-run step 1 with --edge_profile {requested} (pseudo mode) to get '
                       f'a LUT for it, or drop --edge_profile')
    raise LutError(f'--edge_profile {requested}: the edge side of the LUT {lut_file} was measured on '
                   f'{info["device_name"]!r}, not modelled from a device profile; drop --edge_profile, or '
                   f're-run step 1 in pseudo mode (without a measured lut_edge.json) to model {requested}')


def solve_step2(t: C.CostTables, valid: np.ndarray, opt: OptimConfig, seed: int) -> Dict[str, Any]:
    """Relaxed solver, exact optimum, gap, objective choices and plain baselines on `t`, as a JSON-able payload.

    Wall times go to the `wall_s` field only: the rest is identical for the same inputs and seed."""
    valid = C.check_valid(t, valid)
    r = solve_relaxed(t, valid, opt.objective, opt.omega, steps=opt.steps, restarts=opt.restarts, lr=opt.lr,
                      tau_start=opt.tau_start, tau_end=opt.step2_tau_end,
                      rng=np.random.default_rng(int(seed)))
    ex = solve_exact(t, valid, opt.objective, opt.omega)
    t0 = time.perf_counter()
    kept = [frozenset(b for g in np.flatnonzero(valid[k]) for b in LAYOUTS[g].branches) for k in range(len(valid))]
    baselines = C.plain_baselines(t, kept, opt.objective, opt.omega)
    choices = objective_choices(t, valid)
    t_base = time.perf_counter() - t0
    exact = dict(ex.stages, per_split_objective_ms=ex.per_split_objective_ms, status=ex.status,
                 evaluated=ex.evaluated)
    return {
        'objective': opt.objective, 'omega': float(opt.omega), 'batch_size': int(t.batch),
        'gammas': r.gammas, 'lam': r.lam, 'layouts': [LAYOUTS[g].description for g in r.gammas],
        'predicted': r.stages,
        'exact': exact,
        'gap_pct': C.gap_pct(r.objective_ms, ex.objective_ms),
        'throughput_gap_pct': 100.0 * (1.0 - r.stages['throughput_fps'] / ex.stages['throughput_fps']),
        'gradient_descent': {'gammas': r.gd_gammas, 'lam': r.gd_lam, 'objective_ms': r.gd_objective_ms,
                             'gap_pct': C.gap_pct(r.gd_objective_ms, ex.objective_ms),
                             'description': 'argmax of the best restart before the local search'},
        'baselines': baselines,
        'objective_choices': choices,
        'history': {'restarts': r.history, 'winning_restart': r.restart, 'status': r.status},
        'solver': {'method': 'relaxed LUT gradient descent (Adam, annealed softmaxes, restarts) + local search '
                             'under the exact cost; exact optimum by the split scan', 'steps': opt.steps,
                   'restarts': opt.restarts, 'lr': opt.lr, 'tau_start': opt.tau_start, 'tau_end': opt.step2_tau_end,
                   'seed': int(seed)},
        'wall_s': {'relaxed': r.wall_s, 'exact': ex.wall_s, 'baselines': t_base},
    }


def table_rows(payload: Dict[str, Any]) -> List[List[Any]]:
    """[configuration, lambda, edge ms, link ms, server ms, latency ms, throughput fps, bottleneck] rows."""
    src = dict(chosen=payload['predicted'], exact=payload['exact'], **payload['baselines'],
               **payload['objective_choices'])
    rows = TABLE_ROWS
    if 'optimizer_choice' in payload:  # the closed loop adopted a configuration that measured faster
        src['optimizer'] = payload['optimizer_choice']['predicted']
        rows = (('chosen', 'chosen (won the closed loop\'s race on measurement)'),
                ('optimizer', 'optimizer pick (gradient descent + local search)')) + TABLE_ROWS[1:]
    return [[label, src[k]['lam'], src[k]['edge_ms'], src[k]['link_ms'], src[k]['server_ms'], src[k]['latency_ms'],
             src[k]['throughput_fps'], src[k]['bottleneck']] for k, label in rows if k in src]


def table_text(payload: Dict[str, Any]) -> str:
    """The rows of table_rows as aligned text (step 2 prints it)."""
    head = ['configuration (predicted)', 'lambda', 'edge ms', 'link ms', 'server ms', 'latency ms', 'fps',
            'bottleneck']
    cells = [[str(r[0]), str(r[1])] + [f'{v:.2f}' for v in r[2:7]] + [str(r[7])] for r in table_rows(payload)]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ['  '.join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ['  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return '\n'.join(lines)


def random_tables(rng: np.random.Generator, num_blocks: int, has_identity: Optional[Sequence[bool]] = None,
                  batch: int = 1) -> Tuple[C.CostTables, np.ndarray]:
    """A seeded random step-2 instance (tables, valid mask) with RepVGG's structure: blocks with an identity
    branch have the 5 layouts of {D, O, I}, the others the 2 of {D, O}; the edge is 3-30x slower than the
    server, every layout time varies 0.5-2x around its block's base time independently on each side (so the
    two sides prefer different layouts), activations shrink along the network with noise, and the link is set so
    that transfer, edge and server times are comparable (the optimum is usually an interior split)."""
    n = int(num_blocks)
    if has_identity is None:
        has_identity = rng.random(n) < 0.75
        has_identity[0] = False
    kept = [('D', 'O', 'I') if h else ('D', 'O') for h in has_identity]
    valid = C.valid_mask(kept)
    base = rng.lognormal(0.0, 0.7, n)
    ratio = rng.uniform(3.0, 30.0)
    edge = np.full((n, NUM_LAYOUTS), np.nan)
    server = np.full((n, NUM_LAYOUTS), np.nan)
    edge[valid] = (base[:, None] * rng.uniform(0.5, 2.0, (n, NUM_LAYOUTS)))[valid]
    server[valid] = (base[:, None] / ratio * rng.uniform(0.5, 2.0, (n, NUM_LAYOUTS)))[valid]
    act = np.exp(np.cumsum(rng.normal(-0.1, 0.4, n + 1)))
    act[0] *= 0.25  # the uint8 image
    act[-1] = 1e-3  # the logits
    link_bytes = act * 1e5
    edge_total = float(np.nanmin(edge, 1).sum())
    bw = float(link_bytes.mean() * 8 / 1e6 / (edge_total * rng.uniform(0.1, 1.0)) * 1e3)
    t = C.CostTables(edge, server, float(base.mean() * 0.1), float(base.mean() * 0.1 / ratio), link_bytes, bw,
                     float(rng.uniform(0.0, 0.2) * edge_total), int(batch))
    return t, valid


def random_chain(rng: np.random.Generator, num_blocks: int, num_devices: int,
                 has_identity: Optional[Sequence[bool]] = None, batch: int = 1) -> Tuple[C.ChainTables, np.ndarray]:
    """A seeded random chain instance (tables, valid mask) of `num_devices` devices: `random_tables`' edge and
    server as d_1 and d_K, the devices between them each 1.5-6x faster than the one before it (times varying
    0.5-2x per layout independently), the last hop the instance's link and the hops before it 1-10x faster, each
    with a one-way latency of 0-20 % of the edge's total time."""
    t, valid = random_tables(rng, num_blocks, has_identity, batch)
    devices, heads = [t.edge_ms], [t.edge_head_ms]
    for _ in range(int(num_devices) - 2):
        f = rng.uniform(1.5, 6.0)
        devices.append(devices[-1] / f * rng.uniform(0.5, 2.0, t.edge_ms.shape))
        heads.append(heads[-1] / f)
    devices.append(t.server_ms)
    heads.append(t.server_head_ms)
    edge_total = float(np.nanmin(t.edge_ms, 1).sum())
    links = [C.ChainLink(t.bandwidth_mbps * rng.uniform(1.0, 10.0), float(rng.uniform(0.0, 0.2) * edge_total))
             for _ in range(int(num_devices) - 2)] + [C.ChainLink(t.bandwidth_mbps, t.latency_ms)]
    return C.ChainTables(tuple(devices), tuple(heads), t.link_bytes, tuple(links), int(batch)), valid
