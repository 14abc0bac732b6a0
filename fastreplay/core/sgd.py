"""SGD with (Nesterov) momentum over the flat parameter vector, with its per-step, per-group
learning rates and weight decays, and its exact adjoint: one of the run's optimizers
(core/optimizers.py states what they share)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import TrainConfig
from .kernels import sgd_adjoint_, sgd_step_
from .lr import group_schedule
from .optimizers import Optimizer, StepValues


@dataclass(frozen=True)
class SGD(Optimizer):
    """g = grad + wd theta; m = mu m + g; theta -= lr (g + mu m) (Nesterov) or lr m, per group
    (docs/design.md §2); the adjoint in docs/design.md §3 and core/optim.py."""
    momentum: float
    nesterov: bool

    @classmethod
    def from_config(cls, t: TrainConfig, num_steps: int, group_ends, step_backend: str,
                    adjoint_backend: str) -> "SGD":
        return cls(*group_schedule(t, num_steps, group_ends), step_backend, adjoint_backend,
                   t.momentum, t.nesterov)

    def state_size(self, num_params: int) -> int:
        return num_params

    def init(self, theta: torch.Tensor) -> torch.Tensor:
        """The optimizer state of a fresh run: a zero momentum buffer."""
        return torch.zeros_like(theta)

    def step_(self, theta: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor,
              step: int) -> None:
        """Step ``step`` in place on theta and momentum ((P,) or (M, P) for M models)."""
        sgd_step_(theta, momentum, grad, self.group_ends, self.lrs[step], self.wds,
                  self.momentum, self.nesterov, self.step_backend)

    def adjoint_(self, theta_bar: torch.Tensor, m_bar: torch.Tensor, g_bar: torch.Tensor,
                 hvp, step: int, values: Optional[StepValues] = None,
                 backend: str | None = None) -> None:
        """Step ``step``'s adjoint in place (core/optim.py states the conventions); SGD's
        is linear and needs none of the step's forward ``values``."""
        sgd_adjoint_(theta_bar, m_bar, g_bar, hvp, self.group_ends, self.lrs[step], self.wds,
                     self.momentum, self.nesterov, backend or self.adjoint_backend)
