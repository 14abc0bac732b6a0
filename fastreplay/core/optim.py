"""SGD and Adam steps and their exact adjoints over a flat parameter vector (docs/design.md §2-§3):
the pure-PyTorch references.

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

from dataclasses import dataclass
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


# --- Adam and AdamW ------------------------------------------------------------------------
#
# The optimizer state is one flat tensor (..., 2P): the first moments m, then the second moments
# v, so that everything that stores, copies, batches or compares an optimizer state (checkpoints,
# retraining of M models at once, the bit-for-bit rebuild check) treats SGD's momentum and Adam's
# moments alike. Step t (counted from 0; bias corrections use k = t + 1), per parameter group
# with learning rate eta and weight decay lambda:
#
#     g = grad + lambda theta            (adam: L2 in the gradient; adamw: g = grad)
#     m' = b1 m + (1 - b1) g             v' = b2 v + (1 - b2) g^2
#     s = sqrt(v' / (1 - b2^k) + eps_root)        u = m' / (1 - b1^k) / (s + eps)
#     theta' = theta - eta u             (adamw: theta' = theta (1 - eta lambda) - eta u)
#
# which is torch.optim.Adam / AdamW (eps_root = 0) and optax's eps_root otherwise. The functions
# here are the pure-PyTorch reference that the fused kernels are tested against.
#
# Adjoint of one step, from theta_bar (already holding the next step's H g_bar), m_bar', v_bar'
# and the step's forward values (grad, theta, m, v):
#
#     u_bar = -eta theta_bar
#     m_tilde = m_bar' + u_bar c1 / (s + eps)
#     v_tilde = v_bar' - u_bar c1 m' c2 / (2 s (s + eps)^2)     (0 where s = 0)
#     g_bar = (1 - b1) m_tilde + 2 (1 - b2) g v_tilde
#     m_bar = b1 m_tilde;   v_bar = b2 v_tilde
#     theta_bar += lambda g_bar  (adam)   or   theta_bar *= 1 - eta lambda  (adamw)
#
# with c1 = 1 / (1 - b1^k), c2 = 1 / (1 - b2^k). The caller adds H g_bar (and the BatchNorm
# term) to theta_bar at the step before, as for SGD.


@dataclass(frozen=True)
class AdamHyper:
    """What a step needs besides the per-group lr and wd: one per run."""
    beta1: float
    beta2: float
    eps: float
    eps_root: float
    decoupled: bool
    """adamw: weight decay applied to theta directly rather than added to the gradient."""

    def corrections(self, step: int) -> tuple[float, float]:
        """(c1, c2) = 1 / (1 - b^k) at step ``step`` (k = step + 1)."""
        k = step + 1
        return 1.0 / (1.0 - self.beta1 ** k), 1.0 / (1.0 - self.beta2 ** k)


def moments(state: torch.Tensor, num_params: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (m, v) of a flat (..., 2P) Adam state."""
    both = state.view(*state.shape[:-1], 2, num_params)
    return both[..., 0, :], both[..., 1, :]


def adam_step_reference(theta: torch.Tensor, state: torch.Tensor, grad: torch.Tensor,
                        group_ends: Sequence[int], lrs: Sequence[float], wds: Sequence[float],
                        hyper: AdamHyper, step: int) -> None:
    """In place on theta (..., P) and state (..., 2P); see the comment above."""
    b1, b2 = hyper.beta1, hyper.beta2
    c1, c2 = hyper.corrections(step)
    m_all, v_all = moments(state, theta.shape[-1])
    for sl, lr, wd in zip(group_slices(group_ends), lrs, wds):
        th, m, v, gr = theta[..., sl], m_all[..., sl], v_all[..., sl], grad[..., sl]
        g = gr + wd * th if (wd != 0.0 and not hyper.decoupled) else gr
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = (m * c1) / ((v * c2 + hyper.eps_root).sqrt() + hyper.eps)
        if wd != 0.0 and hyper.decoupled:
            th.mul_(1 - lr * wd)
        th.sub_(lr * u)


def adam_adjoint_reference(theta_bar: torch.Tensor, state_bar: torch.Tensor,
                           g_bar: torch.Tensor, hvp: Optional[torch.Tensor],
                           grad: torch.Tensor, theta: torch.Tensor, state: torch.Tensor,
                           group_ends: Sequence[int], lrs: Sequence[float],
                           wds: Sequence[float], hyper: AdamHyper, step: int) -> None:
    """In place on theta_bar, state_bar (K, 2P) and g_bar (K, P), for K measurements of one run
    whose step ``step`` started from (theta, state) (P,), (2P,) with gradient ``grad`` (P,)."""
    if hvp is not None:
        theta_bar.add_(hvp)
    b1, b2 = hyper.beta1, hyper.beta2
    c1, c2 = hyper.corrections(step)
    num_params = theta.shape[-1]
    m_all, v_all = moments(state, num_params)
    mb_all, vb_all = moments(state_bar, num_params)
    for sl, lr, wd in zip(group_slices(group_ends), lrs, wds):
        th, gr = theta[..., sl], grad[..., sl]
        g = gr + wd * th if (wd != 0.0 and not hyper.decoupled) else gr
        m_new = b1 * m_all[..., sl] + (1 - b1) * g
        v_new = b2 * v_all[..., sl] + (1 - b2) * g * g
        s = (v_new * c2 + hyper.eps_root).sqrt()
        denom = s + hyper.eps
        tb, mb, vb, gb = theta_bar[..., sl], mb_all[..., sl], vb_all[..., sl], g_bar[..., sl]
        u_bar = tb * (-lr)
        m_tilde = mb + u_bar * (c1 / denom)
        dv = torch.where(s > 0, (m_new * (c1 * c2)) / (2 * s * denom * denom),
                         torch.zeros_like(s))
        v_tilde = vb - u_bar * dv
        gb.copy_(m_tilde * (1 - b1) + (2 * (1 - b2)) * g * v_tilde)
        mb.copy_(m_tilde * b1)
        vb.copy_(v_tilde * b2)
        if wd != 0.0:
            if hyper.decoupled:
                tb.mul_(1 - lr * wd)
            else:
                tb.add_(gb, alpha=wd)
