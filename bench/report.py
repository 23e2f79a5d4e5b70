"""The combined bench table from bench/results/*.json, printed; with --write_readme also bench/README.md.

    python bench/report.py [--results_dir bench/results] [--write_readme | --update_readme]
                           [--date '2025-01-01 12:00 UTC']
"""
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as a script, from the repo root or from inside bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from artifacts import atomic_write_bytes  # noqa: E402
from bench import common  # noqa: E402
from config import run_cli  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rel = common.RESULTS_DIR.relative_to(common.REPO_ROOT)
    p.add_argument('--results_dir', default=str(common.RESULTS_DIR),
                   help=f'where the bench result files are (default: {rel})')
    p.add_argument('--write_readme', action='store_true',
                   help='regenerate bench/README.md from the results (default: off, print only)')
    p.add_argument('--update_readme', action='store_true',
                   help='re-render only the benches in --results_dir into bench/README.md, keeping the other '
                   'benches\' sections (default: off)')
    p.add_argument('--date', default=None, help='date line of the README, e.g. the output of `date -u` '
                   '(default: now, UTC)')
    args = p.parse_args(argv)
    results = common.collect(Path(args.results_dir))
    if not results:
        raise common.BenchError(f'{args.results_dir}: no bench result files (*.json); run bench/run_all.sh')
    print(common.render(['bench', 'metric', 'value', 'unit'], common.combined_rows(results), markdown=False))
    for r in results:
        print(f'{r["bench"]}: {common.machine_line(r["machine"])}, {r["created_at"]}')
    path = common.BENCH_DIR / 'README.md'
    if args.write_readme or args.update_readme:
        date = args.date or common.utc_now()
        text = common.readme_text(results, date) if args.write_readme else \
            common.update_readme_text(path.read_text() if path.is_file() else '', results, date)
        atomic_write_bytes(path, text.encode())
        print(f'-> {path}')
    return 0


if __name__ == '__main__':
    run_cli(main)
