"""Settle the writes zarr still has in flight when a command stops early (an error, Ctrl-C).

zarr runs its I/O as asyncio tasks on an event loop in a background thread and writes the chunks
of one array assignment concurrently (``asyncio.gather`` under a semaphore). When one chunk write
fails, for instance with a full disk, gather hands that error to the caller at once and leaves its
sibling tasks running; a Ctrl-C likewise leaves the interrupted call's tasks running. If the
process then exits, zarr's exit hook stops and closes the loop under them, and each task still
pending is reported on stderr ("Task was destroyed but it is pending!", "Task exception was never
retrieved" with a traceback, "coroutine ... was never awaited"): dozens of lines of noise around
the one-line error. Letting those tasks finish before exiting removes the noise at its source.

They are awaited, not cancelled: zarr creates some write coroutines before awaiting others (its
metadata writes), and cancelling it there leaves those never awaited, another warning. The writes
are atomic, so whatever they finish is valid; a full disk fails the rest quickly.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time


async def _await_other_tasks(cancel: bool) -> int:
    """Wait until every other task on this loop is done (cancelling them first if ``cancel``);
    returns how many there were. Their exceptions are collected, so none is reported later."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if cancel:
        for task in tasks:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return len(tasks)


def settle_pending_writes(timeout: float = 10.0) -> None:
    """Let the tasks still pending on zarr's I/O loop finish (a no-op when zarr was never
    imported or has nothing in flight). Call it only when the process is about to exit, after
    the background writers have stopped (api.open_or_train closes its store's writer).

    Repeated until a round finds nothing, since a finishing task may start one more write;
    after ``timeout`` seconds (a write stuck on a dead network mount) the rest is cancelled.
    """
    sync = sys.modules.get("zarr.core.sync")
    loop = getattr(sync, "loop", [None])[0] if sync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return
    deadline = time.monotonic() + timeout
    cancel = False
    while True:
        left = deadline - time.monotonic()
        cancel = cancel or left <= 0
        future = asyncio.run_coroutine_threadsafe(_await_other_tasks(cancel), loop)
        try:
            if future.result(max(left, 1.0)) == 0:
                return
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            if cancel:
                return  # even cancelled tasks do not finish: exit anyway, as before
            cancel = True
