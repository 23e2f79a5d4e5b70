"""Chains of K devices for steps 2 and 3 (docs/design.md#device-chains): the one chain description, its cost tables
from a LUT, and step 2's chain section.

A chain is described once, as `--chain` / `optim.chain`: devices in pipeline order, each but the last followed by
the link preset of its hop to the next, e.g. 'rpi4:wifi,jetson-orin-nano:ethernet,server'; or the path of a JSON
file {"chain": [{"device": "rpi4", "link": "wifi"}, {"device": "jetson-orin-nano", "link": "ethernet"},
{"device": "server"}]}.  A device is 'edge' or 'server' (that side of the LUT, measured or modelled as step 1
made it) or a device profile of timing/profiles.py (its side MODELLED by timing.lut.modelled_side for the LUT's
model and input size); a link is a preset of timing.lut.LINK_PRESETS (bandwidth and rtt / 2 per hop).  Every
hop carries the LUT's activation bytes at its split point (`lut.feature_dtype`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np

from config import ConfigError, OptimConfig
from optim import cost as C
from optim.exact import solve_chain_exact
from optim.relax import solve_chain_relaxed
from timing import lut as L
from timing.profiles import PROFILES, get_profile

LUT_DEVICES = ('edge', 'server')  # the LUT's own sides; any other device name is a profile (modelled)
WHERE = '--chain / optim.chain'


class Hop(NamedTuple):
    device: str  # 'edge' | 'server' | a timing/profiles.py profile name
    link: Optional[str]  # link preset to the next device (None for the last device)


def describe_hops(hops: List[Hop]) -> str:
    """The compact form of a chain, 'dev:link,dev:link,dev' (parse_chain's inverse)."""
    return ','.join(h.device if h.link is None else f'{h.device}:{h.link}' for h in hops)


def _check(hops: List[Hop], where: str) -> List[Hop]:
    if len(hops) < 2:
        raise ConfigError(f'{where}: a chain needs at least two devices, got {describe_hops(hops) or "nothing"}')
    for j, h in enumerate(hops):
        if h.device not in LUT_DEVICES and h.device not in PROFILES:
            raise ConfigError(f'{where}: device {j + 1} {h.device!r} is neither a side of the LUT ('
                              f'{", ".join(LUT_DEVICES)}) nor a device profile ({", ".join(sorted(PROFILES))})')
        last = j == len(hops) - 1
        if last and h.link is not None:
            raise ConfigError(f'{where}: the last device {h.device!r} has no next hop; drop its link {h.link!r}')
        if not last and h.link is None:
            raise ConfigError(f'{where}: device {j + 1} {h.device!r} needs the link to the next device, as '
                              f'{h.device}:<link> (links: {", ".join(L.LINK_PRESETS)})')
        if not last and h.link not in L.LINK_PRESETS:
            raise ConfigError(f'{where}: device {j + 1} {h.device!r}: unknown link preset {h.link!r}; valid '
                              f'choices: {", ".join(L.LINK_PRESETS)}')
    return hops


def parse_chain(spec: str, where: str = WHERE) -> List[Hop]:
    """The hops of a chain description (module docstring): the compact string or a JSON file (.json).
    ConfigError naming the flag, file and field otherwise."""
    spec = spec.strip()
    if spec.endswith('.json'):
        from config import resolve_path
        path = resolve_path(spec)
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f'{where}: cannot read the chain file {path}: {e}') from None
        items = obj.get('chain') if isinstance(obj, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get('device'), str)
                                                   for i in items):
            raise ConfigError(f'{path}: field "chain" must be a list of {{"device": NAME, "link": PRESET}} '
                              f'(no "link" on the last device)')
        return _check([Hop(i['device'], i.get('link')) for i in items], f'{where} {path}')
    hops = []
    for part in spec.split(','):
        dev, _, link = part.strip().partition(':')
        hops.append(Hop(dev.strip(), link.strip() or None))
    return _check(hops, where)


def device_side(lut: Dict[str, Any], device: str, batch: int) -> Dict[str, Any]:
    """One device of a chain: its (N, 14) stage table and head time at `batch`, and where they come from."""
    if device in LUT_DEVICES:
        side = lut[device]
        ms, head = L.side_ms(lut, device, batch), L.head_ms(lut, device, batch)
        return {'ms': ms, 'head_ms': head, 'source': side.get('source'),
                'profile': (side.get('profile') or {}).get('name'),
                'device_name': (side.get('metadata') or {}).get('device_name')}
    prof = get_profile(device)
    side = L.modelled_side(prof, lut['model'], lut['input_size'], [batch], side=device)
    view = dict(lut, batch_sizes=[batch], **{'chain_device': side})
    return {'ms': L.side_ms(view, 'chain_device', batch), 'head_ms': L.head_ms(view, 'chain_device', batch),
            'source': 'modelled', 'profile': prof.name, 'device_name': prof.description}


def chain_tables(lut: Dict[str, Any], hops: List[Hop], batch: int, feature_dtype: Optional[str] = None
                 ) -> tuple:
    """(ChainTables, info): the chain's cost tables from `lut` at `batch` and, per device and hop, where its
    numbers come from (JSON-able)."""
    dt = feature_dtype or lut['feature_dtype']
    if dt not in lut['link_bytes']:
        raise L.LutError(f'feature dtype {dt!r} not in the LUT; choices: {sorted(lut["link_bytes"])}')
    sides = [device_side(lut, h.device, batch) for h in hops]
    names = [h.device if [x.device for x in hops].count(h.device) == 1 else f'{h.device}#{j + 1}'
             for j, h in enumerate(hops)]
    presets = [L.LINK_PRESETS[h.link] for h in hops[:-1]]
    link_names = [f'link{j + 1}:{p.name}' for j, p in enumerate(presets)]
    c = C.ChainTables(tuple(s['ms'] for s in sides), tuple(s['head_ms'] for s in sides),
                      np.asarray(lut['link_bytes'][dt], dtype=np.float64),
                      tuple(C.ChainLink(float(p.bandwidth_mbps), float(p.latency_ms)) for p in presets), int(batch),
                      tuple(names), tuple(link_names))
    info = {'description': describe_hops(hops), 'feature_dtype': dt,
            'devices': [dict(name=n, device=h.device, source=s['source'], profile=s['profile'],
                             device_name=s['device_name']) for n, h, s in zip(names, hops, sides)],
            'links': [dict(p.to_dict(), name=ln) for ln, p in zip(link_names, presets)]}
    return c, info


def solve_chain(c: C.ChainTables, valid: np.ndarray, opt: OptimConfig, seed: int) -> Dict[str, Any]:
    """Step 2 over a chain (JSON-able, all PREDICTED by the cost model): the relaxed solver's choice and the exact
    optimum, the gap, and the best split using at most two of the chain's devices (the others only forward; exact),
    with the chain's throughput gain over it (chain_gain_pct, %).  Wall times only under `wall_s`."""
    r = solve_chain_relaxed(c, valid, opt.objective, opt.omega, steps=opt.steps, restarts=opt.restarts, lr=opt.lr,
                            tau_start=opt.tau_start, tau_end=opt.step2_tau_end, rng=np.random.default_rng(int(seed)))
    ex = solve_chain_exact(c, valid, opt.objective, opt.omega)
    t0 = time.perf_counter()
    two = solve_chain_exact(c, valid, opt.objective, opt.omega, max_active=2)
    t_two = time.perf_counter() - t0
    return {'num_devices': c.num_devices, 'num_split_vectors': ex.evaluated,
            'gammas': r.gammas, 'lams': r.lams, 'hop_blocks': r.stages['hop_blocks'], 'predicted': r.stages,
            'exact': dict(ex.stages, status=ex.status, evaluated=ex.evaluated),
            'gap_pct': C.gap_pct(r.objective_ms, ex.objective_ms),
            'gradient_descent': {'gammas': r.gd_gammas, 'lams': r.gd_lams, 'objective_ms': r.gd_objective_ms,
                                 'gap_pct': C.gap_pct(r.gd_objective_ms, ex.objective_ms),
                                 'description': 'argmax of the best restart before the local search'},
            'best_two_device': dict(two.stages, evaluated=two.evaluated,
                                    description='exact optimum among the split vectors under which at most two '
                                                'devices compute (the others only forward), predicted'),
            'chain_gain_pct': 100.0 * (ex.stages['throughput_fps'] / two.stages['throughput_fps'] - 1.0),
            'history': {'restarts': r.history, 'winning_restart': r.restart, 'status': r.status},
            'wall_s': {'relaxed': r.wall_s, 'exact': ex.wall_s, 'two_device': t_two}}


def chain_text(section: Dict[str, Any]) -> str:
    """Step 2's printed summary of its chain section: one line per configuration, stage times by name."""
    lines = [f'chain {section["description"]} ({section["num_devices"]} devices, {section["num_split_vectors"]} '
             f'split vectors), predicted:']
    rows = [('chosen (GD + local search)', section['predicted']), ('exact optimum', section['exact'])]
    rows.append(('best with two computing devices', section['best_two_device']))
    for label, d in rows:
        stages = ', '.join(f'{k} {v:.2f}' for k, v in d['stages_ms'].items())
        lines.append(f'  {label}: lambda {d["lams"]}, blocks {d["hop_blocks"]}; {stages} ms; '
                     f'{d["throughput_fps"]:.2f} fps, latency {d["latency_ms"]:.2f} ms, bottleneck {d["bottleneck"]}')
    lines.append(f'  gap to the exact optimum {section["gap_pct"]:.3g} % (GD alone '
                 f'{section["gradient_descent"]["gap_pct"]:.3g} %); chain vs best two devices: '
                 f'{section["chain_gain_pct"]:+.1f} % throughput')
    return '\n'.join(lines)


def two_device_link(hops: List[Hop], where: str = WHERE) -> L.LinkSpec:
    """Step 3's chain of two devices: the LUT's own edge and server sides (the closed loop measures against them)
    with the link preset of its hop, which then replaces the two-device link: the same tables and the same code
    as without a chain (C.two_device_tables(chain_tables(..)) equals timing.lut.cost_tables under that preset)."""
    if len(hops) != 2 or (hops[0].device, hops[1].device) != LUT_DEVICES:
        raise ConfigError(f'{where}: a chain of two devices in step 3 must be edge:<link>,server (the LUT\'s own '
                          f'sides, which the closed loop measures against), got {describe_hops(hops)}; for a '
                          'modelled edge device re-run step 1 with --edge_profile')
    return L.LINK_PRESETS[hops[0].link]


def goal_section(p: Any, c: C.ChainTables, info: Dict[str, Any], gammas: List[int], lam: int,
                 available: List[Any], solver: str = 'both', time_limit_s: float = 60.0) -> Dict[str, Any]:
    """Step 3's chain field for a chain of K >= 3 devices (JSON-able, PREDICTED by the cost model and the
    surrogate): the goal program `p` (the domain's final surrogate and accuracy floor) solved over the chain, by
    optim.goal.solve_chain_goal (the local search; `solver` gd or both) from two starts, the unpruned chain optimum
    and the domain's own pruning placed at its best split vector, and by optim.goal.solve_chain_milp (exact;
    `solver` milp or both); the lexicographically best is the decision (pruning per branch, split vector, layout
    per block on its device), with those two starts as baselines and the throughput gain over each."""
    from optim import goal
    full = C.valid_mask(available)
    mine = C.valid_mask(goal.kept_sets(gammas))
    unpruned = solve_chain_exact(c, full & c.valid)
    placed = solve_chain_exact(c, mine & c.valid)
    q = goal.chain_problem(p, c)
    found = {}
    if solver in ('gd', 'both'):
        found['local_search'] = goal.solve_chain_goal(p, c, [(unpruned.gammas, unpruned.lams),
                                                             (placed.gammas, placed.lams)])
    if solver in ('milp', 'both'):
        found['milp'] = goal.solve_chain_milp(p, c, time_limit_s)
    keys = {k: goal.lex_keys(goal.goal_values(q, np.array([r['gammas']]), np.array([r['lams']]), c))[0]
            for k, r in found.items() if r['gammas']}
    if not keys:
        raise goal.GoalError(f'chain goal program: no solver returned a configuration ({found})')
    names = list(keys)
    chosen = names[goal.lex_best(np.stack([keys[k] for k in names]))]
    res = dict(found[chosen], chosen=chosen)
    if len(keys) == 2:
        res['gap'] = {'objective_gap_pct': C.gap_pct(float(keys['local_search'][2]), float(keys['milp'][2])),
                      'same_configuration': (found['local_search']['gammas'], found['local_search']['lams']) ==
                      (found['milp']['gammas'], found['milp']['lams'])}
    res['solvers'] = {k: {x: v for x, v in r.items() if x not in ('gammas', 'lams')} for k, r in found.items()}
    dec = goal.chain_evaluate(q, c, res['gammas'], res['lams'])
    base = {'unpruned_chain_optimum': dict(goal.chain_evaluate(q, c, unpruned.gammas, unpruned.lams),
                                           description='nothing pruned; layouts and split vector exact'),
            'domain_pruning_on_chain': dict(goal.chain_evaluate(q, c, placed.gammas, placed.lams),
                                            description=f'the domain\'s two-device decision\'s pruning (lambda {lam}) '
                                                        'with layouts and split vector exact on the chain')}
    return dict(info, num_devices=c.num_devices, decision=dec, solver={k: v for k, v in res.items()
                                                                        if k in ('chosen', 'gap', 'solvers')},
                baselines=base,
                gain_pct={k: 100.0 * (dec['throughput_fps'] / b['throughput_fps'] - 1.0) for k, b in base.items()},
                how='predicted: the chain cost model (optim/cost.py) under the domain\'s final surrogate accuracy '
                    '(goal program levels as for two devices); the progressive pruning rounds and the closed loop '
                    'ran on the two-device split; "measured" is the accuracy of this decision\'s pruning')


def goal_text(d: int, section: Dict[str, Any]) -> str:
    """Step 3's printed line for a domain's chain field."""
    dec = section['decision']
    if section['num_devices'] == 2:
        return f'domain {d}: chain {section["description"]}: the two-device decision itself (lambda {dec["lams"]})'
    stages = ', '.join(f'{k} {v:.2f}' for k, v in dec['stages_ms'].items())
    gains = ', '.join(f'{v:+.1f} % vs {k}' for k, v in section['gain_pct'].items())
    sv = section['solver']
    how = f'{sv["chosen"]}, {sv["solvers"][sv["chosen"]]["status"]}' + (
        f'; local search vs MILP gap {sv["gap"]["objective_gap_pct"]:.3g} %' if 'gap' in sv else '')
    m = section.get('measured') or {}
    acc = '' if not m else (f'; measured test accuracy {m["accuracy_pct"]:.2f} % ({"accepted" if m["accepted"] else "not accepted"}'
                            f' at epsilon)')
    return (f'domain {d}: chain {section["description"]} (predicted, {how}): lambda '
            f'{dec["lams"]}, blocks {dec["hop_blocks"]}, {dec["branches_pruned"]} branches pruned; {stages} ms; '
            f'{dec["throughput_fps"]:.1f} fps ({gains}){acc}')


# ----------------------------------------------------------------------------------------------------------
# Real mode: the chain's chosen configuration over a chain of workers (comm.session.run_chain)
# ----------------------------------------------------------------------------------------------------------

def open_chain(cfg: Any, stack: Any, workers: int) -> tuple:
    """Real mode over a chain: one server session per worker hop (hop k listens on real.chain_port + k, default
    real.port + 1 + k; closed by `stack`), each worker accepted in order, and where each hop reaches its successor
    (real.chain_next[k], default 127.0.0.1:<the successor's --listen port>: the same machine, or a tunnel whose
    local end has the same port, as --next_ssh opens).  -> (comm.session.Hop list, the workers' hellos)."""
    import dataclasses
    import logging

    from comm.session import Hop, SessionError, session_from_config
    r = cfg.real
    first = r.chain_port or r.port + 1
    if first + workers - 1 > 65535:
        raise ConfigError(f'real.chain_port: {workers} hops need ports {first}..{first + workers - 1}')
    nxt = list(r.chain_next)
    if len(nxt) > workers - 1:
        raise ConfigError(f'real.chain_next: {len(nxt)} addresses for a chain of {workers} worker hops; one per hop '
                          f'but the last ({workers - 1})')
    sessions = [stack.enter_context(session_from_config(dataclasses.replace(cfg, real=dataclasses.replace(
        r, port=first + k)))) for k in range(workers)]
    hellos = []
    for k, s in enumerate(sessions):
        logging.getLogger('chain').info('waiting up to %g s for worker hop %d on %s:%d%s', r.connect_timeout_s, k,
                                        r.host, s.port, ' (started with --listen)' if k else '')
        hellos.append(s.accept())
        if k and not hellos[-1].get('listen_port'):
            raise SessionError(f'chain hop {k} (port {s.port}) does not listen for hop {k - 1}: start its '
                               'client_worker.py with --listen HOST:PORT')
    addrs = [(nxt[k] if k < len(nxt) and nxt[k] else f'127.0.0.1:{hellos[k + 1]["listen_port"]}')
             for k in range(workers - 1)]
    return [Hop(s, a) for s, a in zip(sessions, addrs + [None])], hellos


def real_chain_run(cfg: Any, lut: Dict[str, Any], section: Dict[str, Any], hops: list,
                   hellos: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The chain section's chosen configuration (gammas, lams) deployed over `hops` (random weights, the layouts'
    kept sets), loop.real_samples random uint8 images streamed through it at optim.batch_size, MEASURED per stage
    and link, next to the cost model's prediction from the LUT (the section's 'predicted') and its prediction from
    the measured stage times and the links' presets (comm.session.run_chain); the outputs against the unsplit
    model's."""
    import torch

    from comm import parts as PF
    from comm.session import run_chain
    from data.normalize import normalize_batch
    from hyper_repvgg import apply_config
    from pipeline.closed_loop import load_average
    from timing import measure as M
    model = M.random_model(lut['model'], cfg.seed)
    apply_config(model, [int(g) for g in section['gammas']])
    model.eval()
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    dt = section['feature_dtype']
    parts = PF.chain_bytes(model, section['lams'], lut['input_size'], mean, std, feature_dtype=dt)
    gen = torch.Generator()
    gen.manual_seed(int(cfg.seed) + 7)
    bs = int(cfg.optim.batch_size)
    size = lut['input_size']
    images = torch.randint(0, 256, (max(3 * bs, int(cfg.loop.real_samples)), 3, size, size), dtype=torch.uint8,
                           generator=gen)
    load_before = load_average()
    res = run_chain(parts, hops, images, torch.zeros(len(images), dtype=torch.long), bs, links=section['links'],
                    device=cfg.device)
    with torch.no_grad():
        ref = model(normalize_batch(images, mean, std))
    pred = section['predicted']
    return {'mode': 'real', 'gammas': section['gammas'], 'lams': section['lams'], 'samples': res['samples'],
            'batch_size': bs, 'feature_dtype': dt, 'stages': res['stages'], 'links': res['links'],
            'measured_period_ms': res['measured_period_ms'], 'throughput_fps': res['throughput_fps'],
            'steady_throughput_fps': res['steady_throughput_fps'], 'latency_ms': res['latency_ms'],
            'wall_s': res['wall_s'],
            'predicted_lut': {'device_ms': pred['device_ms'], 'link_ms': pred['link_ms'],
                              'period_ms': pred['period_ms'], 'throughput_fps': pred['throughput_fps'],
                              'bottleneck': pred['bottleneck'],
                              'how': 'the cost model on the LUT / device profiles and link presets (step 2\'s '
                                     'prediction of this configuration)'},
            'predicted_measured_stages': res['predicted'],
            'max_abs_diff_vs_unsplit': float((res['outputs'] - ref).abs().max()),
            'predictions_equal_unsplit': res['predictions'] == ref.argmax(1).tolist(),
            'load_average': {'before': load_before, 'after': load_average()},
            'workers': [{k: h.get(k) for k in ('device', 'device_name', 'host', 'threads', 'python_version',
                                               'torch_version', 'listen_port')} for h in hellos],
            'next_addrs': [h.next_addr for h in hops[:-1]]}


def real_text(real: Dict[str, Any], section: Dict[str, Any]) -> str:
    """Step 2's printed lines for a measured chain run: each stage and link measured (median [p10, p90]) next to
    the LUT's prediction, then throughput measured vs predicted, with the load average."""
    names = [d['name'] for d in section['devices']]
    lp = real['predicted_lut']
    lines = [f'chain measured (real mode, {real["samples"]} samples, batch {real["batch_size"]}, outputs vs unsplit '
             f'model max |diff| {real["max_abs_diff_vs_unsplit"]:.2g}):']
    for k, s in enumerate(real['stages']):
        blocks = f'blocks {s["lo"]}..{s["hi"] - 1}' if s['hi'] > s['lo'] else 'no blocks: forwards'
        lines.append(f'  stage {k} ({names[k]}, {blocks}, {s["device"]}): measured '
                     f'{s["compute_ms"]:.2f} ms [{s["compute_ms_p10"]:.2f}, {s["compute_ms_p90"]:.2f}], predicted '
                     f'{lp["device_ms"][k]:.2f} ms (LUT)')
    for k, li in enumerate(real['links']):
        lines.append(f'  link {k}->{k + 1} ({section["links"][k]["name"]}): measured {li["link_ms"]:.2f} ms '
                     f'[{li["link_ms_p10"]:.2f}, {li["link_ms_p90"]:.2f}] for {li["frame_bytes"]:.0f} B, predicted '
                     f'{lp["link_ms"][k]:.2f} ms (LUT bytes / preset bandwidth)')
    pm = real['predicted_measured_stages']
    load = (real['load_average'] or {}).get('after')
    lines.append(f'  throughput: measured {real["steady_throughput_fps"]:.2f} samples/s (steady; whole run '
                 f'{real["throughput_fps"]:.2f}), predicted {lp["throughput_fps"]:.2f} (LUT, bottleneck '
                 f'{lp["bottleneck"]}) and {pm["throughput_fps"]:.2f} (measured stages + preset links, bottleneck '
                 f'{pm["bottleneck"]}); load average {load}')
    return '\n'.join(lines)


def measure_chain(cfg: Any, lut: Dict[str, Any], section: Dict[str, Any]) -> Dict[str, Any]:
    """Step 2 --mode real with a chain: open_chain for its K - 1 worker hops, real_chain_run, sessions closed."""
    import contextlib
    with contextlib.ExitStack() as stack:
        hops, hellos = open_chain(cfg, stack, int(section['num_devices']) - 1)
        return real_chain_run(cfg, lut, section, hops, hellos)
