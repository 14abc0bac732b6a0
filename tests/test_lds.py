"""LDS on a small float64 synthetic run: high where linearity holds, ~0 for shuffled scores."""
from __future__ import annotations

import numpy as np
import pytest

from fastreplay.config import load_config
from fastreplay.exceptions import ConfigError, TrainingError
from fastreplay.interface.api import open_or_train, run_magic
from fastreplay.workflows.lds import CI_METHOD, lds_statistics, run_lds, spearman_rows, subset_masks

OVERRIDES = ["data.name=synthetic", "data.num_train=200", "data.num_test=16",
             "data.image_size=8", "train.epochs=2", "train.batch_size=20", "train.lr=0.05",
             "train.dtype=float64", "model.name=tiny-cnn", "replay.checkpoint_every=5"]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lds")
    cfg = load_config("test", overrides=OVERRIDES)
    run_magic(cfg, list(range(8)), run_dir, plots=False)
    recipe, store = open_or_train(cfg, run_dir)
    return recipe, store


def test_lds_high_at_small_drop_fraction(scored_run):
    recipe, store = scored_run
    res, pred, measured = run_lds(recipe, store, models=16, keep=0.95, targets=None)
    assert res.lds_mean >= 0.95, res
    # The interval is for the population value, centred on the bias-corrected mean.
    assert res.lds_ci[0] <= res.lds_bias_corrected <= res.lds_ci[1]
    assert res.ci_method == CI_METHOD
    assert store._group["lds/weight_keep0.95"].attrs["result"]["ci_method"] == CI_METHOD
    # The metric can fail: the same retrainings scored with shuffled attributions give ~0.
    scores, _ = store.read_scores("loss")
    masks = subset_masks(recipe.num_train, 16, 0.95, 0)
    rng = np.random.default_rng(1)
    shuffled = np.stack([rng.permutation(row) for row in scores])
    assert abs(lds_statistics(shuffled, masks, measured).mean) < 0.3


def test_lds_resumes_without_retraining(scored_run, monkeypatch):
    recipe, store = scored_run
    first, _, _ = run_lds(recipe, store, models=6, keep=0.9, targets=[0, 1])
    import fastreplay.workflows.lds as lds_mod
    monkeypatch.setattr(lds_mod, "retrain_subset", lambda *a, **k: pytest.fail("retrained"))
    again, _, _ = run_lds(recipe, store, models=6, keep=0.9, targets=[0, 1])
    assert again.per_target == first.per_target


def _spy_on_rows(store, monkeypatch) -> list:
    """Every (model, row) the LDS loop hands to the store."""
    written, write = [], store.write_lds_row
    monkeypatch.setattr(store, "write_lds_row",
                        lambda group, j, row: (written.append((j, np.array(row))),
                                               write(group, j, row)))
    return written


def test_diverged_drop_removal_model_is_an_error_not_a_nan_row(scored_run, monkeypatch):
    """Model 2's drop-removal retraining blows up at step 5: a one-line error naming it, no NaN
    row (NaN reads as "not trained yet"), and a rerun keeps models 0 and 1 and fails the same way
    instead of retraining forever."""
    import torch
    recipe, store = scored_run
    poisoned = torch.from_numpy(subset_masks(recipe.num_train, 4, 0.9, 7)[2])
    real_step = recipe.step

    def step(state, weights, keep_mask=None):
        if keep_mask is not None and state.step == 5 and torch.equal(keep_mask.cpu(), poisoned):
            state.theta.fill_(float("inf"))
        return real_step(state, weights, keep_mask=keep_mask)

    monkeypatch.setattr(recipe, "step", step)
    written = _spy_on_rows(store, monkeypatch)
    message = (r"^LDS model 2 \(drop removal, keep 0\.9\) diverged: non-finite loss at step 5; "
               r"lower train\.lr .*a larger --keep.*$")
    try:
        for _ in range(2):
            with pytest.raises(TrainingError, match=message):
                run_lds(recipe, store, models=4, keep=0.9, targets=None, removal="drop",
                        mask_seed=7)
        assert [j for j, _ in written] == [0, 1]  # trained once; the rerun resumed after them
        assert all(np.isfinite(row).all() for _, row in written)
        values = store._group["lds/drop_keep0.9/values"][...]
        assert np.isfinite(values[:2]).all() and np.isnan(values[2:]).all()
    finally:
        store.delete("lds/drop_keep0.9")


def test_non_finite_measurement_is_an_error_not_an_untrained_row(scored_run, monkeypatch):
    import fastreplay.workflows.lds as lds_mod
    recipe, store = scored_run
    calls, real_measure = [], lds_mod.measure

    def measure(*args):
        calls.append(1)
        row = real_measure(*args)
        if len(calls) == 2:
            row[3] = float("nan")
        return row

    monkeypatch.setattr(lds_mod, "measure", measure)
    written = _spy_on_rows(store, monkeypatch)
    try:
        with pytest.raises(TrainingError, match=r"^LDS model 1 \(weight removal, keep 0\.85\) "
                                                r"measured nan on test 3: a non-finite"):
            run_lds(recipe, store, models=3, keep=0.85, targets=None, models_per_batch=1)
        assert [j for j, _ in written] == [0]
    finally:
        store.delete("lds/weight_keep0.85")


def test_bad_lds_arguments(scored_run):
    recipe, store = scored_run
    with pytest.raises(ConfigError, match="keep"):
        run_lds(recipe, store, models=5, keep=1.5, targets=None)
    with pytest.raises(ConfigError, match="no scores"):
        run_lds(recipe, store, models=5, keep=0.9, targets=[12])


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    ours = spearman_rows(a, b)
    ref = [spearmanr(a[:, k], b[:, k]).statistic for k in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_masks_keep_exact_fraction_and_are_seeded():
    m = subset_masks(1000, 4, 0.99, seed=5)
    assert (m.sum(1) == 990).all()
    assert np.array_equal(m, subset_masks(1000, 4, 0.99, seed=5))
    assert not np.array_equal(m, subset_masks(1000, 4, 0.99, seed=6))


def test_batched_lds_equals_one_at_a_time(scored_run):
    """Training 3 models at once (vmap) gives the same measurements up to float64 rounding."""
    recipe, store = scored_run
    one, _, v1 = run_lds(recipe, store, models=3, keep=0.8, targets=[0, 1, 2], mask_seed=11,
                         models_per_batch=1)
    store.delete("lds/weight_keep0.8")
    many, _, v3 = run_lds(recipe, store, models=3, keep=0.8, targets=[0, 1, 2], mask_seed=11,
                          models_per_batch=3)
    np.testing.assert_allclose(v3, v1, rtol=1e-10, atol=1e-12)


def test_smoothness_passes_on_a_smooth_run_and_can_fail(scored_run):
    from fastreplay.workflows.smoothness import check_smoothness
    recipe, store = scored_run
    rep = check_smoothness(recipe, store, keep=0.95)
    assert rep.deterministic and rep.passed and rep.score > 0.8, rep
    assert 0.8 < rep.median_curvature_ratio < 1.25
    # Scores that point the wrong way must fail the check.
    scores, attrs = store.read_scores("loss")
    store.write_scores("loss", -scores, attrs["targets"], "loss")
    try:
        bad = check_smoothness(recipe, store, keep=0.95)
        assert not bad.passed and bad.score < 0.2
    finally:
        store.write_scores("loss", scores, attrs["targets"], "loss")


def test_window_retrainings_start_from_the_stored_run(tmp_path):
    """With an attribution window, retrainings begin at the stored state at replay.start_step
    (checkpoint 10, stepped to 12) and land bit for bit where training from scratch would."""
    import torch

    from fastreplay.core.train import run_steps, train, window_start
    from fastreplay.workflows.lds import retrain_subset
    cfg = load_config("test", overrides=OVERRIDES + ["replay.start_step=12"])
    run_magic(cfg, [0, 1, 2, 3], tmp_path, plots=False)
    recipe, store = open_or_train(cfg, tmp_path)
    start = window_start(recipe, store)
    scratch = run_steps(recipe, recipe.init_state(), recipe.ones(), 12)
    assert start.step == 12
    for a, b in ((start.theta, scratch.theta), (start.opt_state, scratch.opt_state),
                 (start.buffers, scratch.buffers)):
        assert torch.equal(a, b)
    mask = subset_masks(recipe.num_train, 1, 0.9, 3)[0]
    theta, buffers = retrain_subset(recipe, mask, "weight", start)
    full = train(recipe, torch.from_numpy(mask.astype(np.float64)))  # weights act from step 12
    assert torch.equal(theta, full.theta) and torch.equal(buffers, full.buffers)
    res, _, _ = run_lds(recipe, store, models=8, keep=0.95, targets=None, models_per_batch=4)
    assert res.lds_mean >= 0.95, res


def test_channels_last_runs_train_one_model_at_a_time():
    """vmap cannot batch channels_last models: train_many falls back to one at a time, bitwise
    equal to single-model training."""
    import torch

    from fastreplay.core.multitrain import choose_models_per_batch, train_many
    from fastreplay.core.recipe import Recipe
    from fastreplay.core.train import train
    recipe = Recipe(load_config("test", overrides=OVERRIDES + ["train.channels_last=true",
                                                               "train.epochs=1"]))
    w = torch.from_numpy(np.stack([np.ones(200), subset_masks(200, 1, 0.9, 0)[0]]).astype(np.float64))
    many = train_many(recipe, w)
    for j in range(2):
        assert torch.equal(many.theta[j], train(recipe, w[j]).theta)
    assert choose_models_per_batch(recipe, 10) == 1


def test_window_epochs_resolve_to_the_last_steps():
    """The recipe's config (what a store saves) holds the resolved start step; the config
    passed in is immutable and stays as it was."""
    import dataclasses

    from fastreplay.core.recipe import Recipe
    cfg = load_config("test", overrides=OVERRIDES + ["replay.window_epochs=0.5"])
    recipe = Recipe(cfg)  # 2 epochs of 10 steps: the last half epoch is steps 15..19
    assert recipe.cfg.replay.start_step == 15 and recipe.cfg.replay.window_epochs == 0
    assert recipe.plan.start_step == 15 and recipe.plan.weighted(15) and not recipe.plan.weighted(14)
    assert cfg.replay.start_step == 0 and cfg.replay.window_epochs == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.replay.start_step = 3
    with pytest.raises(ConfigError, match="both set"):
        load_config("test", overrides=OVERRIDES + ["replay.window_epochs=1",
                                                   "replay.start_step=3"])
    with pytest.raises(ConfigError, match="exceeds"):
        Recipe(load_config("test", overrides=OVERRIDES + ["replay.window_epochs=3"]))
    assert recipe.num_steps == 20
