"""Times one training step and one replay step per HVP mode (K targets looped) on a recipe.

    python benchmarks/step_probe.py --preset full --set train.epochs=1 --targets 5
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from fastreplay.config import load_config
from fastreplay.recipe import Recipe
from fastreplay.replay import step_vjp


def timed(fn, reps=5, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="full")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--targets", type=int, default=5)
    a = ap.parse_args()
    cfg = load_config(a.preset, overrides=a.set)
    r = Recipe(cfg)
    st = r.init_state()
    ones = r.ones()
    out = {"set": a.set, "params": r.model.num_params, "device": torch.cuda.get_device_name(0)}
    out["train_step_s"] = timed(lambda: (r.step(st, ones), setattr(st, "step", 0)))
    K = a.targets
    gb = torch.randn(K, r.model.num_params, device=r.device, dtype=r.dtype)
    bb = torch.randn(K, r.model.num_buffers, device=r.device, dtype=r.dtype)
    results = {}
    for hvp in ("reverse", "forward", "forward-vmap"):
        r.cfg = dataclasses.replace(cfg, replay=dataclasses.replace(cfg.replay, hvp=hvp))
        for k in (1, K):
            out[f"{hvp}_K{k}_s"] = timed(
                lambda: step_vjp(r, st.theta, st.buffers, 0, gb[:k], bb[:k]), reps=3)
        results[hvp] = step_vjp(r, st.theta, st.buffers, 0, gb, bb)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    for h in ("forward", "forward-vmap"):
        out[f"{h}_vs_reverse_rel"] = [rel(results[h][i], results["reverse"][i]) for i in (0, 1)]
    out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
