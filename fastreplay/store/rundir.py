"""The run directory: what fastreplay wrote there, recorded by content, so that it only ever
overwrites or deletes its own files.

A run directory may also hold the user's own files (notes, data, a --scores-out file); those
are never touched. A file's name says nothing about who wrote it (a user may keep a
``config.toml`` of their own there), so fastreplay keeps a manifest, ``.fastreplay-manifest.json``,
of every file it wrote with the hash of what it wrote, and overwrites or deletes a file only while
the manifest lists it and its content still matches. Also recorded: the directories it made
(``plots/``, ``debug/``, the run directory itself), whether it made ``.lock``, and temporaries
in flight (a file is written under a temporary name, then renamed; the name goes into the
manifest before the file is created, so a killed write leaves nothing unaccounted for).

``magic`` and ``train`` start a run only in a new or empty directory, or in one with a manifest
(claim(new_run=True)); in any other non-empty directory fastreplay cannot tell the user's files
from its own and refuses. Nothing is written or deleted through a symbolic link: not the lock,
not ``plots/``, not a plot (rundir.write and locks.py open with O_NOFOLLOW and check every
directory on the way).

The run store itself (``run.zarr/`` unless --store puts it elsewhere) is recognised by its
content (store/identity.py), and the lock keeps two commands off one run directory and one
store (store/locks.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Optional

from ..exceptions import StoreError
from ..progress import log
from .diskio import _remove_stale_temp_dirs, check_writable, disk_errors
from .identity import Kind, identify
from .locks import LOCK_NAME, RunDirLock, StoreLock, holds_lock_text
from .paths import local_path
from .remote import check_remote, is_remote

MANIFEST_NAME = ".fastreplay-manifest.json"
MANIFEST_FORMAT = 1
_MANIFEST_TEMP = re.compile(rf"^{re.escape(MANIFEST_NAME)}\.[0-9a-f]{{32}}\.tmp$")
"""The manifest's own temporaries (a uuid4 in the name): the one file fastreplay recognises by
name, because the manifest cannot record its own replacement."""
STORE_NAME = "run.zarr"


def content_hash(data: bytes) -> str:
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def _empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "files": {}, "dirs": [], "temps": [],
            "made_run_dir": False, "made_lock": False}


def _is_symlink(path: Path) -> bool:
    return path.is_symlink()


def _entries(path: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return sorted(p.name for p in path.iterdir())
    return []


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class RunDir:
    """A run directory under this process's locks (run directory and store), and the one way
    fastreplay writes and deletes files in it. Made by :func:`claim`; ``release()`` drops the
    locks (idempotent; RunStore.close calls it)."""

    def __init__(self, path: Path, locks: list, store: str):
        self.path = path
        self.store = store
        self._locks = locks
        self.owner = all(lock.owner for lock in locks)
        self._manifest: Optional[dict] = None

    # --- locks -------------------------------------------------------------------------------
    def release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()

    @property
    def held(self) -> bool:
        return any(lock.held for lock in self._locks)

    # --- the manifest ------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def manifest(self) -> dict:
        """The manifest as recorded (an empty one where none is written yet)."""
        if self._manifest is None:
            self._manifest = read_manifest(self.path) or _empty_manifest()
        return self._manifest

    def _save_manifest(self) -> None:
        """Write the manifest atomically (a temporary with a uuid, then a rename)."""
        target = self.manifest_path
        if _is_symlink(target):
            raise StoreError(f"{target} is a symbolic link; fastreplay never writes through one: "
                             "remove the link")
        data = json.dumps(self.manifest(), indent=1, sort_keys=True).encode()
        tmp = self.path / f"{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
        with disk_errors(str(target)):
            _write_new(tmp, data)
            try:
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def _record(self, **changes) -> None:
        m = self.manifest()
        for key, value in changes.items():
            m[key] = value
        self._save_manifest()

    def ours(self, rel: str) -> bool:
        """Whether RUN_DIR/``rel`` is a regular file fastreplay wrote and nobody changed since."""
        path = self.path / rel
        want = self.manifest()["files"].get(rel)
        if want is None or _is_symlink(path) or not path.is_file():
            return False
        try:
            return content_hash(path.read_bytes()) == want
        except OSError:
            return False

    # --- writing -----------------------------------------------------------------------------
    def _check_parents(self, rel: str, create: bool) -> Path:
        """RUN_DIR/``rel``'s directory, every step of it a real directory (created, and
        recorded, when ``create``), never a symbolic link."""
        here = self.path
        for part in Path(rel).parent.parts:
            here = here / part
            if _is_symlink(here) or (here.exists() and not here.is_dir()):
                what = "a symbolic link" if _is_symlink(here) else "not a directory"
                raise StoreError(f"{here} is {what}; fastreplay writes its outputs there and "
                                 "never through a link: move it away or use another --run-dir")
            if not here.exists():
                if not create:
                    continue
                with disk_errors(str(here)):
                    here.mkdir()
                dirs = self.manifest()["dirs"]
                rel_dir = str(here.relative_to(self.path))
                if rel_dir not in dirs:
                    self._record(dirs=[*dirs, rel_dir])
        return here

    def check_free(self, rels: Iterable[str], fix: str = "move it away or use another --run-dir") -> None:
        """Refuse, before any work, to write over a file fastreplay did not write (or that
        changed since): each of ``rels`` must be absent or ours, on a path without links."""
        for rel in rels:
            self._check_parents(rel, create=False)
            path = self.path / rel
            if (path.exists() or _is_symlink(path)) and not self.ours(rel):
                raise StoreError(_not_ours(path, self.manifest()["files"].get(rel), fix))

    def write(self, rel: str, data: bytes, fix: str = "move it away or use another --run-dir") -> Path:
        """Write ``data`` to RUN_DIR/``rel`` atomically (temporary file + rename), replacing only
        a file that is ours and unchanged, and record it in the manifest."""
        if isinstance(data, str):
            data = data.encode()
        parent = self._check_parents(rel, create=True)
        path = self.path / rel
        if (path.exists() or _is_symlink(path)) and not self.ours(rel):
            raise StoreError(_not_ours(path, self.manifest()["files"].get(rel), fix))
        tmp_rel = str(Path(rel).parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        m = self.manifest()
        self._record(temps=[*m["temps"], tmp_rel])  # before the file exists
        tmp = self.path / tmp_rel
        with disk_errors(str(path)):
            try:
                _write_new(tmp, data)
                os.replace(tmp, parent / path.name)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        files = dict(m["files"])
        files[rel] = content_hash(data)
        self._record(files=files, temps=[t for t in m["temps"] if t != tmp_rel])
        return path

    def remove_stale_temporaries(self) -> None:
        """Drop temporaries a killed write left behind (they are listed, so they are ours)."""
        m = self.manifest()
        if not m["temps"]:
            return
        for rel in m["temps"]:
            path = self.path / rel
            if not _is_symlink(path) and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
        self._record(temps=[])

    # --- deleting (clean --what all) -----------------------------------------------------------
    def remove_own_files(self) -> tuple[list[str], list[str]]:
        """Delete what fastreplay wrote here (apart from the store, which the caller discards,
        and ``.lock``, which goes last): the files the manifest lists while they still match,
        listed temporaries, then the directories it made when they are empty. Returns (the
        entries left in the run directory besides .lock, the files kept because they changed)."""
        m = self.manifest()
        changed = []
        for rel in sorted(m["files"]):
            path = self.path / rel
            if not (path.exists() or _is_symlink(path)):
                continue
            if self.ours(rel):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                changed.append(rel)
        for rel in m["temps"]:
            path = self.path / rel
            if not _is_symlink(path) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for rel in sorted(m["dirs"], key=lambda d: -len(Path(d).parts)):
            path = self.path / rel
            if not _is_symlink(path) and path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()  # only when empty: the user's own files stay
        for name in _entries(self.path):
            if _MANIFEST_TEMP.match(name) and not _is_symlink(self.path / name):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
        _remove_stale_temp_dirs(self.path / STORE_NAME)  # .run.zarr.creating-PID of dead processes
        left = [n for n in _entries(self.path) if n not in (LOCK_NAME, MANIFEST_NAME)]
        return left, changed

    def remove_bookkeeping(self) -> bool:
        """Last step of `clean --what all`, still under the lock: delete the manifest, .lock when
        fastreplay made it, and the run directory when fastreplay made it and it is now empty.
        Returns whether the run directory went."""
        m = self.manifest()
        if not _is_symlink(self.manifest_path):
            self.manifest_path.unlink(missing_ok=True)
        lock = self.path / LOCK_NAME
        if m["made_lock"] and not _is_symlink(lock) and lock.is_file():
            lock.unlink(missing_ok=True)
        self.release()
        if m["made_run_dir"] and not _entries(self.path):
            with contextlib.suppress(OSError):
                self.path.absolute().rmdir()
                return True
        return False


def _not_ours(path: Path, recorded: Optional[str], fix: str) -> str:
    if _is_symlink(path):
        return (f"{path} is a symbolic link; fastreplay never writes through one: {fix}")
    why = ("fastreplay wrote it, but it was changed since" if recorded else
           "fastreplay did not write it")
    return f"{path} exists and {why}; refusing to overwrite it: {fix}"


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file, never through a link) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def read_manifest(run_dir: Path) -> Optional[dict]:
    """The manifest of ``run_dir``, None where there is none; a one-line StoreError where one is
    there but unreadable (then nothing in the directory can be proven ours)."""
    path = Path(run_dir) / MANIFEST_NAME
    if _is_symlink(path):
        raise StoreError(f"{path} is a symbolic link; fastreplay never reads or writes through "
                         "one: remove the link")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path} ({exc.strerror or exc}); check the run directory's "
                         "permissions") from None
    try:
        m = json.loads(raw)
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise ValueError
        out = _empty_manifest()
        out.update({k: m[k] for k in out if k in m})
        if not (isinstance(out["files"], dict) and isinstance(out["dirs"], list)
                and isinstance(out["temps"], list)):
            raise ValueError
        return out
    except ValueError:
        raise StoreError(f"{path} is corrupted (not a fastreplay manifest); fastreplay cannot "
                         "tell its files from yours there: move the directory's contents "
                         "you want to keep and use a new --run-dir") from None


def _blocking_entries(run_dir: Path, store: str) -> list[str]:
    """The entries of a run directory without a manifest that stop a new run there: anything
    but fastreplay's own lock file and (a run store being content-identified) its store."""
    blocking = []
    for name in _entries(run_dir):
        path = run_dir / name
        if name == LOCK_NAME and not _is_symlink(path) and path.is_file():
            with contextlib.suppress(OSError):
                if holds_lock_text(path.read_bytes()[:64]):  # a lock file of fastreplay's
                    continue
        if (not is_remote(store) and path == Path(local_path(store))
                and identify(str(path)).kind is Kind.RUN_STORE):
            continue
        blocking.append(name)
    return blocking


def _refuse_foreign_dir(run_dir: Path, store: str) -> None:
    if read_manifest(run_dir) is not None:
        return
    blocking = _blocking_entries(run_dir, store)
    if blocking:
        raise StoreError(f"--run-dir {run_dir} is not empty ({_shown(blocking)}) and has no "
                         f"fastreplay manifest ({MANIFEST_NAME}), so fastreplay cannot tell "
                         "your files from its own; use a new or empty --run-dir (a run stored "
                         "there by an older fastreplay can be reused with --store "
                         f"{run_dir / STORE_NAME})")


def claim(run_dir, store: str, create: bool = True, new_run: bool = False) -> RunDir:
    """Lock ``run_dir`` and the store at ``store`` for this command and return the RunDir.

    ``create``: make the directory when missing (recorded: fastreplay then may remove it once
    empty). ``new_run`` (magic, train --run-dir): the directory must be new, empty, or hold a
    manifest; anything else is refused before anything is created. Checks that the directory
    is writable and the store's location usable (writable if local, reachable with its bucket
    and writable if remote). On any failure nothing stays locked and nothing fastreplay made
    stays behind.
    """
    run_dir = Path(run_dir)
    if _is_symlink(run_dir) and not run_dir.exists():
        raise StoreError(f"--run-dir {run_dir} is a broken symbolic link; point it at a "
                         "directory or use another --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise StoreError(f"--run-dir {run_dir} is a file, not a directory; choose a directory")
    if new_run and run_dir.exists():
        _refuse_foreign_dir(run_dir, store)
    made_dir = False
    if create and not run_dir.exists():
        with disk_errors(f"run directory {run_dir}"):
            run_dir.mkdir(parents=True, exist_ok=True)
        made_dir = True
    check_writable(run_dir)
    locks: list = []
    try:
        locks.append(RunDirLock(run_dir))
        locks.append(StoreLock(store))
        rd = RunDir(run_dir, locks, store)
        if rd.owner:
            if new_run:
                _refuse_foreign_dir(run_dir, store)  # again, now that no one else can write
            if is_remote(store):
                check_remote(store, write=True)
            elif Path(local_path(store)).is_dir():
                check_writable(local_path(store))
            m = rd.manifest()
            if made_dir or locks[0].created or new_run or rd.manifest_path.exists():
                rd._record(made_run_dir=m["made_run_dir"] or made_dir,
                           made_lock=m["made_lock"] or locks[0].created)
            rd.remove_stale_temporaries()
    except BaseException:
        for lock in reversed(locks):
            if lock.created and lock.held:
                with contextlib.suppress(OSError):
                    os.unlink(lock.path)
            lock.release()
        if made_dir:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    return rd


def clean_run_dir(rd: RunDir) -> None:
    """`clean --what all` after the store is gone: delete fastreplay's files in the run
    directory (RunDir.remove_own_files), log what stays and why, then the bookkeeping."""
    left, changed = rd.remove_own_files()
    if changed:
        log.info("kept %s in %s: fastreplay wrote them, but they were changed since",
                 _shown(changed), rd.path)
    gone = rd.remove_bookkeeping()
    if gone:
        log.info("removed %s", rd.path)
    elif left:
        log.info("kept %s: it still holds %s (not written by fastreplay, or changed since)",
                 rd.path, _shown(left))
    else:
        log.info("kept %s (fastreplay did not create it)", rd.path)

