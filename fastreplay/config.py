"""Typed, validated run configuration: presets, TOML files and dotted ``--set`` overrides.

Precedence: preset < config file < overrides. Configs are immutable (frozen dataclasses): a
resolved option is a new config (``with_values``), never an edit of one somebody else holds.
The resolved config is saved in every run store, and the part that determines the training
trajectory is hashed into a fingerprint, so a store is never reused for a different run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import tomllib

from .exceptions import ConfigError


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"
    """Data set: "cifar10" (standard cifar-10-batches-py directory) or "synthetic"."""
    root: str = ""
    """Directory holding cifar-10-batches-py/ (or its parent); empty: $CIFAR_ROOT, else ~/.cache/fastreplay/cifar10."""
    num_train: int = 256
    """Training examples used (a prefix of the training set); 0 = all."""
    num_test: int = 64
    """Test examples available as measurement targets (a prefix of the test set); 0 = all."""
    image_size: int = 8
    """Image side in pixels (CIFAR-10 is 32)."""
    num_classes: int = 10
    augment: bool = True
    """Random crop (padding ``crop_padding``) and horizontal flip, a pure function of (seed, step, position)."""
    crop_padding: int = 2
    label_noise: float = 0.0
    """Fraction of training labels flipped to another class (a pure function of
    data.label_noise_seed): a benchmark for finding harmful data (`fastreplay debug`)."""
    label_noise_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny-cnn"
    """resnet9 | tiny-cnn | mlp."""
    width: float = 1.0
    """Channel multiplier (resnet9: 64-128-256-512 at width 1)."""
    activation: str = "gelu"
    """gelu (smooth: finite differences and LDS behave) or relu."""
    pool: str = "avg"
    """resnet9's pooling: avg (smooth) or max for its 2x downsamplings and its global pool; lse
    for a log-sum-exp global pool, eps * log(mean over H x W of exp(x / eps)) (a smooth max:
    max as lse_eps -> 0, mean as lse_eps -> inf), with max downsamplings unless
    ``inner_pool`` says otherwise (the airbench/MAGIC-style net max-pools inside)."""
    lse_eps: float = 0.1
    """Temperature of the lse global pool (model.pool=lse), in activation units: lower is
    closer to max and less smooth."""
    inner_pool: str = ""
    """resnet9's 2x downsamplings: avg or max; empty: what ``pool`` implies (pool itself for
    avg and max, max for lse)."""
    output_scale: float = 0.125
    """Logits are multiplied by this (small values make training smoother)."""
    bn_momentum: float = 0.1
    """rho in b <- (1 - rho) b + rho s (PyTorch convention)."""
    hidden: int = 32
    """Hidden units of the mlp."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    optimizer: str = "sgd"
    """sgd (momentum, optionally Nesterov), adam (weight decay added to the gradient, as
    torch.optim.Adam) or adamw (decoupled weight decay, as torch.optim.AdamW); each with its
    exact adjoint (docs/design.md §3)."""
    lr: float = 0.1
    """Peak learning rate (base lr of the schedule)."""
    momentum: float = 0.9
    """SGD's momentum (adam/adamw use beta1)."""
    nesterov: bool = True
    weight_decay: float = 5e-4
    """Applied to conv/linear weights only (never BatchNorm parameters or biases)."""
    beta1: float = 0.9
    """adam/adamw: decay of the first moment."""
    beta2: float = 0.999
    """adam/adamw: decay of the second moment."""
    eps: float = 1e-8
    """adam/adamw: added to the root of the second moment, as in torch."""
    eps_root: float = 0.0
    """adam/adamw: added inside the root, sqrt(v_hat + eps_root) (optax's eps_root). A
    positive value keeps the adjoint finite where a second moment is 0 and makes the run
    smoother to attribute (1e-8 to 1e-6 are typical)."""
    schedule: str = "onecycle"
    """constant | onecycle (linear warm-up to the peak, then linear decay) | cosine (linear
    warm-up to the peak, then cosine decay: the fine-tuning schedule of transformers'
    get_cosine_schedule_with_warmup)."""
    peak_at: float = 0.25
    """Fraction of training at which onecycle and cosine reach the peak (the warm-up)."""
    start_factor: float = 0.1
    end_factor: float = 0.0
    clip_norm: float = 0.0
    """Global gradient-norm clipping: each step's gradient g (of the data-weighted loss, before
    weight decay) is scaled by min(1, clip_norm / (||g|| + 1e-6)), as
    torch.nn.utils.clip_grad_norm_ does; 0 = off. Differentiated exactly, clipped steps
    included (docs/design.md §3, "Gradient clipping")."""
    micro_batch: int = 0
    """Gradient accumulation: each step's gradient is the sum of the gradients of consecutive
    micro-batches of this many examples (it must divide train.batch_size), the same step as one
    batch in exact arithmetic, in less memory; 0 = one pass per batch. Not with BatchNorm (its
    batch statistics would be the micro-batch's)."""
    bias_lr_scale: float = 1.0
    """Learning-rate multiplier for the no-decay group (BatchNorm parameters and biases)."""
    lr_convention: str = "mean"
    """What lr and weight_decay mean. mean: the step's own eta and lambda (mean loss over the
    batch, docs/design.md §2). airbench: airbench94's decoupled hyperparameters (lr per 1024
    examples, weight_decay per 1024 examples decoupled from the lr, summed loss), converted
    once into the mean-loss step by core/lr.py (lr_table, weight_decays; docs/design.md
    §2, "The airbench convention")."""
    label_smoothing: float = 0.0
    dtype: str = "float64"
    """float32 | float64."""
    tf32: bool = False
    """Allow TF32 matmuls/convs on CUDA (faster, still deterministic, not bitwise fp32)."""
    channels_last: bool = False
    """Run convolutions in NHWC layout (faster on tensor-core GPUs; changes rounding, so it is
    part of the run's fingerprint)."""
    bf16: bool = False
    """Mixed precision: convolutions and matmuls in bfloat16 (inputs and weights cast, bf16
    outputs); BatchNorm, activations, parameters, optimizer and losses in float32. Needs dtype
    float32. Training, replay and retraining run the same network, so scores are the exact
    derivatives of that network's run."""


@dataclass(frozen=True)
class MeasureConfig:
    kind: str = "loss"
    """loss (cross-entropy of the target in eval mode) or margin (correct logit minus logsumexp of the others)."""
    reduce: str = "none"
    """none: one measurement (and one row of scores) per target; mean: one measurement, the
    mean over the targets (a group: the whole test set, a class, a slice), and one row of scores
    for it, stored under the group's name (score_name)."""
    tta: str = "none"
    """Test-time augmentation of the reported test ACCURACY only: none, or flip (average the
    logits of each image and its horizontal mirror). Measurements, and so scores, never use
    it: they stay the plain eval-mode outputs the scores differentiate."""


@dataclass(frozen=True)
class ReplayConfig:
    checkpoint_every: int = 8
    """Steps between stored checkpoints; replay recomputes the steps in between."""
    schedule: str = "interval"
    """How states between stored checkpoints are rebuilt: every (every state stored, needs
    checkpoint_every = 1: nothing to rebuild, most disk), interval (keep the whole segment in
    memory, one extra forward pass) or tree (REPLAY's lazy k-ary tree: O(k log_k L) states)."""
    tree_arity: int = 4
    """k of the tree schedule."""
    start_step: int = 0
    """Data weights act from this step on (attribution window); the reverse pass stops here."""
    window_epochs: float = 0.0
    """When > 0: attribute only the last this-many epochs (sets start_step once the number of
    steps is known; the saved config holds the resolved start_step). Excludes start_step."""
    backend: str = "auto"
    """Optimizer-adjoint implementation: auto | fused | reference."""
    target_batch: int = 16
    """Measurements replayed together in one reverse pass."""
    hvp: str = "auto"
    """How a reverse step gets H v and the weight term: reverse (double backward), forward
    (forward-over-reverse, torch.func.jvp, one measurement per pass), forward-vmap (the K
    measurements of a pass vmapped through one primal pass: 1.7x faster at K = 10 in fp32 on
    the H100, ~5.5 GB more GPU memory per measurement; their last bits depend on the pass)
    or auto (CUDA: forward-vmap for K > 1, forward for K = 1; CPU: reverse, which is faster
    there), falling back forward-vmap -> forward -> reverse with a warning where a mode runs
    out of memory (vmap) or torch cannot vmap or forward-differentiate the model. Same values
    up to rounding."""
    compile: bool = False
    """torch.compile the forward-over-reverse step (hvp auto, forward, forward-vmap): fuses the
    elementwise tangent work; one compilation per process and pass size (about a minute for
    resnet9 on the H100); values equal to the eager step's up to rounding (3e-4 relative l2
    on the fp32 full preset, 2e-14 in float64)."""


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that determines the trained trajectory and its checkpoints."""
        d = self.to_dict()
        d.pop("measure")
        d["replay"] = {"checkpoint_every": self.replay.checkpoint_every}
        d.pop("device")
        # Keys added later are hashed only away from their defaults, so that older runs
        # (made before the key existed, hence at its default) keep their fingerprints.
        for section, key in KEYS_ADDED_LATER:
            if d[section][key] == getattr(getattr(RunConfig(), section), key):
                d[section].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = ("data", "model", "train", "measure", "replay")

KEYS_ADDED_LATER = (("train", "bf16"), ("train", "lr_convention"), ("model", "lse_eps"),
                    ("model", "inner_pool"), ("train", "optimizer"), ("train", "beta1"),
                    ("train", "beta2"), ("train", "eps"), ("train", "eps_root"),
                    ("data", "label_noise"), ("data", "label_noise_seed"),
                    ("train", "clip_norm"), ("train", "micro_batch"))
"""Trajectory keys the fingerprint leaves out while they hold their defaults."""

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
"""The device names a config (or `bench --device`) accepts."""

SEED_MAX = 2**32 - 1
"""Seeds (``seed``, ``lds --mask-seed``, ``smoothness --seed``) lie in 0..SEED_MAX: NumPy's
generators refuse negative seeds and 32 bits are plenty of distinct runs."""

# Bounds on every integer of a config, checked before anything is allocated: a typo such as
# train.epochs=99999999999999999999 must be a one-line error, not minutes of swapping and then a
# MemoryError. They lie far beyond any run fastreplay is meant for (the full recipe: 50,000
# CIFAR-10 images of 32x32, 16 epochs of batch 512). The optional third entry says why.
INT_LIMITS: dict[str, tuple[int, int, str]] = {
    "seed": (0, SEED_MAX, ""),
    "data.num_train": (0, 1_000_000, "0 = all"),
    "data.num_test": (0, 1_000_000, "0 = all"),
    "data.image_size": (4, 256, ""),
    "data.num_classes": (2, 1000, ""),
    "data.crop_padding": (0, 255, ""),
    "data.label_noise_seed": (0, SEED_MAX, ""),
    "model.hidden": (1, 65_536, ""),
    "train.epochs": (1, 1000, ""),
    "train.batch_size": (2, 65_536, "BatchNorm needs two examples"),
    "train.micro_batch": (0, 65_536, "0 = off"),
    "replay.checkpoint_every": (1, 1_000_000_000, ""),
    "replay.tree_arity": (2, 1024, ""),
    "replay.start_step": (0, 1_000_000_000, ""),
    "replay.target_batch": (1, 100_000, ""),
}
MAX_WIDTH = 8.0
"""model.width at most 8 (resnet9 at width 8 has 420M parameters)."""

PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on a CPU laptop, and smooth: the whole run is attributed and the scores predict
    # retraining. A small CNN (conv-BN-GELU, average pooling; width 1 = 16 channels, 2,970
    # parameters) on a fixed sample of 5,000 CIFAR-10 training images, 8 epochs of batch 100
    # (400 steps), Nesterov SGD 0.9, one-cycle to a moderate lr 0.02, float32. Measured on 2 CPU
    # cores (benchmarks/RESULTS.md, 2026-12-01): 35.2% test accuracy (a fixed sample of 1,000
    # test images), training about 10 s, replay about 26 s per target, an LDS retraining about
    # 10 s (quiet machine); whole-run LDS (weight removal, keep 0.99, float32, bias-corrected
    # jackknife interval, 16 models) 0.996 [0.989, 1.008] on test 0..2 and 0.992 [0.987, 1.008] on
    # test 100..104. At the old lr 0.4 (width 2) the whole run was chaotic.
    "quick": {
        "device": "cpu",
        "data": {"name": "cifar10", "num_train": 5000, "num_test": 1000, "image_size": 32,
                 "crop_padding": 4},
        "model": {"name": "tiny-cnn", "width": 1.0},
        "train": {"epochs": 8, "batch_size": 100, "lr": 0.02, "dtype": "float32",
                  "schedule": "onecycle", "weight_decay": 5e-4},
        "replay": {"checkpoint_every": 20},
    },
    # The GPU recipe: ResNet-9 on all of CIFAR-10, 16 epochs (1,552 steps, 90.05% test accuracy
    # on the H100 with TF32), attributed over its last epoch (steps 1455..1551): over the whole
    # run the scores are exact but the run is chaotic (benchmarks/RESULTS.md); set
    # replay.window_epochs=0 to attribute all of it. One checkpoint per epoch: 0.87 GB on disk.
    "full": {
        "device": "auto",
        "data": {"name": "cifar10", "num_train": 0, "num_test": 0, "image_size": 32,
                 "crop_padding": 4},
        "model": {"name": "resnet9", "width": 1.0, "activation": "gelu", "pool": "max",
                  "output_scale": 0.125},
        "train": {"epochs": 16, "batch_size": 512, "lr": 0.4, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4, "schedule": "onecycle", "peak_at": 0.2,
                  "start_factor": 0.1, "end_factor": 0.0, "label_smoothing": 0.2,
                  "dtype": "float32", "channels_last": True},
        "replay": {"checkpoint_every": 97, "target_batch": 10, "window_epochs": 1.0},
    },
    # Tests: float64 synthetic data, small enough for finite differences.
    "test": {"device": "cpu"},
}


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare strings: --set model.name=resnet9


def _merge(base: dict, update: dict, where: str = "") -> None:
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key {path!r}; known keys here: {known}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a table; set its fields as {path}.FIELD")
            _merge(base[key], value, path + ".")
        else:
            base[key] = value


def _coerce(value: Any, default: Any, path: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # a TOML integer beyond any float: --set train.lr=1000...0
                raise ConfigError(f"config key {path!r} is too large for a number; use a "
                                  "finite number, e.g. 1e9") from None
    elif isinstance(default, str):
        return str(value)
    raise ConfigError(f"config key {path!r} must be a {type(default).__name__}, got {value!r}")


def _build(d: dict) -> RunConfig:
    defaults = RunConfig()
    kwargs = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            section_default = getattr(defaults, f.name)
            sub = {g.name: _coerce(d[f.name][g.name], getattr(section_default, g.name),
                                   f"{f.name}.{g.name}")
                   for g in dataclasses.fields(section_default)}
            kwargs[f.name] = type(section_default)(**sub)
        else:
            kwargs[f.name] = _coerce(d[f.name], getattr(defaults, f.name), f.name)
    return RunConfig(**kwargs)


def _flat_values(cfg: RunConfig) -> dict[str, Any]:
    """Every value of ``cfg`` by its dotted name (seed, data.num_train, ...)."""
    out: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def check_bounds(cfg: RunConfig) -> None:
    """Every number finite and every integer within INT_LIMITS: huge values must fail here,
    before they are used to size an array."""
    for path, value in _flat_values(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value} is not a finite number; use a finite value")
        if path in INT_LIMITS:
            lo, hi, why = INT_LIMITS[path]
            if not lo <= value <= hi:
                raise ConfigError(f"{path}={value} is out of range; use {lo}..{hi}"
                                  + (f" ({why})" if why else ""))


def validate(cfg: RunConfig) -> RunConfig:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    check_bounds(cfg)
    need(cfg.data.name in ("cifar10", "synthetic"), f"data.name={cfg.data.name!r}: use cifar10 or synthetic")
    need(cfg.data.crop_padding < cfg.data.image_size, "data.crop_padding must be in [0, image_size)")
    if cfg.data.name == "cifar10":
        need(cfg.data.image_size == 32 and cfg.data.num_classes == 10,
             "CIFAR-10 has 32x32 images and 10 classes: set data.image_size=32, data.num_classes=10")
    need(cfg.model.name in ("resnet9", "tiny-cnn", "mlp"), f"model.name={cfg.model.name!r}: use resnet9, tiny-cnn or mlp")
    need(cfg.model.activation in ("gelu", "relu"), "model.activation must be gelu or relu")
    need(cfg.model.pool in ("avg", "max", "lse"), "model.pool must be avg, max or lse")
    need(cfg.model.lse_eps > 0, "model.lse_eps must be > 0")
    need(cfg.model.inner_pool in ("", "avg", "max"),
         "model.inner_pool must be avg or max (or empty: what model.pool implies)")
    need(cfg.model.width > 0 and cfg.model.output_scale > 0, "model.width and model.output_scale must be > 0")
    need(cfg.model.width <= MAX_WIDTH, f"model.width={cfg.model.width:g} is too large; use at most "
         f"{MAX_WIDTH:g}")
    need(0 < cfg.model.bn_momentum <= 1, "model.bn_momentum must be in (0, 1]")
    t = cfg.train
    # train.batch_size against the number of examples: checked by the Recipe against the data
    # it actually has (a task's own data ignores data.num_train).
    need(t.lr > 0, "train.lr must be > 0")
    need(0 <= t.momentum < 1, "train.momentum must be in [0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    need(t.schedule in ("constant", "onecycle", "cosine"),
         "train.schedule must be constant, onecycle or cosine")
    need(t.clip_norm >= 0, "train.clip_norm must be >= 0 (0 = no clipping)")
    need(t.micro_batch >= 0 and (t.micro_batch == 0 or t.batch_size % t.micro_batch == 0),
         f"train.micro_batch={t.micro_batch} must divide train.batch_size={t.batch_size} (0 = "
         "no accumulation)")
    need(0 < t.peak_at < 1, "train.peak_at must be in (0, 1)")
    need(t.start_factor >= 0 and t.end_factor >= 0, "train.start_factor/end_factor must be >= 0")
    need(t.bias_lr_scale > 0, "train.bias_lr_scale must be > 0")
    need(t.lr_convention in ("mean", "airbench"), "train.lr_convention must be mean or airbench")
    need(t.optimizer in ("sgd", "adam", "adamw"),
         f"train.optimizer={t.optimizer!r}: use sgd, adam or adamw")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    need(t.eps >= 0 and t.eps_root >= 0, "train.eps and train.eps_root must be >= 0")
    need(t.optimizer == "sgd" or t.eps > 0 or t.eps_root > 0,
         "train.eps and train.eps_root are both 0, so an Adam step divides by 0 where a second "
         "moment is 0; set --set train.eps=1e-8 (or train.eps_root)")
    need(t.optimizer == "sgd" or t.lr_convention == "mean",
         f"train.lr_convention=airbench describes airbench's SGD; with train.optimizer="
         f"{t.optimizer} use train.lr_convention=mean")
    need(0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
    need(t.dtype in ("float32", "float64"), f"train.dtype={t.dtype!r}: use float32 or float64")
    need(not t.bf16 or t.dtype == "float32",
         "train.bf16 mixes bfloat16 into a float32 run; add --set train.dtype=float32")
    need(cfg.measure.kind in ("loss", "margin"), f"measure.kind={cfg.measure.kind!r}: use loss or margin")
    need(cfg.measure.tta in ("none", "flip"), "measure.tta must be none or flip")
    need(cfg.measure.reduce in ("none", "mean"), "measure.reduce must be none or mean")
    need(0 <= cfg.data.label_noise < 1, "data.label_noise must be in [0, 1)")
    r = cfg.replay
    need(r.window_epochs >= 0, "replay.window_epochs must be >= 0 (0 = no window)")
    need(r.window_epochs == 0 or r.start_step == 0,
         f"replay.window_epochs={r.window_epochs:g} and replay.start_step={r.start_step} both set "
         "the attribution window; set one (the other to 0)")
    need(r.schedule in ("every", "interval", "tree"), "replay.schedule must be every, interval or tree")
    need(r.schedule != "every" or r.checkpoint_every == 1,
         f"replay.schedule=every stores every state, but replay.checkpoint_every="
         f"{r.checkpoint_every}; set --set replay.checkpoint_every=1 (or use interval/tree)")
    need(r.backend in ("auto", "fused", "reference"), "replay.backend must be auto, fused or reference")
    need(r.hvp in ("auto", "reverse", "forward", "forward-vmap"),
         f"replay.hvp={r.hvp!r}: use auto, reverse, forward or forward-vmap")
    need(not (r.compile and r.hvp == "reverse"),
         "replay.compile applies to the forward-over-reverse step; use --set replay.hvp=forward "
         "(or auto) with it, or drop replay.compile")
    need(DEVICE_NAME.fullmatch(cfg.device) is not None,
         f"device={cfg.device!r}: use auto, cpu, cuda or cuda:N")
    return cfg


def _read_toml(path: Path) -> dict:
    """The tables of a --config file; anything that is not a readable UTF-8 TOML file (a
    directory, a binary file, a typo) is a one-line ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a TOML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror or exc}); check its "
                          "permissions") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {byte:#04x} at offset "
                          f"{exc.start}); pass a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(preset: str = "quick", config_file: Optional[str | os.PathLike] = None,
                overrides: Optional[list[str]] = None) -> RunConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    d = RunConfig().to_dict()
    _merge(d, PRESETS[preset])
    if config_file:
        _merge(d, _read_toml(Path(config_file)))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.4")
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = _parse_value(raw.strip())
        _merge(d, nested)
    return validate(_build(d))


def with_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with the dotted keys in ``values`` replaced ({"device": "cuda:1",
    "replay.start_step": 97}), validated like any other config."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        section, _, key = path.rpartition(".")
        if section:
            sections.setdefault(section, {})[key] = value
        else:
            top[key] = value
    for section, changes in sections.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **changes)
    return validate(dataclasses.replace(cfg, **top))


def score_name(cfg: RunConfig, group: str | None = None) -> str:
    """Where a run's scores live in its store: the measurement kind, plus the attribution window
    when there is one (scores of different windows are different quantities); a group's
    (measure.reduce=mean) under its own name, so that several groups live side by side."""
    kind, start = cfg.measure.kind, cfg.replay.start_step
    name = kind if group is None else f"{kind}_mean_{group}"
    return name if start == 0 else f"{name}_from{start}"


def config_from_dict(d: dict) -> RunConfig:
    """Rebuild a config saved in a run store (unknown keys are an error, so stores stay honest)."""
    base = RunConfig().to_dict()
    _merge(base, d)
    return validate(_build(base))


def stored_config(store) -> RunConfig:
    """The config a run store holds, verified against the fingerprint recorded with it: a hand
    edit of the stored config (say its lr) would otherwise retrain LDS models with a recipe the
    scores never saw, and report a wrong figure in silence."""
    from .exceptions import StoreError
    fix = ("restore the store's zarr.json from a copy, or rerun `fastreplay magic` with --force "
           "(or another --run-dir) to train again")
    try:
        cfg = config_from_dict(store.config)
    except ConfigError as exc:
        raise StoreError(f"the config stored in {store.path} was edited or corrupted ({exc}); "
                         f"{fix}") from None
    if cfg.fingerprint() != store.fingerprint:
        raise StoreError(f"the config stored in {store.path} was edited or corrupted: it no "
                         f"longer matches the run's fingerprint ({cfg.fingerprint()} != "
                         f"{store.fingerprint}); {fix}")
    return cfg


def to_toml(cfg: RunConfig, unused: tuple[str, ...] | list[str] = ()) -> str:
    """TOML text of a config (for show-config and the resolved config saved next to each run);
    ``unused``: dotted keys the run never reads (a task's own model or data), said in a comment."""
    d = cfg.to_dict()
    lines = []
    if unused:
        lines.append("# Not read by this run (its task brings its own model or data): "
                     + ", ".join(unused))
    lines += [f"{k} = {json.dumps(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for k, v in d[section].items():
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"
