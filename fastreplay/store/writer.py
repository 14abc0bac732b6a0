"""AsyncWriter: the background thread that writes checkpoints while training goes on, and the
snapshots that let training keep mutating what it submitted."""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from ..exceptions import StoreError


class _Pending(tuple):
    """(device-side copy, CUDA event marking the copy done): made on the caller's thread."""


def _snapshot(x):
    """Copy `x` now (async on GPU, no host sync) so training may keep mutating the original."""
    if not isinstance(x, torch.Tensor):
        return np.array(x, copy=True)
    copy, event = x.detach().clone(), None
    if copy.is_cuda:
        event = torch.cuda.Event()
        event.record()
    return _Pending((copy, event))


def _to_numpy(x):
    """Host copy of a tensor/snapshot; runs on the writer thread so only it waits for the device."""
    if isinstance(x, _Pending):
        x, event = x
        if event is not None:
            event.synchronize()
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


class AsyncWriter:
    """Background thread + bounded queue (default 4): training only waits when the queue is full.

    Jobs must not be mutated by the caller after submit (RunStore snapshots them for you).
    A failed job is remembered, later jobs are skipped, and the error is raised (chained, as
    StoreError) by every later submit/flush and by the first close.
    """

    def __init__(self, maxsize: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fastreplay-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    fn, args, kwargs = job
                    fn(*[_to_numpy(a) for a in args], **{k: _to_numpy(v) for k, v in kwargs.items()})
            except BaseException as exc:  # noqa: BLE001 - must never die silently
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc = self._error
            if isinstance(exc, StoreError):  # already says what is wrong and how to fix it
                raise type(exc)(str(exc)) from exc
            raise StoreError(f"background write failed ({type(exc).__name__}: {exc}); "
                             "fix the cause (disk full? permissions?) and rerun") from exc

    def submit(self, fn, *args, **kwargs) -> None:
        """Queue fn(*args, **kwargs); tensors among the args become numpy on the writer thread."""
        if self._closed:
            raise StoreError("write submitted to a closed AsyncWriter; reopen the RunStore")
        self._raise_if_failed()
        self._queue.put((fn, args, kwargs))

    def flush(self) -> None:
        """Wait until every submitted job has run; raise the first job error, if any."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Flush and stop the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except StoreError:
            if exc_type is None:  # don't mask the body's own exception
                raise
