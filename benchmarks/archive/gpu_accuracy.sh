#!/usr/bin/env bash
# One device call (one H100): a GPU smoke run of magic + lds on the final code, then training-only
# accuracy probes of full-preset variants (TF32; no replay, no LDS) toward the 92% aim.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $R
S="--preset full --set train.epochs=2 --set train.tf32=true"
timeout 120 python -m fastreplay magic $S --targets 0:2 --run-dir runs/smoke --json --no-plots 2>>$OUT/smoke.log | tee -a $R
timeout 90 python -m fastreplay lds --run-dir runs/smoke --models 4 --keep 0.99 --json --no-plots 2>>$OUT/smoke.log | tee -a $R
timeout 330 python - <<'PY' 2>>$OUT/acc.log | tee -a $R
import json, time, torch
from fastreplay.config import load_config
from fastreplay.core.measure import accuracy
from fastreplay.core.recipe import Recipe
from fastreplay.core.train import train
variants = [[], ["train.label_smoothing=0.0"], ["model.activation=relu"], ["train.epochs=24"],
            ["model.pool=avg"], ["train.lr=0.8"]]
for v in variants:
    r = Recipe(load_config("full", overrides=["train.tf32=true"] + v))
    torch.cuda.synchronize(); t0 = time.perf_counter()
    st = train(r)
    torch.cuda.synchronize()
    print(json.dumps({"variant": v, "accuracy": accuracy(r, st.theta, st.buffers),
                      "train_s": time.perf_counter() - t0}), flush=True)
PY
true
