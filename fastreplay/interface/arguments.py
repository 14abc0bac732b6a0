"""Checks of the arguments of `lds`, `smoothness` and `train --weights` (config values are
config.validate's concern). One place, so the CLI and the Python API refuse the same values with
the same one-line ConfigError, before anything is allocated or trained."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..config import SEED_MAX
from ..exceptions import ConfigError

MAX_LDS_MODELS = 100_000
"""At most this many LDS subset models: each is one full retraining (100 is the usual M) and its
subset mask takes one byte per training example in memory (5 GB at 50,000 examples)."""

REMOVALS = ("weight", "drop")

DEFAULT_MIN_S = 0.6
"""The S `fastreplay window` asks of a window by default (--min-s). Evidence (README "How far
back the scores hold"): on the GPU, the CIFAR-10 full preset (ResNet-9, 90% accuracy) had S 0.64
with LDS 0.94 over its last epoch and S <= 0.43 with LDS <= 0.83 over longer windows. Other runs
differ: on the CPU S 0.53 went with LDS 0.93 (a tiny CNN at lr 3), S 0.95 with LDS 0.81 (a tiny
CIFAR-10 CNN) and S 0.99 with LDS 0.78 (the stdlib language model), so it is a starting point."""

_NOT_REAL = {"c": "complex numbers", "U": "strings", "S": "bytes", "O": "Python objects",
             "V": "structured records", "M": "dates", "m": "time spans"}
"""What NumPy dtype kinds that are not real numbers hold, for the weights error."""


def check_seed(option: str, seed: int) -> None:
    """Seeds lie in 0..SEED_MAX (NumPy's generators refuse negative ones)."""
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{option} {seed} is out of range; use a seed in 0..{SEED_MAX}")


def check_keep(keep: float, num_train: Optional[int] = None) -> None:
    """``keep`` is a fraction in (0, 1); given the training set size, a subset of that fraction
    must keep at least one example and remove at least one (else every subset is the same)."""
    if not (math.isfinite(keep) and 0 < keep < 1):
        raise ConfigError(f"--keep {keep}: use a fraction in (0, 1), e.g. 0.99")
    if num_train is not None and not 1 <= round(keep * num_train) <= num_train - 1:
        raise ConfigError(f"--keep {keep:g} of {num_train} training examples keeps "
                          f"{round(keep * num_train)}, so every subset is the same; use a "
                          f"fraction between {1.5 / num_train:.3g} and {1 - 1.5 / num_train:.3g}")


def check_lds_arguments(models: int, keep: float, removal: str, mask_seed: int,
                        models_per_batch: int = 0, num_train: Optional[int] = None) -> None:
    """The options of `fastreplay lds` (``num_train``: also check ``keep`` against it)."""
    if not 3 <= models <= MAX_LDS_MODELS:
        raise ConfigError(f"--models {models} is out of range; use 3..{MAX_LDS_MODELS} (a rank "
                          "correlation needs 3; each model is a full retraining, 100 is usual)")
    check_keep(keep, num_train)
    if removal not in REMOVALS:
        raise ConfigError(f"--removal {removal!r}: use weight or drop")
    check_seed("--mask-seed", mask_seed)
    if not 0 <= models_per_batch <= MAX_LDS_MODELS:
        raise ConfigError(f"--models-per-batch {models_per_batch} is out of range; use "
                          f"0..{MAX_LDS_MODELS} (0 = measure and pick)")


def check_debug_arguments(top: int, retrain_without: int, seed: int) -> None:
    """The options of `fastreplay debug` (--retrain-without against the training set size is
    checked once the run is open)."""
    if top < 1 or retrain_without < 0:
        raise ConfigError("--top must be >= 1 and --retrain-without >= 0; e.g. --top 16 "
                          "--retrain-without 100")
    check_seed("--seed", seed)


def check_compare_arguments(keep: float, removal: str) -> None:
    """The options of `fastreplay compare` that name the stored LDS experiment."""
    check_keep(keep)
    if removal not in REMOVALS:
        raise ConfigError(f"--removal {removal!r}: use weight or drop")


def check_smoothness_arguments(keep: float, seed: int) -> None:
    """The options of `fastreplay smoothness`."""
    check_keep(keep)
    check_seed("--seed", seed)


def check_window_arguments(keep: float, seed: int, min_s: float) -> None:
    """The options of `fastreplay window`."""
    check_smoothness_arguments(keep, seed)
    if not -1 <= min_s <= 1:
        raise ConfigError(f"--min-s {min_s:g} is outside [-1, 1], the range of the "
                          f"metasmoothness S; use e.g. --min-s {DEFAULT_MIN_S:g}")


def check_weights(weights, num_train: int) -> np.ndarray:
    """Per-example data weights as float64: one real, finite number per training example.

    Booleans and integers are fine (a 0/1 subset); strings, objects, dates and complex numbers
    are refused (NumPy would otherwise fail obscurely or silently drop the imaginary part).
    """
    weights = np.asarray(weights)
    if weights.dtype.kind not in "biuf":
        what = _NOT_REAL.get(weights.dtype.kind, "not numbers")
        raise ConfigError(f"weights have dtype {weights.dtype} ({what}); pass real numbers, e.g. "
                          "numpy.save(path, w.astype(numpy.float64))")
    if weights.ndim != 1 or len(weights) != num_train:
        raise ConfigError(f"weights have shape {weights.shape} but the run has {num_train} "
                          "training examples: pass one weight per training example")
    weights = weights.astype(np.float64)
    if not np.all(np.isfinite(weights)):
        raise ConfigError("weights contain NaN or inf: pass finite per-example weights")
    return weights
