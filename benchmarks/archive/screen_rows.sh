#!/usr/bin/env bash
# Replay-free smoothness screens of many recipes at once: one row per line of ROWFILE
# ("NAME --set KEY=VALUE ..."; # comments), dealt round-robin to the visible GPUs, each GPU
# running its rows one after another through gpu_screen.sh with TARGETS=none. Every row's
# result is $OUT/NAME.txt; the logs go to $LOGS (default /tmp/screen-logs), so that a call
# returns few files. BASE (default the MAGIC-style recipe) is put before each row's options.
# Usage (GPU machine, checkout root, after `source .gpu/gpu_env.sh`):
#   ROWFILE=rows.txt T_ROW=200 bash benchmarks/archive/screen_rows.sh
set -uo pipefail
: "${ROWFILE:?}" "${T_ROW:=240}" "${LOGS:=/tmp/screen-logs}"
: "${BASE:=--preset full --config benchmarks/recipes/magic-style.toml}"
export LOGS TARGETS=none
mkdir -p "$LOGS"
ngpu=$(nvidia-smi --list-gpus | wc -l)
for g in $(seq 0 $((ngpu - 1))); do
  (
    i=0
    grep -v '^\s*\(#\|$\)' "$ROWFILE" | while read -r name args; do
      if [ $((i % ngpu)) -eq "$g" ]; then
        CUDA_VISIBLE_DEVICES=$g NAME=$name RECIPE="$BASE $args" T_MAGIC=$T_ROW T_SMOOTH=$T_ROW \
          bash benchmarks/archive/gpu_screen.sh >/dev/null 2>&1
      fi
      i=$((i + 1))
    done
  ) &
done
wait
