"""Cheap rankings a user would try before exact scores, to hold the scores against (`fastreplay
debug`): each computed once at the final parameters, in eval mode, on unaugmented inputs.

- training_loss: the final loss of each training example (mislabeled ones stay high);
- gradient_norm: the norm of each example's loss gradient (GraNd-style);
- gradient_similarity: each example's loss gradient against the group's measurement gradient
  (TracIn at the last checkpoint, TRAK without projection or ensembling): the first-order effect
  of one more SGD step on that example.

Each is returned as a harm (larger = more suspect), the same orientation as debug.harm.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..core.func_limits import first_line, forward_ad_unsupported, vmap_unsupported
from ..core.measure import group_measurement_grads
from ..core.recipe import Recipe
from ..progress import log

BATCH = 1000
"""Training examples per forward pass (losses, similarity)."""
GRADIENT_CHUNK = 64
"""Training examples per vmapped per-example gradient (64 parameter-sized vectors at once)."""


def _spans(recipe: Recipe, size: int):
    for lo in range(0, recipe.num_train, size):
        yield torch.arange(lo, min(lo + size, recipe.num_train), device=recipe.device)


def training_losses(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor) -> np.ndarray:
    """Each training example's loss at the final state: the first thing a user would sort by."""
    out = []
    with torch.no_grad():
        for idx in _spans(recipe, BATCH):
            x = recipe.data.plain_train_batch(idx)
            outputs, _ = recipe.model.forward(theta, buffers, x, train=False)
            out.append(recipe.loss_fn(outputs, recipe.data.train_y[idx]).cpu())
    return torch.cat(out).double().numpy()


def gradient_similarities(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor,
                          direction: torch.Tensor) -> np.ndarray:
    """<grad loss_i(theta), direction> for every training example i: one forward-mode pass per
    batch (the directional derivative of the per-example losses), no per-example gradients."""
    out = []
    for idx in _spans(recipe, BATCH):
        x, y = recipe.data.plain_train_batch(idx), recipe.data.train_y[idx]

        def losses(th, x=x, y=y):
            outputs, _ = recipe.model.forward(th, buffers, x, train=False)
            return recipe.loss_fn(outputs, y)

        _, dots = torch.func.jvp(losses, (theta.detach(),), (direction.detach(),))
        out.append(dots.detach().cpu())
    return torch.cat(out).double().numpy()


@contextmanager
def contiguous_inputs(recipe: Recipe):
    """The built-in models without their channels_last conversion, which vmap cannot clone: a
    ranking baseline does not need the training run's NHWC rounding."""
    model = recipe.model
    saved = getattr(model, "channels_last", False)
    model.channels_last = False
    try:
        yield
    finally:
        model.channels_last = saved


def gradient_norms(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor) -> np.ndarray:
    """||grad loss_i(theta)|| for every training example, by torch.func.vmap over examples."""
    def loss_one(th, x, y):
        outputs, _ = recipe.model.forward(th, buffers, x[None], train=False)
        return recipe.loss_fn(outputs, y[None]).sum()

    per_example = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))
    out = []
    with contiguous_inputs(recipe):
        for idx in _spans(recipe, GRADIENT_CHUNK):
            grads = per_example(theta.detach(), recipe.data.plain_train_batch(idx),
                                recipe.data.train_y[idx])
            out.append(torch.linalg.vector_norm(grads, dim=1).detach().cpu())
    return torch.cat(out).double().numpy()


def _unless_unsupported(name: str, compute, unsupported):
    """``compute()``, or None (with a warning) when torch.func cannot transform this model that
    way (``unsupported``: func_limits' test of the exception); any other error propagates."""
    try:
        return compute()
    except (RuntimeError, NotImplementedError) as e:
        if not unsupported(e):
            raise
        log.warning("%s baseline skipped: torch.func cannot transform this model so (%s)", name,
                    first_line(e))
        return None


def baseline_harms(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor,
                   members: list[int], kind: str) -> dict[str, np.ndarray]:
    """Every baseline as a harm (N,), larger = more suspect. A model that torch.func.vmap cannot
    take per example has no gradient_norm, one without forward-mode AD no gradient_similarity
    (each with a warning)."""
    from .debug import harm
    _, g_group, _ = group_measurement_grads(recipe, theta, buffers, members, kind)
    # One more SGD step on example i moves theta by -lr grad loss_i, so the group's measurement
    # changes by -lr <grad loss_i, g_group>: that is the score-like quantity, up to lr > 0.
    dots = _unless_unsupported(
        "gradient_similarity",
        lambda: gradient_similarities(recipe, theta, buffers, g_group[0]), forward_ad_unsupported)
    norms = _unless_unsupported("gradient_norm", lambda: gradient_norms(recipe, theta, buffers),
                                vmap_unsupported)
    harms = {"training_loss": training_losses(recipe, theta, buffers)}
    if dots is not None:
        harms["gradient_similarity"] = harm(-dots, kind)
    if norms is not None:
        harms["gradient_norm"] = norms
    return harms
