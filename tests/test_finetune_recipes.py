"""What fine-tuning recipes use, each with its exact adjoint: gradient clipping (active on some
steps), warm-up + cosine, gradient accumulation, dropout masks drawn from (seed, step, example).

Each is held against float64 finite differences of real retrainings (1e-6 relative, as
tests/test_exactness.py) and against the unrolled-autograd oracle where that applies; SGD and
AdamW both.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SMALL
from test_exactness import assert_matches_finite_differences, central_differences, one_thread

from fastreplay.config import load_config
from fastreplay.core.clip import clip_adjoint_, clip_gradient
from fastreplay.core.lr import lr_table
from fastreplay.core.recipe import Recipe
from fastreplay.core.reference import unrolled_scores
from fastreplay.core.replay import replay
from fastreplay.core.train import run_steps
from fastreplay.interface.api import counterfactual, open_or_train

TARGETS = [1, 4]
OPTIMIZERS = {
    "sgd": ["train.optimizer=sgd"],
    # Adam divides by the root of small second moments: eps_root keeps the run smooth enough for
    # central differences at 1e-6 (tests/test_adam.py).
    "adamw": ["train.optimizer=adamw", "train.lr=0.02", "train.weight_decay=0.05",
              "train.eps=0", "train.eps_root=1e-6"],
}
MLP = SMALL + ["model.name=mlp"]  # no BatchNorm: micro-batches keep the step's maths


def _scores_and_fd(overrides, tmp_path, eps=1e-4):
    cfg = load_config("test", overrides=overrides)
    recipe, store = open_or_train(cfg, tmp_path / "run")
    with one_thread():
        scores = replay(recipe, store, TARGETS, cfg.measure.kind).scores
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train, eps=eps)
        oracle = unrolled_scores(recipe, TARGETS, cfg.measure.kind).detach().numpy()
    store.close()
    return recipe, scores, examples, fd, oracle


def _raw_gradient_norms(recipe) -> np.ndarray:
    """||grad L_t|| at each step of the run (before clipping)."""
    norms = []
    run_steps(recipe, recipe.init_state(), recipe.ones(), recipe.num_steps,
              on_step=lambda s: norms.append(float(recipe.gradient(s.theta, s.buffers, s.step)
                                                   .norm())))
    return np.array(norms)


# --- gradient clipping ------------------------------------------------------------------------

def test_clip_adjoint_is_the_transposed_jacobian():
    """clip_adjoint_ against autograd's vector-Jacobian products of clip_gradient, clipped and
    not, for several cotangents at once."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(9, dtype=torch.float64, generator=gen)
    cot = torch.randn(3, 9, dtype=torch.float64, generator=gen)
    for max_norm in (0.5 * float(g.norm()), 2.0 * float(g.norm())):
        raw = g.clone().requires_grad_(True)
        out = clip_gradient(raw, max_norm)
        want = torch.stack([torch.autograd.grad(out, raw, c, retain_graph=True)[0] for c in cot])
        got = cot.clone()
        clip_adjoint_(got, g, max_norm)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(clip_gradient(g, 1.0).norm(), torch.tensor(1.0, dtype=torch.float64)
                               * float(g.norm()) / (float(g.norm()) + 1e-6))


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_clipped_runs_match_finite_differences(opt, tmp_path):
    """A clip threshold inside the run's range of gradient norms: active on some steps, not on
    others, so both branches of the adjoint are exercised."""
    base = MLP + OPTIMIZERS[opt]
    norms = _raw_gradient_norms(Recipe(load_config("test", overrides=base)))
    clip = float(np.median(norms))
    recipe, scores, examples, fd, oracle = _scores_and_fd(base + [f"train.clip_norm={clip!r}"],
                                                          tmp_path, eps=1e-5)
    clipped = _raw_gradient_norms(recipe) + 1e-6 > clip
    assert 0 < clipped.sum() < len(clipped), clipped  # active on some steps only
    np.testing.assert_allclose(scores, oracle, rtol=0, atol=1e-11 * np.abs(oracle).max())
    assert_matches_finite_differences(scores, examples, fd)
    # and it mattered: the unclipped run's scores differ far beyond the tolerance
    _, unclipped, *_ = _scores_and_fd(base, tmp_path / "unclipped", eps=1e-5)
    assert np.linalg.norm(unclipped - scores) > 1e-3 * np.linalg.norm(scores)


# --- warm-up + cosine -------------------------------------------------------------------------

def test_cosine_schedule_is_transformers_warmup_cosine():
    """train.schedule=cosine with start_factor 0 and end_factor 0 is transformers'
    get_cosine_schedule_with_warmup (linear warm-up over peak_at of the steps, then half a
    cosine to 0), written out here."""
    cfg = load_config("test", overrides=["train.schedule=cosine", "train.peak_at=0.1",
                                         "train.start_factor=0", "train.end_factor=0",
                                         "train.lr=2.0"])
    steps, warmup = 120, 12
    want = [2.0 * (s / warmup if s < warmup else
                   0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
            for s in range(steps)]
    np.testing.assert_allclose(lr_table(cfg.train, steps, 1)[:, 0], want, rtol=1e-14, atol=1e-15)
    floor = load_config("test", overrides=["train.schedule=cosine", "train.end_factor=0.1"])
    assert lr_table(floor.train, 100, 1)[-1, 0] == pytest.approx(0.1 * floor.train.lr, rel=1e-2)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_warmup_cosine_runs_match_finite_differences(opt, tmp_path):
    overrides = MLP + OPTIMIZERS[opt] + ["train.schedule=cosine", "train.peak_at=0.2",
                                         "train.start_factor=0"]
    _, scores, examples, fd, oracle = _scores_and_fd(overrides, tmp_path, eps=1e-5)
    np.testing.assert_allclose(scores, oracle, rtol=0, atol=1e-11 * np.abs(oracle).max())
    assert_matches_finite_differences(scores, examples, fd)
