#!/usr/bin/env bash
# Runs every bench/bench_*.py with .venv (created like run_tests.sh does), prints the combined table, writes
# bench/results/<name>.json and regenerates bench/README.md (table, date from `date -u`, machine).
#
#   bash bench/run_all.sh [--quick] [--pipeline_log FILE]
#
#   --quick              tiny settings (seconds; results go to a temporary directory, README untouched)
#   --pipeline_log FILE  bench_pipeline.py reads the stderr of an earlier run_pipeline.sh run instead of
#                        running the pipeline on the embedded default itself (the slowest bench)
#
# bench_quality.py, bench_optimizer.py (step 3) and bench_executor.py read the finished run in results/ (read only);
# without one, bench_quality.py and bench_executor.py use the run bench_pipeline.py made in results/_bench_pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0; plog=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --quick) quick=1; shift ;;
    --pipeline_log) plog="$2"; shift 2 ;;
    *) echo "run_all.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done

source scripts/setup.sh dataset-fashion-mnist
PY=.venv/bin/python

if [ "$quick" = 1 ]; then out="$(mktemp -d)"; flags=(--quick --out_dir "$out"); else out=bench/results; flags=(); fi
mkdir -p "$out"
failed=()
for script in bench/bench_*.py; do
  extra=()
  if [ "$(basename "$script")" = bench_pipeline.py ] && [ -n "$plog" ]; then extra=(--log "$plog"); fi
  if [ "$(basename "$script")" = bench_quality.py ] && [ "$quick" = 0 ] && [ ! -f results/hardware_lut_complete.json ]; then
    extra=(--results_dir results/_bench_pipeline)
  fi
  if [ "$(basename "$script")" = bench_executor.py ] && [ "$quick" = 0 ] && [ ! -f results/hardware_lut_complete.json ]; then
    extra=(--source results/_bench_pipeline)
  fi
  echo "== bench: $script ${flags[*]} ${extra[*]}" >&2
  t0=$SECONDS
  if "$PY" "$script" "${flags[@]}" "${extra[@]}"; then
    echo "== bench: $script done in $((SECONDS - t0)) s" >&2
  else
    echo "run_all.sh: $script failed (see above); continuing with the others" >&2
    failed+=("$script")
  fi
done

echo "== combined table ($out)" >&2
if [ "$quick" = 1 ]; then
  "$PY" bench/report.py --results_dir "$out"
else
  "$PY" bench/report.py --results_dir "$out" --write_readme --date "$(date -u '+%Y-%m-%d %H:%M UTC')"
fi
if [ "${#failed[@]}" -gt 0 ]; then
  echo "run_all.sh: failed: ${failed[*]}" >&2
  exit 1
fi
