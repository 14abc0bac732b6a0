"""Crash and resume with BatchNorm: the running statistics are part of the resumed state.

test_robustness.py kills `magic` on an MLP, whose state is parameters and momentum only. Here
the model is the test preset's tiny-cnn (two BatchNorm layers), so every checkpoint also holds
a `buffers` row (running means and variances) that a resumed training run must restart from and
a replay must rebuild from. Five named crash points, in training and in the replay, then a rerun
to completion: every checkpoint row (params, momentum, buffers, step), the final state and the
scores must be bitwise those of an uninterrupted run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_robustness import (
    assert_clean,
    assert_same,
    fastreplay,
    kill_at_each_then_finish,
    ok,
    snapshot,
)

from fastreplay.config import load_config
from fastreplay.core.models import FlatModel

# Float64 synthetic 8x8 images, tiny-cnn with BatchNorm (the test preset's model), 24 steps,
# a checkpoint every 5 steps (5 slots; the last segment is shorter), 3 targets one at a time.
SETTINGS = ["data.name=synthetic", "data.num_train=96", "train.epochs=3", "train.batch_size=12",
            "replay.checkpoint_every=5", "replay.target_batch=1", "model.name=tiny-cnn"]
CONFIG = ["--preset", "test"] + [a for s in SETTINGS for a in ("--set", s)]
MAGIC = ["magic", *CONFIG, "--targets", "0:3", "--no-plots", "--log-level", "WARNING"]

# One run directory killed again and again; each rerun resumes from what the previous ones stored
# (which checkpoints a kill finds committed depends on the background writer's progress).
CRASHES = [
    "train_step:7",          # mid-training, past the checkpoint at step 5
    "checkpoint_partial:2",  # the 2nd checkpoint this process writes: params/momentum, no buffers
    "train_step:9",          # resumed from a later checkpoint (its running statistics), killed again
    "final_partial:1",       # final params written, final running statistics not
    "rebuild_step:7",        # mid-replay, rebuilding segment states for target 0
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn_baseline")
    ok(fastreplay(*MAGIC, "--run-dir", root / "run", "--scores-out", root / "scores.npy"))
    return {"snapshot": snapshot(root / "run"), "scores_npy": np.load(root / "scores.npy")}


def test_the_run_has_running_statistics_worth_resuming(uninterrupted):
    """Guard: the checkpoints carry BatchNorm statistics, and they change along the run."""
    snap = uninterrupted["snapshot"]
    num_buffers = FlatModel(load_config("test", overrides=SETTINGS), torch.device("cpu"),
                            torch.float64).num_buffers
    steps = [c[0] for c in snap["checkpoints"]]
    assert steps == [0, 5, 10, 15, 20] and num_buffers > 0
    buffers = [c[3] for c in snap["checkpoints"]]
    assert all(b.shape == (num_buffers,) for b in buffers)
    assert all(not np.array_equal(a, b) for a, b in zip(buffers, buffers[1:]))
    assert snap["final"][1].shape == (num_buffers,)
    assert not np.array_equal(snap["final"][1], buffers[-1])


def test_magic_with_batchnorm_survives_sigkill(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    kill_at_each_then_finish(MAGIC, run_dir, CRASHES, "--scores-out", tmp_path / "scores.npy")
    got, want = snapshot(run_dir), uninterrupted["snapshot"]
    assert_same(got, want)  # every checkpoint row incl. buffers, final state, schedule, scores
    for (step, *_, b_got), (_, *_, b_want) in zip(got["checkpoints"], want["checkpoints"], strict=True):
        assert np.array_equal(b_got, b_want), f"running statistics of the checkpoint at step {step}"
    assert np.array_equal(got["final"][1], want["final"][1]), "final running statistics"
    assert np.array_equal(np.load(tmp_path / "scores.npy"), uninterrupted["scores_npy"])
    assert_clean(run_dir)
