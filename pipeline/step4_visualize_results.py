"""Step 4: figures and the paper table from the artifacts of steps 0-3 (docs/design.md#artifacts-and-steps).

    python pipeline/step4_visualize_results.py [--results_dir results] [--domains 0,3] [--formats png,pdf]

Reads the LUT (required), the step-2 configuration and the step-3 results per domain (optional: figures that
need a missing input are skipped with a logged note), and writes under <results_dir>/visualization/:
accuracy_throughput_curve, domain_comparison, alpha_heatmap, gamma_heatmap, lut_heatmap_edge,
lut_heatmap_server, stage_times, predicted_vs_measured (real mode only) as PNG and PDF, summary.md and
summary.json.
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside pipeline/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import List, Optional, Sequence  # noqa: E402

from artifacts import atomic_write_bytes, write_artifact  # noqa: E402
from config import ConfigError, add_common_args, command_line, resolve_config, run_cli  # noqa: E402

log = logging.getLogger('step4')
KNOWN_FORMATS = ('png', 'pdf', 'svg')


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_common_args(p)
    p.add_argument('--domains', default=None,
                   help='comma-separated domain ids to show (default: every domain with a step-3 result)')
    p.add_argument('--formats', default='png,pdf',
                   help=f'comma-separated figure formats out of {", ".join(KNOWN_FORMATS)} (default: png,pdf)')
    p.add_argument('--batch', type=int, default=None,
                   help='LUT batch size shown in the LUT heatmaps, samples (default: optim.batch_size of the config)')
    return p.parse_args(argv)


def parse_formats(text: str) -> List[str]:
    formats = [f.strip().lower().lstrip('.') for f in text.split(',') if f.strip()]
    bad = [f for f in formats if f not in KNOWN_FORMATS]
    if not formats or bad:
        raise ConfigError(f'--formats {text!r}: expected a comma-separated subset of {", ".join(KNOWN_FORMATS)}')
    return formats


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='step4: %(message)s', stream=sys.stderr)
    args = parse_args(argv)
    cfg = resolve_config(args)
    formats = parse_formats(args.formats)
    from viz import plots, summary  # matplotlib is imported only when the step runs

    inputs = summary.collect(cfg.path(), args.domains, args.batch or cfg.optim.batch_size)
    builders, skipped = plots.figure_builders(inputs)
    for note in inputs.notes + skipped:
        log.info(note)
    out_dir = cfg.path('visualization')
    written: List[Path] = []
    for name, make in builders.items():
        written += plots.save_figure(make(), out_dir, name, formats)
    # a figure of a format written now that this run did not draw is stale (an earlier run's, no longer matching
    # the artifacts); files of formats not asked for this time are left alone (--formats png keeps the PDFs)
    for stale in (out_dir / f'{n}.{f}' for n in plots.FIGURE_NAMES for f in formats):
        if stale.is_file() and stale not in written:
            stale.unlink()
            log.info('removed %s (an earlier run wrote it; this run did not)', stale.name)
    table = summary.build_summary(inputs, skipped)
    atomic_write_bytes(out_dir / 'summary.md', summary.summary_markdown(table).encode())
    write_artifact(out_dir / 'summary.json', 'summary', table.to_payload(), cfg, command_line(argv))
    written += [out_dir / 'summary.md', out_dir / 'summary.json']
    log.info('wrote %d files under %s', len(written), out_dir)
    for line in summary.console_lines(table):
        print(line)
    return 0


if __name__ == '__main__':
    run_cli(main)
