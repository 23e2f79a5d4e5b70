"""Which timing model predicts whole configurations: additive entries, a per-split term, neighbour-layout terms.

The LUT's fit (timing.measure.fit_part_costs) models a part's time as the sum of its blocks' marginal costs.  This
bench times the edge and server parts of many random configurations of the embedded default model (this CPU,
batch 1, one torch thread, fine interleaved rounds: timing.measure._time_parts) once, then cross-validates timing
models on them: each fold's configurations are left out, the model is fitted on the others' parts, and the
left-out configurations' totals (edge + server part, the quantity the LUT validation checks) are predicted.

Models: `shipped fit, additive` (fit_part_costs without edge-part offsets: step 1's method before this bench) and
`shipped fit` (with them: step 1's method now), both with the chain timings as prior, robust non-negative least
squares; and, to see what else the residual could be, unconstrained least squares with the same priors (extra
terms: prior 0, standard deviation `--extra_rel`) of: `additive`, `+ per-split term` (the part that ends or starts at lambda pays a cost of its
own), `+ previous layout's branch count` (block k's cost depends on how many parallel parts block k-1 runs),
`+ previous layout` (on block k-1's layout), `+ layout pairs` (one term per block and pair of neighbouring layouts).

Per model: the left-out configurations' median |error| and signed error (against the median of all rounds) and
|error| against the second pass alone, beside the noise floor (median |pass 1 - pass 2| / pass 2, the passes being
even and odd rounds).  A model is no worse than a second measurement when its |error| against pass 2 is at most
the floor.  The machine's load average is recorded; on a loaded machine the table says so.  Writes
bench/results/lut_terms.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from config import Config, UserError, run_cli  # noqa: E402

NAME = 'lut_terms'
Feature = Tuple[Any, ...]


def collect(configs: int, rounds: int, seed: int, progress: bool) -> Dict[str, Any]:
    """Time the parts of `configs` random configurations of the embedded default in `rounds` interleaved rounds
    (1 untimed + 2 timed calls per visit); also the chain timings (the shipped fit's prior)."""
    import torch

    from timing import measure as M
    from timing.lut import model_spec
    cfg = Config()
    torch.set_num_threads(1)
    model = M.random_model(model_spec(cfg), seed)
    plan, dev = model.plan, torch.device('cpu')
    get = M._deploy_getter(model, dev, keep=True)
    gen = torch.Generator()
    gen.manual_seed(seed + 5)
    inputs = [M._part_input(plan, cfg.model.input_size, lam, 1, gen, dev) for lam in range(len(plan) + 1)]
    head_part = M.SplitPart([], (model.gap, model.linear)).eval()
    x = M._part_input(plan, cfg.model.input_size, 0, 1, gen, dev)
    chain, head_chain = M._chain_batch(plan, x, dev, get, head_part, 2, 10, 0.0, 'wall', None)
    confs = M.random_fit_configurations(plan, configs, seed + 100)
    parts, owner = [], []
    for ci, c in enumerate(confs):
        edge, server = M._config_parts(plan, get, (model.gap, model.linear), c['gammas'], c['lam'])
        if edge is not None:
            parts.append((edge, inputs[0]))
            owner.append((ci, 'edge'))
        parts.append((server, inputs[c['lam']]))
        owner.append((ci, 'server'))
    before = M.machine_state()
    bar = M._progress(rounds, progress, f'bench_lut_terms ({len(parts)} parts)')
    try:
        samples = M._time_parts(parts, dev, rounds, 2, 1, seed + 7, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    after = M.machine_state()
    done = min(len(s) for s in samples)
    med = [float(np.median([v for r in s[:done] for v in r])) for s in samples]
    first_half = [float(np.median([v for r in s[:done // 2] for v in r])) for s in samples]
    passes = [[float(np.median([v for i, r in enumerate(s[:done]) if i % 2 == p for v in r])) for s in samples]
              for p in (0, 1)]
    return {'plan': plan, 'confs': confs, 'owner': owner, 'median_ms': med, 'first_half_ms': first_half,
            'pass_ms': passes, 'rounds': done,
            'prior': {k: v['median_ms'] for k, v in chain.items()}, 'prior_head': head_chain['median_ms'],
            'machine_state_before': before, 'machine_state_after': after}


def _features(plan: Sequence[Any], conf: Dict[str, Any], side: str) -> Dict[Feature, float]:
    """The ridge models' features of one part: ('b', k, gamma) and ('head',) (additive), ('split', lam) (the part
    ends at lam: an edge part), ('prevn', k, parts of gamma_(k-1)), ('prev', k, gamma_(k-1)), ('pair', k,
    gamma_(k-1), gamma_k), for neighbouring blocks inside the part."""
    from hyper_repvgg import LAYOUTS
    g, lam, n = conf['gammas'], int(conf['lam']), len(plan)
    ks = list(range(lam)) if side == 'edge' else list(range(lam, n))
    f: Dict[Feature, float] = {('b', k, g[k]): 1.0 for k in ks}
    f[('split', lam) if side == 'edge' else ('head',)] = 1.0
    for a, b in zip(ks[:-1], ks[1:]):
        f[('prevn', b, len(LAYOUTS[g[a]].parts))] = 1.0
        f[('prev', b, g[a])] = 1.0
        f[('pair', b, g[a], g[b])] = 1.0
    return f


def ridge_model(groups: Sequence[str], extra_rel: float) -> Callable:
    """fit(data, features, train part indices) -> predict(part index): least squares on the parts' times (row
    standard deviation 1 % of the time) over the feature groups `groups`, unconstrained; the blocks' and the head's
    terms with the shipped fit's prior (the chain timings at the parts' scale, standard deviation 25 %), every other
    term with prior 0 and standard deviation `extra_rel` x the median prior term."""
    def fit(data: Dict[str, Any], feats: List[Dict[Feature, float]], train: Sequence[int]) -> Callable:
        keys = sorted({k for f in feats for k in f if k[0] in groups}, key=str)  # unseen terms: their prior
        kid = {k: j for j, k in enumerate(keys)}
        a = np.zeros((len(train), len(keys)))
        for r, i in enumerate(train):
            for k, v in feats[i].items():
                if k in kid:
                    a[r, kid[k]] = v
        t = np.asarray([data['median_ms'][i] for i in train])
        prior = np.array([data['prior'][(k[1], k[2])] if k[0] == 'b' else data['prior_head'] if k[0] == 'head'
                          else 0.0 for k in keys])
        base = np.array([k[0] in ('b', 'head') for k in keys])
        ap = a @ prior
        target = float(np.median(t / ap)) * prior
        med = float(np.median(target[base]))
        sd = np.where(base, 0.25 * np.maximum(target, med), extra_rel * med)
        aw = a / (0.01 * t)[:, None]
        c = np.linalg.solve(aw.T @ aw + np.diag(1.0 / sd ** 2), aw.T @ (1.0 / 0.01 * np.ones(len(train))) +
                            target / sd ** 2)
        return lambda i: float(sum(c[kid[k]] * v for k, v in feats[i].items() if k in kid))
    return fit


def shipped_model(offsets: bool) -> Callable:
    """fit(...) -> predict: timing.measure.fit_part_costs on the train configurations' parts (with or without the
    edge-part offsets), predicted by timing.lut.predict_parts."""
    def fit(data: Dict[str, Any], feats: List[Dict[Feature, float]], train: Sequence[int]) -> Callable:
        from timing import lut as L
        from timing import measure as M
        plan, confs, owner = data['plan'], data['confs'], data['owner']
        keep = sorted({owner[i][0] for i in train})
        times = [data['median_ms'][i] for i in train]  # parts in configuration order, edge before server
        costs, head, _, _, info = M.fit_part_costs(plan, [confs[ci] for ci in keep], times, data['prior'],
                                                   data['prior_head'], 0.01, edge_offsets=offsets)
        side = {'entries': {L.lut_key(k, g, 1): {'median_ms': v} for (k, g), v in costs.items()},
                'head': {L.lut_key('head', None, 1): {'median_ms': head}}}
        if offsets:
            side['edge_part_offset_ms'] = {'1': info['edge_part_offset_ms']}

        def predict(i: int) -> float:
            ci, part = owner[i]
            return L.predict_parts(side, confs[ci]['gammas'], confs[ci]['lam'], 1)[f'{part}_ms']
        return predict
    return fit


def cross_validate(data: Dict[str, Any], fit: Callable, folds: int, seed: int, train_configs: int = 0,
                   half_rounds: bool = False) -> Dict[str, float]:
    """Totals of left-out configurations (measured on all rounds) against the fit on the others: median |error|,
    signed error and |error| against pass 2 (%), and the noise floor (median |pass 1 - pass 2| / pass 2, %).
    `train_configs` > 0: the fit sees only that many of the others (the first in a seeded order); `half_rounds`:
    its parts' times from the first half of the rounds only (what a fit with half the rounds would have seen)."""
    train_data = dict(data, median_ms=data['first_half_ms']) if half_rounds else data
    feats = [_features(data['plan'], data['confs'][ci], side) for ci, side in data['owner']]
    by_conf: Dict[int, List[int]] = {}
    for i, (ci, _) in enumerate(data['owner']):
        by_conf.setdefault(ci, []).append(i)
    order = np.random.default_rng(seed).permutation(len(data['confs']))
    err, vs2, floor = [], [], []
    for f in range(folds):
        test = set(order[f::folds].tolist())
        seen = [ci for ci in order.tolist() if ci not in test]
        seen = set(seen[:train_configs] if train_configs > 0 else seen)
        predict = fit(train_data, feats, [i for i, (ci, _) in enumerate(data['owner']) if ci in seen])
        for ci in sorted(test):
            idx = by_conf[ci]
            p = sum(predict(i) for i in idx)
            m = sum(data['median_ms'][i] for i in idx)
            m1, m2 = (sum(data['pass_ms'][q][i] for i in idx) for q in (0, 1))
            err.append(100.0 * (p - m) / m)
            vs2.append(100.0 * abs(p - m2) / m2)
            floor.append(100.0 * abs(m1 - m2) / m2)
    return {'median_abs_error_pct': float(np.median(np.abs(err))), 'median_signed_error_pct': float(np.median(err)),
            'vs_pass2_pct': float(np.median(vs2)), 'noise_floor_pct': float(np.median(floor)),
            'configurations': len(err)}


MODELS = (('shipped fit, additive (step 1 before)', lambda r: shipped_model(False)),
          ('shipped fit, with edge-part offsets (step 1 now)', lambda r: shipped_model(True)),
          ('ridge: additive', lambda r: ridge_model(('b', 'head'), r)),
          ('ridge: + per-split term', lambda r: ridge_model(('b', 'head', 'split'), r)),
          ("ridge: + previous layout's branch count", lambda r: ridge_model(('b', 'head', 'prevn'), r)),
          ('ridge: + previous layout', lambda r: ridge_model(('b', 'head', 'prev'), r)),
          ('ridge: + layout pairs', lambda r: ridge_model(('b', 'head', 'pair'), r)),
          ('ridge: + per-split term + previous layout', lambda r: ridge_model(('b', 'head', 'split', 'prev'), r)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--configurations', type=int, default=None,
                   help='random configurations timed (default: 600; --quick: 40)')
    p.add_argument('--rounds', type=int, default=None, help='interleaved rounds over their parts, an even number '
                   '(default: 20; --quick: 4)')
    p.add_argument('--folds', type=int, default=5, help='cross-validation folds (default: 5)')
    p.add_argument('--extra_rel', type=float, default=0.25, help='prior standard deviation of the ridge models\' '
                   'extra terms, relative to the median block term (default: 0.25, as the shipped fit\'s offsets)')
    p.add_argument('--seed', type=int, default=0, help='model weights, configurations and order (default: 0)')
    args = p.parse_args(argv)
    n_conf = args.configurations if args.configurations is not None else (40 if args.quick else 600)
    rounds = args.rounds if args.rounds is not None else (4 if args.quick else 20)
    if n_conf < 2 * args.folds or rounds < 2 or rounds % 2 or args.folds < 2:
        raise UserError(f'--configurations {n_conf} / --rounds {rounds} / --folds {args.folds}: expected at least '
                        f'2 folds, 2 configurations per fold and an even number of rounds >= 2')
    machine = common.machine_info()
    data = collect(n_conf, rounds, args.seed, progress=not args.quick)
    loaded = common.is_loaded(data['machine_state_before']['load_average']) or \
        common.is_loaded(data['machine_state_after']['load_average'], own=1.0)
    rows = []
    for name, make in MODELS:
        r = cross_validate(data, make(args.extra_rel), args.folds, args.seed)
        rows.append([name, r['median_abs_error_pct'], r['median_signed_error_pct'], r['vs_pass2_pct'],
                     r['noise_floor_pct'], r['vs_pass2_pct'] <= r['noise_floor_pct'], r['configurations']])
    sizes = []
    n_entries = len(data['prior'])
    for n_train in sorted({min(n_entries, n_conf - n_conf // args.folds), n_conf - n_conf // args.folds}):
        for half in (True, False):
            r = cross_validate(data, shipped_model(True), args.folds, args.seed, n_train, half)
            sizes.append([n_train, data['rounds'] // 2 if half else data['rounds'], r['median_abs_error_pct'],
                          r['vs_pass2_pct'], r['noise_floor_pct']])
    flag = ' (LOADED: not claimed)' if loaded else ''
    table = common.table(
        f'Timing models cross-validated ({args.folds} folds) on {n_conf} random configurations of the embedded '
        f'default, {data["rounds"]} interleaved rounds, this CPU, one thread; measured, load average '
        f'{data["machine_state_before"]["load_average"]} -> {data["machine_state_after"]["load_average"]}{flag}',
        ['model', 'median |error| %', 'median signed error %', '|error| vs pass 2 %', 'noise floor %',
         'no worse than a second measurement', 'configurations'], rows)
    size_table = common.table(
        f'The shipped fit (with edge-part offsets) against how much it sees: fitted on n configurations\' parts timed '
        f'in R rounds (the first R), the left-out configurations measured on all {data["rounds"]}{flag}',
        ['fit configurations n', 'fit rounds R', 'median |error| %', '|error| vs pass 2 %', 'noise floor %'], sizes)
    best = {r[0]: r for r in rows}
    before, now = best[MODELS[0][0]], best[MODELS[1][0]]
    head = [[f'LUT fit median |error|, additive -> with edge-part offsets{flag}', f'{before[1]:.2f} -> {now[1]:.2f}',
             '%'],
            ['noise floor (pass to pass)', now[4], '%'],
            ['with offsets no worse than a second measurement', now[5], '']]
    path = common.write_result(args.out_dir, NAME, {'loaded': loaded, 'rows': rows,
                                                    'sizes': sizes,
                                                    'machine_state': [data['machine_state_before'],
                                                                      data['machine_state_after']]},
                               machine, args.quick, head, [table, size_table], argv)
    common.print_tables([table, size_table], path)
    return 0


if __name__ == '__main__':
    run_cli(main)
