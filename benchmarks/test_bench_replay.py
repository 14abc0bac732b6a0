"""pytest-benchmark suite: training step and replay step (reference vs fast path) of a recipe.

    pytest benchmarks/test_bench_replay.py --benchmark-only [--benchmark-save=NAME]
    pytest benchmarks/test_bench_replay.py --benchmark-only --benchmark-compare  # regressions

On CUDA: the full preset's ResNet-9 (one epoch of schedule, TF32 as in benchmarks/RESULTS.md).
On the CPU: the test preset (tiny-cnn), so the suite also runs where there is no GPU.

Each benchmark also checks what it times: the training step must move the state (finite, new
parameters and running statistics), and each replay step's outputs, (H g + rho J^T b_bar) and the
per-example weight term, must have the right shapes, be finite and match a float64 evaluation
written out here (tolerance from the run's precision).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastreplay.config import load_config
from fastreplay.core.recipe import Recipe
from fastreplay.core.replay import step_vjp

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def recipe():
    if CUDA:
        cfg = load_config("full", overrides=["train.epochs=1", "replay.window_epochs=0",
                                             "train.tf32=true"])
    else:
        cfg = load_config("test")
    r = Recipe(cfg)
    r.state = r.init_state()
    return r


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _bench(benchmark, fn):
    def call():
        fn()
        _sync()
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def _expected_step_vjp(recipe, theta, buffers, step, g_bar, b_bar):
    """What step_vjp must return, evaluated here in float64 with plain autograd, one measurement
    at a time: the gradient of Q = <grad L_t, g> + <new running statistics, b_bar> with respect
    to theta (H g + rho J^T b_bar) and to the batch's data weights ((1/B) <grad loss_i, g>).
    (Not by finite differences: the full preset's max pooling makes the gradient jump.)"""
    x, y = recipe.batch_inputs(step)
    x, buffers = x.double(), buffers.double()
    theta = theta.detach().double().requires_grad_(True)
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device, requires_grad=True)
    losses, new_buffers = recipe.losses(theta, buffers, x, y)
    (grad,) = torch.autograd.grad((w * losses).sum() / x.shape[0], theta, create_graph=True)
    hvps, wgrads = [], []
    for g, b in zip(g_bar.double(), b_bar.double()):
        q = (grad * g).sum() + (new_buffers * b).sum()
        h, wg = torch.autograd.grad(q, (theta, w), retain_graph=True)
        hvps.append(h)
        wgrads.append(wg)
    return torch.stack(hvps), torch.stack(wgrads)


def _tolerance(cfg) -> float:
    """Relative l2 error allowed against the float64 evaluation. Measured on an H200 (full
    preset's model, K = 1 and 5, every hvp mode): about 1e-3 in fp32, 6e-2 with TF32; on the
    CPU in float64 below 1e-15."""
    if cfg.train.dtype == "float64":
        return 1e-9
    return 0.2 if cfg.train.tf32 else 1e-2


def test_train_step(benchmark, recipe):
    ones = recipe.ones()

    def step():
        recipe.step(recipe.state, ones)
        recipe.state.step = 0
    before = recipe.state.theta.clone(), recipe.state.buffers.clone()
    loss = recipe.step(recipe.state, ones)
    recipe.state.step = 0
    assert torch.isfinite(loss) and torch.isfinite(recipe.state.theta).all()
    assert not torch.equal(recipe.state.theta, before[0])
    assert recipe.state.buffers.numel() == recipe.model.num_buffers > 0  # BatchNorm statistics
    assert not torch.equal(recipe.state.buffers, before[1])
    _bench(benchmark, step)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("hvp", ["reverse", "forward", "forward-vmap"])
def test_replay_step(benchmark, recipe, hvp, k):
    base = recipe.cfg
    recipe.cfg = dataclasses.replace(base, replay=dataclasses.replace(base.replay, hvp=hvp))
    g = torch.randn(k, recipe.model.num_params, device=recipe.device, dtype=recipe.dtype)
    b = torch.randn(k, recipe.model.num_buffers, device=recipe.device, dtype=recipe.dtype)
    try:
        hvp_out, weight_term = step_vjp(recipe, recipe.state.theta, recipe.state.buffers, 0, g, b)
        B = recipe.cfg.train.batch_size
        assert hvp_out.shape == (k, recipe.model.num_params) and weight_term.shape == (k, B)
        assert torch.isfinite(hvp_out).all() and torch.isfinite(weight_term).all()
        want_hvp, want_weight = _expected_step_vjp(recipe, recipe.state.theta,
                                                   recipe.state.buffers, 0, g, b)
        tol = _tolerance(recipe.cfg)
        assert _rel_err(hvp_out, want_hvp) < tol, (hvp, k, _rel_err(hvp_out, want_hvp))
        assert _rel_err(weight_term, want_weight) < tol, (hvp, k, _rel_err(weight_term, want_weight))
        _bench(benchmark, lambda: step_vjp(recipe, recipe.state.theta, recipe.state.buffers, 0, g, b))
    finally:
        recipe.cfg = base
