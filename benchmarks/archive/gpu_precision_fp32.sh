#!/usr/bin/env bash
# One device call: the shipped full preset in exact fp32 (16 epochs, last epoch attributed), 10
# measurements replayed together with forward-vmap, then the same scores again with
# replay.compile (compilation included) and how far they move.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
timeout 330 python -m fastreplay magic --preset full --targets 0:10 --set replay.hvp=forward-vmap \
  --run-dir runs/fp32 --json 2>>$OUT/magic.log | tee -a $R
timeout 230 python benchmarks/compare_replays.py --run-dir runs/fp32 \
  --variants forward-vmap+compile 2>>$OUT/compare.log | tee -a $R
tail -3 $OUT/magic.log $OUT/compare.log >> $R
true
