#!/usr/bin/env bash
# One row of the whole-run recipe search (benchmarks/RESULTS.md), on a 2-GPU machine:
#   train once and replay TARGETS over the whole run (torchrun, ranks split the reverse passes),
#   the smoothness screen (4 trainings, one GPU), then a small LDS (torchrun, ranks split models).
# TARGETS=none: the cheap screen only, no replay and no LDS: `train --run-dir`, then
#   `smoothness` (determinism and the metasmoothness S; 5 trainings in all).
# Usage (on the GPU machine, from the checkout root, after `source .gpu/gpu_env.sh`):
#   NAME=magic-w1 RECIPE="--preset full --set ..." TARGETS=0:4 MODELS=16 KEEP=0.99 \
#     bash benchmarks/archive/gpu_screen.sh
# Each step has its own time limit (T_MAGIC, T_SMOOTH, T_LDS seconds) so that one call returns
# whatever finished; results land in $OUT/$NAME.txt (JSON lines) and $OUT/$NAME.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
: "${NAME:?}" "${RECIPE:?}" "${TARGETS:=0:4}" "${MODELS:=16}" "${KEEP:=0.99}"
: "${T_MAGIC:=300}" "${T_SMOOTH:=120}" "${T_LDS:=200}" "${NPROC:=2}"
R=$OUT/$NAME.txt; L=${LOGS:-$OUT}/$NAME.log; RUN=runs/$NAME
echo "recipe $NAME: $RECIPE targets $TARGETS models $MODELS keep $KEEP" | tee -a "$R"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee -a "$R"
t0=$(date +%s)
if [ "$TARGETS" = none ]; then
  # shellcheck disable=SC2086
  timeout "$T_MAGIC" python -m fastreplay train $RECIPE --run-dir "$RUN" --json \
    --log-file "$L" 2>>"$L" | tee -a "$R"
  echo "{\"step\": \"train\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$R"
  timeout "$T_SMOOTH" python -m fastreplay smoothness --run-dir "$RUN" --keep "$KEEP" --json \
    --log-file "$L" 2>>"$L" | tee -a "$R"
  exit 0
fi
# shellcheck disable=SC2086
timeout "$T_MAGIC" torchrun --standalone --nproc-per-node "$NPROC" -m fastreplay magic $RECIPE \
  --targets "$TARGETS" --run-dir "$RUN" --json --no-plots --log-file "$L" 2>>"$L" | tee -a "$R"
echo "{\"step\": \"magic\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$R"
t0=$(date +%s)
timeout "$T_SMOOTH" python -m fastreplay smoothness --run-dir "$RUN" --keep "$KEEP" --json \
  --log-file "$L" 2>>"$L" | tee -a "$R"
echo "{\"step\": \"smoothness\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$R"
t0=$(date +%s)
timeout "$T_LDS" torchrun --standalone --nproc-per-node "$NPROC" -m fastreplay lds --run-dir "$RUN" \
  --models "$MODELS" --keep "$KEEP" --json --log-file "$L" 2>>"$L" | tee -a "$R"
echo "{\"step\": \"lds\", \"wall_s\": $(( $(date +%s) - t0 ))}" | tee -a "$R"
grep -h "test accuracy\|training\|replay" "$L" | tail -8 | tee -a "$R"
true
