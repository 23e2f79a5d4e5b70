#!/usr/bin/env bash
# Runs the whole pipeline, steps 0 -> 4, on the embedded default (Fashion-MNIST, a small RepVGG-A0,
# pseudo mode) unless told otherwise.  Creates .venv on first use.  A second run reuses finished work
# (the base model, finished domains, the LUT); --fresh starts over in the results directory.
#
#   bash run_pipeline.sh [--mode pseudo|real] [--model NAME] [--dataset NAME] [--link 3g|4g|wifi|ethernet]
#                        [--edge_profile NAME] [--epsilon POINTS] [--domains 0,1,...] [--results_dir DIR]
#                        [--checkpoint FILE] [--executor local|ray] [--ray_address HOST:PORT] [--fresh]
#                        [--set SECTION.KEY=VALUE ...] [--local_device]
# --local_device: real mode without a TX2: client_worker.py on one core of this machine, the server on the others,
#                 the link emulator (100 Mbit/s, 0.5 ms one way) between them (comm/localdevice.py)
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
mode=pseudo; domains=""; fresh=0; local_device=0; args=()
for a in "$@"; do if [ "$a" != --local_device ]; then args+=("$a"); fi; done
common=(); step1=(); step23=(); step3=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --local_device) local_device=1; mode=real; shift; continue ;;
    --mode) mode="$2"; shift 2 ;;
    --model|--dataset|--results_dir|--data_root|--device|--seed|--config) common+=("$1" "$2"); shift 2 ;;
    --set) common+=("$1" "$2"); shift 2 ;;
    --checkpoint) common+=(--set "model.checkpoint=$2"); shift 2 ;;
    --executor) common+=(--set "cluster.executor=$2"); shift 2 ;;      # steps 0 and 3 fan out per domain
    --ray_address) common+=(--set "cluster.ray_address=$2"); shift 2 ;;
    --link|--edge_profile) step1+=("$1" "$2"); step23+=("$1" "$2"); shift 2 ;;
    --epsilon) step3+=("$1" "$2"); shift 2 ;;
    --domains) domains="$2"; shift 2 ;;
    --fresh) fresh=1; shift ;;
    *) echo "run_pipeline.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$mode" in pseudo|real) ;; *) echo "run_pipeline.sh: --mode must be pseudo or real, got $mode" >&2; exit 2 ;; esac

source scripts/setup.sh dataset-fashion-mnist
PY=.venv/bin/python

results=results
for ((i = 0; i < ${#common[@]}; i++)); do [ "${common[$i]}" = "--results_dir" ] && results="${common[$((i + 1))]}"; done

if [ "$local_device" = 1 ] && [ -z "${HYPERREPVGG_LOCAL_DEVICE:-}" ]; then
  # the same pipeline in real mode, run on the server cores, with the stand-in worker and link emulator around it
  export HYPERREPVGG_LOCAL_DEVICE=1
  exec "$PY" -m comm.localdevice --log_dir "$results/local_device" -- \
    bash "$0" ${args[@]+"${args[@]}"} --mode real --set 'real.port={port}'
fi
[ "$fresh" = 1 ] && rm -rf "$results"

run() {  # run one step; stop the pipeline at the first failure with the step's own message
  local name="$1"; shift
  echo "== $name: $*" >&2
  local t0=$SECONDS
  if ! "$PY" "$@"; then
    echo "run_pipeline.sh: $name failed (see the message above); finished work is kept, rerun to resume" >&2
    exit 1
  fi
  echo "== $name done in $((SECONDS - t0)) s" >&2
}

if [ -n "$domains" ]; then dom=(--domains "$domains"); else dom=(--all_domains); fi

run "step 0 (data, base model, hyper-weights)" pipeline/step0_prepare.py "${common[@]}"
if [ "$mode" = real ] || [ ! -f "$results/hardware_lut_complete.json" ]; then
  run "step 1 (LUT)" pipeline/step1_measure_lut.py --mode "$mode" "${common[@]}" "${step1[@]}"
else
  echo "== step 1: reusing $results/hardware_lut_complete.json (delete it, or --fresh, to measure again)" >&2
fi
run "step 2 (throughput)" pipeline/step2_initial_throughput_opt.py --mode "$mode" "${common[@]}" "${step23[@]}"
run "split sweep (step 2's configuration, every lambda; pseudo: server measured here)" pipeline/split_sweep.py \
  "${common[@]}" "${step23[@]}"
run "part files (step 2's configuration)" pipeline/export_parts.py "${common[@]}"
run "step 3 (joint, per domain)" pipeline/step_3_joint.py --mode "$mode" "${dom[@]}" "${common[@]}" "${step23[@]}" "${step3[@]}"
run "step 4 (figures)" pipeline/step4_visualize_results.py "${common[@]}"
echo "results: $results/ (figures and summary.md in $results/visualization/)"
