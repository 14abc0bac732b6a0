"""The test oracle: metagradients by differentiating the whole unrolled training run.

Obviously correct and memory-hungry: training is written out-of-place in plain PyTorch with the
graph kept from the data weights w to the final measurement, then autograd does the rest. Use it
on small models (tests); the replay in :mod:`fastreplay.core.replay` must agree with it.
"""
from __future__ import annotations

import torch

from .measure import measurement_values
from .recipe import Recipe


def unrolled_training(recipe: Recipe, weights: torch.Tensor):
    """Final (theta, buffers) as differentiable functions of ``weights``."""
    cfg = recipe.cfg.train
    theta = recipe.model.theta0.clone().requires_grad_(True)
    momentum = torch.zeros_like(theta)
    buffers = recipe.model.buffers0.clone()
    for t in range(recipe.num_steps):
        w = recipe.step_weights(weights, t)[recipe.indices[t]]
        loss, buffers = recipe.batch_loss(theta, buffers, t, w)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        parts_theta, parts_m = [], []
        lo = 0
        for g_idx, hi in enumerate(recipe.model.group_ends):
            th, m, gr = theta[lo:hi], momentum[lo:hi], grad[lo:hi]
            lr, wd = float(recipe.lrs[t][g_idx]), recipe.wds[g_idx]
            g = gr + wd * th
            m_new = cfg.momentum * m + g
            d = g + cfg.momentum * m_new if cfg.nesterov else m_new
            parts_theta.append(th - lr * d)
            parts_m.append(m_new)
            lo = hi
        theta, momentum = torch.cat(parts_theta), torch.cat(parts_m)
    return theta, buffers


def unrolled_scores(recipe: Recipe, targets: list[int], kind: str) -> torch.Tensor:
    """(K, N) d phi_k / d w at w = 1, by reverse-mode autograd through the unrolled run."""
    weights = recipe.ones().requires_grad_(True)
    theta, buffers = unrolled_training(recipe, weights)
    idx = torch.as_tensor(targets, device=recipe.device)
    outputs, _ = recipe.model.forward(theta, buffers, recipe.data.test_batch(idx), train=False)
    values = measurement_values(recipe, outputs, recipe.data.test_y[idx], kind)
    rows = [torch.autograd.grad(values[k], weights, retain_graph=k + 1 < len(targets))[0]
            for k in range(len(targets))]
    return torch.stack(rows)
