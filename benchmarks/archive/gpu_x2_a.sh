#!/usr/bin/env bash
# Two H100s, call A: the shipped full preset (TF32) trained once, 50 measurements replayed on 2
# GPUs (torchrun, NCCL), then the 100-model LDS at keep 0.99 on 2 GPUs.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt; L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
S="--preset full --set train.tf32=true --set replay.hvp=reverse --set replay.target_batch=25"
t0=$(date +%s)
timeout 420 torchrun --standalone --nproc-per-node 2 -m fastreplay magic $S --targets 0:50 \
  --run-dir runs/full --json --no-plots --log-file $L 2>>$L | tee -a $R
echo "magic_2gpu_wall_s $(( $(date +%s) - t0 ))" | tee -a $R
du -sb runs/full/run.zarr | tee -a $R
t0=$(date +%s)
timeout 240 torchrun --standalone --nproc-per-node 2 -m fastreplay lds --run-dir runs/full \
  --models 100 --keep 0.99 --json --log-file $L 2>>$L | tee -a $R
echo "lds_2gpu_wall_s $(( $(date +%s) - t0 ))" | tee -a $R
cp runs/full/plots/lds_weight_keep0.99.png $OUT/ 2>/dev/null
true
