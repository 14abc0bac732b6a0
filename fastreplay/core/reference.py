"""The test oracle: metagradients by differentiating the whole unrolled training run.

Obviously correct and memory-hungry: training is written out-of-place in plain PyTorch with the
graph kept from the data weights w to the final measurement, then autograd does the rest. Use it
on small models (tests); the replay in :mod:`fastreplay.core.replay` must agree with it.
"""
from __future__ import annotations

import torch

from .clip import Clipped, clip_gradient
from .measure import measurement_values
from .optim import group_slices, moments
from .recipe import Recipe
from .sgd import SGD


def unrolled_training(recipe: Recipe, weights: torch.Tensor):
    """Final (theta, buffers) as differentiable functions of ``weights``."""
    opt = recipe.optimizer
    max_norm = opt.max_norm if isinstance(opt, Clipped) else 0.0
    if max_norm:
        opt = opt.inner
    step = _sgd_step if isinstance(opt, SGD) else _adam_step
    theta = recipe.model.theta0.clone().requires_grad_(True)
    state = opt.init(theta).detach()
    buffers = recipe.model.buffers0.clone()
    for t in range(recipe.num_steps):
        w = recipe.step_weights(weights, t)[recipe.plan.indices[t]]
        loss, buffers = recipe.batch_loss(theta, buffers, t, w)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        if max_norm:
            grad = clip_gradient(grad, max_norm)
        parts = [step(opt, t, g_idx, theta[sl], state, sl, grad[sl])
                 for g_idx, sl in enumerate(group_slices(recipe.model.group_ends))]
        theta = torch.cat([th for th, _ in parts])
        state = _join_states([s for _, s in parts])
    return theta, buffers


def _sgd_step(opt, t: int, g_idx: int, th, state, sl, gr):
    """One group's SGD step, out of place: (theta', [momentum'])."""
    lr, wd = float(opt.lrs[t][g_idx]), opt.wds[g_idx]
    g = gr + wd * th
    m_new = opt.momentum * state[sl] + g
    d = g + opt.momentum * m_new if opt.nesterov else m_new
    return th - lr * d, [m_new]


def _adam_step(opt, t: int, g_idx: int, th, state, sl, gr):
    """One group's Adam / AdamW step, out of place: (theta', [m', v'])."""
    h = opt.hyper
    lr, wd = float(opt.lrs[t][g_idx]), opt.wds[g_idx]
    c1, c2 = h.corrections(t)
    m, v = (part[sl] for part in moments(state, state.shape[0] // 2))
    g = gr if h.decoupled else gr + wd * th
    m_new = h.beta1 * m + (1 - h.beta1) * g
    v_new = h.beta2 * v + (1 - h.beta2) * g * g
    u = m_new * c1 / (torch.sqrt(v_new * c2 + h.eps_root) + h.eps)
    decayed = th * (1 - lr * wd) if h.decoupled else th
    return decayed - lr * u, [m_new, v_new]


def _join_states(parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-group pieces of the state back into one flat state (its k pieces of P each)."""
    return torch.cat([torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))])


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
