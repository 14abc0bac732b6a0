"""Exclusive locks a command holds for as long as it works on a run: the run directory's
(RUN_DIR/.lock) and the store's (a lock file named after the store location in fastreplay's own
lock directory), so that neither can be used by two commands at once.

The run directory's lock alone did not protect a store given with --store: a second command with
another run directory could point at a running command's store and discard it (--force). The
store lock is keyed by the store's location (the resolved local path, or the URL), so every
command that names one store, from any run directory, takes the same lock. Remote stores are
locked on this machine only: two machines pointing at one URL are not seen (docs/errors.md).

Both are fcntl.flock locks: the kernel drops them when their holder dies, even by SIGKILL, so a
crash never leaves a stale lock; the files stay. Within one process a lock is shared (holders
are counted: flock locks conflict between open file descriptions even inside one process).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
import threading
import weakref
from pathlib import Path

from ..exceptions import StoreError
from .diskio import os_error
from .paths import local_path
from .remote import is_remote

LOCK_NAME = ".lock"
LOCK_DIR_ENV = "FASTREPLAY_LOCK_DIR"
"""Overrides where store locks live (default ~/.cache/fastreplay/locks)."""

_PID_TEXT = re.compile(rb"^\s*(\d+)?\s*$")


def holds_lock_text(content: bytes) -> bool:
    """Whether ``content`` is what a fastreplay lock file holds: a pid, or nothing."""
    return _PID_TEXT.match(content) is not None


# Locks held by this process: lock file path -> [fd, holders].
_locks: dict[str, list] = {}
_locks_guard = threading.Lock()


def _open_lock_file(path: str) -> tuple[int, bool]:
    """(fd, created) of the lock file ``path``: created when missing, never through a symbolic
    link (a link named .lock would make fastreplay write its pid into whatever it points at),
    and refused when it holds anything but a pid, so a user's own file of that name is never
    overwritten."""
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{path} is a symbolic link; fastreplay never writes through one: "
                             "remove the link (fastreplay makes its own lock file there)") from None
        if exc.errno == errno.EISDIR:
            raise StoreError(f"{path} is a directory, where fastreplay keeps its lock file; move "
                             "it away or use another --run-dir") from None
        err = os_error(exc, path)
        raise (err if err is not exc else StoreError(f"cannot open the lock file {path} "
                                                     f"({exc.strerror}); check --run-dir")) from None
    try:
        held = os.pread(fd, 64, 0)
    except OSError:
        held = b""
    if not holds_lock_text(held):
        os.close(fd)
        raise StoreError(f"{path} is not a fastreplay lock file (it holds other data); move it "
                         "away: fastreplay keeps its lock under that name")
    return fd, False


def _acquire(path: str, busy: str) -> bool:
    """Take the exclusive lock on the file ``path`` (``busy``: the message when another process
    holds it, with {pid}); returns whether this call created the file."""
    with _locks_guard:
        if path in _locks:
            _locks[path][1] += 1
            return False
        fd, created = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = "unknown"
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = str(int(os.pread(fd, 32, 0).split()[0]))
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(busy.format(pid=pid)) from None
            raise StoreError(f"cannot lock {path} ({exc.strerror}); use a local --run-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)  # closing drops the lock
            err = os_error(exc, path)
            raise (err if err is not exc else StoreError(f"cannot write {path} ({exc.strerror})")) from None
        _locks[path] = [fd, 1]
        return created


def _release(path: str) -> None:
    with _locks_guard:
        entry = _locks.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _locks[path]
            os.close(entry[0])  # releases the flock


def torchrun_follower() -> bool:
    """True in a torchrun worker other than rank 0 (rank 0 holds the locks for the whole job)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0
    except ValueError:
        return False


def _nothing() -> None:
    pass


class _FileLock:
    """An exclusive lock on one lock file for as long as this object lives (or until release());
    in a torchrun job only rank 0 takes it (``owner``): the other ranks work under rank 0's
    locks and barriers."""

    def __init__(self, path: str, busy: str):
        self.path = path
        self.owner = not torchrun_follower()
        self.created = False
        if self.owner:
            self.created = _acquire(path, busy)
            self._finalizer = weakref.finalize(self, _release, path)
        else:
            self._finalizer = weakref.finalize(self, _nothing)

    def release(self) -> None:
        self._finalizer()  # runs _release at most once

    @property
    def held(self) -> bool:
        return self._finalizer.alive


class RunDirLock(_FileLock):
    """The exclusive lock on RUN_DIR/.lock. Another process asking for it gets a one-line
    StoreError naming the holder's pid. ``created``: whether taking it made the file."""

    def __init__(self, run_dir):
        self.run_dir = os.fspath(run_dir)
        key = os.path.join(os.path.realpath(self.run_dir), LOCK_NAME)
        super().__init__(key, f"run directory {self.run_dir} is in use by another fastreplay "
                              "process (pid {pid}); wait for it or use another --run-dir")


def lock_directory() -> Path:
    """Where store locks live: $FASTREPLAY_LOCK_DIR, else ~/.cache/fastreplay/locks, else (no
    writable home) a per-user directory under the system's temporary directory."""
    chosen = os.environ.get(LOCK_DIR_ENV)
    candidates = [Path(chosen)] if chosen else [
        Path.home() / ".cache" / "fastreplay" / "locks",
        Path(tempfile.gettempdir()) / f"fastreplay-locks-{os.getuid()}"]
    for directory in candidates:
        with contextlib.suppress(OSError):
            directory.mkdir(parents=True, exist_ok=True)
            if os.access(directory, os.W_OK):
                return directory
    raise StoreError(f"cannot create a directory for store locks ({candidates[0]}); set "
                     f"${LOCK_DIR_ENV} to a writable directory")


def store_key(location: str) -> str:
    """One name per store, however it is written: a local store by its resolved absolute path
    (symbolic links and .. resolved, so two spellings of one directory share a lock), a remote
    one by its URL without a trailing slash."""
    if is_remote(location):
        return location.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(local_path(location))))


class StoreLock(_FileLock):
    """The exclusive lock on a store location: taken by every command that reads or writes the
    store, from whichever run directory, so that no second command can discard (--force,
    clean) or write a store another one is working in."""

    def __init__(self, location: str):
        self.location = location
        key = store_key(location)
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        super().__init__(str(lock_directory() / f"store-{digest}.lock"),
                         f"the run store {location} is in use by another fastreplay process "
                         "(pid {pid}); wait for it or use another --store / --run-dir")
