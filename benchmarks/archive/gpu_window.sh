#!/usr/bin/env bash
# One device call: models/minute one-at-a-time vs batched, then the full recipe (TF32) attributed
# over its last epoch (replay.start_step = 873 of 970) for 8 targets, then the smoothness check.
set -uo pipefail
export PYTHONUNBUFFERED=1
timeout 120 python - <<'PY' | tee $OUT/models_per_minute.json
import json, torch
from fastreplay.config import load_config
from fastreplay.core.recipe import Recipe
from fastreplay.core.multitrain import _steps_per_second
r = Recipe(load_config("full", overrides=["train.tf32=true"]))
out = {}
for m in (1, 4, 8):
    rate = _steps_per_second(r, m, steps=5)
    out[f"m{m}_models_per_min"] = 60 * rate / r.num_steps
print(json.dumps(out))
PY
RUN=runs/window
S="--preset full --set train.tf32=true --set replay.window_epochs=0 --set replay.start_step=873 --set replay.target_batch=8"
timeout 200 python -m fastreplay.interface.cli magic $S --targets 0:8 --run-dir $RUN --json --log-file $OUT/window.log | tee $OUT/window.json
cp $RUN/plots/target_00002.png $OUT/ 2>/dev/null
timeout 150 python -m fastreplay.interface.cli smoothness --run-dir $RUN --json --log-file $OUT/smooth.log | tee $OUT/smoothness.json
