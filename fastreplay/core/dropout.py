"""Dropout whose masks are a pure function of (seed, step, example id, layer, position), so that
training, every rebuilt step of the replay and every LDS retraining draw the very same masks.

torch's dropout draws from the global generator, which no checkpoint holds and which vmap
refuses to use: a replay would differentiate other masks than training drew. Here each mask bit
is a 32-bit integer hash of the run's seed, the step, the example's id in the training set, the
dropout layer and the element's position inside the example; keep it when the hash is at least
p 2^32. So:

* an example's mask does not depend on which other examples share its batch (LDS "drop"
  removal takes examples out of batches; right padding keeps positions where they are);
* the bits are the same on every device (integer arithmetic, products below 2^63);
* the mask is a constant of the step: the layer is linear in its input, and forward-mode AD,
  double backward and vmap all see x * mask / (1 - p).

The Recipe says which examples a training forward pass is computing (``dropout_context``);
eval-mode passes (measurements) use no dropout. A model whose training forward runs without the
context raises, rather than drawing masks nobody can reproduce.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn as nn

from ..exceptions import ReplayError

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2^31: a 32-bit value times it stays below 2^63 in int64
_state = threading.local()


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (int64 tensors holding 32-bit values)."""
    x = ((x >> 16) ^ x) * _MIX & _M32
    x = ((x >> 16) ^ x) * _MIX & _M32
    return (x >> 16) ^ x


@contextlib.contextmanager
def dropout_context(seed: int, step: int, example_ids: torch.Tensor) -> Iterator[None]:
    """Training forward passes inside draw their masks for these examples at this step
    (``example_ids``: the training-set ids of the batch's rows, in order)."""
    previous = getattr(_state, "context", None)
    _state.context = (int(seed) & _M32, int(step) & _M32, example_ids)
    try:
        yield
    finally:
        _state.context = previous


def keep_mask(shape: tuple, layer: int, p: float, device) -> torch.Tensor:
    """bool (B, ...) mask of the elements kept, row b being training example ids[b]."""
    context = getattr(_state, "context", None)
    if context is None:
        raise ReplayError("a dropout layer ran in a training forward pass that fastreplay did not "
                          "start (no step and example ids); call the model through the Recipe")
    seed, step, ids = context
    if ids.shape[0] != shape[0]:
        raise ReplayError(f"a dropout layer got a batch of {shape[0]} rows for {ids.shape[0]} "
                          "examples; the model must keep one row per example in its first "
                          "dimension")
    base = torch.tensor(seed, dtype=torch.int64, device=device)
    base = _mix(_mix(_mix(base) ^ step) ^ (layer & _M32))
    h = _mix(base ^ (ids.to(device=device, dtype=torch.int64) & _M32))
    for n in shape[1:]:  # one coordinate at a time: independent of the padded batch shape
        h = _mix(h.unsqueeze(-1) ^ torch.arange(n, device=device, dtype=torch.int64))
    return h >= int(round(p * 2 ** 32))


def deterministic_dropout(x: torch.Tensor, p: float, layer: int, training: bool) -> torch.Tensor:
    """x * mask / (1 - p) with the mask of keep_mask; x itself in eval mode or at p = 0."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    keep = keep_mask(tuple(x.shape), layer, p, x.device)
    return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))


class DeterministicDropout(nn.Module):
    """nn.Dropout with masks from (seed, step, example id, ``layer``, position): what
    prepare_module puts in place of every stock nn.Dropout (layers numbered in module order)."""

    def __init__(self, p: float, layer: int):
        super().__init__()
        self.p = float(p)
        self.layer = int(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return deterministic_dropout(x, self.p, self.layer, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}"
