"""Adam and AdamW (train.optimizer): the step against torch.optim, the replay against the
unrolled-autograd oracle and against float64 finite differences of real retrainings, with
BatchNorm and two parameter groups, over every checkpoint schedule and adjoint backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL, set_args
from test_exactness import assert_matches_finite_differences, central_differences, one_thread

from fastreplay.config import load_config
from fastreplay.core import kernels
from fastreplay.core.optim import AdamHyper, adam_step_reference
from fastreplay.core.reference import unrolled_scores
from fastreplay.core.replay import replay
from fastreplay.exceptions import ConfigError
from fastreplay.interface.api import counterfactual, open_or_train

ADAM = SMALL + ["train.lr=0.02", "train.weight_decay=0.05", "train.beta1=0.8",
                "train.beta2=0.95", "train.eps=1e-6"]
"""The float64 synthetic run of the other tests, with Adam's own (small) learning rate, a
strong decay and betas far from their defaults, so that every adjoint term shows."""

VARIANTS = {
    "adam": ["train.optimizer=adam"],
    "adamw": ["train.optimizer=adamw"],
    "adam-eps-root": ["train.optimizer=adam", "train.eps_root=1e-6"],
    "adamw-eps-root": ["train.optimizer=adamw", "train.eps_root=1e-6", "train.eps=0"],
}


def _cfg(*extra):
    return load_config("test", overrides=ADAM + list(extra))


@pytest.mark.parametrize("decoupled", [False, True])
def test_the_step_is_torch_adam(decoupled):
    """Three steps of the reference step equal torch.optim.Adam / AdamW in both parameter groups
    (a decayed group and an undecayed group with twice the lr) to 1e-13."""
    gen = torch.Generator().manual_seed(0)
    p = 7
    theta = torch.randn(p, dtype=torch.float64, generator=gen)
    grads = [torch.randn(p, dtype=torch.float64, generator=gen) for _ in range(3)]
    groups = [theta[:4].clone().requires_grad_(), theta[4:].clone().requires_grad_()]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([dict(params=[groups[0]], lr=0.1, weight_decay=0.3),
               dict(params=[groups[1]], lr=0.2, weight_decay=0.0)], betas=(0.8, 0.95), eps=1e-6)
    hyper = AdamHyper(0.8, 0.95, 1e-6, 0.0, decoupled)
    ours, state = theta.clone(), torch.zeros(2 * p, dtype=torch.float64)
    for t, g in enumerate(grads):
        groups[0].grad, groups[1].grad = g[:4].clone(), g[4:].clone()
        opt.step()
        adam_step_reference(ours, state, g, [4, p], [0.1, 0.2], [0.3, 0.0], hyper, t)
    torch.testing.assert_close(ours, torch.cat([x.detach() for x in groups]), rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend,hvp", [("reference", "reverse"), ("fused", "forward")])
def test_replay_equals_unrolled_oracle(variant, backend, hvp, tmp_path):
    if backend == "fused" and not kernels.extension_loaded():
        pytest.skip(f"compiled extension not loaded: {kernels.extension_error()}")
    cfg = _cfg(*VARIANTS[variant], "model.name=tiny-cnn", f"replay.backend={backend}",
               f"replay.hvp={hvp}")
    recipe, store = open_or_train(cfg, tmp_path)
    targets = [0, 2, 5]
    with one_thread():
        fast = replay(recipe, store, targets, "loss").scores
        oracle = unrolled_scores(recipe, targets, "loss").detach().cpu().numpy()
    np.testing.assert_allclose(fast, oracle, rtol=0, atol=1e-11 * np.abs(oracle).max())
    assert np.abs(oracle).max() > 1e-3


@pytest.mark.parametrize("variant", ["adam", "adamw-eps-root"])
def test_scores_match_finite_differences(variant, tmp_path):
    """Exact derivatives of real retrainings (float64 central differences, 1e-6 relative).
    Adam divides by the root of small second moments, so its runs curve more than SGD's: a
    step of 1e-5 keeps the truncation error (~eps^2) well inside the tolerance, and the
    rounding error (~1e-16 / eps) still far below it."""
    cfg = _cfg(*VARIANTS[variant], "model.name=tiny-cnn", "measure.kind=margin")
    recipe, store = open_or_train(cfg, tmp_path)
    with one_thread():
        scores = replay(recipe, store, [1, 4], "margin").scores
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, [1, 4], recipe=recipe), recipe.num_train, eps=1e-5)
    assert_matches_finite_differences(scores, examples, fd)


def test_scores_identical_across_checkpoint_schedules(tmp_path):
    """Every schedule rebuilds the same states and moments: bitwise equal scores."""
    results = {}
    for every, schedule in ((1, "every"), (4, "interval"), (100, "tree"), (7, "tree")):
        cfg = _cfg("train.optimizer=adamw", f"replay.checkpoint_every={every}",
                   f"replay.schedule={schedule}", "replay.start_step=3")
        recipe, store = open_or_train(cfg, tmp_path / f"{every}{schedule}")
        results[(every, schedule)] = replay(recipe, store, [1, 3], "margin").scores
    first = next(iter(results.values()))
    assert np.abs(first).max() > 0
    for key, scores in results.items():
        assert np.array_equal(scores, first), key


def test_checkpoints_hold_both_moments(tmp_path):
    recipe, store = open_or_train(_cfg("train.optimizer=adam"), tmp_path)
    _, params, state, _ = store.read_checkpoint(1)
    assert state.shape == (2 * params.shape[0],)
    m, v = state[:params.shape[0]], state[params.shape[0]:]
    assert np.abs(m).max() > 0 and v.min() >= 0 and v.max() > 0


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=lion"], "train.optimizer='lion': use sgd, adam or adamw"),
    (["train.optimizer=adam", "train.eps=0"], "both 0"),
    (["train.optimizer=adamw", "train.lr_convention=airbench"], "airbench's SGD"),
    (["train.optimizer=adam", "train.beta2=1"], "must be in [0, 1)"),
])
def test_bad_adam_options_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        _cfg(*overrides)


def test_the_optimizer_is_part_of_the_fingerprint():
    """An Adam run never reuses an SGD store (SGD fingerprints stay as recorded before the
    Adam keys existed: test_recipe_options.py)."""
    fingerprints = {_cfg(f"train.optimizer={o}").fingerprint() for o in ("sgd", "adam", "adamw")}
    assert len(fingerprints) == 3
    assert _cfg("train.optimizer=adam", "train.eps_root=1e-7").fingerprint() not in fingerprints


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["adam", "adamw-eps-root"])
@pytest.mark.parametrize("hvp", ["reverse", "forward-vmap"])
def test_cuda_replay_equals_unrolled_oracle(variant, hvp, tmp_path):
    """The fused CUDA Adam step and adjoint in a float64 replay on the GPU, against the oracle."""
    cfg = _cfg(*VARIANTS[variant], "model.name=tiny-cnn", "device=cuda", f"replay.hvp={hvp}")
    recipe, store = open_or_train(cfg, tmp_path)
    assert recipe.runtime.adjoint_backend == "fused" and recipe.runtime.step_backend == "fused"
    targets = [0, 2, 5]
    fast = replay(recipe, store, targets, "loss").scores
    oracle = unrolled_scores(recipe, targets, "loss").detach().cpu().numpy()
    np.testing.assert_allclose(fast, oracle, rtol=0, atol=1e-11 * np.abs(oracle).max())


def test_built_in_presets_train_with_adamw_on_the_command_line(cli, tmp_path):
    """`fastreplay magic --set train.optimizer=adamw` on a built-in preset, then `lds`."""
    out = cli.json("magic", "--preset", "test", *set_args(ADAM + ["train.optimizer=adamw"]),
                   "--targets", "0,3", "--run-dir", tmp_path, "--no-plots")
    assert out["targets"] == [0, 3] and out["replayed_targets"] == 2
    lds = cli.json("lds", "--run-dir", tmp_path, "--models", "4", "--keep", "0.9", "--no-plots")
    assert lds["lds_mean"] > 0.5, lds
    assert 'optimizer = "adamw"' in (tmp_path / "config.toml").read_text()
