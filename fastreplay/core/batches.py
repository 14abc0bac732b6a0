"""The batch order of a run and its attribution window.

Every run of a recipe (training, replay, each retraining) visits the same examples in the same
slots at every step; data weights act only from the window's first step on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ReplayConfig
from ..data import batch_schedule
from ..exceptions import ConfigError


def first_attributed_step(replay: ReplayConfig, num_steps: int, epochs: int) -> int:
    """The first attributed step: replay.start_step, or the first step of the last
    replay.window_epochs epochs when that is set."""
    if replay.window_epochs > 0:
        per_epoch = num_steps // epochs
        window = max(1, round(replay.window_epochs * per_epoch))
        if window > num_steps:
            raise ConfigError(f"replay.window_epochs={replay.window_epochs:g} exceeds the "
                              f"{epochs} training epochs; use at most that")
        return num_steps - window
    if replay.start_step >= num_steps:
        raise ConfigError(f"replay.start_step={replay.start_step} is not below the "
                          f"{num_steps} training steps")
    return replay.start_step


@dataclass(frozen=True)
class BatchPlan:
    indices_np: np.ndarray
    """(T, B) training-example ids of each step's batch slots."""
    indices: torch.Tensor
    """The same on the run's device."""
    start_step: int
    """Data weights act from this step on; before it every run is the same."""

    @classmethod
    def make(cls, num_train: int, batch_size: int, epochs: int, seed: int,
             replay: ReplayConfig, device: torch.device) -> "BatchPlan":
        if batch_size > num_train:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {num_train} training "
                              "examples")
        order = batch_schedule(num_train, batch_size, epochs, seed)
        return cls(order, torch.from_numpy(order).to(device),
                   first_attributed_step(replay, order.shape[0], epochs))

    @property
    def num_steps(self) -> int:
        return self.indices_np.shape[0]

    @property
    def batch_size(self) -> int:
        return self.indices_np.shape[1]

    def weighted(self, step: int) -> bool:
        """Whether data weights act at ``step`` (it lies in the attribution window)."""
        return step >= self.start_step
