"""pytest-benchmark suite: training step and replay step (reference vs fast path) of a recipe.

    pytest benchmarks/test_bench_replay.py --benchmark-only [--benchmark-save=NAME]
    pytest benchmarks/test_bench_replay.py --benchmark-only --benchmark-compare  # regressions

On CUDA: the full preset's ResNet-9 (one epoch of schedule, TF32 as in benchmarks/RESULTS.md).
On the CPU: the test preset (tiny-cnn), so the suite also runs where there is no GPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastreplay.config import load_config
from fastreplay.recipe import Recipe
from fastreplay.replay import step_vjp

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


def test_train_step(benchmark, recipe):
    ones = recipe.ones()

    def step():
        recipe.step(recipe.state, ones)
        recipe.state.step = 0
    _bench(benchmark, step)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("hvp", ["reverse", "forward", "forward-vmap"])
def test_replay_step(benchmark, recipe, hvp, k):
    base = recipe.cfg
    recipe.cfg = dataclasses.replace(base, replay=dataclasses.replace(base.replay, hvp=hvp))
    g = torch.randn(k, recipe.model.num_params, device=recipe.device, dtype=recipe.dtype)
    b = torch.randn(k, recipe.model.num_buffers, device=recipe.device, dtype=recipe.dtype)
    try:
        _bench(benchmark, lambda: step_vjp(recipe, recipe.state.theta, recipe.state.buffers, 0, g, b))
    finally:
        recipe.cfg = base
