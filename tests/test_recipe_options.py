"""The recipe options a MAGIC-paper ResNet-9 needs: log-sum-exp global pooling (model.pool=lse),
airbench's hyperparameter convention (train.lr_convention=airbench) and flip test-time
augmentation of the accuracy (measure.tta=flip); each held against float64 finite differences
(tests/test_exactness.py's helpers and tolerance) where it changes the trajectory or the
measurement, and against its own definition otherwise.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tomllib
import torch
from conftest import SMALL
from test_exactness import (
    TARGETS,
    assert_matches_finite_differences,
    central_differences,
    one_thread,
)

from fastreplay.config import ConfigError, RunConfig, config_from_dict, load_config, to_toml
from fastreplay.core.measure import accuracy_logits
from fastreplay.core.models import GlobalPool
from fastreplay.core.recipe import Recipe
from fastreplay.core.lr import airbench_scale, lr_table
from fastreplay.core.replay import replay
from fastreplay.interface.api import counterfactual, open_or_train

# --- Fingerprints and validation ----------------------------------------------------------

# Computed on the code before these keys existed: adding keys at their defaults must leave
# every existing run's fingerprint (and so its store) valid.
FINGERPRINTS_BEFORE = {"default": "551bca2ed576af0e", "full": "5ccae1d1d9a373e0",
                       "quick": "91d462d316176bce"}

# The quick preset as it was when those fingerprints were taken (tiny-cnn width 2, lr 0.4; the
# preset has since become the smooth width-1, lr-0.02 recipe): its stored runs must stay valid.
QUICK_BEFORE = ["device=cpu", "data.name=cifar10", "data.num_train=5000", "data.num_test=1000",
                "data.image_size=32", "data.crop_padding=4", "model.name=tiny-cnn",
                "model.width=2.0", "train.epochs=8", "train.batch_size=100", "train.lr=0.4",
                "train.dtype=float32", "train.schedule=onecycle", "train.weight_decay=5e-4",
                "replay.checkpoint_every=20"]


def test_runs_made_before_the_new_keys_keep_their_fingerprints():
    assert RunConfig().fingerprint() == FINGERPRINTS_BEFORE["default"]
    assert load_config("full").fingerprint() == FINGERPRINTS_BEFORE["full"]
    assert load_config("test", overrides=QUICK_BEFORE).fingerprint() == FINGERPRINTS_BEFORE["quick"]


@pytest.mark.parametrize("override", ["train.lr_convention=airbench", "model.lse_eps=0.05",
                                      "model.inner_pool=avg", "model.pool=lse"])
def test_new_trajectory_keys_are_saved_and_fingerprinted(override):
    base = load_config("test")
    changed = load_config("test", overrides=[override])
    assert changed.fingerprint() != base.fingerprint()
    saved = config_from_dict(tomllib.loads(to_toml(changed)))  # as a run store keeps it
    assert saved == changed and saved != base


def test_tta_is_saved_but_not_fingerprinted():
    """It changes no trajectory: only the accuracy figure."""
    flip = load_config("test", overrides=["measure.tta=flip"])
    assert 'tta = "flip"' in to_toml(flip)
    assert flip.fingerprint() == load_config("test").fingerprint()


@pytest.mark.parametrize("override, message", [
    ("model.pool=median", "model.pool must be avg, max or lse"),
    ("model.lse_eps=0", "model.lse_eps must be > 0"),
    ("model.lse_eps=inf", "model.lse_eps=inf is not a finite number"),
    ("model.inner_pool=lse", "model.inner_pool must be avg or max"),
    ("train.lr_convention=sum", "train.lr_convention must be mean or airbench"),
    ("measure.tta=crop", "measure.tta must be none or flip"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("test", overrides=[override])


# --- Log-sum-exp pooling ------------------------------------------------------------------

def test_lse_pool_is_a_smooth_max_between_mean_and_max():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lse = lambda eps: GlobalPool("lse", eps)(x)
    assert torch.allclose(lse(1e-4), x.amax(dim=(2, 3)), atol=1e-3)
    assert torch.allclose(lse(1e4), x.mean(dim=(2, 3)), atol=1e-3)
    assert (lse(0.1) <= x.amax(dim=(2, 3))).all() and (lse(0.1) >= x.mean(dim=(2, 3))).all()
    constant = torch.full((1, 1, 4, 4), 7.0, dtype=torch.float64)
    assert torch.allclose(GlobalPool("lse", 0.1)(constant), constant[:, :, 0, 0])
    assert torch.isfinite(GlobalPool("lse", 1e-3)(x * 1e3)).all()  # exp(1e6) would overflow


# --- The airbench convention --------------------------------------------------------------

AIRBENCH = SMALL + ["model.name=tiny-cnn", "train.lr_convention=airbench", "train.momentum=0.875",
                    "train.nesterov=true", "train.lr=153.6", "train.weight_decay=0.768"]
"""B = 12, mu = 0.875: S = 1024 (1 + 8) = 9216, peak eta = 153.6 * 12 / 9216 = 0.2 and
lambda = 0.768 / 153.6 = 5e-3, SMALL's mean-convention values."""


def test_airbench_values_convert_to_moderate_mean_loss_values():
    recipe = Recipe(load_config("test", overrides=AIRBENCH + ["train.schedule=constant"]))
    assert airbench_scale(0.875) == 9216
    np.testing.assert_allclose(recipe.optimizer.lrs[0], [0.2, 0.4], rtol=1e-15)  # bias x2
    np.testing.assert_allclose(recipe.optimizer.wds, [5e-3, 0.0], rtol=1e-15)


def schedule_factor(cfg, step: int, num_steps: int) -> float:
    """f_t: the schedule's factor alone (the mean convention's lr table at lr 1)."""
    unit = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1.0,
                                                                lr_convention="mean"))
    return float(lr_table(unit.train, num_steps, 1)[step, 0])


def airbench_param_groups(cfg, groups, factor: float) -> list[dict]:
    """airbench94's torch SGD groups for (decay, no-decay) tensors at schedule factor f: lr
    f lr / S (times bias_lr_scale), coupled weight_decay (wd B / S) / (unscheduled group lr)."""
    t = cfg.train
    lr = t.lr / airbench_scale(t.momentum)
    decay = t.weight_decay * t.batch_size / airbench_scale(t.momentum)
    return [dict(params=[groups[0]], lr=factor * lr, weight_decay=decay / lr),
            dict(params=[groups[1]], lr=factor * lr * t.bias_lr_scale, weight_decay=0.0)]


def test_an_airbench_step_is_torch_sgd_on_the_summed_loss():
    """Two steps (the second checks the momentum buffer's scale) of the package's step equal
    airbench94's torch SGD on the summed loss, in both parameter groups, to 1e-12."""
    cfg = load_config("test", overrides=AIRBENCH)
    recipe = Recipe(cfg)
    state = recipe.init_state()
    end = recipe.model.group_ends[0]
    params = [recipe.model.theta0[:end].clone().requires_grad_(True),
              recipe.model.theta0[end:].clone().requires_grad_(True)]
    opt = torch.optim.SGD(airbench_param_groups(cfg, params, 1.0), momentum=cfg.train.momentum,
                          nesterov=True)
    buffers = state.buffers.clone()
    for step in range(2):
        factor = schedule_factor(cfg, step, recipe.num_steps)
        for group, scheduled in zip(opt.param_groups, airbench_param_groups(cfg, params, factor)):
            group["lr"] = scheduled["lr"]  # what airbench's LambdaLR does; wd stays
        opt.zero_grad()
        losses, buffers = recipe.batch_losses(torch.cat(params), buffers, step)
        losses.sum().backward()
        opt.step()
        buffers = buffers.detach()
        recipe.step(state, recipe.ones())
        expected = torch.cat([p.detach() for p in params])
        assert torch.allclose(state.theta[:end], expected[:end], rtol=0, atol=1e-12)
        assert torch.allclose(state.theta[end:], expected[end:], rtol=0, atol=1e-12)
        assert not torch.equal(state.theta, recipe.model.theta0)


# --- Test-time augmentation -----------------------------------------------------------------

def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    recipe = Recipe(load_config("test", overrides=SMALL + ["measure.tta=flip"]))
    theta, buffers = recipe.model.theta0, recipe.model.buffers0
    x = recipe.data.test_batch(torch.arange(4))
    plain, _ = recipe.model.forward(theta, buffers, x, train=False)
    mirror, _ = recipe.model.forward(theta, buffers, x.flip(-1), train=False)
    got = accuracy_logits(recipe, theta, buffers, x)
    assert torch.allclose(got, (plain + mirror) / 2, rtol=0, atol=1e-15)
    assert not torch.allclose(got, plain)


# --- Finite differences ---------------------------------------------------------------------

FD_RUNS = {
    # A log-sum-exp global pool on 16x16 images (at 8x8 the global pool sees a 1x1 map, where
    # lse, max and mean coincide). Average downsampling: with max downsampling the float64
    # retrainings of this tiny run jump between eps = 1e-6 and 1e-5 (pool=max does too), so
    # central differences at eps = 1e-4 measure the jump, not the derivative.
    "resnet9-lse": SMALL + ["data.image_size=16", "model.name=resnet9", "model.width=0.125",
                            "model.pool=lse", "model.inner_pool=avg",
                            "train.nesterov=false", "measure.kind=margin"],
    "tiny-cnn-airbench": AIRBENCH + ["measure.kind=loss"],
}
HVP = {"resnet9-lse": ["reverse", "forward", "forward-vmap"], "tiny-cnn-airbench": ["reverse"]}


@pytest.mark.parametrize("run", list(FD_RUNS))
def test_scores_match_finite_differences(run, tmp_path):
    """Finite differences once per run, then the replay in each HVP mode the option touches
    (the pool is in the network, so every mode; the convention only in the step's scalars)."""
    cfg = load_config("test", overrides=FD_RUNS[run])
    recipe = Recipe(cfg)
    with one_thread():
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train)
        _, store = open_or_train(cfg, tmp_path)
        try:
            for hvp in HVP[run]:
                cfg_h = load_config("test", overrides=FD_RUNS[run] + [f"replay.hvp={hvp}"])
                scores = replay(Recipe(cfg_h), store, TARGETS, cfg_h.measure.kind).scores
                assert_matches_finite_differences(scores, examples, fd)
        finally:
            store.close()
