"""Times one replay step per variant (HVP mode x torch.compile) against the training steps.

    python benchmarks/step_probe.py --preset full --set train.epochs=1 --targets 10 \
        --variants reverse forward forward+compile forward-vmap forward-vmap+compile

Prints one JSON line: ours and the plain eager torch.nn training step, per variant the first
call (compilation included) and the median step at K=1 and K=targets, the whole-run replay cost
per measurement over the faster training step ((step + rebuild) / K / train step), and each
variant's largest deviation from the double-backward step relative to its largest entry.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fastreplay.config import load_config
from fastreplay.core.recipe import Recipe
from fastreplay.core.replay import step_vjp
from fastreplay.workflows.bench import _eager_nn_step, _time, replay_variant


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="full")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--variants", nargs="+",
                    default=["reverse", "forward", "forward+compile", "forward-vmap",
                             "forward-vmap+compile"])
    a = ap.parse_args()
    cfg = load_config(a.preset, overrides=a.set)
    r = Recipe(cfg)
    dev = r.device
    st = r.init_state()
    ones = r.ones()

    def train_step():
        r.step(st, ones)
        st.step = 0

    out = {"set": a.set, "params": r.model.num_params, "device": torch.cuda.get_device_name(dev),
           "train_step_s": _time(train_step, dev, reps=10, warm=2),
           "eager_nn_train_step_s": _time(_eager_nn_step(cfg, dev), dev, reps=10, warm=2)}
    denom = min(out["train_step_s"], out["eager_nn_train_step_s"])
    K = a.targets
    gen = torch.Generator(device=dev).manual_seed(0)
    gb = torch.randn(K, r.model.num_params, device=dev, dtype=r.dtype, generator=gen)
    bb = torch.randn(K, r.model.num_buffers, device=dev, dtype=r.dtype, generator=gen)
    results = {}
    for variant in a.variants:
        r.cfg = replay_variant(cfg, variant)
        for k in sorted({1, K}):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step_vjp(r, st.theta, st.buffers, 0, gb[:k], bb[:k])
            torch.cuda.synchronize()
            out[f"{variant}_K{k}_first_s"] = time.perf_counter() - t0
            s = _time(lambda: step_vjp(r, st.theta, st.buffers, 0, gb[:k], bb[:k]), dev, reps=3,
                      warm=0)
            out[f"{variant}_K{k}_s"] = s
            out[f"{variant}_K{k}_run_per_measurement"] = (s + out["train_step_s"]) / k / denom
        results[variant] = step_vjp(r, st.theta, st.buffers, 0, gb, bb)
        print(json.dumps({k: v for k, v in out.items() if k.startswith(variant)}), flush=True)
    if "reverse" in results:
        ref = results["reverse"]
        for variant, res in results.items():
            out[f"{variant}_vs_reverse_rel"] = [
                float((res[i] - ref[i]).abs().max() / ref[i].abs().max()) for i in (0, 1)]
    out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
