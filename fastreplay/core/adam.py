"""Adam and AdamW, train.optimizer = adam | adamw (core/optimizers.py states the interface; the
step, its adjoint and their derivation are in core/optim.py and docs/design.md §3).

The optimizer state is one flat tensor (..., 2P): the first moments m, then the second moments
v, so that everything that stores, copies, batches or compares an optimizer state (checkpoints,
retraining of M models at once, the bit-for-bit rebuild check) treats SGD's momentum and Adam's
moments alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..config import TrainConfig
from .kernels import adam_adjoint_, adam_step_
from .lr import group_schedule
from .optim import AdamHyper
from .optimizers import Optimizer, StepValues


@dataclass(frozen=True)
class Adam(Optimizer):
    """train.optimizer = adam | adamw (core/optimizers.py states the interface)."""
    hyper: AdamHyper
    needs_step_values: ClassVar[bool] = True

    @classmethod
    def from_config(cls, t: TrainConfig, num_steps: int, group_ends, step_backend: str,
                    adjoint_backend: str) -> "Adam":
        hyper = AdamHyper(t.beta1, t.beta2, t.eps, t.eps_root, t.optimizer == "adamw")
        return cls(*group_schedule(t, num_steps, group_ends), step_backend, adjoint_backend,
                   hyper)

    def state_size(self, num_params: int) -> int:
        return 2 * num_params

    def init(self, theta: torch.Tensor) -> torch.Tensor:
        """Zero first and second moments."""
        return theta.new_zeros(*theta.shape[:-1], 2 * theta.shape[-1])

    def step_(self, theta: torch.Tensor, state: torch.Tensor, grad: torch.Tensor,
              step: int) -> None:
        adam_step_(theta, state, grad, self.group_ends, self.lrs[step], self.wds, self.hyper,
                   step, self.step_backend)

    def adjoint_(self, theta_bar: torch.Tensor, state_bar: torch.Tensor, g_bar: torch.Tensor,
                 hvp, step: int, values: Optional[StepValues] = None,
                 backend: str | None = None) -> None:
        if values is None:
            raise ValueError("Adam's adjoint needs the step's forward values (StepValues)")
        adam_adjoint_(theta_bar, state_bar, g_bar, hvp, values.grad, values.theta, values.state,
                      self.group_ends, self.lrs[step], self.wds, self.hyper, step,
                      backend or self.adjoint_backend)
