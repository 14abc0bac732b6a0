"""Fused Adam ops torch.ops.fastreplay.adam_step_ / adam_adjoint_ (csrc/adam_math.h) against
the PyTorch reference (fastreplay/core/optim.py), on random inputs: CPU always, CUDA where
there is a GPU and CUDA kernels. Tolerances as in test_kernels.py (a few ulps: the reference
runs several ATen kernels with their own FMA contractions), of the largest magnitude in each
output: Adam divides by roots of second moments near 0, so intermediates reach far beyond the
inputs' scale, and an element that cancels two of them carries their rounding."""
from __future__ import annotations

import pytest
import torch
from test_kernels import DEVICES, TOL, make_groups, ops, randn

from fastreplay.core.optim import AdamHyper, adam_adjoint_reference, adam_step_reference

SIZES = [1, 7, 1023, 100003]
HYPERS = {
    "adam": AdamHyper(0.85, 0.99, 1e-8, 0.0, False),
    "adamw": AdamHyper(0.9, 0.999, 1e-8, 0.0, True),
    "adamw-eps-root": AdamHyper(0.9, 0.95, 0.0, 1e-6, True),
}


def scalars(hyper: AdamHyper, step: int) -> tuple:
    c1, c2 = hyper.corrections(step)
    return (hyper.beta1, hyper.beta2, hyper.eps, hyper.eps_root, c1, c2, hyper.decoupled)


def assert_close(name, got, want, dtype):
    tol = TOL[dtype]
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{name}: {m}")


def positive(shape, dtype, device, gen):
    """Second moments: non-negative, some of them zero (the adjoint's 0 where s = 0)."""
    v = randn(shape, dtype, device, gen).square()
    v.view(-1)[::5] = 0
    return v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("runs", [(), (3,)])
def test_step_matches_reference(device, dtype, hyper, P, runs):
    gen = torch.Generator().manual_seed(P + len(runs))
    ends, lrs, wds, _ = make_groups(P, 3, gen)
    h = HYPERS[hyper]
    theta, grad = (randn((*runs, P), dtype, device, gen) for _ in range(2))
    state = torch.cat([randn((*runs, P), dtype, device, gen),
                       positive((*runs, P), dtype, device, gen)], dim=-1)
    ref = [t.clone() for t in (theta, state, grad)]
    ops.adam_step_(theta, state, grad, ends, lrs, wds, *scalars(h, 4))
    adam_step_reference(*ref, ends, lrs, wds, h, 4)
    for name, a, b in zip(("theta", "state"), (theta, state), ref):
        assert_close(name, a, b, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("with_hvp", [False, True])
def test_adjoint_matches_reference(device, dtype, hyper, P, with_hvp):
    gen = torch.Generator().manual_seed(P + 17 * with_hvp)
    ends, lrs, wds, _ = make_groups(P, 2, gen)
    h = HYPERS[hyper]
    k = 3
    theta_bar, g_bar = randn((k, P), dtype, device, gen), torch.zeros(k, P, dtype=dtype, device=device)
    state_bar = randn((k, 2 * P), dtype, device, gen)
    hvp = randn((k, P), dtype, device, gen) if with_hvp else None
    grad, theta = randn((P,), dtype, device, gen), randn((P,), dtype, device, gen)
    grad.view(-1)[::7] = 0  # with zero second moments below: s = 0 where eps_root = 0
    state = torch.cat([randn((P,), dtype, device, gen), positive((P,), dtype, device, gen)])
    ref = [t.clone() for t in (theta_bar, state_bar, g_bar)]
    ops.adam_adjoint_(theta_bar, state_bar, g_bar, hvp, grad, theta, state, ends, lrs, wds,
                      *scalars(h, 2))
    adam_adjoint_reference(*ref, hvp, grad, theta, state, ends, lrs, wds, h, 2)
    for name, a, b in zip(("theta_bar", "state_bar", "g_bar"), (theta_bar, state_bar, g_bar), ref):
        assert torch.isfinite(a).all(), name
        assert_close(name, a, b, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_adam_arguments_are_readable_errors(device):
    theta = torch.zeros(4, dtype=torch.float64, device=device)
    grad = torch.zeros_like(theta)
    args = ([4], [0.1], [0.0], *scalars(HYPERS["adam"], 0))
    with pytest.raises(RuntimeError, match=r"the last dimension of state is 4 but must be 8"):
        ops.adam_step_(theta, torch.zeros_like(theta), grad, *args)
    with pytest.raises(RuntimeError, match="theta and state share memory"):
        both = torch.zeros(8, dtype=torch.float64, device=device)
        ops.adam_step_(both[:4], both, grad, *args)
    with pytest.raises(RuntimeError, match=r"grad must have shape \[4\]"):
        ops.adam_adjoint_(torch.zeros(2, 4, dtype=torch.float64, device=device),
                          torch.zeros(2, 8, dtype=torch.float64, device=device),
                          torch.zeros(2, 4, dtype=torch.float64, device=device), None,
                          torch.zeros(2, 4, dtype=torch.float64, device=device), theta,
                          torch.zeros(8, dtype=torch.float64, device=device), *args)
