"""Result quality: per domain, the joint configuration's predicted throughput against the plain-model baselines.

For each link (default ethernet, wifi, 4g, 3g; edge modelled with the LUT's device profile, the default TX2) the
finished steps 0-2 of a results directory (--results_dir, default results/) are copied into a work directory
of their own (the source is only read), then step 2 and step 3 run there as the pipeline runs them
(`pipeline/step2_initial_throughput_opt.py --link L` for the warm start, then `pipeline/step_3_joint.py
--all_domains --link L`), and the `joint_optimization/domain_<d>_joint.json` files are read back.  Per domain:
throughput of the joint configuration (pruning + layouts + split) at the chosen epsilon (joint.epsilon unless
--epsilon), of the best plain split, edge only and server only (the unpruned plain model, the artifact's
`baselines.unpruned`), the joint / best-plain-split ratio, the split lambda, the branches pruned and the test
accuracy drop (A_ref - final, points); per link the mean and the worst domain (lowest ratio, largest drop).
Throughputs are the cost model's predictions from the LUT (pseudo mode), not measurements on a device.

--quick builds a tiny synthetic steps-0 result (2 domains, RepVGG-A0 at width 0.25, 32 px, modelled LUT) in the
work directory instead of copying one, with tiny solver settings (seconds per link; numbers not meant for
reading).  Writes bench/results/quality.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

from bench import common  # noqa: E402
from config import REPO_ROOT, Config, ConfigError, UserError, resolve_path, run_cli  # noqa: E402

log = logging.getLogger('bench_quality')
NAME = 'quality'
LINKS = ('ethernet', 'wifi', '4g', '3g')
# what step 3 reads from a finished steps-0..2 run (initial_throughput_config.json is rewritten per link)
NEEDED = ('partition_info.json', 'trained_hyper_weights.json', 'training_results.json', 'base_model',
          'hardware_lut_complete.json')
SKIP = shutil.ignore_patterns('joint_optimization', 'visualization', '_*', '*.png', '*.tmp')
# --quick: the tiny synthetic setting of tests/test_step3.py (step 0 takes seconds), tiny solver settings
QUICK_DATA = ['--dataset', 'synthetic', '--set', 'model.input_size=32', '--set', 'model.small_input=true',
              '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'data.synthetic_samples=600',
              '--set', 'train.base_train_samples=200', '--set', 'train.base_epochs=1', '--set', 'train.batch_size=32']
QUICK_CONFIG = QUICK_DATA + ['--set', 'data.num_domains=2', '--set', 'optim.steps=20', '--set', 'optim.restarts=1']
QUICK_STEP3 = ['--epsilon_sweep', '1', '--max_rounds', '1']
DOMAIN_COLUMNS = ['link', 'domain', 'joint fps', 'best plain split fps (lambda)', 'edge-only fps', 'server-only fps',
                  'joint / best plain', 'joint lambda', 'branches pruned', 'accuracy drop (points)']
SUMMARY_COLUMNS = ['link', 'domains', 'mean joint fps', 'mean best plain split fps', 'mean edge-only fps',
                   'mean server-only fps', 'mean joint / best plain', 'worst joint / best plain (domain)',
                   'mean accuracy drop (points)', 'worst accuracy drop (domain)', 'step 3 wall s']


class BenchQualityError(UserError):
    """A results directory without the finished steps 0-2, or a step that failed."""


def _run(cmd: Sequence[str], what: str) -> float:
    """Run one pipeline step (its stderr passes through); wall seconds, BenchQualityError when it fails."""
    log.info('%s: %s', what, ' '.join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=str(REPO_ROOT), stdout=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise BenchQualityError(f'{what} failed (exit {proc.returncode}): {" ".join(cmd)}; see its message above')
    return time.perf_counter() - t0


def copy_results(src: Path, dst: Path) -> None:
    """Copy the finished steps 0-2 of `src` into `dst` (without step 3/4 outputs); the source is only read."""
    missing = [n for n in NEEDED if not (src / n).exists()]
    if missing:
        raise BenchQualityError(f'--results_dir {src}: missing {", ".join(missing)}; run steps 0-2 there first '
                                '(bash run_pipeline.sh)')
    shutil.copytree(src, dst, ignore=SKIP, dirs_exist_ok=True)


def build_quick(dst: Path) -> None:
    """A tiny synthetic step-0 result with a modelled LUT (TX2 edge, Orin Nano as the server) in `dst`."""
    from artifacts import write_artifact
    from config import DataConfig, ModelConfig, TrainConfig
    from timing import lut as L
    from timing.profiles import get_profile
    _run([sys.executable, str(REPO_ROOT / 'pipeline' / 'step0_prepare.py'), *QUICK_DATA, '--num_domains', '2',
          '--epochs', '1', '--threads', '1', '--results_dir', str(dst)], 'step 0 (quick, synthetic)')
    cfg = Config(model=ModelConfig(input_size=32, small_input=True, width_multiplier=(0.25, 0.25, 0.25, 0.25)),
                 data=DataConfig(dataset='synthetic', num_domains=2, synthetic_samples=600),
                 train=TrainConfig(base_train_samples=200, base_epochs=1, batch_size=32), results_dir=str(dst))
    model = L.model_spec(cfg)
    edge = L.modelled_side(get_profile('jetson-tx2'), model, 32, [1], side='edge')
    server = L.modelled_side(get_profile('jetson-orin-nano'), model, 32, [1], side='server')
    write_artifact(cfg.path('hardware_lut_complete.json'), 'hardware_lut_complete',
                   L.merge(server, edge, L.resolve_link(cfg.lut), 'fp32'), cfg, 'bench_quality.py --quick')


def read_domains(results_dir: Path, domains: Optional[Sequence[int]]) -> List[Dict[str, Any]]:
    """One record per domain_<d>_joint.json of a step-3 run (only `domains` when given)."""
    from artifacts import load_artifact
    paths = sorted((results_dir / 'joint_optimization').glob('domain_*_joint.json'),
                   key=lambda p: int(p.name.split('_')[1]))
    out = []
    for p in paths:
        obj = load_artifact(p, 'joint_domain', {'domain': int, 'predicted': dict, 'baselines': dict,
                                                'accuracy_drop_pct': float, 'timing': dict, 'lam': int})
        if domains is not None and obj['domain'] not in domains:
            continue
        base = obj['baselines']['unpruned']
        rec = {'domain': obj['domain'], 'joint_fps': obj['predicted']['throughput_fps'], 'joint_lam': obj['lam'],
               'joint_bottleneck': obj['predicted']['bottleneck'], 'branches_pruned': obj['branches_pruned'],
               'epsilon': obj['epsilon'], 'a_ref_pct': obj['a_ref_pct'],
               'final_accuracy_pct': obj['final_accuracy_pct'], 'accuracy_drop_pct': obj['accuracy_drop_pct'],
               'xi_accuracy_pct': obj['deviations']['xi_accuracy_pct'],
               'step3_wall_s': obj['timing'].get('wall_s'), 'link': obj['link']}
        for k in ('best_plain_split', 'edge_only', 'server_only'):
            rec[f'{k}_fps'] = base[k]['throughput_fps']
        rec['best_plain_split_lam'] = base['best_plain_split']['lam']
        rec['joint_over_best_plain'] = rec['joint_fps'] / rec['best_plain_split_fps']
        out.append(rec)
    if not out:
        raise BenchQualityError(f'{results_dir / "joint_optimization"}: no domain_<d>_joint.json for the requested '
                                'domains; step 3 wrote nothing')
    return out


def summarize(recs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean over domains, the worst domain (lowest joint / best plain ratio, largest accuracy drop)."""
    import numpy as np

    def mean(k: str) -> float:
        return float(np.mean([r[k] for r in recs]))
    worst_r = min(recs, key=lambda r: r['joint_over_best_plain'])
    worst_a = max(recs, key=lambda r: r['accuracy_drop_pct'])
    walls = [r['step3_wall_s'] for r in recs if r['step3_wall_s'] is not None]
    return {'domains': len(recs), **{f'mean_{k}': mean(k) for k in (
        'joint_fps', 'best_plain_split_fps', 'edge_only_fps', 'server_only_fps', 'joint_over_best_plain',
        'accuracy_drop_pct')},
        'worst_joint_over_best_plain': worst_r['joint_over_best_plain'], 'worst_ratio_domain': worst_r['domain'],
        'worst_accuracy_drop_pct': worst_a['accuracy_drop_pct'], 'worst_drop_domain': worst_a['domain'],
        'domains_within_epsilon_test': sum(r['xi_accuracy_pct'] <= 1e-9 for r in recs),
        'step3_domain_wall_s_sum': float(sum(walls)) if walls else None}


def run_link(link: str, work: Path, src: Path, quick: bool, domains: Optional[str],
             epsilon: Optional[str], extra: Sequence[str]) -> Dict[str, Any]:
    """Steps 2 and 3 under `link` in work/<link>; the per-domain records and the summary."""
    rd = work / link
    rd.mkdir(parents=True, exist_ok=True)
    config_flags = list(QUICK_CONFIG) if quick else []
    copy_results(src, rd)
    common_flags = config_flags + ['--results_dir', str(rd), '--link', link] + list(extra)
    t2 = _run([sys.executable, str(REPO_ROOT / 'pipeline' / 'step2_initial_throughput_opt.py'), *common_flags],
              f'step 2 ({link})')
    which = ['--domains', domains] if domains else ['--all_domains']
    step3 = [sys.executable, str(REPO_ROOT / 'pipeline' / 'step_3_joint.py'), *which, *common_flags]
    step3 += (QUICK_STEP3 if quick else []) + (['--epsilon', epsilon] if epsilon is not None else [])
    t3 = _run(step3, f'step 3 ({link})')
    wanted = None if not domains else [int(x) for x in domains.split(',') if x.strip()]
    recs = read_domains(rd, wanted)
    return {'link': link, 'results_dir': str(rd), 'step2_wall_s': t2, 'step3_wall_s': t3, 'domains': recs,
            'summary': summarize(recs)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='bench_quality: %(message)s', stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument('--results_dir', default='results', help='finished steps 0-2 to copy (read only), relative to '
                   'the repository root (default: results; ignored with --quick)')
    p.add_argument('--links', default=','.join(LINKS), help=f'comma-separated link presets (default: '
                   f'{",".join(LINKS)})')
    p.add_argument('--domains', default=None, help='comma-separated domain ids (default: all domains)')
    p.add_argument('--epsilon', default=None, help=f'allowed accuracy drop, points (default: joint.epsilon = '
                   f'{Config().joint.epsilon})')
    p.add_argument('--work_dir', default=None, help='where the per-link copies and step outputs go; kept, and '
                   'a rerun resumes finished domains (default: a temporary directory, removed at the end)')
    p.add_argument('step_args', nargs='*', help='further flags for steps 2 and 3, after `--`, e.g. -- --set '
                   'joint.max_rounds=3 (default: none)')
    args = p.parse_args(argv)
    links = [x.strip() for x in args.links.split(',') if x.strip()]
    from timing.lut import LINK_PRESETS
    bad = [x for x in links if x not in LINK_PRESETS]
    if bad or not links:
        raise ConfigError(f'--links {args.links!r}: valid presets are {", ".join(LINK_PRESETS)}')
    src = None if args.quick else resolve_path(args.results_dir)
    if src is not None and not src.is_dir():
        raise BenchQualityError(f'--results_dir {src}: not a directory')
    machine = common.machine_info()
    t0 = time.perf_counter()
    tmp = None
    if args.work_dir:
        work = resolve_path(args.work_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix='bench_quality_')
        work = Path(tmp.name)
    try:
        if args.quick:  # one tiny step-0 result, copied per link like a real one
            src = work / '_quick_source'
            if not (src / 'hardware_lut_complete.json').exists():
                build_quick(src)
        runs = [run_link(link, work, src, args.quick, args.domains, args.epsilon, args.step_args) for link in links]
    finally:
        if tmp is not None:
            tmp.cleanup()
    rows, summary_rows, headline = [], [], []
    for run in runs:
        for r in run['domains']:
            rows.append([run['link'], r['domain'], r['joint_fps'],
                         f'{common.fmt(r["best_plain_split_fps"])} ({r["best_plain_split_lam"]})', r['edge_only_fps'],
                         r['server_only_fps'], r['joint_over_best_plain'], r['joint_lam'], r['branches_pruned'],
                         r['accuracy_drop_pct']])
        s = run['summary']
        summary_rows.append([run['link'], s['domains'], s['mean_joint_fps'], s['mean_best_plain_split_fps'],
                             s['mean_edge_only_fps'], s['mean_server_only_fps'], s['mean_joint_over_best_plain'],
                             f'{common.fmt(s["worst_joint_over_best_plain"])} ({s["worst_ratio_domain"]})',
                             s['mean_accuracy_drop_pct'],
                             f'{common.fmt(s["worst_accuracy_drop_pct"])} ({s["worst_drop_domain"]})',
                             run['step3_wall_s']])
        headline += [[f'{run["link"]}: mean joint / best plain split throughput', s['mean_joint_over_best_plain'],
                      'x'],
                     [f'{run["link"]}: worst-domain accuracy drop', s['worst_accuracy_drop_pct'], 'points']]
    eps = args.epsilon if args.epsilon is not None else Config().joint.epsilon
    where = 'quick: synthetic, tiny' if args.quick else f'copy of {args.results_dir}'
    tables = [common.table(f'Joint configuration vs plain-model baselines, mean and worst domain per link '
                           f'(epsilon {eps} points; predicted throughput; {where})', SUMMARY_COLUMNS, summary_rows),
              common.table('Per domain', DOMAIN_COLUMNS, rows)]
    payload = {'settings': {'links': links, 'domains': args.domains, 'epsilon': eps, 'source': where,
                            'step_args': list(args.step_args)},
               'links': {r['link']: {k: v for k, v in r.items() if k != 'link'} for r in runs},
               'wall_s': time.perf_counter() - t0}
    path = common.write_result(args.out_dir, NAME, payload, machine, args.quick, headline, tables, argv)
    common.print_tables(tables, path)
    return 0


if __name__ == '__main__':
    run_cli(main)
