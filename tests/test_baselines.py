"""The cheap baselines of `fastreplay debug` (workflows/baselines.py) against their definitions,
computed the slow way: one autograd gradient per training example at the final parameters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL
from test_fallbacks import GAPS, warnings_logged  # noqa: F401 (a fixture)

from fastreplay.config import load_config
from fastreplay.core.measure import group_measurement_grads
from fastreplay.core.recipe import Recipe
from fastreplay.core.train import train
from fastreplay.workflows.baselines import (baseline_harms, gradient_norms,
                                            gradient_similarities)

GROUP = [0, 3, 5]


def trained(channels_last: bool = False):
    cfg = load_config("test", overrides=SMALL + ["model.name=tiny-cnn",
                                                 f"train.channels_last={str(channels_last).lower()}"])
    recipe = Recipe(cfg)
    return recipe, train(recipe)


def per_example_gradients(recipe: Recipe, state) -> torch.Tensor:
    rows = []
    for i in range(recipe.num_train):
        theta = state.theta.detach().requires_grad_(True)
        idx = torch.tensor([i])
        x = recipe.data.plain_train_batch(idx)
        outputs, _ = recipe.model.forward(theta, state.buffers, x, train=False)
        (g,) = torch.autograd.grad(recipe.loss_fn(outputs, recipe.data.train_y[idx]).sum(), theta)
        rows.append(g)
    return torch.stack(rows)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_norms_and_similarities_match_per_example_autograd(channels_last):
    """vmap cannot clone to channels_last: the norms must still come out (NCHW inside vmap)."""
    recipe, state = trained(channels_last)
    grads = per_example_gradients(recipe, state)
    direction = torch.randn(recipe.model.num_params, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(gradient_norms(recipe, state.theta, state.buffers),
                               grads.norm(dim=1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(gradient_similarities(recipe, state.theta, state.buffers, direction),
                               (grads @ direction).numpy(), rtol=1e-9, atol=1e-12)
    assert recipe.model.channels_last == channels_last  # restored after the vmap


@pytest.mark.parametrize("kind", ["loss", "margin"])
def test_baselines_are_oriented_as_harms(kind):
    """One more SGD step on example i changes the group's measurement by -lr <g_i, g_group>: a
    harm (worse group) is positive, so for a loss the harm is -<g_i, g_group> and for a margin
    (higher is better) +<g_i, g_group>."""
    recipe, state = trained()
    grads = per_example_gradients(recipe, state)
    _, g_group, _ = group_measurement_grads(recipe, state.theta, state.buffers, GROUP, kind)
    harms = baseline_harms(recipe, state.theta, state.buffers, GROUP, kind)
    dots = (grads @ g_group[0]).numpy()
    np.testing.assert_allclose(harms["gradient_similarity"], -dots if kind == "loss" else dots,
                               rtol=1e-9, atol=1e-14)
    assert set(harms) == {"training_loss", "gradient_similarity", "gradient_norm"}
    # and the sign means what it says: a small step on the most harmful example worsens the group
    worst = int(np.argmax(harms["gradient_similarity"]))
    before = group_measurement_grads(recipe, state.theta, state.buffers, GROUP, kind)[0]
    after = group_measurement_grads(recipe, state.theta - 1e-4 * grads[worst], state.buffers,
                                    GROUP, kind)[0]
    worse = (after - before) > 0 if kind == "loss" else (after - before) < 0
    assert bool(worse)


@pytest.mark.parametrize("gap, missing", [("Function without jvp", {"gradient_similarity",
                                                                     "gradient_norm"}),
                                          ("Function without vmap", {"gradient_norm"})])
def test_a_model_torch_func_cannot_transform_loses_that_baseline_not_the_command(
        monkeypatch, warnings_logged, gap, missing):
    """Real torch gaps (tests/test_fallbacks.py) spliced into the loss: the baselines that need
    the missing transform are skipped with a warning, the rest are computed."""
    import torch.nn.functional as F
    recipe, state = trained()
    identity = GAPS[gap]
    monkeypatch.setattr(recipe, "loss_fn",
                        lambda outputs, y: F.cross_entropy(identity(outputs), y, reduction="none"))
    harms = baseline_harms(recipe, state.theta, state.buffers, GROUP, "loss")
    assert set(harms) == {"training_loss", "gradient_similarity", "gradient_norm"} - missing
    assert sorted(m.split(" baseline skipped")[0] for m in warnings_logged) == sorted(missing)
