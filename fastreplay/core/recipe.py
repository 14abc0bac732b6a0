"""A training recipe made concrete: data on the device, the flat model, the batch order and the
per-step, per-group learning rates. Training, replay and every retraining share one Recipe, so
they run the very same step function on the very same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..config import RunConfig
from ..data import ImageData, batch_schedule, device_data
from ..exceptions import ConfigError
from ..task import Task, builtin_measurement, builtin_task, check_task, cross_entropy, per_example
from .kernels import resolve_backend, sgd_step_
from .models import FlatModel

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use --set device=cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are "
                          "visible; use cuda:0 or set CUDA_VISIBLE_DEVICES")
    return device


def configure_determinism(device: torch.device, tf32: bool) -> None:
    """Bitwise-reproducible steps: the replay recomputes states and must land on the same bits."""
    # CUBLAS_WORKSPACE_CONFIG is set in fastreplay/__init__.py, before CUDA can initialise.
    torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def airbench_scale(momentum: float) -> float:
    """airbench94's "kilostep scale" 1024 (1 + 1/(1 - mu)): its lr and weight decay are per
    1024 examples, and Nesterov momentum's step on a constant gradient is (1 + 1/(1 - mu))
    times that gradient, which this divides out."""
    return 1024 * (1 + 1 / (1 - momentum))


def mean_loss_lr_and_decay(cfg: RunConfig) -> tuple[float, float]:
    """(peak eta, lambda) of this package's mean-loss step for train.lr and train.weight_decay.

    lr_convention=mean: they are eta and lambda themselves. lr_convention=airbench converts
    airbench94's optimizer once: torch SGD on the SUMMED loss B L_mean with group lr
    alpha_g = f_t lr s_g / S and coupled weight_decay kappa_g = (wd B / S) / (lr s_g / S)
    (S = airbench_scale, s_g the group's lr multiplier, f_t the schedule factor, which scales
    alpha but not kappa). With the momentum buffer m = buf / B its step is ours with
    eta_g = B alpha_g = f_t s_g (lr B / S) and lambda_g = kappa_g / B = wd / (lr s_g), so
    eta_g lambda_g = f_t wd B / S: the decay per step is independent of lr, as airbench
    intends. For the decay group (s = 1): peak eta = lr B / S and lambda = wd / lr.
    """
    t = cfg.train
    if t.lr_convention == "mean":
        return t.lr, t.weight_decay
    peak = t.lr * t.batch_size / airbench_scale(t.momentum)
    return peak, t.weight_decay / t.lr


def weight_decays(cfg: RunConfig, num_groups: int) -> list[float]:
    """lambda per parameter group: the decay group's, and 0 for the no-decay group (biases and
    BatchNorm parameters; airbench also decays its BatchNorm biases, which this does not)."""
    return [mean_loss_lr_and_decay(cfg)[1], 0.0][:num_groups]


def lr_table(cfg: RunConfig, num_steps: int, num_groups: int) -> np.ndarray:
    """(T, groups) learning rates: the schedule's factor times the peak eta (train.lr, converted
    by mean_loss_lr_and_decay under lr_convention=airbench) times the group scale."""
    t = cfg.train
    s = np.arange(num_steps, dtype=np.float64)
    if t.schedule == "constant":
        factor = np.ones(num_steps)
    else:  # onecycle: linear start->peak over peak_at of training, then linear peak->end
        peak = max(1.0, t.peak_at * num_steps)
        up = t.start_factor + (1 - t.start_factor) * s / peak
        down = 1 + (t.end_factor - 1) * (s - peak) / max(1.0, num_steps - peak)
        factor = np.where(s < peak, up, down)
    scales = [1.0, t.bias_lr_scale][:num_groups]
    peak_eta = mean_loss_lr_and_decay(cfg)[0]
    return peak_eta * factor[:, None] * np.asarray(scales)[None, :]


@dataclass
class TrainState:
    theta: torch.Tensor
    momentum: torch.Tensor
    buffers: torch.Tensor
    step: int

    def clone(self) -> "TrainState":
        return TrainState(self.theta.clone(), self.momentum.clone(), self.buffers.clone(), self.step)


ModelFactory = Optional[Callable[[], torch.nn.Module]]
"""A zero-argument callable building the user's own module (None: the built-in model.name)."""


class Recipe:
    """``task``: what to train and measure (fastreplay.task.Task); None: the preset's own
    (task.builtin_task: ``model.name`` on ``data.name``), for which ``model_factory`` and
    ``data`` are shorthands replacing the module (a zero-argument callable, called under
    torch.manual_seed(cfg.seed), its stock BatchNorm layers swapped for the functional twin,
    refused with a ConfigError where it could not be replayed exactly) and the images
    (ImageData, checked by data.check_image_data)."""

    def __init__(self, cfg: RunConfig, download: bool = False, data: Optional[ImageData] = None,
                 model_factory: ModelFactory = None, task: Optional[Task] = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = DTYPES[cfg.train.dtype]
        configure_determinism(self.device, cfg.train.tf32)
        if task is None:
            task = builtin_task(cfg, download, data, model_factory)
        elif data is not None or model_factory is not None:
            raise ConfigError("give either a task or model_factory/data, not both: they are "
                              "the task's model and data")
        self.task = check_task(task)
        self.data = device_data(self.task, cfg, self.device, self.dtype)
        self.model = FlatModel(cfg, self.device, self.dtype, self.task.model, self.task.decays)
        self.loss_fn = self.task.loss or cross_entropy(cfg.train.label_smoothing)
        n, b = self.data.num_train, cfg.train.batch_size
        if b > n:
            raise ConfigError(f"train.batch_size={b} exceeds the {n} training examples")
        self.indices_np = batch_schedule(n, b, cfg.train.epochs, cfg.seed)
        self.indices = torch.from_numpy(self.indices_np).to(self.device)
        self.num_steps = self.indices_np.shape[0]
        if cfg.replay.window_epochs > 0:
            # Resolved in place, so that the config saved with the run says which steps it means.
            per_epoch = self.num_steps // cfg.train.epochs
            window = max(1, round(cfg.replay.window_epochs * per_epoch))
            if window > self.num_steps:
                raise ConfigError(f"replay.window_epochs={cfg.replay.window_epochs:g} exceeds the "
                                  f"{cfg.train.epochs} training epochs; use at most that")
            cfg.replay.start_step, cfg.replay.window_epochs = self.num_steps - window, 0.0
        if cfg.replay.start_step >= self.num_steps:
            raise ConfigError(f"replay.start_step={cfg.replay.start_step} is not below the "
                              f"{self.num_steps} training steps")
        self.lrs = lr_table(cfg, self.num_steps, len(self.model.group_ends))
        self.wds = weight_decays(cfg, len(self.model.group_ends))
        # The forward step always uses the best available kernels; a replay must recompute
        # states with the same ones (checked against the store), whatever its adjoint backend.
        self.step_backend = resolve_backend("auto", self.device)
        self.adjoint_backend = resolve_backend(cfg.replay.backend, self.device)

    @property
    def num_train(self) -> int:
        return self.data.num_train

    def init_state(self) -> TrainState:
        m = self.model
        return TrainState(m.theta0.clone(), torch.zeros_like(m.theta0), m.buffers0.clone(), 0)

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
        return weights if step >= self.cfg.replay.start_step else self.ones()

    def batch_inputs(self, step: int, present: Optional[torch.Tensor] = None):
        """Step's augmented batch (x, y), only the ``present`` slots when given."""
        idx = self.indices[step]
        x = self.data.train_batch(idx, step)
        y = self.data.train_y[idx]
        if present is not None:
            x, y = x[present], y[present]
        return x, y

    def losses(self, theta: torch.Tensor, buffers: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor):
        """Per-example training losses on (x, y) and the updated running statistics: a pure
        function of tensors (what torch.func and torch.compile transform)."""
        outputs, new_buffers = self.model.forward(theta, buffers, x, train=True)
        return per_example(self.loss_fn(outputs, y), y.shape[0], "loss"), new_buffers

    def measurement(self, kind: str):
        """The function of (test outputs, targets) measured under ``kind``: the task's own, else
        the built-in one."""
        return self.task.measurements.get(kind) or builtin_measurement(kind)

    def batch_losses(self, theta: torch.Tensor, buffers: torch.Tensor, step: int,
                     present: Optional[torch.Tensor] = None):
        """Per-example losses on step's augmented batch and the updated running statistics."""
        return self.losses(theta, buffers, *self.batch_inputs(step, present))

    def batch_loss(self, theta: torch.Tensor, buffers: torch.Tensor, step: int,
                   batch_weights: torch.Tensor, present: Optional[torch.Tensor] = None):
        """(1/B) sum_i w_i loss_i on step's augmented batch, and the updated running statistics.

        ``present`` (bool, per batch slot) takes examples out of the batch altogether (LDS "drop"
        removal): they skip the forward pass and the loss is averaged over those that remain.
        """
        denom = self.indices.shape[1]
        if present is not None:
            batch_weights = batch_weights[present]
            denom = max(1, int(present.sum()))
        losses, new_buffers = self.batch_losses(theta, buffers, step, present)
        return (batch_weights * losses).sum() / denom, new_buffers

    def step(self, state: TrainState, weights: torch.Tensor,
             keep_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advance ``state`` by one SGD step in place; returns the (detached) batch loss."""
        t = state.step
        w = self.step_weights(weights, t)[self.indices[t]]
        present = None
        if keep_mask is not None and t >= self.cfg.replay.start_step:
            present = keep_mask[self.indices[t]]
        theta = state.theta.detach().requires_grad_(True)
        loss, new_buffers = self.batch_loss(theta, state.buffers, t, w, present)
        (grad,) = torch.autograd.grad(loss, theta)
        sgd_step_(state.theta, state.momentum, grad, self.model.group_ends, self.lrs[t], self.wds,
                  self.cfg.train.momentum, self.cfg.train.nesterov, self.step_backend)
        state.buffers = new_buffers.detach()
        state.step = t + 1
        return loss.detach()
