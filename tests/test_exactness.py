"""Exactness: MAGIC scores equal central finite differences of real retrainings, in float64.

Tolerance 1e-6 relative (norm over the 5 examples x 2 targets). Why it is attainable: with
eps = 1e-4 the central difference has truncation error ~eps^2 * |phi'''| ~ 1e-8 relative for these
smooth (GELU, average pooling) runs, and float64 rounding contributes ~1e-16 * |phi| / eps
~ 1e-12; the replay itself is exact up to rounding (it matches the unrolled autograd oracle to
~1e-15). A wrong adjoint term (momentum, Nesterov, decay, group lr, BatchNorm statistics) moves
scores by 1e-3..1e-1 relative, far outside the tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SMALL, set_args

EPS = 1e-4
TOL = 1e-6

CASES = {
    "tiny-cnn-nesterov-loss": ["model.name=tiny-cnn", "train.nesterov=true", "measure.kind=loss"],
    "tiny-cnn-plain-margin": ["model.name=tiny-cnn", "train.nesterov=false", "measure.kind=margin"],
    "mlp-nesterov-margin": ["model.name=mlp", "train.nesterov=true", "measure.kind=margin"],
    "mlp-plain-loss": ["model.name=mlp", "train.nesterov=false", "measure.kind=loss"],
    "tiny-cnn-window-loss": ["model.name=tiny-cnn", "train.nesterov=true", "measure.kind=loss",
                             "replay.start_step=4"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_scores_match_finite_differences(case, cli, tmp_path):
    overrides = SMALL + CASES[case]
    targets = [1, 4]
    scores_file = tmp_path / "scores.npy"
    cli("magic", "--preset", "test", *set_args(overrides), "--targets", "1,4",
        "--run-dir", tmp_path / "run", "--scores-out", scores_file, "--no-plots")
    scores = np.load(scores_file)
    assert scores.shape == (2, 48)
    examples = np.random.default_rng(0).choice(48, size=5, replace=False)
    fd = np.zeros((2, 5))
    for j, i in enumerate(examples):
        vals = []
        for sign in (+1, -1):
            w = np.ones(48)
            w[i] += sign * EPS
            np.save(tmp_path / "w.npy", w)
            out = cli.json("train", "--preset", "test", *set_args(overrides),
                           "--weights", tmp_path / "w.npy", "--measure", "1,4")
            assert out["measure"]["index"] == targets
            vals.append(np.array(out["measure"]["value"]))
        fd[:, j] = (vals[0] - vals[1]) / (2 * EPS)
    got = scores[:, examples]
    rel = np.linalg.norm(got - fd) / np.linalg.norm(fd)
    assert np.linalg.norm(fd) > 1e-4, "finite differences too small to test anything"
    assert rel <= TOL, f"relative error {rel:.2e}\nscores {got}\nfd {fd}"
