"""The run store: one Zarr v3 group holding the schedule, checkpoints, final state and scores.

Checkpoints are written on a background thread so training only waits when the write queue
is full; each checkpoint row has a commit marker written last, so a crash never leaves a
half-written checkpoint that reads as valid.

Crash safety (docs/errors.md): every file is written to a temporary name and renamed into place
(SafeLocalStore), so a SIGKILL never leaves a torn chunk or metadata file; checkpoint rows, the
final state and score rows carry crc32 checksums verified on read; scores grow by appending rows
that count only once the target list (atomic metadata) names them. RunDirLock keeps a second
process off a run directory.

Remote stores (an fsspec URL such as s3://bucket/run.zarr, through zarr's FsspecStore): every
object write is atomic on the object store itself, so there are no temporary files or
renames; the store is created by one write of its zarr.json (identity attrs included), and
--force deletes exactly its prefix, only when it holds a fastreplay run store, root metadata
last. Deleting a node (clean, --force) is not atomic there: a crash midway leaves part of it
(rerun the command). The lock stays on the local run directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib.metadata
import json
import os
import platform
import queue
import re
import shutil
import threading
import uuid
import weakref
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from .exceptions import DiskFullError, StoreError
from .faults import crash_point

_STEP_CHUNK = 256  # schedule rows per chunk
_SCORE_CHUNK = 16  # score targets per chunk (stores written before append_scores)
LOCK_NAME = ".lock"
_PARTIAL = ".partial"  # suffix of a file being written (zarr's and ours): never a valid key
_NO_CRC = -1  # checksum slot never written (stores from before checksums)
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


def _crc(a: np.ndarray) -> int:
    """crc32 of the exact bytes of ``a`` (C order)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


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


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def is_remote(path) -> bool:
    """True for an fsspec URL such as ``s3://bucket/run.zarr`` (``file://`` counts as local)."""
    return not _is_local(os.fspath(path))


# Remote stores: fsspec filesystems (s3fs for s3://) configured by their usual environment
# (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_DEFAULT_REGION for
# S3). Listings are not cached: this process deletes and recreates groups (--force, clean) and
# a stale listing would hide that.
_REMOTE_OPTIONS = {"use_listings_cache": False}
# Packages whose exceptions mean "the remote store cannot be reached or used" (network, endpoint,
# credentials), as opposed to a bug here; OSErrors always count.
_REMOTE_ERROR_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "google",
                         "adlfs", "azure", "requests", "urllib3"}


def _remote_fs(url: str):
    """(fsspec filesystem, path inside it) of a remote store URL; a one-line StoreError when the
    protocol is unknown or its driver (s3fs for s3://) is not installed."""
    try:
        from fsspec.core import url_to_fs
        return url_to_fs(url, **_REMOTE_OPTIONS)
    except ImportError as exc:
        raise StoreError(f"cannot open {url}: {exc}; install the fsspec driver of that protocol "
                         "(`pip install s3fs` for s3://) or use a local --store") from None
    except ValueError as exc:
        raise StoreError(f"cannot open {url} ({exc}); use a local path or an fsspec URL such as "
                         "s3://bucket/run.zarr") from None


@contextlib.contextmanager
def remote_errors(url: str):
    """Turn a failure to reach or use the remote store at ``url`` into a one-line StoreError.

    FileNotFoundError passes through (callers decide what missing means); so do errors that are
    not about the remote side (they are bugs, and keep their traceback).
    """
    try:
        yield
    except (StoreError, FileNotFoundError):
        raise
    except PermissionError as exc:
        raise StoreError(f"access to {url} denied ({_first_line(exc)}); check the credentials "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                         "bucket's permissions") from None
    except Exception as exc:
        if not (isinstance(exc, OSError)
                or type(exc).__module__.split(".")[0] in _REMOTE_ERROR_MODULES):
            raise
        raise StoreError(f"cannot reach the store {url} ({type(exc).__name__}: {_first_line(exc)}); "
                         "check AWS_ENDPOINT_URL, the network and the credentials "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), then rerun") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def check_remote(url: str, write: bool = False):
    """(filesystem, path) of a remote store after checking that its location is usable: the
    driver is installed, the endpoint answers, the bucket exists and (``write``) accepts a probe
    object written beside the store and deleted again. Raises a one-line StoreError otherwise."""
    fs, path = _remote_fs(url)
    path = path.rstrip("/")
    split = getattr(fs, "split_path", None)  # object stores (s3fs, gcsfs, adlfs): bucket, key, ...
    bucket, key = split(path)[:2] if split else ("", path)
    if not key:
        raise StoreError(f"store {url} names a bucket, not a location inside it; use e.g. "
                         f"{url.rstrip('/')}/run.zarr")
    with remote_errors(url):
        if bucket:
            try:
                fs.info(bucket)
            except FileNotFoundError:
                raise StoreError(f"bucket {bucket!r} of {url} does not exist (or is not visible "
                                 "with these credentials); create it or fix --store") from None
        if write:
            parent, _, name = path.rpartition("/")
            probe = f"{parent}/.{name}.write-probe-{os.getpid()}"
            try:
                fs.pipe_file(probe, b"x")
            finally:
                with contextlib.suppress(Exception):
                    fs.rm_file(probe)
    return fs, path


def _open_zarr(path: str, mode: str) -> zarr.Group:
    if not _is_local(path):
        from zarr.storage import FsspecStore
        store = FsspecStore.from_url(path, storage_options=dict(_REMOTE_OPTIONS),
                                     read_only=(mode == "r"))
        return zarr.open_group(store=store, mode=mode)
    local = path.removeprefix("file://")
    return zarr.open_group(store=SafeLocalStore(local, read_only=(mode == "r")), mode=mode)


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
    deleted: rename it beside the store (atomic), then delete the renamed copy."""
    if not tree.exists():
        return
    doomed = store_root.parent / f".{store_root.name}.deleting.{uuid.uuid4().hex[:12]}-{os.getpid()}"
    with disk_errors(str(tree)):
        os.rename(tree, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    _remove_stale_temp_dirs(store_root)


def discard_store(path) -> bool:
    """Delete a store; --force and `clean --what all` use it. Returns whether there was one.

    A local store goes atomically (see _discard_tree). A remote one is deleted object by object
    (exactly the objects under its prefix, its root zarr.json last), and only when it is a
    fastreplay run store: anything else at that URL is refused with a StoreError and left alone.
    """
    path = os.fspath(path)
    if is_remote(path):
        return _discard_remote(path)
    final = Path(path.removeprefix("file://"))
    if not final.exists():
        return False
    _discard_tree(final, final)
    return True


def _discard_remote(url: str) -> bool:
    fs, path = check_remote(url)
    with remote_errors(url):
        try:
            meta = json.loads(fs.cat_file(f"{path}/zarr.json"))
        except FileNotFoundError:
            if fs.exists(path):
                raise StoreError(f"{url} holds data that is not a Zarr group; refusing to delete "
                                 "it: choose another --store") from None
            return False
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        attrs = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else {}
        if meta.get("node_type") != "group" or "fingerprint" not in attrs or "config" not in attrs:
            raise StoreError(f"{url} is not a fastreplay run store; refusing to delete it: "
                             "choose another --store")
        # Exactly the objects under PREFIX/ (never a sibling such as PREFIX2/), the root
        # metadata last: a crash midway leaves a store that the next --force still recognises.
        root = f"{path}/zarr.json"
        doomed = [f for f in fs.find(path) if f.startswith(f"{path}/") and f != root]
        if doomed:
            fs.rm(doomed)
        fs.rm_file(root)
        fs.invalidate_cache(path)
    return True


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
    probe = os.path.join(os.fspath(directory), f".write-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        if exc.errno in _READ_ONLY:
            raise StoreError(f"run directory {directory} is not writable ({exc.strerror}); make it "
                             f"writable (chmod -R u+w {directory}) or use another --run-dir") from None
        err = os_error(exc, f"a probe file in {directory}")
        raise (err if err is not exc else StoreError(
            f"cannot write in run directory {directory} ({exc.strerror or exc}); "
            "check the disk or use another --run-dir")) from None


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


def versions() -> dict:
    """Library versions recorded in the store, so a replay can warn about a changed stack."""
    try:
        own = importlib.metadata.version("fastreplay")
    except importlib.metadata.PackageNotFoundError:
        own = "0.1.0+local"
    return {"fastreplay": own, "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _jsonable(v):
    """Numpy/torch scalars and arrays as plain JSON values (zarr attrs reject np.float32 etc.)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.generic, np.ndarray, torch.Tensor)):
        return v.tolist()
    return v


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


class RunStore:
    """A fastreplay run store (Zarr v3 group); see the package docs for the layout."""

    def __init__(self, path, group: zarr.Group, writer_maxsize: int = 4):
        self.path = str(path)
        self._group = group
        self._writer = AsyncWriter(writer_maxsize)
        self.lock: RunDirLock | None = None  # released by close()

    @classmethod
    def create(cls, path, config: dict, fingerprint: str, versions: dict,
               attrs: dict | None = None) -> RunStore:
        """A new store with its identity attrs. Local stores appear atomically: built under a
        temporary name and renamed, so a crash never leaves a store without its fingerprint."""
        path = os.fspath(path)
        config, versions = _jsonable(config), _jsonable(versions)
        try:
            json.dumps({"config": config, "versions": versions, "attrs": _jsonable(attrs or {})})
        except (TypeError, ValueError) as exc:
            raise StoreError(f"config/versions are not JSON-serialisable ({exc}); "
                             "pass plain dicts of str/int/float/bool/list") from exc
        exists_msg = (f"a run store already exists at {path}; "
                      "pass --force to overwrite it or choose another --run-dir")
        now = _now()
        meta = {**_jsonable(attrs or {}), "config": config, "fingerprint": fingerprint,
                "versions": versions, "status": "created", "created": now, "updated": now}
        if not _is_local(path):
            # One object write (zarr.json with the identity attrs) makes the group: it never
            # exists without its fingerprint.
            check_remote(path)
            from zarr.storage import FsspecStore
            with remote_errors(path):
                store = FsspecStore.from_url(path, storage_options=dict(_REMOTE_OPTIONS))
                try:
                    group = zarr.open_group(store=store, mode="w-", attributes=meta)
                except FileExistsError:
                    raise StoreError(exists_msg) from None
            return cls(path, group)
        final = Path(path.removeprefix("file://"))
        if final.exists():
            raise StoreError(exists_msg)
        _remove_stale_temp_dirs(final)
        tmp = final.parent / f".{final.name}.creating-{os.getpid()}"
        with disk_errors(f"the new run store {path}"):
            shutil.rmtree(tmp, ignore_errors=True)
            zarr.open_group(store=SafeLocalStore(tmp), mode="w-").attrs.update(meta)
            crash_point("store_creating")
            try:
                os.rename(tmp, final)  # atomic; fails if `final` appeared meanwhile
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StoreError(exists_msg) from None
                raise
        return cls(path, _open_zarr(path, "r+"))

    @classmethod
    def open(cls, path, mode: str = "r+") -> RunStore:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = os.fspath(path)
        if is_remote(path):
            check_remote(path)  # an unreachable endpoint or missing bucket is not "no store"
        try:
            if _is_local(path) and not os.path.isdir(path.removeprefix("file://")):
                raise FileNotFoundError(path)  # don't let the store create an empty directory
            group = _open_zarr(path, mode)
        except Exception as exc:  # FileNotFoundError / GroupNotFoundError / array at path
            raise StoreError(f"no run store at {path} ({type(exc).__name__}); run `fastreplay "
                             f"train` first or check {'--store' if is_remote(path) else '--run-dir'}") from exc
        if "fingerprint" not in group.attrs or "config" not in group.attrs:
            raise StoreError(f"{path} is a Zarr group but not a fastreplay run store; "
                             "check --run-dir")
        return cls(path, group)

    @staticmethod
    def exists(path) -> bool:
        """Whether ``path`` holds a run store. For a remote URL whose location cannot be used
        (unreachable endpoint, missing bucket or driver) this raises a one-line StoreError
        rather than answering no."""
        path = os.fspath(path)
        if is_remote(path):
            check_remote(path)
        try:
            return "fingerprint" in _open_zarr(path, "r").attrs
        except Exception:
            return False

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.__exit__(exc_type, exc, tb)
        finally:
            if self.lock is not None:
                self.lock.release()

    @property
    def config(self) -> dict:
        return dict(self._group.attrs["config"])

    @property
    def fingerprint(self) -> str:
        return str(self._group.attrs["fingerprint"])

    @property
    def status(self) -> str:
        return str(self._group.attrs["status"])

    @status.setter
    def status(self, value: str) -> None:
        self.set_attr("status", str(value))

    def get_attr(self, key: str, default=None):
        return self._group.attrs.get(key, default)

    def set_attr(self, key: str, value) -> None:
        """Store one JSON-able run attribute (e.g. timings) and bump "updated"."""
        self.set_attrs({key: value})

    def set_attrs(self, values: dict) -> None:
        """Store several run attributes in one atomic metadata write (and bump "updated")."""
        values = {str(k): _jsonable(v) for k, v in values.items()}
        for key, value in values.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"run attribute {key!r} is not JSON-serialisable ({exc}); "
                                 "store plain values") from exc
        self._group.attrs.update({**values, "updated": _now()})

    def _array(self, name: str):
        try:
            return self._group[name]
        except KeyError as exc:
            raise StoreError(f"{self.path} has no '{name}'; the run was not allocated/trained "
                             "this far (or its checkpoints were cleaned): rerun `fastreplay train`") from exc

    def _require(self, name: str, shape: tuple, dtype: str, chunks: tuple, fill=0) -> bool:
        """Create array ``name`` unless it exists with this shape and dtype; True if created."""
        if name in self._group:
            arr = self._group[name]
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise StoreError(f"'{name}' in {self.path} is {arr.shape} {arr.dtype}, expected "
                                 f"{shape} {dtype}; the store belongs to another config: "
                                 "pass --force or choose another --run-dir")
            return False
        chunks = tuple(max(1, c) for c in chunks)  # zero-length axes (Q == 0) still need chunk >= 1
        self._group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                 compressors=None, fill_value=fill)
        return True

    def allocate(self, *, num_steps: int, batch_size: int, num_groups: int, num_checkpoints: int,
                 num_params: int, num_buffers: int, dtype: str) -> None:
        """Create every fixed-shape array; a no-op for arrays that already exist with these shapes."""
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        T, K, P, Q = num_steps, num_checkpoints, num_params, num_buffers
        sc = min(_STEP_CHUNK, max(T, 1))
        self._require("schedule/indices", (T, batch_size), "int32", (sc, batch_size))
        self._require("schedule/lr", (T, num_groups), "float64", (sc, num_groups))
        # Per-slot chunks: each slot's step/commit flag is its own (atomically written) file.
        fresh = "checkpoints/params" not in self._group
        self._require("checkpoints/step", (K,), "int64", (1,), fill=-1)
        self._require("checkpoints/committed", (K,), "bool", (1,), fill=False)
        for name, n in (("params", P), ("momentum", P), ("buffers", Q)):
            self._require(f"checkpoints/{name}", (K, n), dtype, (1, n))
        # crc32 of each committed row's params, momentum, buffers and step, checked on read.
        self._require("checkpoints/checksum", (K, 4), "int64", (1, 4), fill=_NO_CRC)
        self._require("final/params", (P,), dtype, (P,))
        self._require("final/buffers", (Q,), dtype, (Q,))
        self._require("final/checksum", (2,), "int64", (2,), fill=_NO_CRC)
        if fresh and not self.get_attr("checksums"):
            self.set_attr("checksums", "crc32")  # every committed row must carry one

    def write_schedule(self, indices: np.ndarray, lr: np.ndarray) -> None:
        idx_arr, lr_arr = self._array("schedule/indices"), self._array("schedule/lr")
        indices, lr = np.asarray(indices), np.asarray(lr)
        if indices.shape != idx_arr.shape or lr.shape != lr_arr.shape:
            raise ValueError(f"schedule shapes {indices.shape}/{lr.shape} != allocated "
                             f"{idx_arr.shape}/{lr_arr.shape}")
        if indices.size and (indices.min() < 0 or indices.max() > np.iinfo(np.int32).max):
            raise ValueError("schedule indices must lie in [0, 2**31)")
        idx_arr[...] = indices.astype(np.int32)
        lr_arr[...] = lr.astype(np.float64)

    def read_schedule(self) -> tuple[np.ndarray, np.ndarray]:
        return self._array("schedule/indices")[...], self._array("schedule/lr")[...]

    def _write_row(self, name: str, row, value: np.ndarray) -> int:
        """Write one flat vector, refusing lossy casts (replay must be bitwise exact); returns
        the crc32 of the bytes stored."""
        arr = self._array(name)
        value = np.asarray(value).reshape(-1)
        width = arr.shape[-1]
        if value.size != width or not np.can_cast(value.dtype, arr.dtype, "safe"):
            raise StoreError(f"cannot store {value.size} x {value.dtype} into '{name}' "
                             f"({width} x {arr.dtype}); the model/dtype differs from the "
                             "allocated store: pass --force or choose another --run-dir")
        stored = np.ascontiguousarray(value.astype(arr.dtype, copy=False))
        arr[row] = stored
        return _crc(stored)

    def _has(self, name: str) -> bool:
        return name in self._group

    def _write_checkpoint_now(self, slot, step, params, momentum, buffers) -> None:
        committed = self._array("checkpoints/committed")
        committed[slot] = False  # an overwrite in progress must not read as the old checkpoint
        crcs = [self._write_row("checkpoints/params", slot, params),
                self._write_row("checkpoints/momentum", slot, momentum)]
        crash_point("checkpoint_partial")
        crcs.append(self._write_row("checkpoints/buffers", slot, buffers))
        self._array("checkpoints/step")[slot] = step
        crcs.append(_crc(np.asarray([step], dtype=np.int64)))
        if self._has("checkpoints/checksum"):
            self._array("checkpoints/checksum")[slot] = np.asarray(crcs, dtype=np.int64)
        committed[slot] = True  # the commit: written last, one small file
        crash_point("checkpoint_written")

    def _check_slot(self, slot: int) -> int:
        k = self._array("checkpoints/committed").shape[0]
        if not 0 <= slot < k:
            raise IndexError(f"checkpoint slot {slot} out of range [0, {k})")
        return int(slot)

    def write_checkpoint(self, slot: int, step: int, params, momentum, buffers) -> None:
        """Enqueue a checkpoint write; inputs are snapshotted now so training may keep mutating them."""
        slot = self._check_slot(slot)
        self._writer.submit(self._write_checkpoint_now, slot, int(step), _snapshot(params),
                            _snapshot(momentum), _snapshot(buffers))

    def checkpoint_steps(self) -> np.ndarray:
        steps = self._array("checkpoints/step")[...]
        return np.where(self._array("checkpoints/committed")[...], steps, -1).astype(np.int64)

    def _stored_crcs(self, name: str, index) -> np.ndarray | None:
        """The stored checksums, or None for a store (or row) written before checksums existed."""
        if not self._has(name):
            return None
        crcs = np.asarray(self._array(name)[index], dtype=np.int64).reshape(-1)
        if (crcs == _NO_CRC).all() and not self.get_attr("checksums"):
            return None
        return crcs

    def _read_verified(self, what: str, names: list[str], index, crc_name: str, fix: str):
        """Read ``names`` at ``index`` and check them against their stored crc32s."""
        try:
            values = [self._array(n)[index] for n in names]
        except StoreError:
            raise
        except Exception as exc:  # a truncated/garbled chunk file fails to decode
            raise StoreError(f"{what} of {self.path} is unreadable ({type(exc).__name__}: {exc}); "
                             f"the store is damaged: {fix}") from None
        crcs = self._stored_crcs(crc_name, index)
        if crcs is not None:
            for name, value, want in zip(names, values, crcs):
                if int(want) == _NO_CRC or _crc(np.asarray(value)) != int(want):
                    raise StoreError(f"{what} of {self.path} is corrupted ({name} fails its "
                                     f"checksum): {fix}")
        return values

    def read_checkpoint(self, slot: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        slot = self._check_slot(slot)
        if not bool(self._array("checkpoints/committed")[slot]):
            raise StoreError(f"checkpoint slot {slot} in {self.path} was never fully written "
                             "(training crashed or is still running); rerun or resume `fastreplay train`")
        fix = ("rerun training with --force (or use another --run-dir); scores already stored "
               "stay readable until then")
        params, momentum, buffers, step = self._read_verified(
            f"checkpoint slot {slot}",
            ["checkpoints/params", "checkpoints/momentum", "checkpoints/buffers", "checkpoints/step"],
            slot, "checkpoints/checksum", fix)
        return int(step), params, momentum, buffers

    def _write_final_now(self, params, buffers) -> None:
        crcs = [self._write_row("final/params", slice(None), params)]
        crash_point("final_partial")
        crcs.append(self._write_row("final/buffers", slice(None), buffers))
        if self._has("final/checksum"):
            self._array("final/checksum")[...] = np.asarray(crcs, dtype=np.int64)
        crash_point("final_written")

    def write_final(self, params, buffers) -> None:
        self._writer.submit(self._write_final_now, _snapshot(params), _snapshot(buffers))

    def read_final(self) -> tuple[np.ndarray, np.ndarray]:
        params, buffers = self._read_verified(
            "the final state", ["final/params", "final/buffers"], slice(None), "final/checksum",
            "rerun training with --force (or use another --run-dir)")
        return params, buffers

    @staticmethod
    def _check_scores(name: str, scores, targets, kind: str) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid score name {name!r}: use a plain name without '/'")
        if kind not in ("loss", "margin"):
            raise ValueError(f"kind must be 'loss' or 'margin', got {kind!r}")
        if scores.ndim != 2 or scores.shape[0] != len(targets):
            raise ValueError(f"scores must be len(targets) x N, got {scores.shape} for {len(targets)} targets")
        if len(set(int(t) for t in targets)) != len(targets):
            raise ValueError(f"duplicate targets in {list(targets)}")
        return scores

    def append_scores(self, name: str, scores: np.ndarray, targets: list[int], kind: str,
                      extra_attrs: dict | None = None) -> None:
        """Add the score rows of new ``targets`` to ``scores/<name>``, crash-safely.

        The rows are written past the committed ones first; they only count once the target
        list (with one crc32 per row) names them, and that list lives in the array's metadata,
        rewritten atomically (the commit). A crash in between leaves the stored scores exactly as
        they were: the stray rows are ignored and overwritten by the next append.
        """
        scores = self._check_scores(name, scores, targets, kind)
        targets = [int(t) for t in targets]
        key, n = f"scores/{name}", scores.shape[1]
        extra = _jsonable(extra_attrs or {})
        if key not in self._group:
            arr = self._group.create_array(
                key, shape=(0, n), dtype="float64", chunks=(1, max(1, n)), compressors=None,
                fill_value=np.nan, attributes={**extra, "targets": [], "crc32": [], "kind": kind})
        else:
            arr = self._group[key]
            if arr.shape[1] != n or arr.attrs.get("kind", kind) != kind:
                raise StoreError(f"{key} in {self.path} holds {arr.attrs.get('kind')} scores over "
                                 f"{arr.shape[1]} examples, not {kind} over {n}; the store belongs "
                                 "to another config: pass --force or choose another --run-dir")
        attrs = dict(arr.attrs)
        old = [int(t) for t in attrs.get("targets", [])]
        again = sorted(set(old) & set(targets))
        if again:
            raise ValueError(f"targets {again[:5]} are already stored in {key}")
        old_crcs = [int(c) for c in attrs.get("crc32", [])]
        old_crcs += [_NO_CRC] * (len(old) - len(old_crcs))  # rows from before checksums
        r, k = len(old), len(targets)
        if arr.shape[0] != r + k:
            arr.resize((r + k, n))
        arr[r:r + k] = scores
        crash_point("scores_partial")
        arr.attrs.update({**extra, "targets": old + targets,
                          "crc32": old_crcs + [_crc(row) for row in scores]})  # the commit

    def write_scores(self, name: str, scores: np.ndarray, targets: list[int], kind: str,
                     extra_attrs: dict | None = None) -> None:
        """Replace ``scores/<name>`` by these rows. Not crash-safe (a crash after the delete loses
        the old rows): adding targets to stored scores is what append_scores is for."""
        scores = self._check_scores(name, scores, targets, kind)
        self.delete(f"scores/{name}")
        self.append_scores(name, scores, targets, kind, extra_attrs)

    def read_scores(self, name: str) -> tuple[np.ndarray, dict]:
        """(rows sorted by target id, attrs with the sorted "targets"); rows are checked against
        their stored crc32."""
        arr = self._array(f"scores/{name}")
        attrs = dict(arr.attrs)
        targets = [int(t) for t in attrs.get("targets", [])]
        fix = (f"delete {self.path}/scores/{name} and rerun `fastreplay magic` to recompute the "
               "scores (training is reused)")
        try:
            rows = arr[:len(targets)]
        except Exception as exc:
            raise StoreError(f"scores/{name} of {self.path} are unreadable ({type(exc).__name__}: "
                             f"{exc}); {fix}") from None
        crcs = [int(c) for c in attrs.pop("crc32", [])]
        for t, row, want in zip(targets, rows, crcs):
            if want != _NO_CRC and _crc(row) != want:
                raise StoreError(f"scores/{name} of {self.path}: the row of target {t} is corrupted "
                                 f"(checksum mismatch); {fix}")
        order = np.argsort(np.asarray(targets, dtype=np.int64), kind="stable")
        attrs["targets"] = [targets[i] for i in order]
        return rows[order], attrs

    def score_names(self) -> list[str]:
        if "scores" not in self._group:
            return []
        return sorted(self._group["scores"].array_keys())

    def lds_values(self, group: str, masks: np.ndarray, targets: list[int], attrs: dict) -> np.ndarray:
        """(M, K) measured values of an LDS experiment (NaN = model not trained yet).

        Creates ``group`` with the bit-packed masks on first use; afterwards the stored masks and
        targets must match, so a resumed experiment never mixes two different designs.
        """
        packed = np.packbits(masks, axis=1)
        m, k = masks.shape[0], len(targets)
        try:
            ready = "targets" in self._group[group].attrs
        except KeyError:
            ready = False
        if not ready:
            self.delete(group)  # a crash interrupted the set-up (its last step): start again
        if f"{group}/masks" in self._group:
            same = (self._group[f"{group}/masks"].shape == packed.shape
                    and np.array_equal(self._group[f"{group}/masks"][...], packed)
                    and list(self._group[group].attrs.get("targets", [])) == list(targets))
            if not same:
                raise StoreError(f"{self.path}/{group} holds an LDS run with other subsets or "
                                 "targets; delete it with `fastreplay clean --what lds` or change --keep")
            return self._group[f"{group}/values"][...]
        self._group.create_array(f"{group}/masks", shape=packed.shape, dtype="uint8",
                                 chunks=(min(256, m), packed.shape[1]))[...] = packed
        crash_point("lds_init")
        self._group.create_array(f"{group}/values", shape=(m, k), dtype="float64",
                                 chunks=(1, max(1, k)), fill_value=np.nan)
        # The commit of the set-up: until "targets" is there, the group is redone from scratch.
        self._group[group].attrs.update(_jsonable({**attrs, "targets": list(targets)}))
        return np.full((m, k), np.nan)

    def write_lds_row(self, group: str, row: int, values: np.ndarray) -> None:
        """One model's measurements: one chunk per row (one atomic file write), so a crash loses
        at most the model being trained; unwritten rows read as NaN and are retrained."""
        self._group[f"{group}/values"][row] = np.asarray(values, dtype=np.float64)
        crash_point("lds_model")

    def write_lds_result(self, group: str, result: dict) -> None:
        self._group[group].attrs.update({"result": _jsonable(result), "updated": _now()})

    def lds_groups(self) -> list[str]:
        return sorted(f"lds/{g}" for g in self._group["lds"].group_keys()) if "lds" in self._group else []

    def delete(self, name: str) -> None:
        """Delete a node; on a local store it disappears at once (renamed away, then removed),
        on a remote one object by object."""
        if _is_local(self.path):
            root = Path(self.path.removeprefix("file://"))
            _discard_tree(root / name, root)
        elif name in self._group:
            del self._group[name]

    def remove_partial_files(self) -> int:
        """Delete temporary files left by a killed writer (call only under the run lock); a
        remote store has none (each object write is atomic there)."""
        return remove_partial_files(self.path.removeprefix("file://")) if _is_local(self.path) else 0

    def nbytes_on_disk(self) -> int:
        """Bytes the store takes (for a remote store: the sizes of its objects)."""
        if is_remote(self.path):
            fs, path = _remote_fs(self.path)
            with remote_errors(self.path):
                return int(fs.du(path.rstrip("/"), total=True))
        root = self.path.removeprefix("file://")
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)

    def delete_checkpoints(self) -> None:
        """Drop checkpoints/ (the bulk of the store); schedule, final state and scores stay."""
        self._writer.flush()  # a queued write would otherwise recreate chunks after the delete
        self.delete("checkpoints")


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
