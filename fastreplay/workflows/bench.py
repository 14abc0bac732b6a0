"""`fastreplay bench kernels|replay`: our fast paths against the pure-PyTorch reference paths.

kernels: the fused optimizer adjoint against the best pure-PyTorch path (SGD), and the fused
Adam step and adjoint against the pure-PyTorch reference.
The reference here is the fastest eager formulation we know: torch._foreach_* over the
per-parameter tensors (what torch.optim's foreach SGD does), K measurements as a leading dim.
Bandwidth counts the bytes the adjoint must move: read theta_bar, m_bar, hvp; write theta_bar,
m_bar, g_bar. The ceiling is a device-to-device copy of the same size measured in the same run.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..config import with_values
from ..core import kernels
from ..core.optim import group_slices


def _time(fn: Callable[[], None], device: torch.device, reps: int = 20, warm: int = 3) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def adjoint_foreach(tb, mb, gb, hvp, group_ends, lrs, wds, mu, nesterov, sizes):
    """The adjoint with torch._foreach_* over per-parameter chunks of each group."""
    for sl, lr, wd in zip(group_slices(group_ends), lrs, wds):
        n = sl.stop - sl.start
        split = [s for s in sizes if s > 0]
        parts = lambda x: list(x[..., sl].split(_fit(split, n), dim=-1))  # noqa: E731
        T, M, G = parts(tb), parts(mb), parts(gb)
        if hvp is not None:
            torch._foreach_add_(T, parts(hvp))
        d = torch._foreach_mul(T, -lr)
        if nesterov:
            mt = torch._foreach_add(M, d, alpha=mu)
            torch._foreach_copy_(G, d)
            torch._foreach_add_(G, mt)
        else:
            mt = torch._foreach_add(M, d)
            torch._foreach_copy_(G, mt)
        torch._foreach_copy_(M, mt)
        torch._foreach_mul_(M, mu)
        if wd:
            torch._foreach_add_(T, G, alpha=wd)


def _fit(sizes, n):
    out, total = [], 0
    for s in sizes:
        if total + s > n:
            break
        out.append(s)
        total += s
    if total < n:
        out.append(n - total)
    return out


def bench_kernels(device: str = "cuda", num_params: int = 6_573_120, targets=(1, 10),
                  dtype=torch.float32) -> dict:
    dev = torch.device(device)
    # ResNet-9-like layout: many tensors in the decay group, BN/bias vectors in the second.
    sizes = [1728, 73728, 147456, 147456, 294912, 1179648, 2359296, 2359296, 5120]
    decay = sum(sizes)
    group_ends = [decay, num_params] if num_params > decay else [num_params]
    lrs, wds = [0.1, 0.2][:len(group_ends)], [5e-4, 0.0][:len(group_ends)]
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "num_params": num_params, "dtype": str(dtype).replace("torch.", ""), "rows": []}
    for k in targets:
        shape = (k, num_params)
        tb, mb, hv = (torch.randn(shape, device=dev, dtype=dtype) for _ in range(3))
        gb = torch.empty_like(tb)
        nbytes = 6 * tb.numel() * tb.element_size()
        row = {"targets": k, "bytes": nbytes}
        fused = lambda: kernels.sgd_adjoint_(tb, mb, gb, hv, group_ends, lrs, wds, 0.9, True, "fused")  # noqa: E731
        ref = lambda: adjoint_foreach(tb, mb, gb, hv, group_ends, lrs, wds, 0.9, True, sizes)  # noqa: E731
        plain = lambda: kernels.sgd_adjoint_(tb, mb, gb, hv, group_ends, lrs, wds, 0.9, True, "reference")  # noqa: E731
        src = torch.randn(nbytes // 2 // tb.element_size(), device=dev, dtype=dtype)
        dst = torch.empty_like(src)
        copy = lambda: dst.copy_(src)  # noqa: E731  (reads + writes the same byte count)
        for name, fn in (("fused", fused), ("foreach", ref), ("reference", plain), ("copy", copy)):
            if name == "fused" and not kernels._fused_available(dev):
                continue
            tb.normal_(), mb.normal_()
            row[f"{name}_s"] = _time(fn, dev)
            row[f"{name}_GBps"] = nbytes / row[f"{name}_s"] / 1e9
        if "fused_s" in row:
            row["speedup_vs_foreach"] = row["foreach_s"] / row["fused_s"]
            row["fraction_of_copy_bw"] = row["fused_GBps"] / row["copy_GBps"]
        out["rows"].append(row)
    out["adam_rows"] = _bench_adam(dev, dtype, num_params, group_ends, lrs, wds, targets)
    return out


def _bench_adam(dev: torch.device, dtype, num_params: int, group_ends, lrs, wds,
                targets) -> list[dict]:
    """The fused Adam step (one run) and adjoint (K measurements) against the pure-PyTorch
    reference. Bytes: the step reads theta, m, v, grad and writes theta, m, v; the adjoint
    reads theta_bar, hvp, m_bar, v_bar and writes them and g_bar for each measurement, and
    reads the step's grad, theta, m, v once."""
    from ..core.optim import AdamHyper
    hyper = AdamHyper(0.9, 0.999, 1e-8, 1e-8, True)
    p = num_params
    theta, grad = (torch.randn(p, device=dev, dtype=dtype) for _ in range(2))
    state = torch.randn(2 * p, device=dev, dtype=dtype).abs_()
    rows = []
    size = theta.element_size()
    step_row = {"op": "step", "bytes": 7 * p * size}
    fns = {"fused": lambda: kernels.adam_step_(theta, state, grad, group_ends, lrs, wds, hyper,
                                               10, "fused"),
           "reference": lambda: kernels.adam_step_(theta, state, grad, group_ends, lrs, wds,
                                                   hyper, 10, "reference")}
    rows.append(_timed_row(step_row, fns, dev))
    for k in targets:
        tb, gb, hv = (torch.randn(k, p, device=dev, dtype=dtype) for _ in range(3))
        sb = torch.randn(k, 2 * p, device=dev, dtype=dtype)
        row = {"op": "adjoint", "targets": k, "bytes": (9 * k + 4) * p * size}
        fns = {name: (lambda name=name: kernels.adam_adjoint_(
                   tb, sb, gb, hv, grad, theta, state, group_ends, lrs, wds, hyper, 10, name))
               for name in ("fused", "reference")}
        rows.append(_timed_row(row, fns, dev))
    return rows


def _timed_row(row: dict, fns: dict, dev: torch.device) -> dict:
    for name, fn in fns.items():
        if name == "fused" and not kernels._fused_available(dev):
            continue
        row[f"{name}_s"] = _time(fn, dev)
        row[f"{name}_GBps"] = row["bytes"] / row[f"{name}_s"] / 1e9
    if "fused_s" in row:
        row["speedup_vs_reference"] = row["reference_s"] / row["fused_s"]
    return row


def _eager_nn_step(cfg, device: torch.device):
    """One step of the plain eager torch.nn training loop for the same model (channels_last where
    the recipe is 4-D, torch.optim.SGD foreach, same batch size): a baseline for the ratios'
    denominator, so that a slow training step of ours cannot flatter any ratio."""
    import torch.nn.functional as F

    from ..core.models import build_module

    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.train.dtype)
    module = build_module(cfg).to(device=device, dtype=dtype)
    b, s = cfg.train.batch_size, cfg.data.image_size
    x = torch.randn(b, 3, s, s, device=device, dtype=dtype)
    if cfg.model.name != "mlp":
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.data.num_classes, (b,), device=device)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=cfg.train.momentum,
                          nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay,
                          foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y, label_smoothing=cfg.train.label_smoothing).backward()
        opt.step()
    return step


def replay_variant(cfg, variant: str):
    """``cfg`` with the replay step of ``variant``: an hvp mode, "+compile" for replay.compile
    (e.g. "forward-vmap+compile"); what the benchmarks/ probes take on their command lines."""
    hvp, _, compiled = variant.partition("+")
    return with_values(cfg, {"replay.hvp": hvp, "replay.compile": compiled == "compile"})


def _timed_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_replay(cfg, targets: int = 4, steps: int = 5) -> dict:
    """Costs of the recipe ``cfg``: training step (ours and plain eager
    torch.nn), reference and fast replay step (optimizer adjoint + H v + weight term) with their
    ratios, the training run with and without checkpoint streaming, real replays of 1 and K
    measurements over the configured window against the training run, disk and peak memory."""
    import tempfile

    from ..core.optimizers import StepValues
    from ..core.recipe import Recipe
    from ..core.replay import hvp_mode, replay, step_vjp
    from ..core.train import train, train_into_store
    from ..store import RunStore, versions

    recipe = Recipe(cfg)
    dev = recipe.device
    state = recipe.init_state()
    ones = recipe.ones()

    def one_step():
        recipe.step(state, ones)
        state.step = 0

    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "params": recipe.model.num_params, "steps": recipe.num_steps,
           "replayed_steps": recipe.num_steps - recipe.plan.start_step,
           "tf32": cfg.train.tf32, "bf16": cfg.train.bf16,
           "channels_last": cfg.train.channels_last, "compile": cfg.replay.compile,
           "train_step_s": _time(one_step, dev, reps=steps, warm=2),
           "eager_nn_train_step_s": _time(_eager_nn_step(cfg, dev), dev, reps=steps, warm=2)}
    # The faster of the two training steps: a slow training step must not flatter a ratio.
    denominator = min(out["train_step_s"], out["eager_nn_train_step_s"])
    # The reference step: double backward and the pure-PyTorch adjoint (same run otherwise).
    reference = Recipe(with_values(cfg, {"replay.hvp": "reverse", "replay.backend": "reference"}))
    for k in sorted({1, targets}):
        g_bar = torch.randn(k, recipe.model.num_params, device=dev, dtype=recipe.dtype)
        b_bar = torch.randn(k, recipe.model.num_buffers, device=dev, dtype=recipe.dtype)
        t_bar, g_out = g_bar.clone(), torch.empty_like(g_bar)
        m_bar = torch.randn(k, recipe.optimizer.state_size(recipe.model.num_params), device=dev,
                            dtype=recipe.dtype)
        hvp = torch.randn_like(g_bar)
        for name, r in (("reference", reference), ("fast", recipe)):
            def reverse_step(r=r):
                values = None
                if r.optimizer.needs_step_values:  # Adam: the step's gradient and moments
                    values = StepValues(r.gradient(state.theta, state.buffers, 0), state.theta,
                                        state.opt_state)
                r.optimizer.adjoint_(t_bar, m_bar, g_out, hvp, 0, values)
                step_vjp(r, state.theta, state.buffers, 0, g_out, b_bar)
            # The first call alone: it includes building (with replay.compile, compiling) the step.
            out[f"{name}_replay_step_K{k}_first_s"] = _timed_once(reverse_step, dev)
            out[f"{name}_replay_step_K{k}_s"] = _time(reverse_step, dev, reps=steps, warm=1)
            out[f"{name}_hvp_K{k}"] = hvp_mode(r, k)
        out[f"fast_vs_reference_K{k}"] = (out[f"reference_replay_step_K{k}_s"]
                                          / out[f"fast_replay_step_K{k}_s"])
        # A reverse step also rebuilds its state (one training step): whole-run replay cost of
        # one of these K measurements in units of the training run.
        out[f"replay_run_per_measurement_K{k}_over_train_run"] = (
            (out[f"fast_replay_step_K{k}_s"] + out["train_step_s"]) / k / denominator)

    out["train_run_s"] = _timed_once(lambda: train(recipe), dev)
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore.create(f"{tmp}/run.zarr", recipe.cfg.to_dict(), cfg.fingerprint(),
                                versions(), attrs={"step_backend": recipe.runtime.step_backend})
        out["train_run_streaming_s"] = _timed_once(lambda: train_into_store(recipe, store), dev)
        out["store_bytes"] = store.nbytes_on_disk()
        out["streaming_slowdown"] = out["train_run_streaming_s"] / out["train_run_s"] - 1
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for k in sorted({1, targets}):
            res = replay(recipe, store, list(range(k)), cfg.measure.kind)
            out[f"replay_K{k}_s"] = res.seconds
            out[f"replay_K{k}_per_measurement_over_train_run"] = (
                res.seconds / k / out["train_run_s"] * out["train_step_s"] / denominator)
        if dev.type == "cuda":
            out["replay_peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
        store.close()
    return out
