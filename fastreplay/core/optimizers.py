"""The run's optimizer, chosen by train.optimizer: what every optimizer provides, and the one
place that builds it from the config.

An optimizer is resolved once per recipe (learning rates and weight decays of every step and
parameter group included) and then called with a step number only, in the spirit of torchopt's
(init, update) pairs:

- ``state_size(P)``: the length of its flat state (SGD: momentum, P; Adam: moments, 2P), which
  the checkpoints store as is;
- ``init(theta)``: the state of a fresh run;
- ``step_(theta, state, grad, t)``: step t in place, for one run (P,) or M runs (M, P);
- ``adjoint_(theta_bar, state_bar, g_bar, hvp, t, values)``: the step's exact adjoint in place
  for K measurements (docs/design.md §3); ``values`` (StepValues) are the step's forward
  gradient, parameters and state, which the replay supplies when ``needs_step_values``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..config import TrainConfig


@dataclass(frozen=True)
class StepValues:
    """Forward values of one step that a nonlinear optimizer's adjoint needs."""
    grad: torch.Tensor
    """(P,) gradient of the batch loss at theta (data weights 1, no weight decay)."""
    theta: torch.Tensor
    state: torch.Tensor
    """The optimizer state before the step."""


@dataclass(frozen=True)
class Optimizer:
    """What every optimizer holds: the parameter groups, their per-step learning rates and
    weight decays, and the kernel backends of its step and adjoint. Subclasses add their own
    hyperparameters and the methods of the module docstring."""
    group_ends: tuple[int, ...]
    lrs: np.ndarray
    """(T, groups) learning rate of each step and parameter group."""
    wds: tuple[float, ...]
    step_backend: str
    adjoint_backend: str
    needs_step_values: ClassVar[bool] = False


def build_optimizer(t: TrainConfig, num_steps: int, group_ends, step_backend: str,
                    adjoint_backend: str):
    """The optimizer train.optimizer names, resolved for a run of ``num_steps`` steps, behind
    the gradient clip when train.clip_norm is set (core/clip.py)."""
    from .adam import Adam
    from .clip import Clipped
    from .sgd import SGD
    cls = SGD if t.optimizer == "sgd" else Adam
    opt = cls.from_config(t, num_steps, group_ends, step_backend, adjoint_backend)
    return Clipped(opt, t.clip_norm) if t.clip_norm > 0 else opt
