"""Whole-run data attribution for a user-written CNN with stock BatchNorm2d on CIFAR-10.

What it shows: a network written the way users write them (``nn.Conv2d`` + ``nn.BatchNorm2d``
+ GELU blocks, nothing from fastreplay) trained on real CIFAR-10 through the own-task API, its
BatchNorm running statistics carried exactly through the replay. CIFAR-10 is read from
``$CIFAR_ROOT`` (the standard ``cifar-10-batches-py`` directory; ``fastreplay magic --download``
with a preset fetches it once).

On a CPU (``make_task``: the first 5,000 training and 1,000 test images, halved to 16x16),
about a minute for ``magic`` and three for ``lds`` on 2 cores (``OMP_NUM_THREADS=1``):

    python -m fastreplay magic --preset test --config examples/cifar_cnn.toml \
        --task examples/cifar_cnn.py:make_task --targets 0:2 --run-dir runs/cifar-cnn
    python -m fastreplay lds --run-dir runs/cifar-cnn --task examples/cifar_cnn.py:make_task \
        --models 16 --keep 0.99

Measured there (2026-12-01, benchmarks/RESULTS.md): 43.9% test accuracy, training 10-15 s,
replay 27 s per target, and the whole-run scores predict retraining: LDS 0.87 [0.76, 1.05] on
test 0..1 and 0.77 [0.58, 1.02] on test 100..101 (keep 0.99, weight removal, 16 models,
bias-corrected jackknife interval).

On a GPU at full size (``make_full_task``: all 50,000 / 10,000 images at 32x32), the same commands with
``--task examples/cifar_cnn.py:make_full_task --set device=cuda --set train.dtype=float32``.
"""
from __future__ import annotations

import numpy as np
import torch.nn as nn

from fastreplay.data import default_root, load_cifar10, subsample
from fastreplay.task import Task

WIDTH = 16
"""Channels of the first block (the second has twice as many)."""


def block(c_in: int, c_out: int) -> nn.Sequential:
    """conv -> BatchNorm2d -> GELU -> 2x2 average pool: BatchNorm before the activation and
    average pooling keep the training run smooth, so its whole-run scores predict retraining."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.GELU(), nn.AvgPool2d(2))


def build_model() -> nn.Module:
    return nn.Sequential(block(3, WIDTH), block(WIDTH, 2 * WIDTH), block(2 * WIDTH, 2 * WIDTH),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * WIDTH, 10))


def halve(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, 32, 32) -> (N, 3, 16, 16) by 2x2 averages: a quarter of the compute."""
    n, c, h, w = images.shape
    return images.reshape(n, c, h // 2, 2, w // 2, 2).mean((3, 5)).round().astype(np.uint8)


def make_task(num_train: int = 5000, num_test: int = 1000, full_size: bool = False) -> Task:
    """The CNN on a fixed sample of (at most) ``num_train`` training and ``num_test`` test
    images of CIFAR-10 (fastreplay.data.subset), at 16x16 unless ``full_size`` (uint8 images:
    normalised per channel, and cropped and flipped when ``data.augment``)."""
    data = load_cifar10(default_root())
    subsample(data, min(num_train, len(data.train_x)), min(num_test, len(data.test_x)))
    if not full_size:
        data.train_x, data.test_x = halve(data.train_x), halve(data.test_x)
    return Task(model=build_model, data=data)


def make_full_task() -> Task:
    """All 50,000 training and 10,000 test images at 32x32 (for a GPU)."""
    return make_task(50_000, 10_000, full_size=True)
