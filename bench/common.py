"""What the bench scripts share: the result JSON (with the machine it ran on), tables, the combined report.

Every bench script writes `bench/results/<name>.json` through `write_result`: an artifact (artifacts.py: atomic,
`schema_version`, `kind` = 'bench_<name>', `created_at`, `command`) whose payload carries

* `machine`  - CPU model, cores, torch / python versions, platform, load average before and after the run;
* `quick`    - True when the run used the tiny --quick settings (numbers not meant for reading);
* `headline` - rows [metric, value, unit] for the combined table of bench/run_all.sh;
* `tables`   - detail tables {'title', 'columns', 'rows'} rendered into bench/README.md;
* whatever else the script measured (raw records, settings).

Numbers reach bench/README.md only through these files (bench/report.py), never by hand.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / 'results'

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from artifacts import load_artifact, write_artifact  # noqa: E402
from config import UserError  # noqa: E402
from timing.measure import cpu_name  # noqa: E402


class BenchError(UserError):
    """A bench result file that is missing or malformed; the message names the file and the field."""


def load_average() -> Optional[List[float]]:
    """1/5/15-minute load averages (a busy machine makes timings noisy), None where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def is_loaded(load: Optional[Sequence[float]], own: float = 0.0) -> bool:
    """Whether other work loads this machine: the 1-minute load average less `own` (the busy threads of this
    bench, once it has run for a minute) above a quarter of the cores (at least 0.5).  Unknown load: False."""
    if not load:
        return False
    return load[0] - own > max(0.5, 0.25 * (os.cpu_count() or 1))


def machine_info() -> Dict[str, Any]:
    """The machine a bench ran on: CPU model, cores, torch / python versions, platform, load average now."""
    import torch
    return {'cpu_model': cpu_name(), 'cpu_cores': os.cpu_count(), 'torch_version': torch.__version__,
            'torch_threads_default': torch.get_num_threads(), 'python_version': platform.python_version(),
            'platform': platform.platform(), 'load_average_start': load_average()}


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Dict[str, Any]:
    """A detail table as stored in a result file."""
    for i, r in enumerate(rows):
        if len(r) != len(columns):
            raise ValueError(f'table {title!r}: row {i} has {len(r)} cells, columns are {list(columns)}')
    return {'title': title, 'columns': list(columns), 'rows': [list(r) for r in rows]}


def fmt(value: Any) -> str:
    """A cell as text: floats with 3 significant digits (at least 1 decimal for >= 100), None as 'n/a'."""
    if value is None:
        return 'n/a'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        return f'{value:.1f}' if abs(value) >= 100 else f'{value:.3g}'
    return str(value)


def print_tables(tables: Sequence[Dict[str, Any]], path: Path) -> None:
    """A bench's tables as plain text on stdout, then where its result file went."""
    for t in tables:
        print(t['title'])
        print(render(t['columns'], t['rows'], markdown=False))
        print()
    print(f'-> {path}')


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = True) -> str:
    """A table as Markdown (for README) or as aligned plain text (for the terminal)."""
    cells = [[fmt(c) for c in r] for r in rows]
    if markdown:  # a '|' inside a cell would end it
        columns = [c.replace('|', '\\|') for c in columns]
        cells = [[c.replace('|', '\\|') for c in r] for r in cells]
        lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
        lines += ['| ' + ' | '.join(r) + ' |' for r in cells]
        return '\n'.join(lines)
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ['  '.join(c.ljust(w) for c, w in zip(columns, widths)), '  '.join('-' * w for w in widths)]
    lines += ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return '\n'.join(lines)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """--quick and --out_dir, shared by every bench script."""
    parser.add_argument('--quick', action='store_true',
                        help='tiny settings that finish in seconds (tests); the numbers are not meant for reading '
                             '(default: off)')
    parser.add_argument('--out_dir', default=str(RESULTS_DIR),
                        help=f'where <name>.json is written (default: {RESULTS_DIR.relative_to(REPO_ROOT)})')


def write_result(out_dir: str, name: str, payload: Dict[str, Any], machine: Dict[str, Any], quick: bool,
                 headline: Sequence[Sequence[Any]], tables: Sequence[Dict[str, Any]],
                 argv: Optional[Sequence[str]] = None) -> Path:
    """Write <out_dir>/<name>.json (kind 'bench_<name>'); `machine` comes from machine_info() taken at the start."""
    from config import command_line
    machine = dict(machine, load_average_end=load_average())
    for i, r in enumerate(headline):
        if len(r) != 3:
            raise ValueError(f'bench {name}: headline row {i} must be [metric, value, unit], got {r!r}')
    body = dict(payload, bench=name, machine=machine, quick=bool(quick), headline=[list(r) for r in headline],
                tables=list(tables))
    path = Path(out_dir) / f'{name}.json'
    write_artifact(path, f'bench_{name}', body, None, command_line(argv))
    return path


RESULT_FIELDS = {'bench': str, 'machine': dict, 'quick': bool, 'headline': list, 'tables': list}


def load_result(path: Path) -> Dict[str, Any]:
    """A bench result file, validated (artifacts.load_artifact plus the bench fields)."""
    obj = load_artifact(path, fields=RESULT_FIELDS)
    if not obj['kind'].startswith('bench_'):
        raise BenchError(f'{path}: field "kind" is {obj["kind"]!r}, expected bench_<name>')
    for i, t in enumerate(obj['tables']):
        if not isinstance(t, dict) or not {'title', 'columns', 'rows'} <= set(t):
            raise BenchError(f'{path}: field "tables[{i}]" needs title, columns and rows')
    return obj


def collect(results_dir: Path) -> List[Dict[str, Any]]:
    """Every bench result in results_dir, by name; files that are not bench results are named in an error."""
    out = []
    for p in sorted(Path(results_dir).glob('*.json')):
        obj = load_result(p)
        obj['_file'] = p.name
        out.append(obj)
    return out


def combined_rows(results: Sequence[Dict[str, Any]]) -> List[List[Any]]:
    """[bench, metric, value, unit] over all results (the table run_all.sh prints)."""
    rows = []
    for r in results:
        tag = r['bench'] + (' (quick)' if r['quick'] else '')
        rows += [[tag] + list(h) for h in r['headline']] or [[tag, '(no headline rows)', None, '']]
    return rows


def machine_line(m: Dict[str, Any], load: bool = True) -> str:
    avg = m.get('load_average_start') if load else None
    return (f'{m.get("cpu_model")}, {m.get("cpu_cores")} cores, torch {m.get("torch_version")}, '
            f'Python {m.get("python_version")}' + (f', 1-minute load average at start {avg[0]}' if avg else ''))


def script_summaries() -> List[List[str]]:
    """[script, first line of its docstring] for every bench/bench_*.py (read with ast, not imported)."""
    import ast
    rows = []
    for p in sorted(BENCH_DIR.glob('bench_*.py')):
        doc = ast.get_docstring(ast.parse(p.read_text())) or ''
        rows.append([f'`{p.name}`', doc.strip().split('\n\n')[0].replace('\n', ' ')])
    return rows


def readme_text(results: Sequence[Dict[str, Any]], date_utc: str) -> str:
    """bench/README.md: how to run, the machine(s), the combined table and every detail table."""
    machines = sorted({machine_line(r['machine'], load=False) for r in results})
    out = [
        '# Benchmarks',
        '',
        '<!-- Generated by bench/run_all.sh (bench/report.py) from bench/results/*.json. Do not edit by hand. -->',
        '',
        ('Run them all with `bash bench/run_all.sh` (uses `.venv`, creating it as run_tests.sh does): every '
         '`bench/bench_*.py` runs, writes `bench/results/<name>.json`, and this file is regenerated. The slowest is '
         '`bench_pipeline.py`, which runs the whole pipeline on the embedded default (`--pipeline_log FILE` reads the '
         'log of an earlier `run_pipeline.sh` run instead). Each script has `--help` and `--quick` (tiny settings, '
         'for tests). Timings depend on the machine and on its load: the 1-minute load average at the start of each '
         'bench is given with its results.'),
        '',
        render(['script', 'what it measures'], script_summaries()),
        '',
        f'Generated {date_utc}.',
        '',
        'Machine: ' + ('; '.join(machines) if machines else 'no results'),
        '',
        '## Combined table',
        '',
        render(['bench', 'metric', 'value', 'unit'], combined_rows(results)),
    ]
    for r in results:
        out += ['', f'## {r["bench"]}' + (' (quick settings)' if r['quick'] else ''), '',
                f'`{r["_file"]}`, written {r["created_at"]} by `{r["command"]}`; {machine_line(r["machine"])}.']
        for t in r['tables']:
            out += ['', f'**{t["title"]}**', '', render(t['columns'], t['rows'])]
    return '\n'.join(out) + '\n'


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=1)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
