#!/usr/bin/env bash
# The precision-LDS protocol of gpu_precision_lds.sh (test 0..9, 50 models, keep 0.99, last
# epoch) for exact fp32 and for TF32, so the three precisions compare on the same footing.
# About 9 min on an H200: fp32 magic ~200 s + LDS ~270 s, TF32 magic ~90 s + LDS ~80 s.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
for P in train.tf32=false train.tf32=true; do
  D=runs/lds_${P#train.}
  echo "== $P" | tee -a $R
  python -m fastreplay magic --preset full --targets 0:10 --set $P --run-dir $D --json \
    2>>$OUT/log.txt | tee -a $R
  python -m fastreplay lds --run-dir $D --models 50 --keep 0.99 --json 2>>$OUT/log.txt | tee -a $R
done
tail -n 4 $OUT/log.txt >> $R
true
