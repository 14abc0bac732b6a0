"""Chooses the implementation of the elementwise optimizer step and adjoint.

``backend="fused"`` calls the compiled custom ops ``torch.ops.fastreplay.*`` (csrc/), and
``backend="reference"`` the pure-PyTorch functions in :mod:`fastreplay.core.optim`. ``"auto"`` picks
fused when the extension loaded and has a kernel for the tensor's device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..exceptions import KernelError
from .optim import (adam_adjoint_reference, adam_step_reference, sgd_adjoint_reference,
                    sgd_step_reference)

_LOAD_ERROR: Optional[str] = None
try:  # the compiled extension registers torch.ops.fastreplay.* on import
    from .. import _C  # type: ignore[attr-defined]  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the build
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

BACKENDS = ("auto", "fused", "reference")


def extension_loaded() -> bool:
    return _LOAD_ERROR is None


def extension_error() -> Optional[str]:
    return _LOAD_ERROR


def cuda_kernels_built() -> bool:
    if not extension_loaded():
        return False
    try:
        return bool(torch.ops.fastreplay.built_with_cuda())
    except Exception:
        return False


def _fused_available(device: torch.device) -> bool:
    if not extension_loaded():
        return False
    return device.type == "cpu" or (device.type == "cuda" and cuda_kernels_built())


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend; refuse "fused" when it cannot run on ``device``."""
    if backend not in BACKENDS:
        raise KernelError(f"replay.backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "fused" if _fused_available(device) else "reference"
    if backend == "fused" and not _fused_available(device):
        why = _LOAD_ERROR or f"no {device.type} kernels in this build"
        raise KernelError(
            f"replay.backend=fused but the compiled extension cannot run on {device} ({why}); "
            "rebuild with `pip install --no-build-isolation -e .` or set replay.backend=reference"
        )
    return backend


def sgd_step_(theta, momentum, grad, group_ends: Sequence[int], lrs: Sequence[float],
              wds: Sequence[float], mu: float, nesterov: bool, backend: str) -> None:
    if backend == "fused":
        torch.ops.fastreplay.sgd_step_(theta, momentum, grad, list(map(int, group_ends)),
                                       list(map(float, lrs)), list(map(float, wds)),
                                       float(mu), bool(nesterov))
    else:
        sgd_step_reference(theta, momentum, grad, group_ends, lrs, wds, mu, nesterov)


def sgd_adjoint_(theta_bar, m_bar, g_bar, hvp, group_ends: Sequence[int], lrs: Sequence[float],
                 wds: Sequence[float], mu: float, nesterov: bool, backend: str) -> None:
    if backend == "fused":
        torch.ops.fastreplay.sgd_adjoint_(theta_bar, m_bar, g_bar, hvp, list(map(int, group_ends)),
                                          list(map(float, lrs)), list(map(float, wds)),
                                          float(mu), bool(nesterov))
    else:
        sgd_adjoint_reference(theta_bar, m_bar, g_bar, hvp, group_ends, lrs, wds, mu, nesterov)


def _has_op(name: str) -> bool:
    return extension_loaded() and hasattr(torch.ops.fastreplay, name)


def adam_step_(theta, state, grad, group_ends: Sequence[int], lrs: Sequence[float],
               wds: Sequence[float], hyper, step: int, backend: str) -> None:
    if backend == "fused" and _has_op("adam_step_"):
        torch.ops.fastreplay.adam_step_(theta, state, grad, list(map(int, group_ends)),
                                        list(map(float, lrs)), list(map(float, wds)),
                                        *_adam_scalars(hyper, step))
    else:
        adam_step_reference(theta, state, grad, group_ends, lrs, wds, hyper, step)


def adam_adjoint_(theta_bar, state_bar, g_bar, hvp, grad, theta, state,
                  group_ends: Sequence[int], lrs: Sequence[float], wds: Sequence[float], hyper,
                  step: int, backend: str) -> None:
    if backend == "fused" and _has_op("adam_adjoint_"):
        torch.ops.fastreplay.adam_adjoint_(theta_bar, state_bar, g_bar, hvp, grad, theta, state,
                                           list(map(int, group_ends)), list(map(float, lrs)),
                                           list(map(float, wds)), *_adam_scalars(hyper, step))
    else:
        adam_adjoint_reference(theta_bar, state_bar, g_bar, hvp, grad, theta, state, group_ends,
                               lrs, wds, hyper, step)


def _adam_scalars(hyper, step: int) -> tuple:
    """The scalar arguments of the fused Adam ops: b1, b2, eps, eps_root, c1, c2, decoupled."""
    c1, c2 = hyper.corrections(step)
    return (float(hyper.beta1), float(hyper.beta2), float(hyper.eps), float(hyper.eps_root),
            float(c1), float(c2), bool(hyper.decoupled))
