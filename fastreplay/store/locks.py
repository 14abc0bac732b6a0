"""Run-directory locks: RunDirLock, an exclusive flock on RUN_DIR/.lock shared within a process."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import weakref

from ..exceptions import StoreError
from .diskio import os_error

LOCK_NAME = ".lock"


# Run-directory locks held by this process: realpath -> [fd, holders]. flock locks conflict
# between open file descriptions even inside one process, so a process shares one per directory.
_locks: dict[str, list] = {}
_locks_guard = threading.Lock()


def _acquire_lock(run_dir) -> str:
    key = os.path.realpath(os.fspath(run_dir))
    with _locks_guard:
        if key in _locks:
            _locks[key][1] += 1
            return key
        path = os.path.join(key, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            err = os_error(exc, path)
            raise (err if err is not exc else StoreError(f"cannot open the lock file {path} "
                                                         f"({exc.strerror}); check --run-dir")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = "unknown"
            with contextlib.suppress(OSError, ValueError):
                pid = str(int(os.pread(fd, 32, 0).split()[0]))
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"run directory {run_dir} is in use by another fastreplay process "
                                 f"(pid {pid}); wait for it or use another --run-dir") from None
            raise StoreError(f"cannot lock run directory {run_dir} ({exc.strerror}); "
                             "use a local --run-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)  # closing drops the lock
            err = os_error(exc, path)
            raise (err if err is not exc else StoreError(f"cannot write {path} ({exc.strerror})")) from None
        _locks[key] = [fd, 1]
        return key


def _release_lock(key: str) -> None:
    with _locks_guard:
        entry = _locks.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _locks[key]
            os.close(entry[0])  # releases the flock


def _torchrun_follower() -> bool:
    """True in a torchrun worker other than rank 0 (rank 0 holds the lock for the whole job)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0
    except ValueError:
        return False


def _nothing() -> None:
    pass


class RunDirLock:
    """Exclusive lock on RUN_DIR/.lock (fcntl.flock) for as long as this object lives.

    Another process asking for it gets a one-line StoreError naming the holder's pid. The kernel
    drops the lock when the holder dies, even by SIGKILL, so a crash never leaves a stale lock.
    Re-entrant within one process (holders are counted). In a torchrun job only rank 0 takes it
    (``owner``); the other ranks work in the same store under rank 0's lock and barriers.
    """

    def __init__(self, run_dir):
        self.run_dir = os.fspath(run_dir)
        self.owner = not _torchrun_follower()
        if self.owner:
            key = _acquire_lock(run_dir)
            self._finalizer = weakref.finalize(self, _release_lock, key)
        else:
            self._finalizer = weakref.finalize(self, _nothing)

    def release(self) -> None:
        self._finalizer()  # runs _release_lock at most once

    @property
    def held(self) -> bool:
        return self._finalizer.alive
