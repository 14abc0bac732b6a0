"""Prefetcher: reads a run store's checkpoints ahead on a background thread."""

from __future__ import annotations

import queue
import threading

from .runstore import RunStore


class Prefetcher:
    """Reads checkpoints ahead on a background thread, in the order given, so I/O overlaps compute.

    At most `depth` checkpoints are read but not yet yielded (bounding memory to depth x 3P).
    """

    def __init__(self, store: RunStore, slots: list[int], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.store, self.slots, self.depth = store, list(slots), depth

    def __iter__(self):
        ready: queue.Queue = queue.Queue()
        room = threading.Semaphore(self.depth)
        stop = threading.Event()

        def read() -> None:
            for slot in self.slots:
                room.acquire()
                if stop.is_set():
                    return
                try:
                    ready.put((slot, self.store.read_checkpoint(slot), None))
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                    ready.put((slot, None, exc))
                    return

        thread = threading.Thread(target=read, name="fastreplay-prefetch", daemon=True)
        thread.start()
        try:
            for _ in self.slots:
                slot, value, exc = ready.get()
                room.release()
                if exc is not None:
                    raise exc
                yield slot, value
        finally:
            stop.set()
            room.release()  # wake the reader if it waits for room, so it sees `stop`
            thread.join()
