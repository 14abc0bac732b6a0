#!/usr/bin/env bash
# Two H100s, call B (same machine, right after A): the 100-model LDS at keep 0.95 on ONE GPU
# (the 1-vs-2-GPU comparison) and the smoothness check, while GPU 1 runs two sweep variants.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt; L=$OUT/all.log
S="--preset full --set train.tf32=true --set replay.hvp=reverse --set replay.target_batch=25"
if [ ! -d runs/full/run.zarr ]; then  # the machine was lost between calls: redo A's run
  torchrun --standalone --nproc-per-node 2 -m fastreplay magic $S --targets 0:50 \
    --run-dir runs/full --json --no-plots --log-file $L 2>>$L | tee -a $R
fi
sweep() {  # name, overrides...: train, replay 5 targets, smoothness, 20-model LDS on GPU 1
  local name=$1; shift
  export CUDA_VISIBLE_DEVICES=1
  python -m fastreplay magic --preset full --set train.tf32=true --set replay.hvp=reverse \
    --set replay.target_batch=5 "$@" --targets 0:5 --run-dir runs/$name --json --no-plots \
    --log-file $OUT/sweep.log > $OUT/sweep_$name.txt 2>>$OUT/sweep.log
  python -m fastreplay smoothness --run-dir runs/$name --json --log-file $OUT/sweep.log >> $OUT/sweep_$name.txt 2>>$OUT/sweep.log
  python -m fastreplay lds --run-dir runs/$name --models 20 --keep 0.99 --json --no-plots \
    --log-file $OUT/sweep.log >> $OUT/sweep_$name.txt 2>>$OUT/sweep.log
}
( sweep w2 --set replay.window_epochs=2; \
  sweep e10 --set train.epochs=10 ) &
t0=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 400 python -m fastreplay lds --run-dir runs/full --models 100 \
  --keep 0.95 --json --log-file $L 2>>$L | tee -a $R
echo "lds_1gpu_wall_s $(( $(date +%s) - t0 ))" | tee -a $R
CUDA_VISIBLE_DEVICES=0 timeout 120 python -m fastreplay smoothness --run-dir runs/full --json \
  --log-file $L 2>>$L | tee -a $R
cp runs/full/plots/lds_weight_keep0.95.png $OUT/ 2>/dev/null
wait
cat $OUT/sweep_*.txt >> $R
true
