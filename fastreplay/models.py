"""Models and the flat-parameter view the optimizer and the replay work on.

All parameters live in one flat vector ``theta`` with the parameter groups as contiguous slices
(decayed conv/linear weights first, then BatchNorm parameters and biases), and BatchNorm running
statistics in one flat vector ``buffers``. :class:`FlatModel` evaluates the network at any
(theta, buffers) and, in train mode, also returns the updated running statistics as a
differentiable function of theta: the reverse pass needs their Jacobian (docs/design.md §4).

resnet9 is the Myrtle/MAGIC-style ResNet-9: prep conv(64w), conv(128w)+pool, residual block,
conv(256w)+pool, conv(512w)+pool, residual block, global pool, linear head without bias whose
logits are scaled by ``model.output_scale``. Convolutions have no bias (BatchNorm follows).
At width 1 it has 6,573,130 parameters; GELU and average pooling are the smooth options
(model.pool=lse: a log-sum-exp global pool, see GlobalPool).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .config import RunConfig

BN_EPS = 1e-5


class BatchNorm(nn.Module):
    """BatchNorm whose running-statistics update is returned, not applied in place.

    In train mode it stores ``(1 - rho) * running + rho * batch_stat`` (unbiased variance, as
    PyTorch does) in ``self.updated`` so the caller can collect them, keeping the graph to theta.
    """

    def __init__(self, channels: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.updated = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        # In the run's precision (with train.bf16 the convolution before returns bf16): CUDA's
        # forward-mode BatchNorm formulas give float32 tangents for bf16 inputs, which the
        # next bf16 convolution's derivative then refuses.
        x = x.to(self.running_mean.dtype)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            n = x.numel() // x.shape[1]
            rho = self.momentum
            self.updated = ((1 - rho) * self.running_mean + rho * mean,
                            (1 - rho) * self.running_var + rho * var * (n / (n - 1)))
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, BN_EPS)
        scale = self.weight * torch.rsqrt(self.running_var + BN_EPS)
        return (x - self.running_mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that computes in ``compute_dtype`` when set (train.bf16), casting input and
    weight as torch.autocast would, and returns bf16 (BatchNorm takes it back to float32).
    Explicit casts, because autocast under torch.func.jvp leaves some inputs uncast ("Input
    type and weight type should be the same"); casts differentiate in every mode."""

    compute_dtype = None

    def forward(self, x):
        cd = self.compute_dtype
        if cd is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(cd)
        return self._conv_forward(x.to(cd), self.weight.to(cd), bias)


class Linear(nn.Linear):
    """nn.Linear with Conv2d's ``compute_dtype``."""

    compute_dtype = None

    def forward(self, x):
        cd = self.compute_dtype
        if cd is None:
            return super().forward(x)
        return F.linear(x.to(cd), self.weight.to(cd),
                        None if self.bias is None else self.bias.to(cd))


class GlobalPool(nn.Module):
    """Global max, mean or log-sum-exp over H, W via amax/mean/logsumexp: unlike the adaptive
    pooling layers their backward passes have deterministic CUDA kernels, which bitwise replay
    requires, and all three differentiate in every HVP mode (double backward, jvp, vmap).

    lse is eps * log((1/(H W)) sum exp(x / eps)) = eps * logsumexp(x / eps) - eps * log(H W):
    a smooth max that lies between the mean and the max (equal to both on a constant map),
    tends to the max as eps -> 0 and to the mean as eps -> inf. Subtracting eps * log(H W)
    keeps it on the activations' scale whatever the map size; logsumexp is the stable form.
    """

    def __init__(self, kind: str, eps: float = 0.1):
        super().__init__()
        self.kind = kind
        self.eps = eps

    def forward(self, x):
        if self.kind == "max":
            return x.amax(dim=(2, 3))
        if self.kind == "lse":
            area = x.shape[2] * x.shape[3]
            return self.eps * (torch.logsumexp(x.flatten(2) / self.eps, dim=2) - math.log(area))
        return x.mean(dim=(2, 3))


def _act(name: str) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU()


def _conv_bn(c_in: int, c_out: int, act: str, rho: float) -> nn.Sequential:
    return nn.Sequential(Conv2d(c_in, c_out, 3, padding=1, bias=False), BatchNorm(c_out, rho),
                         _act(act))


class Residual(nn.Module):
    def __init__(self, c: int, act: str, rho: float):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c, act, rho), _conv_bn(c, c, act, rho))

    def forward(self, x):
        return x + self.body(x)


def inner_pool_kind(pool: str, inner_pool: str) -> str:
    """resnet9's 2x downsampling: inner_pool when set, else pool's own kind, max for lse (the
    airbench/MAGIC-style net max-pools inside and smooths only the global pool)."""
    if inner_pool:
        return inner_pool
    return "max" if pool == "lse" else pool


class ResNet9(nn.Module):
    def __init__(self, num_classes: int, width: float, act: str, pool: str, output_scale: float,
                 rho: float, lse_eps: float = 0.1, inner_pool: str = ""):
        super().__init__()
        c = [max(1, int(round(k * width))) for k in (64, 128, 256, 512)]
        inner = inner_pool_kind(pool, inner_pool)
        down = (lambda: nn.MaxPool2d(2)) if inner == "max" else (lambda: nn.AvgPool2d(2))
        self.features = nn.Sequential(
            _conv_bn(3, c[0], act, rho),
            _conv_bn(c[0], c[1], act, rho), down(), Residual(c[1], act, rho),
            _conv_bn(c[1], c[2], act, rho), down(),
            _conv_bn(c[2], c[3], act, rho), down(), Residual(c[3], act, rho),
        )
        self.global_pool = GlobalPool(pool, lse_eps)
        self.head = Linear(c[3], num_classes, bias=False)
        self.output_scale = output_scale

    def forward(self, x):
        return self.head(self.global_pool(self.features(x))) * self.output_scale


class TinyCNN(nn.Module):
    """conv-BN-act, avg-pool, conv-BN-act, global average, linear: a few thousand parameters."""

    def __init__(self, num_classes: int, width: float, act: str, rho: float):
        super().__init__()
        c = max(2, int(round(16 * width)))
        self.net = nn.Sequential(_conv_bn(3, c, act, rho), nn.AvgPool2d(2), _conv_bn(c, c, act, rho),
                                 GlobalPool("avg"), Linear(c, num_classes))

    def forward(self, x):
        return self.net(x)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int, act: str):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), Linear(in_features, hidden), _act(act),
                                 Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def build_module(cfg: RunConfig) -> nn.Module:
    m, d = cfg.model, cfg.data
    if m.name == "resnet9":
        return ResNet9(d.num_classes, m.width, m.activation, m.pool, m.output_scale, m.bn_momentum,
                       m.lse_eps, m.inner_pool)
    if m.name == "tiny-cnn":
        return TinyCNN(d.num_classes, m.width, m.activation, m.bn_momentum)
    return MLP(3 * d.image_size ** 2, m.hidden, d.num_classes, m.activation)


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class FlatModel:
    """A network evaluated at flat (theta, buffers); groups are contiguous slices of theta."""

    GROUP_NAMES = ("decay", "no_decay")

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype):
        torch.manual_seed(cfg.seed)  # initialisation on the CPU: identical on every device
        module = build_module(cfg).to(dtype)
        self.module = module.to(device)
        self.bn_momentum = cfg.model.bn_momentum
        self.channels_last = cfg.train.channels_last
        for layer in module.modules():
            if isinstance(layer, (Conv2d, Linear)):
                layer.compute_dtype = torch.bfloat16 if cfg.train.bf16 else None
        named = dict(module.named_parameters())
        decay = [n for n, p in named.items() if p.dim() >= 2]
        no_decay = [n for n, p in named.items() if p.dim() < 2]
        self.param_slots, off, self.group_ends = [], 0, []
        for group in (decay, no_decay):
            for n in group:
                self.param_slots.append(Slot(n, tuple(named[n].shape), off))
                off += named[n].numel()
            self.group_ends.append(off)
        self.num_params = off
        self.buffer_slots, off = [], 0
        for n, b in module.named_buffers():
            self.buffer_slots.append(Slot(n, tuple(b.shape), off))
            off += b.numel()
        self.num_buffers = off
        self.bn_layers = [m for m in module.modules() if isinstance(m, BatchNorm)]
        self.theta0 = torch.cat([named[s.name].detach().reshape(-1) for s in self.param_slots])
        bufs = dict(module.named_buffers())
        self.buffers0 = (torch.cat([bufs[s.name].reshape(-1) for s in self.buffer_slots])
                         if self.buffer_slots else torch.zeros(0, dtype=dtype, device=device))

    @staticmethod
    def _views(flat: torch.Tensor, slots) -> dict:
        return {s.name: flat[s.offset:s.offset + s.numel].view(s.shape) for s in slots}

    def forward(self, theta: torch.Tensor, buffers: torch.Tensor, x: torch.Tensor, train: bool):
        """Logits, and in train mode the updated flat running statistics (else None)."""
        self.module.train(train)
        tensors = self._views(theta, self.param_slots)
        tensors.update(self._views(buffers, self.buffer_slots))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = functional_call(self.module, tensors, (x,))
        logits = logits.to(theta.dtype)  # losses and measurements in the run's precision
        if not train:
            return logits, None
        if not self.bn_layers:
            return logits, buffers.new_zeros(0)
        new = [u.reshape(-1) for layer in self.bn_layers for u in layer.updated]
        for layer in self.bn_layers:
            layer.updated = None
        return logits, torch.cat(new)
