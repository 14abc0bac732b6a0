"""A task that uses every Task option at once, for the exactness tests of the own-task path
(tests/test_task.py) and of `--task` on the CLI: tabular inputs (no images), stock BatchNorm1d
and LayerNorm, a custom per-example loss, a custom measurement, a seeded augmentation and a
weight-decay rule that makes two parameter groups other than the default ones."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastreplay.task import ArrayData, Task

FEATURES, CLASSES = 12, 3


def _split(n: int, rng: np.random.Generator):
    y = rng.integers(0, CLASSES, n)
    centres = np.linspace(-1, 1, CLASSES * FEATURES).reshape(CLASSES, FEATURES)
    return (centres[y] + rng.normal(0, 1, (n, FEATURES))).astype(np.float32), y


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16, momentum=0.3), nn.GELU(),
                         nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, CLASSES))


def loss(outputs, targets):
    """Cross-entropy plus a small penalty on the logits, per example."""
    return F.cross_entropy(outputs, targets, reduction="none") + 0.05 * outputs.pow(2).mean(1)


def log_likelihood(outputs, targets):
    """log p(target): higher is better, so registered as a "margin" kind."""
    return F.log_softmax(outputs, 1).gather(1, targets[:, None]).squeeze(1)


def jitter(x, seed: int, step: int):
    """Gaussian input noise drawn from a generator seeded by (seed, step): a pure function."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x + 0.1 * noise.to(x.device, x.dtype)


def decays(name: str, param) -> bool:
    """Weight decay (lr x1) for the first Linear layer only, bias included; every other
    parameter goes to the no-decay group (lr x train.bias_lr_scale)."""
    return name.startswith("0.")


def make_task() -> Task:
    rng = np.random.default_rng(5)
    (train_x, train_y), (test_x, test_y) = _split(48, rng), _split(8, rng)
    return Task(model=model, data=ArrayData(train_x, train_y, test_x, test_y, ("a", "b", "c")),
                loss=loss, measurements={"margin": log_likelihood}, augment=jitter,
                decays=decays)
