"""Group measurements (measure.reduce=mean) and `fastreplay debug`: the group's scores are
exact, the harm ranking finds planted label noise, and retraining without the most harmful
examples moves the group's loss as the scores predict."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import SMALL, set_args
from test_exactness import assert_matches_finite_differences, central_differences, one_thread

from fastreplay.config import load_config
from fastreplay.core.measure import resolve_group
from fastreplay.core.replay import replay
from fastreplay.data import flip_labels, flipped_examples
from fastreplay.exceptions import ConfigError
from fastreplay.core.train import load_final
from fastreplay.interface.api import counterfactual, open_or_train, open_trained
from fastreplay.workflows.baselines import baseline_harms
from fastreplay.workflows.debug import score_group

GROUP = [1, 2, 4, 6]


def test_group_scores_are_the_exact_derivative_of_the_mean(tmp_path):
    """One replay of the mean measurement equals the mean of the members' own score rows (to
    rounding) and central differences of the mean of real retrainings (1e-6 relative)."""
    cfg = load_config("test", overrides=SMALL + ["model.name=tiny-cnn", "measure.reduce=mean"])
    recipe, store = open_or_train(cfg, tmp_path)
    with one_thread():
        row, _ = score_group(recipe, store, "some", GROUP, "loss")
        each = replay(recipe, store, GROUP, "loss").scores
        np.testing.assert_allclose(row, each.mean(0), rtol=0, atol=1e-12 * np.abs(row).max())
        examples, fd = central_differences(
            lambda w: np.repeat(counterfactual(cfg, w, GROUP, recipe=recipe).mean(), 2),
            recipe.num_train)
    assert_matches_finite_differences(np.stack([row, row]), examples, fd)
    # stored once, under the group's name, and read back rather than replayed again
    again, seconds = score_group(recipe, store, "some", GROUP, "loss")
    assert seconds == 0.0 and np.array_equal(again, row)
    assert "loss_mean_some" in store.score_names()


def test_magic_with_reduce_mean_stores_one_row(cli, tmp_path):
    out = cli.json("magic", "--preset", "test", *set_args(SMALL + ["measure.reduce=mean"]),
                   "--targets", "0:8", "--run-dir", tmp_path, "--scores-out", tmp_path / "s.npy")
    assert np.load(tmp_path / "s.npy").shape == (1, 48) and out["plots"] == []


def test_labels_flip_reproducibly():
    labels = np.arange(1000) % 10
    flipped = flip_labels(labels, 0.1, 10, seed=5)
    ids = flipped_examples(1000, 0.1, 5)
    assert len(ids) == 100 and np.array_equal(np.flatnonzero(flipped != labels), ids)
    assert np.array_equal(flipped, flip_labels(labels, 0.1, 10, seed=5))
    assert not np.array_equal(flipped, flip_labels(labels, 0.1, 10, seed=6))


NOISY = ["data.num_train=256", "data.num_test=128", "data.label_noise=0.1", "model.name=tiny-cnn",
         "train.epochs=8"]
"""The synthetic float64 run with 26 of its 256 training labels flipped (67% test accuracy)."""


def test_debug_finds_flipped_labels_and_retraining_confirms_the_ranking(cli, tmp_path):
    cli("train", "--preset", "test", *set_args(NOISY), "--run-dir", tmp_path)
    out = cli.json("debug", "--run-dir", tmp_path, "--retrain-without", "13", "--top", "8")
    assert out["group"] == "all" and out["members"] == 128 and len(out["most_harmful"]) == 8
    # Measured: AUROC 0.85 (random ranking: 0.5 +- 0.06 with 26 flipped of 256).
    assert out["detection"]["flipped"] == 26 and out["detection"]["scores"]["auroc"] > 0.75
    det = out["detection"]
    assert {"training_loss", "gradient_norm", "gradient_similarity"} <= set(det)
    assert det["best_baseline"] == max(("training_loss", "gradient_norm", "gradient_similarity"),
                                       key=lambda n: det[n]["auroc"])
    top, by_baseline, random = out["retrained"]
    assert top["removed"] == "top 13 harmful" and random["removed"].startswith("13 random")
    assert by_baseline["removed"] == f"top 13 by {det['best_baseline']}"
    # Measured: -0.064 for a predicted -0.074; the random 13 +0.034 for a predicted +0.026.
    change = top["value"] - out["value"]
    assert change < 0 and abs(change - top["predicted_change"]) < 0.5 * abs(top["predicted_change"])
    assert change < random["value"] - out["value"]
    with open(tmp_path / "debug" / "harm_all.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 256 and [int(r["index"]) for r in rows[:8]] == out["most_harmful"]
    harms = [float(r["harm"]) for r in rows]
    assert harms == sorted(harms, reverse=True)
    # the baseline arm removed the best baseline's own top 13: its predicted change is theirs
    recipe, store = open_trained(tmp_path)
    final = load_final(recipe, store)
    rankings = baseline_harms(recipe, final.theta, final.buffers, list(range(128)), "loss")
    store.close()
    top_by_baseline = np.argsort(-rankings[det["best_baseline"]], kind="stable")[:13]
    score_of = {int(r["index"]): float(r["score"]) for r in rows}
    assert by_baseline["predicted_change"] == pytest.approx(
        -sum(score_of[int(i)] for i in top_by_baseline), rel=1e-9)
    assert (tmp_path / "debug" / "harm_all.png").stat().st_size > 0
    assert json.loads((tmp_path / "debug" / "harm_all.json").read_text())["group"] == "all"


def test_groups_by_class_file_and_spec(tmp_path):
    cfg = load_config("test", overrides=SMALL)
    from fastreplay.core.recipe import Recipe
    recipe = Recipe(cfg)
    labels = recipe.data.test_y.cpu().numpy()
    c = int(labels[0])
    name, members = resolve_group(f"class:{c}", recipe)
    assert name == f"class{c}" and members == [int(i) for i in np.flatnonzero(labels == c)]
    assert resolve_group(f"class:class{c}", recipe) == (name, members)  # by class name too
    (tmp_path / "ids.txt").write_text("5\n1, 3\n")
    assert resolve_group(str(tmp_path / "ids.txt"), recipe)[1] == [1, 3, 5]
    assert resolve_group("1,3,5", recipe) == resolve_group(str(tmp_path / "ids.txt"), recipe)
    with pytest.raises(ConfigError, match="no class 'cat'"):
        resolve_group("class:cat", recipe)


def test_a_group_short_of_the_test_set_is_judged_on_the_rest_too(tmp_path):
    """The ranking is chosen on the group, so its own loss is in-sample: debug also judges every
    model on the test examples outside the group (held out), as the ratio a user can trust."""
    from fastreplay.core.measure import accuracy, measure
    from fastreplay.workflows.debug import run_debug
    cfg = load_config("test", overrides=NOISY)
    recipe, store = open_or_train(cfg, tmp_path)
    res = run_debug(recipe, store, group="0:64", remove=13)
    final = load_final(recipe, store)
    rest = list(range(64, 128))
    assert res.members == 64 and res.held_out_members == 64
    assert res.held_out_value == pytest.approx(
        float(measure(recipe, final.theta, final.buffers, rest, "loss").mean()), rel=1e-12)
    assert res.held_out_accuracy == accuracy(recipe, final.theta, final.buffers, examples=rest)
    assert 0.5 * (res.held_out_accuracy + accuracy(recipe, final.theta, final.buffers,
                                                   examples=range(64))) == res.accuracy
    for r in res.retrained:
        assert r.held_out_value is not None and 0 <= r.held_out_accuracy <= 1
    whole = run_debug(recipe, store, group="all")
    assert whole.held_out_members == 0 and whole.held_out_value is None
