#!/usr/bin/env bash
# One device call (one GPU): replay-step probes (HVP mode x precision x layout), then the full
# recipe at 16 epochs attributed over its last epoch: 10 measurements, smoothness, a 20-model LDS.
# Everything printed goes to $OUT/results.txt, the logs to $OUT/all.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt; L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
[ "${PROBE:-1}" = 1 ] && for s in "" "--set train.channels_last=true" "--set train.tf32=true" \
         "--set train.tf32=true --set train.channels_last=true"; do
  timeout 90 python benchmarks/step_probe.py --preset full --set train.epochs=1 $s --targets 5 2>>$L | tee -a $R
done
CHOICE="--set train.tf32=true --set train.channels_last=true --set replay.hvp=forward"
echo "chosen: $CHOICE" | tee -a $R
RUN=runs/e16
S="--preset full --set train.epochs=16 --set replay.target_batch=10 $CHOICE"
timeout 240 python -m fastreplay.interface.cli magic $S --targets 0:10 --run-dir $RUN --json --log-file $L | tee -a $R
du -sh $RUN/run.zarr | tee -a $R
cp $RUN/plots/target_00002.png $OUT/ 2>/dev/null
timeout 90 python -m fastreplay.interface.cli smoothness --run-dir $RUN --json --log-file $L | tee -a $R
timeout 150 python -m fastreplay.interface.cli lds --run-dir $RUN --models 20 --keep 0.99 --json --log-file $L | tee -a $R
cp $RUN/plots/lds_weight_keep0.99.png $OUT/ 2>/dev/null
