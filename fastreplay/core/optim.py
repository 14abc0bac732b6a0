"""SGD step and its exact adjoint over a flat parameter vector (docs/design.md §2-§3).

Parameters live in one flat vector whose parameter groups are contiguous slices: group g covers
``[group_ends[g-1], group_ends[g])`` and has its own learning rate and weight decay at each step.
Both operations are elementwise, which is why the compiled core can fuse them; the functions
here are the pure-PyTorch reference that the fused kernels are tested against.

Adjoint conventions (one reverse step t, arrays of shape (..., P), leading dims = measurements):

    theta_bar += hvp                      (H g_bar of the step after this one, if given)
    d_bar  = -lr * theta_bar
    Nesterov: g_bar = d_bar, m_tilde = m_bar + mu * d_bar;  plain: g_bar = 0, m_tilde = m_bar + d_bar
    g_bar += m_tilde;  m_bar = mu * m_tilde
    theta_bar += wd * g_bar
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def group_slices(group_ends: Sequence[int]):
    start = 0
    for end in group_ends:
        yield slice(start, int(end))
        start = int(end)


def sgd_step_reference(
    theta: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    group_ends: Sequence[int],
    lrs: Sequence[float],
    wds: Sequence[float],
    mu: float,
    nesterov: bool,
) -> None:
    """In place: g = grad + wd*theta; m = mu*m + g; d = g + mu*m (Nesterov) or m; theta -= lr*d."""
    for sl, lr, wd in zip(group_slices(group_ends), lrs, wds):
        th, m, gr = theta[..., sl], momentum[..., sl], grad[..., sl]
        g = gr + wd * th if wd != 0.0 else gr.clone()
        m.mul_(mu).add_(g)
        d = g.add_(m, alpha=mu) if nesterov else m
        th.sub_(lr * d)


def sgd_adjoint_reference(
    theta_bar: torch.Tensor,
    m_bar: torch.Tensor,
    g_bar: torch.Tensor,
    hvp: Optional[torch.Tensor],
    group_ends: Sequence[int],
    lrs: Sequence[float],
    wds: Sequence[float],
    mu: float,
    nesterov: bool,
) -> None:
    """In place on theta_bar, m_bar, g_bar (all (..., P)); see the module docstring."""
    if hvp is not None:
        theta_bar.add_(hvp)
    for sl, lr, wd in zip(group_slices(group_ends), lrs, wds):
        tb, mb, gb = theta_bar[..., sl], m_bar[..., sl], g_bar[..., sl]
        d_bar = tb * (-lr)
        if nesterov:
            m_tilde = mb + mu * d_bar
            gb.copy_(d_bar).add_(m_tilde)
        else:
            m_tilde = mb + d_bar
            gb.copy_(m_tilde)
        mb.copy_(m_tilde).mul_(mu)
        if wd != 0.0:
            tb.add_(gb, alpha=wd)
