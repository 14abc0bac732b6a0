"""Models and the flat-parameter view the optimizer and the replay work on.

All parameters live in one flat vector ``theta`` with the parameter groups as contiguous slices
(decayed conv/linear weights first, then BatchNorm parameters and biases), and BatchNorm running
statistics in one flat vector ``buffers``. :class:`FlatModel` evaluates the network at any
(theta, buffers) and, in train mode, also returns the updated running statistics as a
differentiable function of theta: the reverse pass needs their Jacobian (docs/design.md §4).
A user's own module (FlatModel's ``model_factory``) is checked and its stock BatchNorm layers
swapped for the functional twin by :func:`prepare_module`; the built-in models below already
use the twin, so for them that is a no-op.

resnet9 is the Myrtle/MAGIC-style ResNet-9: prep conv(64w), conv(128w)+pool, residual block,
conv(256w)+pool, conv(512w)+pool, residual block, global pool, linear head without bias whose
logits are scaled by ``model.output_scale``. Convolutions have no bias (BatchNorm follows).
At width 1 it has 6,573,130 parameters; GELU and average pooling are the smooth options
(model.pool=lse: a log-sum-exp global pool, see GlobalPool).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..config import RunConfig
from ..exceptions import ConfigError, ReplayError
from .dropout import DeterministicDropout

BN_EPS = 1e-5


class BatchNorm(nn.Module):
    """BatchNorm whose running-statistics update is returned, not applied in place.

    In train mode it stores ``(1 - rho) * running + rho * batch_stat`` (unbiased variance, as
    PyTorch does) in ``self.updated`` so the caller can collect them, keeping the graph to theta.
    The stock layers a user module brings (nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm) are swapped
    for this twin (:func:`prepare_module`), which then carries that layer's momentum, eps and
    affine setting: inputs (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) alike, with
    ``input_dims`` the stock layer's accepted input ranks (None: any, the built-in models).
    """

    def __init__(self, channels: int, momentum: float, eps: float = BN_EPS, affine: bool = True,
                 input_dims: tuple | None = None):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.input_dims = input_dims
        # Set by FlatModel, which clears ``updated`` before each pass and collects it after:
        # a second call in one pass is then an error (not when the layer is used on its own,
        # as a plain nn.Module whose updates nobody reads, e.g. bench's eager baseline).
        self.qualified_name = ""
        self.one_call_per_pass = False
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.updated = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dims is not None and x.dim() not in self.input_dims:
            raise ValueError(f"expected {' or '.join(f'{d}D' for d in self.input_dims)} input "
                             f"(got {x.dim()}D input)")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        # In the run's precision (with train.bf16 the convolution before returns bf16): CUDA's
        # forward-mode BatchNorm formulas give float32 tangents for bf16 inputs, which the
        # next bf16 convolution's derivative then refuses.
        x = x.to(self.running_mean.dtype)
        if self.training:
            if self.one_call_per_pass and self.updated is not None:
                # A second call would start again from b_t, where torch chains the two updates.
                raise ReplayError(f"BatchNorm layer {self.qualified_name!r} ran twice in one "
                                  "forward pass; use a separate layer for each call")
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            n = x.numel() // x.shape[1]
            rho = self.momentum
            self.updated = ((1 - rho) * self.running_mean + rho * mean,
                            (1 - rho) * self.running_var + rho * var * (n / (n - 1)))
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = self.weight * scale
        out = (x - self.running_mean.view(shape)) * scale.view(shape)
        return out if self.bias is None else out + self.bias.view(shape)


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


# The stock layers swapped for the BatchNorm twin, with the input ranks each accepts. A user
# subclass of one of them is swapped too when it keeps the stock forward (else refused).
_STOCK_BN_DIMS = ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)),
                  (nn.SyncBatchNorm, None))
_STOCK_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _where(name: str, layer: nn.Module) -> str:
    return f"model module {name or '(the model itself)'!r} ({type(layer).__name__})"


def _refusal(name: str, layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be trained and replayed exactly, or None when it can.

    Randomness in train mode (dropout, RReLU) is drawn from torch's global generator, which no
    checkpoint holds: the replay's rebuilt steps would draw other masks than training did.
    Running statistics are replayed only for BatchNorm (its update is a known function of the
    batch with a known adjoint, docs/design.md §4); every other update in place is unknowable.
    """
    where = _where(name, layer)
    for p in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
        if nn.parameter.is_lazy(p):
            return (f"{where} has uninitialised (lazy) parameters; give it its sizes, or run one "
                    "forward pass in the model factory")
    random = "draws random numbers in train mode, which the replay cannot reproduce"
    if (isinstance(layer, nn.modules.dropout._DropoutNd) and type(layer) is not nn.Dropout
            and layer.p > 0):  # stock nn.Dropout becomes DeterministicDropout (prepare_module)
        return f"{where} {random}; set p=0, or use nn.Dropout (fastreplay makes its masks reproducible)"
    if isinstance(layer, (nn.MultiheadAttention, nn.RNNBase)) and layer.dropout > 0:
        return f"{where} {random}; set dropout=0"
    if isinstance(layer, nn.RReLU):
        return f"{where} {random}; use nn.LeakyReLU"
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm) and layer.track_running_stats:
        return (f"{where} tracks running statistics, which fastreplay replays only for "
                "BatchNorm; set track_running_stats=False (InstanceNorm's default)")
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if type(layer).forward not in _STOCK_BN_FORWARDS:
            return (f"{where} overrides BatchNorm's forward, which fastreplay cannot replay; "
                    "use the stock forward or fastreplay.core.models.BatchNorm")
        if not layer.track_running_stats:
            return (f"{where} has track_running_stats=False, so its eval-mode output depends on "
                    "the other examples in the batch (measurements are per example); set "
                    "track_running_stats=True")
        if layer.momentum is None:
            return (f"{where} has momentum=None (a cumulative average, a different factor each "
                    "step); set a fixed momentum, e.g. 0.1")
    return None


def _twin(layer: nn.modules.batchnorm._BatchNorm) -> BatchNorm:
    """The BatchNorm twin of a stock layer: its momentum, eps and affine setting, and its very
    parameter and running-statistics tensors (so its initial values are kept). The stock
    ``num_batches_tracked`` counter is dropped: with a fixed momentum nothing reads it."""
    dims = next((d for cls, d in _STOCK_BN_DIMS if isinstance(layer, cls)), None)
    twin = BatchNorm(layer.num_features, float(layer.momentum), float(layer.eps), layer.affine,
                     dims)
    if layer.affine:
        twin.weight, twin.bias = layer.weight, layer.bias
    twin.running_mean, twin.running_var = layer.running_mean, layer.running_var
    twin.train(layer.training)
    return twin


_BF16_CAPABLE = {nn.Conv2d: Conv2d, nn.Linear: Linear}


def prepare_module(module: nn.Module) -> nn.Module:
    """Check a module for what exact replay needs and swap its stock BatchNorm layers for the
    twin, in place, under the same attribute names (parameter names, order and values stay).

    The rules (docs/design.md §4, "Stock layers"): stock BatchNorm (1d/2d/3d, SyncBatchNorm: one
    process computes it over the whole batch) becomes :class:`BatchNorm`; LayerNorm, GroupNorm
    and InstanceNorm without running statistics hold no state and need nothing. Refused with a
    ConfigError naming the module: dropout-like randomness in train mode, InstanceNorm tracking
    running statistics, BatchNorm without running statistics, with momentum=None or with its
    own forward, lazy parameters. Every other buffer is a constant: it stays on the module,
    outside the flat ``buffers``, and :class:`FlatModel` raises a ReplayError if a forward pass
    changes it. On a built-in model (already the twin) this is a no-op.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"the model factory returned a {type(module).__name__}, not a "
                          "torch.nn.Module; return the network itself")
    twins: dict[int, BatchNorm] = {}  # a layer registered twice becomes one twin
    for name, layer in list(module.named_modules()):
        why = _refusal(name, layer)
        if why:
            raise ConfigError(why)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and id(layer) not in twins:
            twins[id(layer)] = _twin(layer)
    for layer in module.modules():
        # Stock Conv2d and Linear become their behaviour-identical subclasses, which can compute
        # in bfloat16 under train.bf16 (their compute_dtype); nothing else about them changes.
        if type(layer) in _BF16_CAPABLE:
            layer.__class__ = _BF16_CAPABLE[type(layer)]
    _make_dropout_deterministic(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return twins[id(module)]
    for parent in list(module.modules()):
        for child_name, child in list(parent._modules.items()):  # every name, shared or not
            if child is not None and id(child) in twins:
                setattr(parent, child_name, twins[id(child)])
    return module


def _make_dropout_deterministic(module: nn.Module) -> None:
    """Every stock nn.Dropout becomes a DeterministicDropout of the same p (core/dropout.py):
    its masks are a function of (seed, step, example id, layer, position), numbered in module
    order, so training, the replay and every retraining drop the same units."""
    layer = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Dropout:
                replacement = DeterministicDropout(child.p, layer)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                layer += 1


@dataclass(frozen=True)
class _Constant:
    """A buffer FlatModel treats as a constant, and what it was when the model was built."""
    where: str
    owner: nn.Module
    name: str
    tensor: torch.Tensor
    version: int

    def changed(self) -> bool:
        return (self.owner._buffers.get(self.name) is not self.tensor
                or self.tensor._version != self.version)


def default_decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay (and lr x1) for weight matrices and kernels; none (and lr x
    train.bias_lr_scale) for biases and normalisation parameters."""
    return param.dim() >= 2


class FlatModel:
    """A network evaluated at flat (theta, buffers); groups are contiguous slices of theta.

    ``decays(name, param) -> bool`` picks the weight-decayed group (default: tensors of two or
    more dimensions). ``model_factory`` (zero arguments, returning an nn.Module) replaces the built-in
    ``build_module(cfg)``; either is called under ``torch.manual_seed(cfg.seed)``, so the initial
    weights are a function of the seed, and then passed through :func:`prepare_module`. theta
    holds every parameter; ``buffers`` holds the BatchNorm running statistics only, layer by
    layer in module order, and ``buffer_decay`` (same length) each element's 1 - rho of its
    layer: the factor the replay's statistics adjoint decays by (docs/design.md §4).
    """

    GROUP_NAMES = ("decay", "no_decay")

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype,
                 model_factory=None, decays=None):
        torch.manual_seed(cfg.seed)  # initialisation on the CPU: identical on every device
        module = model_factory() if model_factory is not None else build_module(cfg)
        module = prepare_module(module).to(dtype)
        self.module = module.to(device)
        self.channels_last = cfg.train.channels_last
        for layer in module.modules():
            if isinstance(layer, (Conv2d, Linear)):
                layer.compute_dtype = torch.bfloat16 if cfg.train.bf16 else None
        # Parameters with requires_grad=False are frozen: constants of the run, left on the
        # module (functional_call uses them as they are), outside theta and never stepped.
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
        if not named:
            raise ConfigError("the model has no parameters to train (none, or all with "
                              "requires_grad=False); give it some (e.g. BatchNorm with "
                              "affine=True, a Linear layer)")
        decays = decays or default_decays
        chosen = {n: decays(n, p) for n, p in named.items()}
        for n, d in chosen.items():
            if not isinstance(d, (bool, np.bool_)):
                raise ConfigError(f"the task's decays rule returned {type(d).__name__} for "
                                  f"parameter {n!r}; it must return True (weight-decayed) or "
                                  "False")
        decay = [n for n in named if chosen[n]]
        no_decay = [n for n in named if not chosen[n]]
        self.param_slots, off, self.group_ends = [], 0, []
        for group in (decay, no_decay):
            for n in group:
                self.param_slots.append(Slot(n, tuple(named[n].shape), off))
                off += named[n].numel()
            self.group_ends.append(off)
        self.num_params = off
        # BatchNorm statistics, layer by layer in module order: the order forward() returns
        # their updates in (for the built-in models also module.named_buffers()'s order).
        self.bn_layers, self.buffer_slots, off, decays = [], [], 0, []
        for name, layer in module.named_modules():
            if isinstance(layer, BatchNorm):
                layer.qualified_name, layer.one_call_per_pass = name, True
                self.bn_layers.append(layer)
                for b in ("running_mean", "running_var"):
                    n = f"{name}.{b}" if name else b
                    shape = tuple(getattr(layer, b).shape)
                    self.buffer_slots.append(Slot(n, shape, off))
                    off += self.buffer_slots[-1].numel
                    decays.append(torch.full((self.buffer_slots[-1].numel,),
                                             1 - layer.momentum, dtype=dtype))
        self.num_buffers = off
        self.buffer_decay = (torch.cat(decays) if decays else torch.zeros(0, dtype=dtype)).to(device)
        self.constants = [
            _Constant(_where(name, layer), layer, b, t, t._version)
            for name, layer in module.named_modules() for b, t in layer._buffers.items()
            if t is not None and not (isinstance(layer, BatchNorm)
                                      and b in ("running_mean", "running_var"))]
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
        for layer in self.bn_layers:  # an earlier pass that raised may have left its updates
            layer.updated = None
        logits = functional_call(self.module, tensors, (x,))
        if self.constants and not torch.compiler.is_compiling():
            self._check_constants()
        logits = logits.to(theta.dtype)  # losses and measurements in the run's precision
        if not train:
            return logits, None
        if not self.bn_layers:
            return logits, buffers.new_zeros(0)
        for layer in self.bn_layers:
            if layer.updated is None:
                raise ReplayError(
                    f"BatchNorm layer {layer.qualified_name!r} did not update its running "
                    "statistics in a training forward pass (not called, or kept in eval mode); "
                    "remove it or let it train: its statistics would be frozen, which the "
                    "replay does not model")
        new = [u.reshape(-1) for layer in self.bn_layers for u in layer.updated]
        for layer in self.bn_layers:
            layer.updated = None
        return logits, torch.cat(new)

    def _check_constants(self) -> None:
        """Buffers outside BatchNorm are constants (prepare_module): one a forward pass
        changed, in place or by reassignment, is state the replay does not carry."""
        for c in self.constants:
            if c.changed():
                raise ReplayError(
                    f"{c.where} changed its buffer {c.name!r} in a forward pass; fastreplay "
                    "replays running statistics of BatchNorm only and keeps every other buffer "
                    "constant: stop updating it, or make it a fixed tensor")
