"""Global gradient-norm clipping (train.clip_norm) as a transform in front of any optimizer,
with its exact adjoint (docs/design.md §3, "Gradient clipping").

Each step's gradient g (of the data-weighted batch loss, before weight decay, per model) is
scaled as torch.nn.utils.clip_grad_norm_ does: G = s g with s = min(1, c / (||g|| + eps)),
eps = 1e-6. Where the clip is active, G = c g / (n + eps) with n = ||g||, whose Jacobian is
symmetric:

    dG/dg = s (I - g g^T / (n (n + eps)))

so the adjoint of the raw gradient is  g_bar = s (G_bar - g <g, G_bar> / (n (n + eps))),  and
g_bar = G_bar where the clip is not active (s = 1). Clipping is differentiable everywhere but on
the sphere n + eps = c, which a run crosses with probability zero. The clip couples all
parameters of a step (through n), so it is not elementwise: it sits between the gradient and
the optimizer's own (elementwise, fused) step and adjoint, and needs the step's raw gradient,
which the replay recomputes (StepValues.grad).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .optimizers import StepValues

CLIP_EPS = 1e-6
"""torch.nn.utils.clip_grad_norm_'s epsilon in max_norm / (total_norm + eps)."""


def clip_scale(grad: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, n): the clip factor and the gradient's norm, per model (over the last dimension)."""
    norm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0), norm


def clip_gradient(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """G = min(1, c / (||g|| + eps)) g, per model: a new tensor ((P,) or (M, P))."""
    scale, _ = clip_scale(grad, max_norm)
    return grad * scale


def clip_adjoint_(g_bar: torch.Tensor, grad: torch.Tensor, max_norm: float) -> None:
    """In place: the adjoint G_bar (K, P) of the clipped gradient becomes that of the raw
    gradient ``grad`` (P,) of the same step (module docstring)."""
    scale, norm = clip_scale(grad, max_norm)
    if float(scale) >= 1.0:  # the clip was not active: G = g
        return
    coupling = (g_bar @ grad) / (norm * (norm + CLIP_EPS))  # (K,)
    g_bar.sub_(coupling[:, None] * grad).mul_(scale)


@dataclass(frozen=True)
class Clipped:
    """An optimizer whose gradient is clipped first: the same interface
    (core/optimizers.py), delegating to ``inner`` after the clip (step) or before the clip's own
    adjoint (adjoint)."""
    inner: object
    max_norm: float
    needs_step_values = True  # the clip's adjoint needs the step's raw gradient

    def __getattr__(self, name):  # group_ends, lrs, wds, backends: the inner optimizer's
        if name == "inner":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def state_size(self, num_params: int) -> int:
        return self.inner.state_size(num_params)

    def init(self, theta: torch.Tensor) -> torch.Tensor:
        return self.inner.init(theta)

    def step_(self, theta: torch.Tensor, state: torch.Tensor, grad: torch.Tensor,
              step: int) -> None:
        self.inner.step_(theta, state, clip_gradient(grad, self.max_norm), step)

    def adjoint_(self, theta_bar: torch.Tensor, state_bar: torch.Tensor, g_bar: torch.Tensor,
                 hvp, step: int, values: Optional[StepValues] = None,
                 backend: str | None = None) -> None:
        if values is None:
            raise ValueError("a clipped step's adjoint needs its forward values (StepValues)")
        clipped = replace(values, grad=clip_gradient(values.grad, self.max_norm))
        self.inner.adjoint_(theta_bar, state_bar, g_bar, hvp, step, clipped, backend=backend)
        clip_adjoint_(g_bar, values.grad, self.max_norm)
