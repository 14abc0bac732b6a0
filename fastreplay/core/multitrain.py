"""Train several models at once under the identical schedule (LDS retraining, smoothness probes).

The M models share every input batch (same order, same augmentation) and differ only in their
per-example weights, so one vmapped step (torch.func.grad over functional_call) trains all of
them: M parameter vectors stacked as (M, P) and one fused optimizer step over the stack. On a
GPU this fills the card where one small model would not; ``choose_models_per_batch`` measures
which is faster instead of guessing.
"""
from __future__ import annotations

import time
import weakref

import torch
from torch.func import grad, vmap

from ..faults import crash_point
from ..progress import log
from .func_limits import first_line, vmap_unsupported
from .recipe import Recipe, TrainState
from .train import _NanWatch, run_steps


def _make_step(recipe: Recipe):
    """M models' gradients of one (micro-)batch: its loss divided by the whole batch's size."""
    def loss_fn(theta, buffers, w_batch, x, y, size):
        losses, new_buffers = recipe.losses(theta, buffers, x, y)
        loss = (w_batch * losses).sum() / size
        return loss, (new_buffers, loss)

    return vmap(grad(loss_fn, has_aux=True), in_dims=(0, 0, 0, None, None, None))


def train_many(recipe: Recipe, weights: torch.Tensor, num_steps: int | None = None,
               start: TrainState | None = None) -> TrainState:
    """Train len(weights) models (weights: (M, N)) from ``start`` (default: the initialisation);
    returns a stacked state ((M, P), ...). Vmapped where vmap can batch the model, else (and
    after vmap turned out not to support it, from the start again) one model at a time."""
    weights = weights.to(recipe.device, recipe.dtype)
    init = start or recipe.init_state()
    if can_batch_models(recipe):
        try:
            return _train_vmapped(recipe, weights, init, num_steps)
        except (RuntimeError, NotImplementedError) as exc:
            if not vmap_unsupported(exc):
                raise
            _VMAP_UNSUPPORTED.add(recipe)
            log.warning("vmap cannot batch this model (%s); training the models one at a time "
                        "from here on", first_line(exc))
    return _train_one_by_one(recipe, weights, init, num_steps)


def _train_vmapped(recipe: Recipe, weights: torch.Tensor, init: TrainState,
                   num_steps: int | None) -> TrainState:
    """The M models in one vmapped step each; ``init`` is left as it was."""
    m = weights.shape[0]
    state = TrainState(init.theta.expand(m, -1).clone(), init.opt_state.expand(m, -1).clone(),
                       init.buffers.expand(m, -1).clone(), init.step)
    step_fn = _make_step(recipe)
    ones = recipe.ones()
    watch = _NanWatch(recipe.device)
    for t in range(init.step, recipe.num_steps if num_steps is None else num_steps):
        idx = recipe.plan.indices[t]
        x, y = recipe.batch_inputs(t)
        w = weights[:, idx] if recipe.plan.weighted(t) else ones[idx].expand(m, -1)
        grads, losses = None, None
        for part in recipe.micro_batches(x.shape[0]):  # the same sum as Recipe.batch_gradient
            with recipe.randomness(t, idx[part]):
                g, (new_buffers, piece) = step_fn(state.theta, state.buffers, w[:, part],
                                                  x[part], y[part], x.shape[0])
            grads = g if grads is None else grads + g
            losses = piece if losses is None else losses + piece
        recipe.optimizer.step_(state.theta, state.opt_state, grads, t)
        state.buffers = new_buffers
        watch.update(losses.sum(), t)
        state.step = t + 1
        crash_point("retrain_step")
    watch.check()
    return state


# Recipes whose vmapped step torch turned out not to support (found by trying, once a process).
_VMAP_UNSUPPORTED: "weakref.WeakSet[Recipe]" = weakref.WeakSet()


def can_batch_models(recipe: Recipe) -> bool:
    """vmap cannot run channels_last convolutions (torch: "NYI: clone(memory_format) inside
    vmap"), and an NCHW batch would round differently from the NHWC training run; nor models
    with an operation it has no batching rule for (found by the first try, see train_many)."""
    return not recipe.cfg.train.channels_last and recipe not in _VMAP_UNSUPPORTED


def _train_one_by_one(recipe: Recipe, weights: torch.Tensor, init: TrainState,
                      num_steps: int | None) -> TrainState:
    stop = recipe.num_steps if num_steps is None else num_steps
    finals = [run_steps(recipe, init.clone(), w, stop, description="retrain") for w in weights]
    return TrainState(*(torch.stack([getattr(f, k) for f in finals])
                        for k in ("theta", "opt_state", "buffers")), stop)


def _steps_per_second(recipe: Recipe, m: int, steps: int = 3) -> float:
    """Model-steps per second of an m-model batch over a few real steps."""
    weights = recipe.ones().expand(m, -1)
    train_many(recipe, weights, num_steps=1)  # warm-up (kernel selection, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_many(recipe, weights, num_steps=steps)
    torch.cuda.synchronize()
    return m * steps / (time.perf_counter() - t0)


def choose_models_per_batch(recipe: Recipe, models: int, candidates=(1, 4, 8, 16)) -> int:
    """The fastest models-per-batch on this device, by measurement (1 on the CPU)."""
    if recipe.device.type != "cuda" or models == 1 or not can_batch_models(recipe):
        return 1
    best, best_rate = 1, 0.0
    for m in [c for c in candidates if c <= models]:
        try:
            rate = _steps_per_second(recipe, m)
        except torch.OutOfMemoryError:
            break
        log.info("models per batch %d: %.1f model-steps/s", m, rate)
        if rate > best_rate:
            best, best_rate = m, rate
    return best
