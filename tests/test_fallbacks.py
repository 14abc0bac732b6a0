"""Models that torch.func cannot vmap or forward-differentiate: fall back exactly, or say so.

Each gap below is a real torch limitation on the CPU (not a mocked exception), spliced into the
loss as an identity on the logits, so every mode that does run gives the same values:

* ``channels-last clone``: Tensor.clone(memory_format=torch.channels_last) of a batched tensor
  ("NYI: ... inside vmap", a RuntimeError), the class of failure a channels_last ResNet-9 with
  average pooling meets in the vmapped step on a GPU;
* ``Function without vmap``: a custom autograd.Function with a jvp rule but no vmap rule;
* ``Function without jvp``: one with neither (NotImplementedError from forward-mode AD).
"""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from conftest import SMALL

from fastreplay.config import load_config, with_values
from fastreplay.core.recipe import Recipe
from fastreplay.core.replay import hvp_mode, replay
from fastreplay.exceptions import ReplayError
from fastreplay.interface.api import open_or_train
from fastreplay.progress import log

TARGETS = [1, 4]


class _IdentityWithoutJvp(torch.autograd.Function):
    """The identity, with a backward only: double backward works, forward-mode AD does not."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class _IdentityWithoutVmap(_IdentityWithoutJvp):
    """The identity, with a backward and a jvp rule but no vmap rule."""

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


def _channels_last_clone(logits):
    b, c = logits.shape
    return logits.reshape(b, c, 1, 1).clone(memory_format=torch.channels_last).reshape(b, c)


GAPS = {
    "channels-last clone": _channels_last_clone,
    "Function without vmap": _IdentityWithoutVmap.apply,
    "Function without jvp": _IdentityWithoutJvp.apply,
}


def _splice(monkeypatch, recipe, gap: str) -> None:
    """Route the recipe's per-example losses through the gap (an identity on the logits)."""
    import torch.nn.functional as F
    identity = GAPS[gap]

    def losses(theta, buffers, x, y):
        logits, new_buffers = recipe.model.forward(theta, buffers, x, train=True)
        return F.cross_entropy(identity(logits), y, reduction="none",
                               label_smoothing=recipe.cfg.train.label_smoothing), new_buffers
    monkeypatch.setattr(recipe, "losses", losses)


@pytest.fixture
def warnings_logged(monkeypatch):
    """The messages fastreplay logs at WARNING (its own handler: the CLI's logging set-up may
    stop propagation to pytest's caplog)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    log.addHandler(handler)
    monkeypatch.setattr(log, "level", logging.INFO)
    yield messages
    log.removeHandler(handler)


def _trained(tmp_path, monkeypatch, gap: str, hvp: str):
    recipe, store = open_or_train(load_config("test", overrides=SMALL + [f"replay.hvp={hvp}"]),
                                  tmp_path)
    _splice(monkeypatch, recipe, gap)
    return recipe, store


VMAP_TO_FORWARD = "forward-vmap is not supported for this model by torch.func.vmap ("
FORWARD_TO_REVERSE = "forward is not supported for this model by forward-mode AD ("


@pytest.mark.parametrize("gap,lands_on,warnings", [
    ("channels-last clone", "forward",
     [(VMAP_TO_FORWARD + "NYI: Tensor.clone(memory_format) inside vmap", "forward")]),
    ("Function without vmap", "forward",
     [(VMAP_TO_FORWARD + "You tried to vmap over _IdentityWithoutVmap", "forward")]),
    # vmap fails first (no vmap rule), then forward-mode AD (no jvp rule): two steps down.
    ("Function without jvp", "reverse",
     [(VMAP_TO_FORWARD + "You tried to vmap over _IdentityWithoutJvp", "forward"),
      (FORWARD_TO_REVERSE + "You must implement the jvp function", "reverse")]),
])
def test_auto_falls_back_exactly_where_torch_cannot_transform_the_model(
        gap, lands_on, warnings, tmp_path, monkeypatch, warnings_logged):
    """replay.hvp=auto on "CUDA" (K = 2: forward-vmap first) ends on the first mode that runs,
    with the scores of that mode chosen explicitly (bitwise: the failed attempt changes
    nothing), one warning per mode ruled out, and no second try."""
    from fastreplay.core import replay as replay_mod
    recipe, store = _trained(tmp_path, monkeypatch, gap, lands_on)
    expected = replay(recipe, store, TARGETS, "loss").scores
    recipe = Recipe(with_values(recipe.cfg, {"replay.hvp": "auto"}))
    _splice(monkeypatch, recipe, gap)
    monkeypatch.setattr(replay_mod, "_on_cuda", lambda recipe: True)
    assert hvp_mode(recipe, 2) == "forward-vmap"
    got = replay(recipe, store, TARGETS, "loss").scores
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got).max() > 1e-3
    assert hvp_mode(recipe, 2) == lands_on and hvp_mode(recipe, 1) == lands_on  # remembered
    assert len(warnings_logged) == len(warnings), warnings_logged
    for message, (reason, next_mode) in zip(warnings_logged, warnings):
        assert message.startswith("replay.hvp=auto: " + reason), message
        assert f"replaying with replay.hvp={next_mode} from here on" in message, message


@pytest.mark.parametrize("gap,hvp,use", [
    ("channels-last clone", "forward-vmap", "forward"),
    ("Function without vmap", "forward-vmap", "forward"),
    ("Function without jvp", "forward", "reverse"),
])
def test_an_explicit_mode_torch_cannot_run_is_one_clear_error(gap, hvp, use, tmp_path,
                                                             monkeypatch):
    recipe, store = _trained(tmp_path, monkeypatch, gap, hvp)
    with pytest.raises(ReplayError) as err:
        replay(recipe, store, TARGETS, "loss")
    message = str(err.value)
    assert message.startswith(f"replay.hvp={hvp} is not supported for this model by ")
    assert message.endswith(f"; use --set replay.hvp={use}") and "\n" not in message


@pytest.mark.parametrize("bug", [
    "mat1 and mat2 shapes cannot be multiplied (24x3 and 4x10)",
    "vmap: Expected all tensors to have the same size in the mapped dimension, got sizes [2, 3]",
])
def test_a_real_error_in_the_vmapped_step_is_not_taken_for_a_limitation(bug, tmp_path,
                                                                        monkeypatch):
    from fastreplay.core import replay as replay_mod
    recipe, store = open_or_train(load_config("test", overrides=SMALL), tmp_path)

    def broken(recipe, batched):
        def step(*args):
            raise RuntimeError(bug)
        return step
    monkeypatch.setattr(replay_mod, "_on_cuda", lambda recipe: True)
    monkeypatch.setattr(replay_mod, "_tangent_fn", broken)
    with pytest.raises(RuntimeError, match=f"^{re.escape(bug)}$"):
        replay(recipe, store, TARGETS, "loss")
    assert hvp_mode(recipe, 2) == "forward-vmap"  # nothing ruled out


@pytest.mark.parametrize("gap", ["channels-last clone", "Function without vmap"])
def test_train_many_trains_one_model_at_a_time_where_vmap_cannot_batch_it(
        gap, monkeypatch, warnings_logged):
    """LDS retraining: the vmapped multi-model step meets the same gaps; it starts over one
    model at a time (bitwise single-model training) and does not try vmap again."""
    from fastreplay.core.multitrain import can_batch_models, choose_models_per_batch, train_many
    from fastreplay.core.train import train
    recipe = Recipe(load_config("test", overrides=SMALL + ["train.epochs=1"]))
    _splice(monkeypatch, recipe, gap)
    assert can_batch_models(recipe)
    w = torch.ones(2, recipe.num_train, dtype=torch.float64)
    w[1, ::3] = 0
    many = train_many(recipe, w)
    for j in range(2):
        assert torch.equal(many.theta[j], train(recipe, w[j]).theta)
    assert not can_batch_models(recipe) and choose_models_per_batch(recipe, 10) == 1
    assert len(warnings_logged) == 1 and "vmap cannot batch this model" in warnings_logged[0]
