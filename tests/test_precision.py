"""Precision and compilation options of the replay: train.bf16 and replay.compile.

Both change rounding only, so each is held against the unrolled-autograd oracle run with the
same option, at a tolerance set by the arithmetic it uses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from conftest import SMALL

from fastreplay.config import KEYS_ADDED_LATER, load_config
from fastreplay.core.reference import unrolled_scores
from fastreplay.core.replay import replay
from fastreplay.exceptions import ConfigError
from fastreplay.interface.api import open_or_train

TARGETS = [0, 2, 5]


def _scores(tmp_path, *extra):
    cfg = load_config("test", overrides=SMALL + ["model.name=tiny-cnn"] + list(extra))
    recipe, store = open_or_train(cfg, tmp_path)
    fast = replay(recipe, store, TARGETS, "loss").scores
    oracle = unrolled_scores(recipe, TARGETS, "loss").detach().cpu().numpy()
    assert np.abs(oracle).max() > 1e-3
    return fast, oracle


@pytest.mark.parametrize("hvp", ["forward", "forward-vmap"])
def test_compiled_step_equals_unrolled_oracle(hvp, tmp_path):
    """torch.compile fuses the tangent arithmetic: float64 rounding, ~1e-15 relative."""
    fast, oracle = _scores(tmp_path, f"replay.hvp={hvp}", "replay.compile=true")
    np.testing.assert_allclose(fast, oracle, rtol=0, atol=1e-12 * np.abs(oracle).max())


@pytest.mark.parametrize("hvp,rel", [
    # Double backward takes the oracle's route through the same bf16 network: float32
    # accumulation-order rounding only (measured 3e-8 of the largest score).
    ("reverse", 1e-5),
    # Forward mode carries its tangents in bf16 (unit roundoff 2^-8 = 3.9e-3), where the oracle
    # carries cotangents: a few bf16 roundings apart (measured 1.8e-3).
    ("forward", 2e-2),
])
def test_bf16_replay_matches_the_bf16_oracle(hvp, rel, tmp_path):
    fast, oracle = _scores(tmp_path / "bf16", "train.dtype=float32", "train.bf16=true",
                           f"replay.hvp={hvp}")
    scale = np.abs(oracle).max()
    np.testing.assert_allclose(fast, oracle, rtol=0, atol=rel * scale)
    # bf16 is really on: the float32 run's scores are further away than float32 rounding.
    fp32, _ = _scores(tmp_path / "fp32", "train.dtype=float32", "replay.hvp=reverse")
    assert np.abs(fp32 - oracle).max() > 1e-4 * scale


def test_precision_options_are_validated():
    with pytest.raises(ConfigError, match="train.dtype=float32"):
        load_config("test", overrides=["train.bf16=true"])  # the test preset is float64
    with pytest.raises(ConfigError, match="replay.hvp=forward"):
        load_config("test", overrides=["replay.compile=true", "replay.hvp=reverse"])


def test_bf16_is_in_the_fingerprint_and_older_runs_keep_theirs():
    fp32 = load_config("test", overrides=["train.dtype=float32"])
    bf16 = dataclasses.replace(fp32, train=dataclasses.replace(fp32.train, bf16=True))
    assert fp32.fingerprint() != bf16.fingerprint()
    # A run made before train.bf16 (and the keys added after it) hashed its config without them.
    d = fp32.to_dict()
    d.pop("measure"), d.pop("device")
    for section, key in KEYS_ADDED_LATER:
        d[section].pop(key)
    d["replay"] = {"checkpoint_every": fp32.replay.checkpoint_every}
    old = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert fp32.fingerprint() == old
