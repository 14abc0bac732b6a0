"""A training recipe made concrete: the task's model and loss on the device, stepped by the
run's optimizer over the run's batch order. Training, replay and every retraining share one
Recipe, so they run the very same step function on the very same inputs.

Each responsibility lives in its own piece, resolved once from the config:

- ``runtime`` (core/runtime.py): device, dtype, determinism, kernel backends;
- ``data`` (data.py): the task's examples on the device, with their augmentation;
- ``plan`` (core/batches.py): the batch order and the attribution window;
- ``model`` and ``loss_fn``: the task's network as a flat-parameter function, and its loss;
- ``optimizer`` (core/optimizers.py): learning rates, weight decays, the step and its adjoint.

``cfg`` is the resolved config (the attribution window as a start step): what the run store
saves. The config passed in is never changed.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..config import RunConfig, with_values
from ..data import ImageData, device_data
from ..exceptions import ConfigError
from ..task import (Task, builtin_measurement, builtin_task, check_task, cross_entropy,
                    per_example, unused_config_keys)
from .batches import BatchPlan
from .dropout import DeterministicDropout, dropout_context
from .models import FlatModel
from .optimizers import build_optimizer
from .runtime import Runtime


@dataclass
class TrainState:
    theta: torch.Tensor
    opt_state: torch.Tensor
    """The optimizer's state (SGD: momentum, P; Adam: moments, 2P)."""
    buffers: torch.Tensor
    step: int

    def clone(self) -> "TrainState":
        return TrainState(self.theta.clone(), self.opt_state.clone(), self.buffers.clone(), self.step)


ModelFactory = Optional[Callable[[], torch.nn.Module]]
"""A zero-argument callable building the user's own module (None: the built-in model.name)."""


class Recipe:
    """``task``: what to train and measure (fastreplay.task.Task); None: the preset's own
    (task.builtin_task: ``model.name`` on ``data.name``), for which ``model_factory`` and
    ``data`` are shorthands replacing the module (a zero-argument callable, called under
    torch.manual_seed(cfg.seed), its stock BatchNorm layers swapped for the functional twin,
    refused with a ConfigError where it could not be replayed exactly) and the images
    (ImageData, checked by data.check_image_data). Once built, the task is tried on a few
    examples (core/admission.py), so that what could not be trained and replayed exactly is
    refused before any training."""

    def __init__(self, cfg: RunConfig, download: bool = False, data: Optional[ImageData] = None,
                 model_factory: ModelFactory = None, task: Optional[Task] = None):
        self.runtime = Runtime.from_config(cfg)
        is_builtin = task is None
        if task is None:
            task = builtin_task(cfg, download, data, model_factory)
        elif data is not None or model_factory is not None:
            raise ConfigError("give either a task or model_factory/data, not both: they are "
                              "the task's model and data")
        self.task = check_task(task)
        self.builtin_data = is_builtin and data is None
        """The data come from data.name (so data.label_noise applied, and its flips are known)."""
        self.unused_keys = unused_config_keys(self.task, own_data=not self.builtin_data, cfg=cfg)
        self.data = device_data(self.task, cfg, self.device, self.dtype)
        self.model = FlatModel(cfg, self.device, self.dtype, self.task.model, self.task.decays)
        _check_recipe_fits_model(cfg, self.model)
        self.loss_fn = self.task.loss or cross_entropy(cfg.train.label_smoothing)
        t = cfg.train
        self.plan = BatchPlan.make(self.data.num_train, t.batch_size, t.epochs, cfg.seed,
                                   cfg.replay, self.device)
        self.cfg = with_values(cfg, {"replay.start_step": self.plan.start_step,
                                     "replay.window_epochs": 0.0})
        self.run_window_start = self.plan.start_step
        """The first attributed step of the run as configured (with_window keeps it)."""
        self.optimizer = build_optimizer(t, self.num_steps, self.model.group_ends,
                                         self.runtime.step_backend, self.runtime.adjoint_backend)
        from .admission import admit  # it measures through measure.py, which imports this
        admit(self)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runtime.dtype

    @property
    def num_steps(self) -> int:
        return self.plan.num_steps

    def with_window(self, start_step: int) -> "Recipe":
        """The same recipe attributing from ``start_step`` on (data weights act from there): a
        shallow copy sharing the model, data and optimizer. The window is not part of the
        trajectory (config fingerprint), so one stored run serves every window: `window`
        screens them without training the run again."""
        if not 0 <= start_step < self.num_steps:
            raise ConfigError(f"an attribution window must start inside the run's "
                              f"{self.num_steps} steps, not at step {start_step}")
        other = copy.copy(self)
        other.plan = dataclasses.replace(self.plan, start_step=start_step)
        other.cfg = with_values(self.cfg, {"replay.start_step": start_step,
                                           "replay.window_epochs": 0.0})
        return other

    def window_suffix(self) -> str:
        """"" for the run's own window, else "_fromSTART": names results of another window
        (its LDS retrainings differ) so that they never mix with the run's own."""
        start = self.plan.start_step
        return "" if start == self.run_window_start else f"_from{start}"

    @property
    def num_train(self) -> int:
        return self.data.num_train

    def init_state(self) -> TrainState:
        m = self.model
        return TrainState(m.theta0.clone(), self.optimizer.init(m.theta0), m.buffers0.clone(), 0)

    def tensor(self, array) -> torch.Tensor:
        """A stored array as a fresh tensor on the device in the run's dtype (never aliasing it:
        training updates states in place)."""
        return torch.tensor(np.asarray(array), device=self.device, dtype=self.dtype)

    def stored_state(self, checkpoint) -> TrainState:
        """A stored checkpoint (step, params, momentum, buffers) as a TrainState on the device."""
        step, params, momentum, buffers = checkpoint
        return TrainState(self.tensor(params), self.tensor(momentum), self.tensor(buffers),
                          int(step))

    def ones(self) -> torch.Tensor:
        return torch.ones(self.num_train, dtype=self.dtype, device=self.device)

    def step_weights(self, weights: torch.Tensor, step: int) -> torch.Tensor:
        """Data weights act only from replay.start_step on; before it every run is identical."""
        return weights if self.plan.weighted(step) else self.ones()

    def batch_inputs(self, step: int, present: Optional[torch.Tensor] = None):
        """Step's augmented batch (x, y), only the ``present`` slots when given."""
        idx = self.plan.indices[step]
        x = self.data.train_batch(idx, step)
        y = self.data.train_y[idx]
        if present is not None:
            x, y = x[present], y[present]
        return x, y

    def batch_ids(self, step: int, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training-set ids of step's batch rows (only the ``present`` slots when given)."""
        idx = self.plan.indices[step]
        return idx if present is None else idx[present]

    def randomness(self, step: int, ids: torch.Tensor):
        """The context of a training forward pass over the examples ``ids`` at ``step``: what
        the model's dropout draws its masks from (core/dropout.py), the same in training, in
        every rebuilt step of the replay and in every retraining."""
        return dropout_context(self.cfg.seed, step, ids)

    def micro_batches(self, size: int) -> list[slice]:
        """The slices of a batch of ``size`` rows whose gradients a step sums
        (train.micro_batch; one slice without accumulation). The loss of every slice is divided
        by the whole batch's size, so their sum is the step's gradient."""
        micro = self.cfg.train.micro_batch or size
        return [slice(lo, min(lo + micro, size)) for lo in range(0, size, micro)]

    def losses(self, theta: torch.Tensor, buffers: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor):
        """Per-example training losses on (x, y) and the updated running statistics: a pure
        function of tensors (what torch.func and torch.compile transform)."""
        outputs, new_buffers = self.model.forward(theta, buffers, x, train=True)
        return self.loss_values(outputs, y), new_buffers

    def loss_values(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task's training loss of each example, from the model's outputs and targets."""
        return per_example(self.loss_fn(outputs, y), y.shape[0], "loss")

    def measurement(self, kind: str):
        """The function of (test outputs, targets) measured under ``kind``: the task's own, else
        the built-in one."""
        return self.task.measurements.get(kind) or builtin_measurement(kind)

    def batch_losses(self, theta: torch.Tensor, buffers: torch.Tensor, step: int,
                     present: Optional[torch.Tensor] = None):
        """Per-example losses on step's augmented batch and the updated running statistics."""
        with self.randomness(step, self.batch_ids(step, present)):
            return self.losses(theta, buffers, *self.batch_inputs(step, present))

    def gradient(self, theta: torch.Tensor, buffers: torch.Tensor, step: int) -> torch.Tensor:
        """grad_theta L_step(theta, w = 1): the gradient the scored run's step ``step`` took
        from theta (what a nonlinear optimizer's adjoint, or the clip's, needs)."""
        unit = torch.ones(self.plan.batch_size, dtype=self.dtype, device=self.device)
        grad, _, _ = self.batch_gradient(theta, buffers, step, unit)
        return grad

    def batch_gradient(self, theta: torch.Tensor, buffers: torch.Tensor, step: int,
                       batch_weights: torch.Tensor, present: Optional[torch.Tensor] = None):
        """(grad_theta, updated running statistics, loss) of step's weighted batch loss
        (batch_loss), summed over its micro-batches (train.micro_batch): the one place a
        training step's gradient is taken, for training and for the replay's forward values."""
        theta = theta.detach().requires_grad_(True)
        x, y = self.batch_inputs(step, present)
        ids = self.batch_ids(step, present)
        if present is not None:
            batch_weights = batch_weights[present]
        denom = self.plan.batch_size if present is None else max(1, int(present.sum()))
        grad, loss, new_buffers = None, None, buffers
        for part in self.micro_batches(x.shape[0]):
            with self.randomness(step, ids[part]):
                losses, new_buffers = self.losses(theta, buffers, x[part], y[part])
            piece = (batch_weights[part] * losses).sum() / denom
            (g,) = torch.autograd.grad(piece, theta)
            grad = g if grad is None else grad + g
            loss = piece.detach() if loss is None else loss + piece.detach()
        return grad, new_buffers, loss

    def batch_loss(self, theta: torch.Tensor, buffers: torch.Tensor, step: int,
                   batch_weights: torch.Tensor, present: Optional[torch.Tensor] = None):
        """(1/B) sum_i w_i loss_i on step's augmented batch, and the updated running statistics.

        ``present`` (bool, per batch slot) takes examples out of the batch altogether (LDS "drop"
        removal): they skip the forward pass and the loss is averaged over those that remain.
        """
        denom = self.plan.batch_size
        if present is not None:
            batch_weights = batch_weights[present]
            denom = max(1, int(present.sum()))
        losses, new_buffers = self.batch_losses(theta, buffers, step, present)
        return (batch_weights * losses).sum() / denom, new_buffers

    def step(self, state: TrainState, weights: torch.Tensor,
             keep_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advance ``state`` by one SGD step in place; returns the (detached) batch loss."""
        t = state.step
        idx = self.plan.indices[t]
        w = self.step_weights(weights, t)[idx]
        present = None
        if keep_mask is not None and self.plan.weighted(t):
            present = keep_mask[idx]
        grad, new_buffers, loss = self.batch_gradient(state.theta, state.buffers, t, w, present)
        self.optimizer.step_(state.theta, state.opt_state, grad, t)
        state.buffers = new_buffers.detach()
        state.step = t + 1
        return loss


def _check_recipe_fits_model(cfg: RunConfig, model: FlatModel) -> None:
    """Options the model rules out: micro-batches would give BatchNorm a micro-batch's
    statistics (another step than one batch's); a compiled replay step would bake one step's
    dropout masks into its graph."""
    if cfg.train.micro_batch and model.bn_layers:
        raise ConfigError(f"train.micro_batch={cfg.train.micro_batch} splits each batch, but the "
                          "model's BatchNorm layers would then normalise by each micro-batch's "
                          "statistics (another step than one batch's); set train.micro_batch=0")
    dropout = [m for m in model.module.modules() if isinstance(m, DeterministicDropout) and m.p > 0]
    if cfg.replay.compile and dropout:
        raise ConfigError("replay.compile would compile one step's dropout masks into the replay "
                          "step; drop --set replay.compile=true (or set the model's dropout to 0)")
