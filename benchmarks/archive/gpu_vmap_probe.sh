#!/usr/bin/env bash
# One device call (one H100): replay-step probe of reverse / forward / forward-vmap at K = 1 and
# 10, fp32 and TF32, full preset (channels_last).
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
for s in "" "--set train.tf32=true"; do
  timeout 150 python benchmarks/step_probe.py --preset full --set train.epochs=1 $s --targets 10 2>>$OUT/probe.log | tee -a $R
done
true
