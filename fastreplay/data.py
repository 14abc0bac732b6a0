"""Data sets on the device, and the deterministic batch order and augmentation.

Exact replay and counterfactual retraining need every run to see the same inputs: the batch
order is a function of (seed, epoch) and each example's crop and flip a function of
(seed, step, position in the batch), drawn on the CPU with NumPy so they do not depend on the
device. Images stay uint8 on the device; normalisation happens per batch.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig, RunConfig
from .exceptions import ConfigError, DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]


@dataclass
class ImageData:
    """uint8 images (N, C, H, W) and int64 labels, on the CPU."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple


def default_root() -> str:
    return os.environ.get("CIFAR_ROOT") or str(Path.home() / ".cache" / "fastreplay" / "cifar10")


def _batches_dir(root: Path) -> Path:
    return root if (root / "test_batch").exists() else root / "cifar-10-batches-py"


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 file {path} is missing; pass --download or point data.root "
                        "at a directory holding cifar-10-batches-py/") from None
    except Exception as exc:
        raise DataError(f"CIFAR-10 file {path} is unreadable ({type(exc).__name__}); "
                        "delete it and re-download with --download") from None
    # Both pickle key styles occur: bytes keys (Python 2 pickles) and str keys.
    get = lambda k: batch.get(k.encode(), batch.get(k))  # noqa: E731
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise DataError(f"CIFAR-10 file {path} has no data/labels entries; is it a CIFAR-10 batch?")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"CIFAR-10 file {path} has data of shape {data.shape}, expected (n, 3072) "
                        "with one label per row; re-download it with --download")
    return data.reshape(-1, 3, 32, 32), labels


def _download_cifar10(root: str) -> None:
    """Fetch and unpack the official archive into ``root``. No network, a proxy, a full disk or
    a broken archive is a one-line DataError (the user can fetch the archive by other means)."""
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError:
        raise DataError("--download needs torchvision (pip install torchvision); or put "
                        f"cifar-10-batches-py/ under {root} yourself") from None
    try:
        download_and_extract_archive(CIFAR10_URL, download_root=root)
    except Exception as exc:  # URLError, HTTPError, OSError, tarfile errors, checksum mismatch
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not download CIFAR-10 from {CIFAR10_URL} ({type(exc).__name__}: "
                        f"{reason[:200]}); fetch and unpack that archive under {root} yourself, "
                        "or point $CIFAR_ROOT / data.root at a copy") from None


def load_cifar10(root: str, download: bool = False) -> ImageData:
    base = _batches_dir(Path(root))
    if not (base / "test_batch").exists():
        if not download:
            raise DataError(f"CIFAR-10 not found under {root} (expected cifar-10-batches-py/); "
                            "pass --download, set $CIFAR_ROOT, or set data.root")
        _download_cifar10(root)
        base = _batches_dir(Path(root))
    parts = [_read_batch(base / f) for f in _TRAIN_FILES]
    test_x, test_y = _read_batch(base / _TEST_FILES[0])
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return ImageData(train_x, train_y, test_x, test_y, CIFAR10_CLASSES)


def make_synthetic(cfg: DataConfig, seed: int) -> ImageData:
    """Learnable toy images: a class-dependent smooth pattern plus noise (deterministic in seed)."""
    rng = np.random.default_rng([seed, 7])
    n_train, n_test = cfg.num_train or 256, cfg.num_test or 64
    s, c = cfg.image_size, cfg.num_classes
    prototypes = rng.normal(0, 1, size=(c, 3, s, s))
    prototypes = 0.5 * (prototypes + np.roll(prototypes, 1, axis=-1))

    def draw(n):
        y = rng.integers(0, c, size=n)
        x = prototypes[y] + rng.normal(0, 1.0, size=(n, 3, s, s))
        return np.clip(128 + 40 * x, 0, 255).astype(np.uint8), y.astype(np.int64)

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return ImageData(train_x, train_y, test_x, test_y, tuple(f"class{i}" for i in range(c)))


SUBSET_SEED = 0
"""Seed of the fixed sample a smaller run takes (data.num_train / data.num_test)."""


def subset(n: int, have: int) -> np.ndarray:
    """Which of ``have`` stored examples a run of ``n`` uses: all when n is 0 or ``have``, else a
    fixed random sample, kept in stored order. Not a prefix: a copy of a data set may be stored
    sorted by class (CIFAR-10's test batch is, as some converters write it), and a prefix of it
    would hold a single class."""
    if n in (0, have):
        return np.arange(have)
    return np.sort(np.random.default_rng([SUBSET_SEED, have]).choice(have, size=n, replace=False))


def subsample(data: ImageData, num_train: int, num_test: int) -> None:
    """Keep ``num_train`` training and ``num_test`` test examples (0: all), chosen by subset."""
    train = subset(num_train, len(data.train_x))
    test = subset(num_test, len(data.test_x))
    data.train_x, data.train_y = data.train_x[train], data.train_y[train]
    data.test_x, data.test_y = data.test_x[test], data.test_y[test]


def load_data(cfg: RunConfig, download: bool = False) -> ImageData:
    d = cfg.data
    if d.name == "synthetic":
        data = make_synthetic(d, cfg.seed)
    else:
        data = load_cifar10(d.root or default_root(), download=download)
    for what, n, have in (("num_train", d.num_train, len(data.train_x)),
                          ("num_test", d.num_test, len(data.test_x))):
        if n > have:
            raise DataError(f"data.{what}={n} but the data set has only {have} examples")
    subsample(data, d.num_train, d.num_test)
    if data.train_y.max() >= d.num_classes or data.train_y.min() < 0:
        raise DataError(f"labels outside [0, {d.num_classes}); check data.num_classes")
    if d.label_noise > 0:
        data.train_y = flip_labels(data.train_y, d.label_noise, d.num_classes, d.label_noise_seed)
    return data


def flipped_examples(num_train: int, fraction: float, seed: int) -> np.ndarray:
    """The training ids whose labels data.label_noise flips: round(fraction N) of them, a pure
    function of (N, fraction, seed)."""
    rng = np.random.default_rng([seed, 2])
    return np.sort(rng.choice(num_train, size=round(fraction * num_train), replace=False))


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """A copy of ``labels`` with the flipped_examples moved to another class, drawn uniformly
    from the other num_classes - 1 (reproducibly)."""
    out = labels.copy()
    ids = flipped_examples(len(labels), fraction, seed)
    shift = np.random.default_rng([seed, 3]).integers(1, num_classes, size=len(ids))
    out[ids] = (out[ids] + shift) % num_classes
    return out


def check_image_data(data: ImageData, num_classes: int) -> ImageData:
    """A user's own ImageData, checked for what training and the store need: uint8 images
    (N, 3, H, W) of one square size in both splits, one integer label in [0, num_classes) per
    image. Labels become int64. Raises a one-line DataError naming what is wrong."""
    if not isinstance(data, ImageData):
        raise DataError(f"data must be a fastreplay.data.ImageData, not {type(data).__name__}; "
                        "build one from uint8 (N, 3, H, W) images and integer labels")
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"{split}_x must be a uint8 numpy array (N, 3, H, W), got "
                            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}; "
                            "scale images to 0..255 and put the channels first")
        if x.shape[2] != x.shape[3] or x.shape[2:] != data.train_x.shape[2:]:
            raise DataError(f"{split}_x images are {x.shape[2]}x{x.shape[3]}; train and test "
                            f"images must share one square size ({data.train_x.shape[2]}x"
                            f"{data.train_x.shape[3]} for train)")
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{split}_y must hold one integer label per image ({len(x)}), got "
                            f"{y.dtype} {y.shape}")
        if len(x) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{split}_y has labels outside [0, {num_classes}); set "
                            "data.num_classes to the number of classes")
        setattr(data, f"{split}_y", y.astype(np.int64))
    if len(data.train_x) == 0 or len(data.test_x) == 0:
        raise DataError("data needs at least one training and one test image")
    return data


def batch_schedule(num_train: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
    """(T, B) example indices: a fresh permutation per epoch, the incomplete last batch dropped."""
    per_epoch = num_train // batch_size
    rows = [np.random.default_rng([seed, 0, e]).permutation(num_train)[:per_epoch * batch_size]
            for e in range(epochs)]
    return np.concatenate(rows).reshape(epochs * per_epoch, batch_size).astype(np.int64)


def augmentation_draws(seed: int, step: int, batch_size: int, padding: int):
    """Crop offsets (dy, dx) and flip bits for each batch position at ``step``."""
    rng = np.random.default_rng([seed, 1, step])
    offsets = rng.integers(0, 2 * padding + 1, size=(2, batch_size))
    flips = rng.integers(0, 2, size=batch_size).astype(bool)
    return offsets[0], offsets[1], flips


class _SplitsOnDevice:
    """What training, replay and measurement read of any data on the device: ``train_x``,
    ``train_y``, ``test_x``, ``test_y`` (set by the subclass) and their sizes."""

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_x.shape[0]


class DeviceData(_SplitsOnDevice):
    """The data set as uint8 on the device, plus the normalisation and augmentation (the
    built-in crop and flip, or a task's own ``augment`` applied after normalising)."""

    images = True

    def __init__(self, data: ImageData, cfg: RunConfig, device: torch.device, dtype: torch.dtype,
                 augment=None):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.augment = augment
        self.class_names = data.class_names
        self.train_x = torch.from_numpy(data.train_x).to(device)
        self.train_y = torch.from_numpy(data.train_y).to(device)
        self.test_x = torch.from_numpy(data.test_x).to(device)
        self.test_y = torch.from_numpy(data.test_y).to(device)
        pixels = data.train_x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
        self.mean = torch.tensor(pixels.mean(1), dtype=dtype, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pixels.std(1) + 1e-8, dtype=dtype, device=device).view(1, 3, 1, 1)
        s = data.train_x.shape[-1]
        self._ar = torch.arange(s, device=device)

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.to(self.dtype) / 255.0 - self.mean) / self.std

    def train_batch(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        x = self.normalize(self.train_x[indices])
        if self.augment is not None:
            return self.augment(x, self.cfg.seed, step)
        d = self.cfg.data
        if not d.augment:
            return x
        p, n, s = d.crop_padding, x.shape[0], x.shape[-1]
        dy, dx, flip = augmentation_draws(self.cfg.seed, step, n, p)
        dy = torch.from_numpy(dy).to(self.device)
        dx = torch.from_numpy(dx).to(self.device)
        flip = torch.from_numpy(flip).to(self.device)
        # One gather does crop and flip: row/column index grids per example.
        rows = dy[:, None] + self._ar[None, :]
        cols_fwd = dx[:, None] + self._ar[None, :]
        cols = torch.where(flip[:, None], dx[:, None] + (s - 1 - self._ar)[None, :], cols_fwd)
        xp = F.pad(x, (p, p, p, p))
        b = torch.arange(n, device=self.device)[:, None, None, None]
        c = torch.arange(x.shape[1], device=self.device)[None, :, None, None]
        return xp[b, c, rows[:, None, :, None], cols[:, None, None, :]]

    def test_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.test_x[indices])

    def plain_train_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Training inputs as test inputs are fed: normalised, never augmented."""
        return self.normalize(self.train_x[indices])


def _as_tensor(a, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    except Exception:
        raise DataError(f"ArrayData.{what} must be a numpy array or tensor, not "
                        f"{type(a).__name__}") from None
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"ArrayData.{what} has dtype {t.dtype}; use a real number type")
    return t.detach().cpu()


def _finite(t: torch.Tensor, what: str, role: str) -> torch.Tensor:
    """``t`` (N, ...) in the run's dtype, refused when an example holds NaN or inf (also a
    float64 value too large for float32): the first step's loss would be NaN, or a test
    measurement and its scores would be, with nothing saying which example did it."""
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        value = t[i][~torch.isfinite(t[i])].reshape(-1)[0].item()
        raise DataError(f"ArrayData.{what} holds {value} in example {i} (as "
                        f"{str(t.dtype).removeprefix('torch.')}); "
                        f"{role} must be finite: drop or fix that example (e.g. impute NaNs, "
                        "clip huge values) before building the ArrayData")
    return t


class ArrayDeviceData(_SplitsOnDevice):
    """A task's ArrayData on the device: inputs as given (floating ones in the run's dtype),
    optionally augmented by the task's own pure function of (batch, seed, step)."""

    images = False

    def __init__(self, data, cfg: RunConfig, device: torch.device, dtype: torch.dtype,
                 augment=None):
        self.cfg, self.device, self.dtype, self.augment = cfg, device, dtype, augment
        self.class_names = data.class_names
        for split in ("train", "test"):
            x = _as_tensor(getattr(data, f"{split}_x"), f"{split}_x")
            y = _as_tensor(getattr(data, f"{split}_y"), f"{split}_y")
            if x.dim() == 0 or y.dim() == 0 or len(x) != len(y) or len(x) == 0:
                raise DataError(f"ArrayData.{split}_x {tuple(x.shape)} and {split}_y "
                                f"{tuple(y.shape)} must hold the same number (>= 1) of examples "
                                "along their first dimension")
            if x.is_floating_point():
                x = _finite(x.to(dtype), f"{split}_x", "inputs")
            if y.is_floating_point():
                y = _finite(y.to(dtype), f"{split}_y", "targets")
            setattr(self, f"{split}_x", x.to(device))
            setattr(self, f"{split}_y", y.to(device))
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(f"ArrayData train inputs are {tuple(self.train_x.shape[1:])} per "
                            f"example but test inputs {tuple(self.test_x.shape[1:])}; they must "
                            "match")

    def train_batch(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        x = self.train_x[indices]
        return x if self.augment is None else self.augment(x, self.cfg.seed, step)

    def test_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.test_x[indices]

    def plain_train_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Training inputs as test inputs are fed: never augmented."""
        return self.train_x[indices]


def device_data(task, cfg: RunConfig, device: torch.device, dtype: torch.dtype):
    """The task's data on the device: ImageData (checked, normalised, built-in augmentation
    unless the task brings its own) or any other ArrayData."""
    if isinstance(task.data, ImageData):
        return DeviceData(check_image_data(task.data, cfg.data.num_classes), cfg, device, dtype,
                          task.augment)
    from .task import check_data_type
    check_data_type(task.data)
    if cfg.measure.tta != "none":
        raise ConfigError(f"measure.tta={cfg.measure.tta} mirrors images; this task's data are "
                          "not images: set measure.tta=none")
    return ArrayDeviceData(task.data, cfg, device, dtype, task.augment)
