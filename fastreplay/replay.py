"""REPLAY: the exact reverse pass of docs/design.md §3-§7, for K measurements at once.

States theta_t are rebuilt segment by segment (last segment first) from the stored checkpoints by
re-running the deterministic forward steps; each rebuilt segment must land bit for bit on the
next stored state, otherwise the run is not reproducible and exact scores are impossible.

Per reverse step t (adjoints carried for all K measurements):
  1. optimizer adjoint (elementwise, fused when built): g_bar, m_bar, theta_bar += wd * g_bar
  2. at theta_t, for Q_k = <grad L_t, g_bar_k> + <b_{t+1}(theta), b_bar_k>: d/dtheta gives
     H g_bar + rho J^T b_bar, d/dw the score increments of the batch; computed by a
     double backward (replay.hvp = reverse) or forward-over-reverse (replay.hvp = forward,
     optionally vmapped over the K measurements and torch.compiled).
  3. b_bar *= (1 - rho)
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .exceptions import ReplayError
from .kernels import sgd_adjoint_
from .measure import measurement_grads
from .progress import log, progress_bar
from .recipe import Recipe, TrainState
from .store import Prefetcher
from .train import run_steps


@dataclass
class ReplayResult:
    scores: np.ndarray  # (K, N) float64
    values: np.ndarray  # (K,) measurement values at theta_T
    seconds: float


def hvp_mode(recipe: Recipe, k: int) -> str:
    """replay.hvp resolved for a pass of k measurements. auto: on CUDA forward-over-reverse,
    vmapped over the k measurements when k > 1 (1.7x faster at k = 10 in fp32 on the H100)
    unless that ran out of memory before; on the CPU double backward (faster there), or
    forward with replay.compile."""
    hvp = recipe.cfg.replay.hvp
    if hvp != "auto":
        return hvp
    if not _on_cuda(recipe):
        return "forward" if recipe.cfg.replay.compile else "reverse"
    if k > 1 and not _state(recipe).get("vmap_out_of_memory"):
        return "forward-vmap"
    return "forward"


def _on_cuda(recipe: Recipe) -> bool:
    return recipe.device.type == "cuda"


def step_vjp(recipe: Recipe, theta_t: torch.Tensor, buffers_t: torch.Tensor, step: int,
             g_bar: torch.Tensor, b_bar: torch.Tensor):
    """(H g_bar + rho J^T b_bar) (K, P) and d<grad L_t, g_bar>/dw for the batch (K, B)."""
    mode = hvp_mode(recipe, g_bar.shape[0])
    x, y = recipe.batch_inputs(step)
    w = torch.ones(x.shape[0], dtype=recipe.dtype, device=recipe.device)
    if mode == "forward-vmap":  # one primal pass, the K tangents vmapped through it
        try:
            return _tangent_fn(recipe, True)(theta_t.detach(), buffers_t, x, y, w, g_bar, b_bar)
        except torch.cuda.OutOfMemoryError:
            if recipe.cfg.replay.hvp != "auto":
                raise ReplayError(
                    f"replay.hvp=forward-vmap ran out of GPU memory with {g_bar.shape[0]} "
                    "measurements per pass; lower --set replay.target_batch or use "
                    "--set replay.hvp=forward") from None
            _state(recipe)["vmap_out_of_memory"] = True
            torch.cuda.empty_cache()
            log.warning("vmapping %d measurements ran out of GPU memory; replaying them one "
                        "per pass from here on (lower replay.target_batch to keep the faster "
                        "vmapped pass)", g_bar.shape[0])
            mode = "forward"
    if mode == "forward":
        fn = _tangent_fn(recipe, False)
        theta = theta_t.detach()
        outs = [fn(theta, buffers_t, x, y, w, g_bar[k], b_bar[k]) for k in range(g_bar.shape[0])]
        return torch.stack([h for h, _ in outs]), torch.stack([d for _, d in outs])
    theta = theta_t.detach().requires_grad_(True)
    w.requires_grad_(True)
    losses, new_buffers = recipe.losses(theta, buffers_t, x, y)
    loss = (w * losses).sum() / x.shape[0]
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
    hvps, wgrads = [], []
    k_total = g_bar.shape[0]
    for k in range(k_total):
        q = (grad * g_bar[k]).sum()
        if new_buffers.numel():
            q = q + (new_buffers * b_bar[k]).sum()
        h, wg = torch.autograd.grad(q, (theta, w), retain_graph=k + 1 < k_total,
                                    materialize_grads=True)
        hvps.append(h)
        wgrads.append(wg)
    return torch.stack(hvps), torch.stack(wgrads)


_RECIPE_STATE: "weakref.WeakKeyDictionary[Recipe, dict]" = weakref.WeakKeyDictionary()


def _state(recipe: Recipe) -> dict:
    """What the replay learns about a recipe once per process: built (compiled) step
    functions, whether vmapping ran out of memory."""
    return _RECIPE_STATE.setdefault(recipe, {})


def _tangent_fn(recipe: Recipe, batched: bool):
    """The forward-over-reverse step as a pure function of tensors, built (and compiled, with
    replay.compile) once per recipe: (theta, buffers, x, y, w, g, b) -> (H g + rho J^T b, dlosses).

    The running-statistics term rides along for free: with G(theta, c) = grad_theta [L_t(theta)
    + <b_{t+1}(theta), c>] taken at c = 0 in direction (g, b), the tangent is exactly
    H g + rho J^T b (the second-order term in c vanishes at c = 0). The tangents of the
    per-example losses are <grad loss_i, g>, i.e. B times the weight derivative. Unbatched:
    one target per jvp, so a target's scores do not depend on which targets share its pass
    (bitwise equal under sharding); batched (replay.hvp = forward-vmap): the K tangents share one
    primal pass, and their last bits depend on K (kernels block by batch size).
    """
    key = ("tangents", batched, recipe.cfg.replay.compile)
    fns = _state(recipe)
    if key in fns:
        return fns[key]

    def tangents(theta, buffers, x, y, w, g, b):
        size = x.shape[0]

        def objective(th, c):
            losses, new_buffers = recipe.losses(th, buffers, x, y)
            return (w * losses).sum() / size + (new_buffers * c).sum(), losses

        c0 = torch.zeros_like(buffers)
        _, (h, dlosses) = torch.func.jvp(torch.func.grad(objective, has_aux=True), (theta, c0),
                                         (g, b))
        return h, dlosses / size

    fn = torch.func.vmap(tangents, in_dims=(None,) * 5 + (0, 0)) if batched else tangents
    if recipe.cfg.replay.compile:
        log.info("replay.compile: the first reverse step compiles the %s step (about a minute "
                 "on a GPU; once per process and pass size)", "vmapped" if batched else "jvp")
        fn = torch.compile(fn, dynamic=False)
    fns[key] = fn
    return fn


def reverse_states(recipe: Recipe, state: TrainState, end: int, arity: int, ones: torch.Tensor,
                   stop: int, expect_end: torch.Tensor | None = None):
    """Yield (t, theta_t, buffers_t) for t = end-1 down to ``stop``, rebuilt from ``state``.

    arity 0 keeps every state of the segment (one forward pass, end - begin states in memory);
    arity k >= 2 is REPLAY's lazy k-ary tree: keep k states, recurse into the sub-segments
    last first (O(k log_k L) states, O(log_k L) forward passes). The arithmetic per step is the
    same either way, so scores are bitwise identical across schedules. ``expect_end``: the stored
    state at ``end``; the rebuilt one must equal it bit for bit.
    """
    begin = state.step
    n = end - begin
    leaf = arity == 0 or n <= arity
    size = 1 if leaf else -(-n // arity)
    kept: list = []

    def keep(st: TrainState) -> None:
        if st.step >= stop or not leaf:
            if (st.step - begin) % size == 0:
                kept.append((st.step, st.theta.clone(), st.buffers) if leaf else st.clone())

    run_steps(recipe, state, ones, end, on_step=keep, description="rebuild")
    if expect_end is not None and not torch.equal(state.theta, expect_end):
        raise ReplayError(
            f"recomputing steps {begin}..{end} did not reproduce the stored state bit for bit: "
            "the run is not deterministic here (same device, torch and kernels as training "
            "are required)")
    if leaf:
        yield from reversed(kept)
        return
    while kept:
        sub = kept.pop()
        sub_end = min(sub.step + size, end)
        if sub_end > stop:
            yield from reverse_states(recipe, sub, sub_end, arity, ones, stop)


def _segments(checkpoint_steps: list[int], num_steps: int, start_step: int):
    """(begin, end, slot) for each checkpoint segment overlapping [start_step, num_steps), last first."""
    bounds = checkpoint_steps + [num_steps]
    segs = [(bounds[j], bounds[j + 1], j) for j in range(len(checkpoint_steps))]
    return [s for s in reversed(segs) if s[1] > start_step]


def replay(recipe: Recipe, store, targets: list[int], kind: str) -> ReplayResult:
    """Exact scores d phi_k / d w_i for the targets, from the run held by ``store``."""
    stored_backend = store.get_attr("step_backend")
    if stored_backend and stored_backend != recipe.step_backend:
        raise ReplayError(f"the run was trained with the {stored_backend} step kernels but this "
                          f"process has {recipe.step_backend}; replay where it was trained or retrain with --force")
    slots_steps = [int(s) for s in store.checkpoint_steps()]
    if any(s < 0 for s in slots_steps):
        raise ReplayError(f"run store {store.path} has uncommitted checkpoints; finish training first")
    final_params, final_buffers = map(recipe.tensor, store.read_final())
    if recipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    values, theta_bar, b_bar = measurement_grads(recipe, final_params, final_buffers, targets, kind)
    m_bar = torch.zeros_like(theta_bar)
    g_bar = torch.empty_like(theta_bar)
    pending_hvp = None
    rho = recipe.model.bn_momentum
    scores = torch.zeros(len(targets), recipe.num_train, dtype=torch.float64, device=recipe.device)
    start = recipe.cfg.replay.start_step
    cfg_t = recipe.cfg.train
    ones = recipe.ones()
    segments = _segments(slots_steps, recipe.num_steps, start)
    total = sum(end - max(begin, start) for begin, end, _ in segments)
    next_state = final_params
    arity = recipe.cfg.replay.tree_arity if recipe.cfg.replay.schedule == "tree" else 0
    every = recipe.cfg.replay.schedule == "every"
    # Checkpoints are read (and verified) ahead on a background thread while the current
    # segment is rebuilt and replayed: disk time hides behind GPU time.
    with progress_bar(f"replay {len(targets)} target(s)", total) as advance:
        checkpoints = Prefetcher(store, [slot for _, _, slot in segments], depth=1)
        for (begin, end, _), (_, checkpoint) in zip(segments, checkpoints):
            state = recipe.stored_state(checkpoint)
            stored_theta = state.theta.clone()  # the rebuild advances state in place
            if every:  # the stored state is theta_t itself: nothing to rebuild
                states = [(state.step, state.theta, state.buffers)]
            else:
                states = reverse_states(recipe, state, end, arity, ones, stop=max(begin, start),
                                        expect_end=next_state)
            for t, theta_t, buffers_t in states:
                sgd_adjoint_(theta_bar, m_bar, g_bar, pending_hvp, recipe.model.group_ends,
                             recipe.lrs[t], recipe.wds, cfg_t.momentum, cfg_t.nesterov,
                             recipe.adjoint_backend)
                pending_hvp, wgrad = step_vjp(recipe, theta_t, buffers_t, t, g_bar, b_bar)
                b_bar.mul_(1 - rho)
                scores[:, recipe.indices[t]] += wgrad.to(torch.float64)
                advance()
            next_state = stored_theta
    del ones
    if recipe.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    log.debug("replayed %d targets in %.2fs", len(targets), seconds)
    return ReplayResult(scores.cpu().numpy(), values.cpu().numpy(), seconds)
