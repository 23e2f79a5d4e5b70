"""LUT fidelity: how well a server-side LUT measured on this CPU predicts whole configurations.

For each model: measure the server side's LUT here (timing.measure.measure_side, chain timing as step 1 does),
draw random configurations (a valid layout per block and a split, timing.lut.random_configurations), run each
one end to end (timing.lut.validate_side) and compare the LUT's sum with the measurement: share of
configurations within +/-10 %, median |error| (timing.lut.validation_summary) and Spearman's rho between the
predicted and the measured totals (does the LUT rank configurations right, which is what the optimizer needs;
it says little when the configurations' measured range is not much wider than the timing noise, so that
range is reported too).

Models: default = the embedded default (config.py: RepVGG-A0 at width (0.25, 0.25, 0.25, 0.5), 64 px,
10 classes); a0_224 = RepVGG-A0 at its own width, 224 px, 1000 classes; b3_224 = RepVGG-B3, 224 px, 1000 classes
(few repeats and a time budget per entry, so that the whole bench stays within about 10 minutes on 2 cores).
Batch 1 throughout.  Writes bench/results/lut_fidelity.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, NamedTuple, Optional, Sequence  # noqa: E402

from bench import common  # noqa: E402
from config import Config, ConfigError, run_cli  # noqa: E402

log = logging.getLogger('bench_lut')
NAME = 'lut_fidelity'
TOLERANCE_PCT = 10.0


class Case(NamedTuple):
    key: str
    label: str
    arch: Dict[str, Any]  # hyper_repvgg spec_dict: name, num_classes, width_multiplier, small_input
    input_size: int  # px
    warmup: int  # untimed passes
    repeats: int  # timed passes
    max_entry_s: float  # time budget per LUT entry, s (0 = none)
    configs: int  # whole configurations validated


def default_case(warmup: int, repeats: int, configs: int) -> Case:
    """The embedded default of config.py (the model run_pipeline.sh uses)."""
    from timing.lut import model_spec
    cfg = Config()
    wm = cfg.model.width_multiplier
    return Case('default', f'{cfg.model.name} w{tuple(wm) if wm else "(arch)"} {cfg.model.input_size} px',
                model_spec(cfg), cfg.model.input_size, warmup, repeats, 0.0, configs)


def imagenet_arch(name: str) -> Dict[str, Any]:
    return {'name': name, 'num_classes': 1000, 'width_multiplier': None, 'small_input': False}


def cases(quick: bool) -> Dict[str, Case]:
    if quick:  # a tiny model: the whole run takes seconds
        tiny = {'name': 'RepVGG-A0', 'num_classes': 10, 'width_multiplier': [0.25, 0.25, 0.25, 0.25],
                'small_input': False}
        return {'tiny': Case('tiny', 'RepVGG-A0 w0.25 32 px (quick)', tiny, 32, 1, 3, 0.0, 4)}
    return {'default': default_case(warmup=5, repeats=20, configs=20),
            'a0_224': Case('a0_224', 'RepVGG-A0 224 px', imagenet_arch('RepVGG-A0'), 224, 3, 10, 0.0, 20),
            'b3_224': Case('b3_224', 'RepVGG-B3 224 px', imagenet_arch('RepVGG-B3'), 224, 1, 3, 1.0, 10)}


def spearman(pred: Sequence[float], meas: Sequence[float]) -> Optional[float]:
    """Spearman's rho of predicted vs measured totals (None with fewer than 3 points or a constant side)."""
    import numpy as np
    from scipy.stats import spearmanr
    if len(pred) < 3:
        return None
    rho = float(spearmanr(pred, meas).statistic)
    return rho if np.isfinite(rho) else None


def run_case(case: Case, threads: int, seed: int) -> Dict[str, Any]:
    """Measure the server LUT of one model here and validate it end to end; the numbers of one table row."""
    import numpy as np

    from timing import lut as L
    from timing import measure as M
    t0 = time.perf_counter()
    res = M.measure_side(case.arch, case.input_size, (1,), 'cpu', case.warmup, case.repeats, threads,
                         case.max_entry_s, seed, progress=True, microbenchmark=False, timing='chain')
    side = L.side_payload('server', case.arch, case.input_size, res)
    t_lut = time.perf_counter() - t0
    configs = L.random_configurations(case.arch, case.configs, np.random.default_rng(seed))
    t0 = time.perf_counter()
    rep = L.validate_side(side, configs, 1, 'cpu', case.warmup, case.repeats,
                          case.max_entry_s * side['num_blocks'], seed, progress=True)
    t_val = time.perf_counter() - t0
    pred = [r['predicted']['total_ms'] for r in rep['records']]
    meas = [r['measured']['total_ms'] for r in rep['records']]
    total = rep['summary']['total']
    out = {'label': case.label, 'model': case.arch, 'input_size_px': case.input_size, 'batch': 1,
           'num_blocks': side['num_blocks'], 'lut_entries': len(side['entries']),
           'settings': {'warmup': case.warmup, 'repeats': case.repeats, 'max_entry_s': case.max_entry_s,
                        'threads': res['metadata']['threads'], 'timing': 'chain', 'seed': seed},
           'configurations': len(rep['records']), 'tolerance_pct': TOLERANCE_PCT,
           'share_within_10pct': total['share_within_tol'], 'median_abs_error_pct': total['median_abs_error_pct'],
           'median_signed_error_pct': total['median_signed_error_pct'], 'spearman_rho': spearman(pred, meas),
           'median_measured_total_ms': float(np.median(meas)),
           'measured_range_pct': float(100 * (max(meas) - min(meas)) / np.median(meas)), 'lut_measure_wall_s': t_lut,
           'validation_wall_s': t_val, 'summary': rep['summary'], 'records': rep['records']}
    log.info('%s: %d configurations, %.0f %% within +/-%.0f %%, median |error| %.1f %%, Spearman rho %s '
             '(LUT %.0f s, validation %.0f s)', case.label, out['configurations'], 100 * out['share_within_10pct'],
             TOLERANCE_PCT, out['median_abs_error_pct'], common.fmt(out['spearman_rho']), t_lut, t_val)
    return out


COLUMNS = ['model', 'blocks', 'configs', 'within +/-10 % (%)', 'median |err| (%)', 'median signed err (%)',
           'Spearman rho', 'median measured (ms)', 'measured range (% of median)', 'repeats', 'bench time (s)']


def table_rows(results: Dict[str, Dict[str, Any]]) -> List[List[Any]]:
    return [[r['label'], r['num_blocks'], r['configurations'], 100 * r['share_within_10pct'],
             r['median_abs_error_pct'], r['median_signed_error_pct'], r['spearman_rho'],
             r['median_measured_total_ms'], r['measured_range_pct'], r['settings']['repeats'],
             r['lut_measure_wall_s'] + r['validation_wall_s']]
            for r in results.values()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_lut: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--models', default=None,
                   help='comma-separated subset of default,a0_224,b3_224 (default: all; with --quick: the tiny model)')
    p.add_argument('--threads', type=int, default=Config().lut.threads,
                   help=f'torch threads while timing, as lut.threads (default: {Config().lut.threads})')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and configurations (default: 0)')
    args = p.parse_args(argv)
    available = cases(args.quick)
    keys = list(available) if not args.models else [k.strip() for k in args.models.split(',') if k.strip()]
    bad = [k for k in keys if k not in available]
    if bad or not keys:
        raise ConfigError(f'--models {args.models!r}: valid choices are {", ".join(available)}')
    machine = common.machine_info()
    results = {k: run_case(available[k], args.threads, args.seed) for k in keys}
    rows = table_rows(results)
    headline = []
    for r in results.values():
        headline += [[f'{r["label"]}: configurations within +/-10 %', 100 * r['share_within_10pct'], '%'],
                     [f'{r["label"]}: median |error|', r['median_abs_error_pct'], '%'],
                     [f'{r["label"]}: Spearman rho (predicted vs measured)', r['spearman_rho'], '']]
    tables = [common.table('Server-side LUT on this CPU: LUT sum vs end-to-end time of whole configurations, batch 1',
                           COLUMNS, rows)]
    path = common.write_result(args.out_dir, NAME, {'models': results}, machine, args.quick, headline, tables, argv)
    print(common.render(COLUMNS, rows, markdown=False))
    print(f'-> {path}')
    return 0


if __name__ == '__main__':
    run_cli(main)
