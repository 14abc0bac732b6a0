"""Where and how the arithmetic runs: device, dtype, determinism and the kernel backends.

Resolved once per process from the config; training, replay and retraining read it from here
so that a replay recomputes the forward steps with exactly the kernels that trained the run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..exceptions import ConfigError
from .kernels import resolve_backend

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


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    step_backend: str
    """Kernels of the forward optimizer step: always the best available ones; a replay must
    recompute states with the same ones (checked against the store)."""
    adjoint_backend: str
    """Kernels of the optimizer's adjoint (replay.backend resolved)."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "Runtime":
        """Resolve the device and backends and make this process deterministic."""
        device = resolve_device(cfg.device)
        configure_determinism(device, cfg.train.tf32)
        return cls(device, DTYPES[cfg.train.dtype], resolve_backend("auto", device),
                       resolve_backend(cfg.replay.backend, device))


THREADS_ATTR = "cpu_threads"


def run_threads(device: torch.device) -> dict:
    """The store attribute recording the intra-op thread count of a CPU run: on the CPU the
    count changes how matrix products split their sums, hence their last bits (seen with GPT-2),
    so every process that steps the run (resuming, rebuilding, retraining) must use it."""
    return {THREADS_ATTR: torch.get_num_threads()} if device.type == "cpu" else {}


@contextlib.contextmanager
def threads_of(store, device: torch.device):
    """Run the body with the run's recorded intra-op thread count (CPU runs; stores made before
    it was recorded run as they are), then restore this process's own."""
    recorded = store.get_attr(THREADS_ATTR) if device.type == "cpu" else None
    before = torch.get_num_threads()
    if recorded and recorded != before:
        torch.set_num_threads(int(recorded))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def use_run_threads(store, device: torch.device) -> None:
    """This process steps the run with its recorded CPU thread count from here on (a command
    working on one stored run: lds, smoothness, debug)."""
    recorded = store.get_attr(THREADS_ATTR) if device.type == "cpu" else None
    if recorded:
        torch.set_num_threads(int(recorded))
