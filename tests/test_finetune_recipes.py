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


# --- gradient accumulation --------------------------------------------------------------------

@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_accumulated_runs_match_finite_differences(opt, tmp_path):
    """train.micro_batch=4 of a batch of 12: three micro-batches summed, the same step as one
    batch (the runs agree to rounding), and its scores are the run's exact derivatives."""
    base = MLP + OPTIMIZERS[opt]
    _, scores, examples, fd, oracle = _scores_and_fd(base + ["train.micro_batch=4"], tmp_path,
                                                     eps=1e-5)
    np.testing.assert_allclose(scores, oracle, rtol=0, atol=1e-11 * np.abs(oracle).max())
    assert_matches_finite_differences(scores, examples, fd)
    whole, split = (Recipe(load_config("test", overrides=base + extra))
                    for extra in ([], ["train.micro_batch=4"]))
    a, b = (run_steps(r, r.init_state(), r.ones(), r.num_steps).theta for r in (whole, split))
    assert not torch.equal(a, b)  # really summed in pieces (other rounding) ...
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)  # ... of the same step


def test_accumulation_is_refused_with_batchnorm():
    from fastreplay.exceptions import ConfigError
    with pytest.raises(ConfigError, match=r"train.micro_batch=4 splits each batch, but the "
                                          r"model's BatchNorm layers"):
        Recipe(load_config("test", overrides=SMALL + ["model.name=tiny-cnn",
                                                      "train.micro_batch=4"]))


# --- dropout ------------------------------------------------------------------------------------

def dropout_mlp():
    """An MLP with stock nn.Dropout between its layers (fastreplay makes the masks reproducible)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 24),
                               torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Linear(24, 16),
                               torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 10))


def test_dropout_masks_depend_on_seed_step_and_example_only():
    from fastreplay.core.dropout import dropout_context, keep_mask
    with dropout_context(3, 7, torch.tensor([5, 9, 2])):
        batch = keep_mask((3, 4, 50), layer=1, p=0.3, device="cpu")
    with dropout_context(3, 7, torch.tensor([9])):
        alone = keep_mask((1, 4, 50), layer=1, p=0.3, device="cpu")
    with dropout_context(3, 7, torch.tensor([9])):
        longer = keep_mask((1, 6, 50), layer=1, p=0.3, device="cpu")  # more (padded) positions
    assert torch.equal(batch[1:2], alone) and torch.equal(longer[:, :4], alone)
    for other in ((4, 7, 1), (3, 8, 1), (3, 7, 2)):  # seed, step, layer
        with dropout_context(other[0], other[1], torch.tensor([9])):
            assert not torch.equal(keep_mask((1, 4, 50), other[2], 0.3, "cpu"), alone)
    with dropout_context(0, 0, torch.arange(1000)):
        kept = keep_mask((1000, 100), layer=0, p=0.3, device="cpu").double().mean()
    assert abs(float(kept) - 0.7) < 0.01


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_dropout_runs_match_finite_differences(opt, tmp_path):
    """Stock nn.Dropout in a user's module: its masks are redrawn identically by every retraining
    and every rebuilt step, so the scores are the derivatives of the dropout run."""
    overrides = SMALL + OPTIMIZERS[opt]
    cfg = load_config("test", overrides=overrides)
    recipe, store = open_or_train(cfg, tmp_path / "run", model_factory=dropout_mlp)
    with one_thread():
        scores = replay(recipe, store, TARGETS, cfg.measure.kind).scores
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train, eps=1e-5)
        oracle = unrolled_scores(recipe, TARGETS, cfg.measure.kind).detach().numpy()
    store.close()
    np.testing.assert_allclose(scores, oracle, rtol=0, atol=1e-11 * np.abs(oracle).max())
    assert_matches_finite_differences(scores, examples, fd)
    # the dropout is on: the same network without it trains to another place
    plain = Recipe(cfg, model_factory=lambda: torch.nn.Sequential(
        *[m if not isinstance(m, torch.nn.Dropout) else torch.nn.Identity() for m in dropout_mlp()]))
    a = run_steps(recipe, recipe.init_state(), recipe.ones(), recipe.num_steps).theta
    b = run_steps(plain, plain.init_state(), plain.ones(), plain.num_steps).theta
    assert not torch.allclose(a, b, rtol=1e-3)
