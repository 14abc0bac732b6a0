"""The smoothness screen without scores: MGD's metasmoothness S after training alone, the
`train --run-dir` run it screens, and the options that go with them."""
from __future__ import annotations

import pytest
import torch
from conftest import run_module, set_args

from fastreplay.interface.api import open_trained
from fastreplay.workflows.smoothness import check_smoothness, metasmoothness

# float64 tiny CNN on synthetic data, 10 epochs of 8 steps; only train.lr (and the activation)
# changes between the smooth and the chaotic run.
RUN = ["--preset", "test", *set_args(["train.epochs=10", "model.activation=relu"])]


def test_metasmoothness_is_the_weighted_sign_agreement_of_two_steps():
    a = torch.zeros(4, dtype=torch.float64)
    on = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    assert metasmoothness(a, on, 2 * on) == pytest.approx(1.0)  # straight on: smooth
    assert metasmoothness(a, on, on * 0.5) == pytest.approx(-1.0)  # every step turns back
    # Weighted by |theta_2h - theta_0|: the one coordinate that turns back carries 3 of 5.
    assert metasmoothness(a, torch.tensor([1.0, 1.0, 1.0, 1.0]).double(),
                          torch.tensor([2.0, 2.0, 0.5, 0.0]).double()) == pytest.approx(
        (2 + 2 - 0.5) / 4.5)
    assert metasmoothness(a, a, a) != metasmoothness(a, a, a)  # no response at all: NaN


@pytest.mark.parametrize("lr, low, high", [(0.1, 0.6, 1.0), (3.0, -1.0, 0.25)])
def test_metasmoothness_separates_a_smooth_from_a_chaotic_run(cli, tmp_path, lr, low, high):
    """S needs no scores: `train --run-dir` then `smoothness`. On this run LDS (keep 0.9, 30
    models, 8 targets) measured 0.86 at lr 0.1 and -0.03 at lr 3 (benchmarks/RESULTS.md)."""
    out = cli.json("train", *RUN, "--set", f"train.lr={lr}", "--run-dir", tmp_path)
    assert out["steps"] == 80 and out["store"].endswith("run.zarr")
    rep = cli.json("smoothness", "--run-dir", tmp_path, "--keep", "0.9", "--targets", "0:4")
    assert rep["deterministic"] and not rep["scored"]
    assert rep["score"] is None and rep["passed"] is None and rep["predicted"] is None
    assert rep["targets"] == [0, 1, 2, 3]
    assert low < rep["metasmoothness"] < high, rep


def test_magic_reuses_the_run_that_train_stored(cli, tmp_path):
    trained = cli.json("train", *RUN, "--run-dir", tmp_path)
    res = cli.json("magic", *RUN, "--run-dir", tmp_path, "--targets", "0:2", "--no-plots")
    assert res["train_seconds"] == trained["train_seconds"]  # not trained again
    recipe, store = open_trained(tmp_path)
    try:
        rep = check_smoothness(recipe, store, keep=0.9)  # scored now: the scored targets
        assert rep.scored and rep.targets == [0, 1] and rep.score is not None
        assert rep.metasmoothness > 0.5
    finally:
        store.close()


@pytest.mark.parametrize("args, message", [
    (["train", "--run-dir", "{d}", "--weights", "{d}/w.npy"], "--weights belongs to a counterfactual"),
    (["train", "--run-dir", "{d}", "--measure", "0"], "--measure belongs to a counterfactual"),
    (["train", "--store", "{d}/elsewhere.zarr"], "--store and --force apply to a stored run"),
    (["train", "--force"], "--store and --force apply to a stored run"),
])
def test_train_options_that_do_not_fit_together_are_one_line_errors(tmp_path, args, message):
    proc = run_module(*[a.format(d=tmp_path) for a in args], *RUN, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_smoothness_targets_must_be_scored_when_scores_are_stored(cli, tmp_path):
    cli("magic", *RUN, "--run-dir", tmp_path, "--targets", "0:2", "--no-plots")
    proc = run_module("smoothness", "--run-dir", tmp_path, "--targets", "5", check=False)
    assert proc.returncode == 2 and "targets [5] have no scores yet" in proc.stderr


def test_one_model_at_a_time_reuses_the_determinism_run_as_the_baseline(cli, tmp_path, monkeypatch):
    """Where models cannot be batched (channels_last on the GPU) the screen trains two probes,
    not three: its baseline is the determinism retraining. Same S and measured changes as the
    batched screen, to rounding."""
    import fastreplay.workflows.smoothness as smoothness

    cli.json("train", *RUN, "--set", "train.lr=0.1", "--run-dir", tmp_path)
    recipe, store = open_trained(tmp_path)
    try:
        batched = check_smoothness(recipe, store, keep=0.9, targets=[0, 1, 2])
        trained = []
        real = smoothness.train_many
        monkeypatch.setattr(smoothness, "can_batch_models", lambda r: False)
        monkeypatch.setattr(smoothness, "train_many",
                            lambda r, w, **kw: trained.append(len(w)) or real(r, w, **kw))
        alone = check_smoothness(recipe, store, keep=0.9, targets=[0, 1, 2])
    finally:
        store.close()
    assert trained == [2]
    assert alone.metasmoothness == pytest.approx(batched.metasmoothness, abs=1e-9)
    assert alone.actual_full == pytest.approx(batched.actual_full, abs=1e-12)
    assert alone.actual_half == pytest.approx(batched.actual_half, abs=1e-12)
