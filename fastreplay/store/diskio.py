"""Local disk I/O of a run store: one-line errors for the OSErrors a user can fix (disk full,
read-only directory), atomic writes (SafeLocalStore: temporary file + rename), atomic deletes
(rename away, then remove), and clean-up of what a killed writer left behind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path

from zarr.storage import LocalStore

from ..exceptions import DiskFullError, StoreError
from ..faults import crash_point

_PARTIAL = ".partial"  # suffix of a file being written (zarr's and ours): never a valid key
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def os_error(exc: OSError, what: str) -> Exception:
    """A one-line StoreError for the OSErrors a user can fix (disk full, no write permission).

    Other OSErrors are returned unchanged (the caller re-raises them).
    """
    if exc.errno in _DISK_FULL:
        return DiskFullError(f"disk full while writing {what}; free space on that disk (e.g. "
                             "`fastreplay clean OLD_RUN_DIR`) and rerun the same command: the run "
                             "resumes where it stopped")
    if exc.errno in _READ_ONLY:
        return StoreError(f"cannot write {what}: {exc.strerror or exc} (read-only directory?); "
                          "make it writable (chmod -R u+w) or use another --run-dir")
    return exc


@contextlib.contextmanager
def disk_errors(what: str):
    """Turn any OSError raised by the body (writing ``what``) into a one-line StoreError."""
    try:
        yield
    except OSError as exc:
        err = os_error(exc, what)
        if err is exc:
            err = StoreError(f"cannot write {what} ({exc.strerror or exc}); check the path and "
                             "rerun")
        raise err from None


def _write_file(path: Path, data) -> None:
    """The one place store bytes hit the disk (tests inject ENOSPC here)."""
    with open(path, "wb") as fh:
        fh.write(data)


def _put_atomic(root: Path, key: str, value, exclusive: bool = False) -> None:
    """Write ``value`` to root/key via a temporary file and a rename: a reader (or a process
    killed mid-write) sees the old file or the new one, never a torn one."""
    path = root / key
    tmp = path.parent / f"{path.name}.{uuid.uuid4().hex}{_PARTIAL}"
    data = value.as_buffer_like() if hasattr(value, "as_buffer_like") else value.to_bytes()
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(tmp, data)
        except OSError as exc:
            err = os_error(exc, f"{key} in {root}")
            if err is exc:
                raise
            raise err from None
        crash_point("store_write")
        if exclusive:  # like zarr: FileExistsError when the key exists
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class SafeLocalStore(LocalStore):
    """zarr's LocalStore with every write atomic (temporary file + rename) on every zarr 3
    version, one-line errors for a full disk or a read-only directory, and a crash point."""

    async def set(self, key: str, value) -> None:
        await self._safe_set(key, value, False)

    async def set_if_not_exists(self, key: str, value) -> None:
        try:
            await self._safe_set(key, value, True)
        except FileExistsError:
            pass

    def set_sync(self, key: str, value) -> None:
        self._ensure_open_sync()
        self._check_writable()
        _put_atomic(self.root, key, value)

    async def _safe_set(self, key: str, value, exclusive: bool) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(_put_atomic, self.root, key, value, exclusive)


def _remove_stale_temp_dirs(final: Path) -> None:
    """Remove ``.NAME.creating-PID`` / ``.NAME.deleting[.ID]-PID`` dirs of processes that are gone."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(creating|deleting)(\.[0-9a-f]+)?-(\d+)$")
    for d in final.parent.glob(f".{final.name}.*-*"):
        match = pattern.match(d.name)
        if match is None:
            continue
        pid = match.group(3)
        try:
            os.kill(int(pid), 0)
            if int(pid) != os.getpid():
                continue  # its process still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def _discard_tree(tree: Path, store_root: Path) -> None:
    """Delete ``tree`` (the store or a node in it) so that a crash midway never leaves it half
    deleted: rename it beside the store (atomic), then delete the renamed copy. A symlink is
    removed itself, never followed: what it points to is left alone."""
    if not tree.exists() and not tree.is_symlink():
        return
    doomed = store_root.parent / f".{store_root.name}.deleting.{uuid.uuid4().hex[:12]}-{os.getpid()}"
    with disk_errors(str(tree)):
        os.rename(tree, doomed)
    if doomed.is_symlink():
        doomed.unlink()
    else:
        shutil.rmtree(doomed, ignore_errors=True)
    _remove_stale_temp_dirs(store_root)


def remove_partial_files(root) -> int:
    """Delete the temporary files a killed writer left behind; call only under the run lock."""
    n = 0
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(_PARTIAL):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, f))
                    n += 1
    return n


def check_writable(directory) -> None:
    """Raise a one-line StoreError unless a file can be created in ``directory`` (a probe write:
    permission bits alone do not say it, e.g. for root or a read-only mount)."""
    # A fresh name, created exclusively and never through a link: a file of the user's that
    # happened to have the probe's name is never opened, let alone truncated or deleted.
    probe = os.path.join(os.fspath(directory), f".write-probe-{uuid.uuid4().hex}")
    created = False
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        created = True
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        if exc.errno in _READ_ONLY:
            raise StoreError(f"run directory {directory} is not writable ({exc.strerror}); make it "
                             f"writable (chmod -R u+w {directory}) or use another --run-dir") from None
        err = os_error(exc, f"a probe file in {directory}")
        raise (err if err is not exc else StoreError(
            f"cannot write in run directory {directory} ({exc.strerror or exc}); "
            "check the disk or use another --run-dir")) from None
