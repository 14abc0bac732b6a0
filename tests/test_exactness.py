"""Exactness: MAGIC scores equal central finite differences of real retrainings, in float64.

Tolerance 1e-6 relative (norm over the 5 examples x 2 targets). Why it is attainable: with
eps = 1e-4 the central difference has truncation error ~eps^2 * |phi'''| ~ 1e-8 relative for these
smooth (GELU, average pooling) runs, and float64 rounding contributes ~1e-16 * |phi| / eps
~ 1e-12; the replay itself is exact up to rounding (it matches the unrolled autograd oracle to
~1e-15). A wrong adjoint term (momentum, Nesterov, decay, group lr, BatchNorm statistics) moves
scores by 1e-3..1e-1 relative, far outside the tolerance.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import SMALL, set_args

from fastreplay.config import load_config
from fastreplay.core import kernels
from fastreplay.core.recipe import Recipe
from fastreplay.core.replay import replay
from fastreplay.interface.api import counterfactual, open_or_train

EPS = 1e-4
TOL = 1e-6
TARGETS = [1, 4]
NUM_EXAMPLES = 5  # training examples whose weight is perturbed

CASES = {
    "tiny-cnn-nesterov-loss": ["model.name=tiny-cnn", "train.nesterov=true", "measure.kind=loss"],
    "tiny-cnn-plain-margin": ["model.name=tiny-cnn", "train.nesterov=false", "measure.kind=margin"],
    "mlp-nesterov-margin": ["model.name=mlp", "train.nesterov=true", "measure.kind=margin"],
    "mlp-plain-loss": ["model.name=mlp", "train.nesterov=false", "measure.kind=loss"],
    "tiny-cnn-window-loss": ["model.name=tiny-cnn", "train.nesterov=true", "measure.kind=loss",
                             "replay.start_step=4"],
}


def central_differences(measure, num_train: int, eps: float = EPS):
    """(examples, fd): NUM_EXAMPLES random training examples and, for each target and example,
    (phi(w + eps e_i) - phi(w - eps e_i)) / 2 eps at w = 1, where ``measure(w)`` retrains with
    weights w and returns the targets' measurements."""
    examples = np.random.default_rng(0).choice(num_train, size=NUM_EXAMPLES, replace=False)
    fd = np.zeros((len(TARGETS), NUM_EXAMPLES))
    for j, i in enumerate(examples):
        values = []
        for sign in (+1, -1):
            w = np.ones(num_train)
            w[i] += sign * eps
            values.append(np.asarray(measure(w)))
        fd[:, j] = (values[0] - values[1]) / (2 * eps)
    return examples, fd


def assert_matches_finite_differences(scores, examples, fd):
    got = scores[:, examples]
    rel = np.linalg.norm(got - fd) / np.linalg.norm(fd)
    assert np.linalg.norm(fd) > 1e-4, "finite differences too small to test anything"
    assert rel <= TOL, f"relative error {rel:.2e}\nscores {got}\nfd {fd}"


@pytest.mark.parametrize("case", list(CASES))
def test_scores_match_finite_differences(case, cli, tmp_path):
    """Through the CLI: `magic` scores, `train --weights --measure` retrainings."""
    overrides = SMALL + CASES[case]
    scores_file = tmp_path / "scores.npy"
    cli("magic", "--preset", "test", *set_args(overrides), "--targets", "1,4",
        "--run-dir", tmp_path / "run", "--scores-out", scores_file, "--no-plots")
    scores = np.load(scores_file)
    assert scores.shape == (2, 48)

    def retrain(w):
        np.save(tmp_path / "w.npy", w)
        out = cli.json("train", "--preset", "test", *set_args(overrides),
                       "--weights", tmp_path / "w.npy", "--measure", "1,4")
        assert out["measure"]["index"] == TARGETS
        return out["measure"]["value"]

    assert_matches_finite_differences(scores, *central_differences(retrain, 48))


# --- Every way of replaying a run against that run's finite differences -------------------
#
# The finite differences depend on the trained run only, not on how it is replayed, so they
# are computed once per model configuration (10 retrainings through the Python API, what
# `fastreplay train --weights` runs) and every (adjoint backend x hvp mode x schedule) replay
# of the run is held against them. The checkpoint interval is not part of the trajectory:
# each schedule's store holds the bitwise same run, checkpointed as that schedule needs.

MATRIX_RUNS = {
    "tiny-cnn": SMALL + CASES["tiny-cnn-nesterov-loss"],
    # Residual blocks, three poolings and label smoothing, plain momentum, margin: the
    # resnet9 code path at a size finite differences can afford (width 0.125: 8..64 channels).
    "resnet9-smoothed": SMALL + ["model.name=resnet9", "model.width=0.125",
                                 "train.label_smoothing=0.1", "train.nesterov=false",
                                 "measure.kind=margin"],
}
SCHEDULES = {
    "every": ["replay.schedule=every", "replay.checkpoint_every=1"],
    "interval": ["replay.schedule=interval", "replay.checkpoint_every=5"],
    "tree": ["replay.schedule=tree", "replay.checkpoint_every=7", "replay.tree_arity=2"],
}
BACKENDS = ["fused", "reference"]
HVP_MODES = ["reverse", "forward", "forward-vmap"]


@contextmanager
def one_thread():
    """These models are tiny: one intra-op thread runs them faster than two on a shared 2-core
    machine (no OpenMP spin-waiting). The stored runs and their replays both run under it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ScoredRun:
    overrides: list
    examples: np.ndarray
    fd: np.ndarray  # (targets, examples)
    stores: dict  # schedule -> run store of the run


@pytest.fixture(scope="module", params=list(MATRIX_RUNS))
def scored_run(request, tmp_path_factory):
    overrides = MATRIX_RUNS[request.param]
    cfg = load_config("test", overrides=overrides)
    recipe = Recipe(cfg)
    stores = {}
    with one_thread():
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train)
        for schedule, extra in SCHEDULES.items():
            run_dir = tmp_path_factory.mktemp(f"{request.param}-{schedule}")
            _, stores[schedule] = open_or_train(load_config("test", overrides=overrides + extra),
                                                run_dir)
    yield ScoredRun(overrides, examples, fd, stores)
    for store in stores.values():
        store.close()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("hvp", HVP_MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_replay_matches_the_finite_differences(scored_run, backend, hvp, schedule):
    if backend == "fused" and not kernels.extension_loaded():
        pytest.skip(f"compiled extension not loaded: {kernels.extension_error()}")
    cfg = load_config("test", overrides=scored_run.overrides + SCHEDULES[schedule]
                      + [f"replay.backend={backend}", f"replay.hvp={hvp}"])
    with one_thread():
        scores = replay(Recipe(cfg), scored_run.stores[schedule], TARGETS,
                        cfg.measure.kind).scores
    assert_matches_finite_differences(scores, scored_run.examples, scored_run.fd)
