#!/usr/bin/env bash
# One device call: the full preset with train.bf16 (train, 10 measurements, 50-model LDS), then
# the same LDS protocol on the fp32 run left by gpu_precision_fp32.sh (runs/fp32).
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
timeout 150 python -m fastreplay magic --preset full --targets 0:10 --set train.bf16=true \
  --set replay.hvp=forward-vmap --run-dir runs/bf16 --json 2>>$OUT/log.txt | tee -a $R
timeout 150 python -m fastreplay lds --run-dir runs/bf16 --models 50 --keep 0.99 --json 2>>$OUT/log.txt | tee -a $R
timeout 230 python -m fastreplay lds --run-dir runs/fp32 --models 50 --keep 0.99 --json 2>>$OUT/log.txt | tee -a $R
tail -n 4 $OUT/log.txt >> $R
true
