"""Scale-out under torchrun: which share of the measurements or LDS models this process takes.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op single
process. GPUs talk through NCCL (one GPU per process, cuda:LOCAL_RANK), CPUs through gloo.
Rank 0 trains and writes summaries and plots; every rank replays or retrains its own share.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .exceptions import PeerStopped


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> str:
    """Join the torchrun job if there is one; returns the device this process should use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # Rank 0 may train for a long time while the others wait at the first barrier.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=12))
    return device


def shard(items: Sequence[Any]) -> list:
    """This rank's share, round-robin (balanced within one item)."""
    return list(items[rank()::world_size()])


def _collective(op, *args, **kwargs) -> None:
    """Run a collective; when a peer process has gone (gloo: "Connection closed by peer",
    NCCL: a DistBackendError), say so in one line instead of a traceback on every other rank."""
    try:
        op(*args, **kwargs)
    except RuntimeError as exc:  # dist.DistError and the gloo transport errors are RuntimeErrors
        raise PeerStopped(f"rank {rank()}: another torchrun process of this job stopped "
                          f"({type(exc).__name__} in {op.__name__}), so this one stops too; "
                          "its own error, printed above, says what to fix") from exc


def barrier() -> None:
    if dist.is_initialized():
        _collective(dist.barrier)


def gather_to_main(obj: Any) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    _collective(dist.gather_object, obj, out, dst=0)
    return out


def gather_all(obj: Any) -> list:
    """Every rank's ``obj`` on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    _collective(dist.all_gather_object, out, obj)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
