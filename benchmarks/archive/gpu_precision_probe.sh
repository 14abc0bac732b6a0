#!/usr/bin/env bash
# One device call (one H100): the replay step per variant (HVP mode x torch.compile) in fp32 and
# with train.bf16, against our and a plain eager torch.nn training step (benchmarks/step_probe.py).
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
for P in train.bf16=false train.bf16=true; do
  echo "== $P" | tee -a $R
  timeout 250 python benchmarks/step_probe.py --preset full --set train.epochs=1 --set $P \
    --targets 10 2>>$OUT/probe.log | tee -a $R
done
tail -5 $OUT/probe.log >> $R
true
