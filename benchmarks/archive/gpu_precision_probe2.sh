#!/usr/bin/env bash
# One device call (one H100): the step probe with train.bf16 (all variants) and in float64
# (is the compiled step exact where rounding cannot hide anything?).
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
echo "== bf16" | tee -a $R
timeout 230 python benchmarks/step_probe.py --preset full --set train.epochs=1 --set train.bf16=true \
  --targets 10 2>>$OUT/probe.log | tail -1 | tee -a $R
echo "== float64" | tee -a $R
timeout 200 python benchmarks/step_probe.py --preset full --set train.epochs=1 --set train.dtype=float64 \
  --set train.channels_last=false --targets 2 --variants reverse forward forward+compile 2>>$OUT/probe.log | tail -1 | tee -a $R
tail -5 $OUT/probe.log >> $R
true
