#!/usr/bin/env bash
# The one GPU runner: every GPU figure in benchmarks/RESULTS.md from now on comes from one of
# these subcommands (older figures name the exact script they came from, kept in
# benchmarks/archive/). Run on the GPU machine from the checkout root, after
# `source .gpu/gpu_env.sh` (see the device notes in README "Tests"); results land in $OUT.
#
#   bash benchmarks/gpu.sh suite
#       the CUDA test suite (kernels and GPU paths), must load the compiled extension
#   bash benchmarks/gpu.sh bench [--set KEY=VALUE ...]
#       `fastreplay bench kernels` and `bench replay` (full preset, 1 and 4 measurements)
#   NAME=... RECIPE="--preset full --set ..." [TARGETS=0:4 MODELS=16 KEEP=0.99] bash benchmarks/gpu.sh row
#       one row of a recipe search: train and replay TARGETS over the attribution window
#       (torchrun over the visible GPUs), the smoothness screen, then an LDS of MODELS models;
#       TARGETS=none: `train --run-dir` + `smoothness` only (no replay, no LDS). Each step has
#       its own limit (T_MAGIC, T_SMOOTH, T_LDS seconds), so a call returns what finished.
#       TASK=FILE.py:FUNCTION attributes a user task (examples/): passed as --task to each step.
#       Results: $OUT/NAME.txt (JSON lines); log: ${LOGS:-$OUT}/NAME.log.
#   [NAME=noise NOISE=0.05 REMOVE=2500 GROUP=all RECIPE="--preset full"] bash benchmarks/gpu.sh noise
#       the label-noise benchmark of `fastreplay debug`: train with NOISE of the training labels
#       flipped, rank by harm to GROUP's mean test loss against the baselines, retrain without
#       the top REMOVE (scores, best baseline, random); GROUP=0:5000 also judges every model on
#       the held-out half. $OUT/NAME.txt, NAME.png.
#   NAME=... RECIPE="..." TARGETS=... [TASK=... MODELS=100 KEEPS="0.99 0.95" REMOVAL=weight
#     METHODS=magic,gradsim,trak,ekfac,kfac,tracin] bash benchmarks/gpu.sh compare
#       an attribution row against the peers: `magic` over TARGETS, an LDS of MODELS models
#       for each keep, then `fastreplay compare` on each (the peers travel as wheels in .whl/,
#       installed by the caller). Limits T_MAGIC, T_LDS, T_COMPARE seconds; every step resumes
#       what a previous call stored. $OUT/NAME.txt (JSON lines), NAME.log, NAME_REMOVAL_keepK.png.
#   ROWFILE=rows.txt [T_ROW=240 BASE="..."] bash benchmarks/gpu.sh screen
#       replay-free screens of many recipes: each ROWFILE line "NAME --set KEY=VALUE ..."
#       (# comments) is a `row` with TARGETS=none on top of BASE (default: the MAGIC-style
#       recipe), rows dealt round-robin to the visible GPUs; logs in $LOGS (default
#       /tmp/screen-logs) so that a call returns few files.
set -uo pipefail
export PYTHONUNBUFFERED=1
here=$(dirname "$0")

suite() {
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/suite.txt"
  FASTREPLAY_REQUIRE_EXT=1 python -m pytest -q -rf --tb=line -m cuda tests/ 2>&1 | tail -25 | tee -a "$OUT/suite.txt"
}

bench() {
  python -m fastreplay bench kernels --device cuda --json "$@" | tee -a "$OUT/bench.txt"
  python -m fastreplay bench replay --device cuda --preset full --targets 1,4 --json "$@" \
    | tee -a "$OUT/bench.txt"
}

row() {
  : "${NAME:?}" "${RECIPE:?}" "${TARGETS:=0:4}" "${MODELS:=16}" "${KEEP:=0.99}"
  : "${T_MAGIC:=300}" "${T_SMOOTH:=120}" "${T_LDS:=200}"
  local nproc r l run t0 task=()
  nproc=${NPROC:-$(nvidia-smi --list-gpus | wc -l)}
  [ -n "${TASK:-}" ] && task=(--task "$TASK")
  r=$OUT/$NAME.txt; l=${LOGS:-$OUT}/$NAME.log; run=runs/$NAME
  echo "recipe $NAME: $RECIPE targets $TARGETS models $MODELS keep $KEEP" | tee -a "$r"
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee -a "$r"
  t0=$(date +%s)
  if [ "$TARGETS" = none ]; then
    # shellcheck disable=SC2086
    timeout "$T_MAGIC" python -m fastreplay train $RECIPE "${task[@]}" --run-dir "$run" --json \
      --log-file "$l" 2>>"$l" | tee -a "$r"
    echo "{\"step\": \"train\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$r"
    timeout "$T_SMOOTH" python -m fastreplay smoothness --run-dir "$run" --keep "$KEEP" --json \
      "${task[@]}" --log-file "$l" 2>>"$l" | tee -a "$r"
    return 0
  fi
  # shellcheck disable=SC2086
  timeout "$T_MAGIC" torchrun --standalone --nproc-per-node "$nproc" -m fastreplay magic $RECIPE \
    "${task[@]}" --targets "$TARGETS" --run-dir "$run" --json --no-plots --log-file "$l" 2>>"$l" \
    | tee -a "$r"
  echo "{\"step\": \"magic\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$r"
  t0=$(date +%s)
  timeout "$T_SMOOTH" python -m fastreplay smoothness --run-dir "$run" --keep "$KEEP" --json \
    "${task[@]}" --log-file "$l" 2>>"$l" | tee -a "$r"
  echo "{\"step\": \"smoothness\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$r"
  t0=$(date +%s)
  timeout "$T_LDS" torchrun --standalone --nproc-per-node "$nproc" -m fastreplay lds \
    --run-dir "$run" --models "$MODELS" --keep "$KEEP" --json "${task[@]}" --no-plots \
    --log-file "$l" 2>>"$l" | tee -a "$r"
  echo "{\"step\": \"lds\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$r"
  grep -h "test accuracy\|training\|replay" "$l" | tail -8 | tee -a "$r"
}

noise() {
  : "${NAME:=noise}" "${NOISE:=0.05}" "${REMOVE:=2500}" "${GROUP:=all}" "${RECIPE:=--preset full}"
  local r=$OUT/$NAME.txt l=${LOGS:-$OUT}/$NAME.log run=runs/$NAME png
  echo "label noise $NAME: $RECIPE noise $NOISE remove $REMOVE group $GROUP" | tee -a "$r"
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee -a "$r"
  # shellcheck disable=SC2086
  python -m fastreplay train $RECIPE --set data.label_noise="$NOISE" --run-dir "$run" --json \
    --log-file "$l" 2>>"$l" | tee -a "$r"
  python -m fastreplay debug --run-dir "$run" --group "$GROUP" --retrain-without "$REMOVE" \
    --top 12 --json --log-file "$l" 2>>"$l" | tee -a "$r"
  for png in "$run"/debug/harm_*.png; do cp "$png" "$OUT/$NAME.png"; done
}

compare() {
  : "${NAME:?}" "${RECIPE:?}" "${TARGETS:?}" "${MODELS:=100}" "${KEEPS:=0.99}" "${REMOVAL:=weight}"
  : "${METHODS:=magic,gradsim,trak,ekfac,kfac,tracin}"
  : "${T_MAGIC:=300}" "${T_LDS:=300}" "${T_COMPARE:=200}"
  local r=$OUT/$NAME.txt l=${LOGS:-$OUT}/$NAME.log run=runs/$NAME task=() keep t0
  [ -n "${TASK:-}" ] && task=(--task "$TASK")
  echo "compare $NAME: $RECIPE targets $TARGETS models $MODELS keeps $KEEPS $REMOVAL" | tee -a "$r"
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee -a "$r"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$T_MAGIC" python -m fastreplay magic $RECIPE "${task[@]}" --targets "$TARGETS" \
    --run-dir "$run" --json --no-plots --log-file "$l" 2>>"$l" | tee -a "$r"
  echo "{\"step\": \"magic\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$r"
  for keep in $KEEPS; do
    t0=$(date +%s)
    timeout "$T_LDS" python -m fastreplay lds --run-dir "$run" --models "$MODELS" --keep "$keep" \
      --removal "$REMOVAL" --json --no-plots "${task[@]}" --log-file "$l" 2>>"$l" | tee -a "$r"
    echo "{\"step\": \"lds $keep\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$r"
  done
  for keep in $KEEPS; do
    t0=$(date +%s)
    timeout "$T_COMPARE" python -m fastreplay compare --run-dir "$run" --methods "$METHODS" \
      --keep "$keep" --removal "$REMOVAL" --json "${task[@]}" --log-file "$l" 2>>"$l" | tee -a "$r"
    echo "{\"step\": \"compare $keep\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$r"
    cp "$run/compare/${REMOVAL}_keep${keep}.png" "$OUT/${NAME}_${REMOVAL}_keep${keep}.png" 2>/dev/null
  done
  grep -h "test accuracy\|training\|replay\|LDS:" "$l" | tail -10 | tee -a "$r"
}

screen() {
  : "${ROWFILE:?}" "${T_ROW:=240}" "${LOGS:=/tmp/screen-logs}"
  : "${BASE:=--preset full --config $here/recipes/magic-style.toml}"
  export LOGS
  mkdir -p "$LOGS"
  local ngpu g
  ngpu=$(nvidia-smi --list-gpus | wc -l)
  for g in $(seq 0 $((ngpu - 1))); do
    (
      i=0
      grep -v '^\s*\(#\|$\)' "$ROWFILE" | while read -r name args; do
        if [ $((i % ngpu)) -eq "$g" ]; then
          CUDA_VISIBLE_DEVICES=$g NAME=$name RECIPE="$BASE $args" TARGETS=none \
            T_MAGIC=$T_ROW T_SMOOTH=$T_ROW row >/dev/null 2>&1
        fi
        i=$((i + 1))
      done
    ) &
  done
  wait
}

case "${1:-}" in
  suite|bench|row|noise|compare|screen) cmd=$1; shift; "$cmd" "$@" ;;
  *) sed -n '2,27p' "$0"; exit 2 ;;
esac
