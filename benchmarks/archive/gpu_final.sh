#!/usr/bin/env bash
# One device call: kernel benchmark, then the full recipe (TF32) with 10 measurements in chunks,
# then whatever finished is summarised from the store (a timeout keeps completed chunks).
set -uo pipefail
export PYTHONUNBUFFERED=1
python -m fastreplay.interface.cli bench kernels --device cuda --json | tee $OUT/bench_kernels.json
RUN=runs/full-tf32
timeout ${MAGIC_TIMEOUT:-450} python -m fastreplay.interface.cli magic --preset full --set train.tf32=true \
  --set replay.target_batch=2 --targets 0:10 --run-dir $RUN --json --log-file $OUT/magic.log --no-plots | tee $OUT/magic.json
python - <<'PY' | tee $OUT/store_summary.json
import json, os
from fastreplay.store import RunStore
s = RunStore.open("runs/full-tf32/run.zarr", mode="r")
names = s.score_names()
out = {"status": s.status, "test_accuracy": s.get_attr("test_accuracy"), "train_seconds": s.get_attr("train_seconds"),
       "store_bytes": s.nbytes_on_disk(), "scored": (s.read_scores(names[0])[1]["targets"] if names else [])}
print(json.dumps(out))
PY
timeout 60 python -m fastreplay.interface.cli magic --preset full --set train.tf32=true --targets 0:2 --run-dir $RUN --log-level WARNING >/dev/null 2>&1 && cp $RUN/plots/*.png $OUT/ 2>/dev/null
ls $OUT
