"""RunStore: one run's Zarr v3 group (schedule, checkpoints, final state, scores, LDS values),
with crc32-checked rows and crash-safe commits; creating, opening and deleting run stores."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr

from ..exceptions import StoreError
from ..faults import crash_point
from .diskio import (
    SafeLocalStore,
    _discard_tree,
    _remove_stale_temp_dirs,
    disk_errors,
    remove_partial_files,
)
from .identity import DISCARDABLE, Kind, identify, refusal
from .paths import local_path
from .remote import (
    _REMOTE_OPTIONS,
    _delete_remote,
    _is_local,
    _remote_fs,
    check_remote,
    is_remote,
    remote_errors,
)
from .writer import AsyncWriter, _snapshot

STORE_NAME = "run.zarr"  # the store's name inside a run directory (without --store)

_STEP_CHUNK = 256  # schedule rows per chunk
_SCORE_CHUNK = 16  # score targets per chunk (stores written before append_scores)
_NO_CRC = -1  # checksum slot never written (stores from before checksums)


def _crc(a: np.ndarray) -> int:
    """crc32 of the exact bytes of ``a`` (C order)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def _open_zarr(path: str, mode: str) -> zarr.Group:
    if not _is_local(path):
        from zarr.storage import FsspecStore
        store = FsspecStore.from_url(path, storage_options=dict(_REMOTE_OPTIONS),
                                     read_only=(mode == "r"))
        return zarr.open_group(store=store, mode=mode)
    return zarr.open_group(store=SafeLocalStore(local_path(path), read_only=(mode == "r")),
                           mode=mode)


def discard_store(path) -> bool:
    """Delete a store; --force and `clean --what all` use it. Returns whether there was one.

    Only a fastreplay run store is deleted, or one whose root metadata is damaged but whose
    layout shows it is ours (store/identity.py); anything else at ``path`` is refused with a
    one-line StoreError and left alone, locally and remotely alike. A local store goes atomically
    (see _discard_tree); a remote one object by object, its root zarr.json last.
    """
    path = os.fspath(path)
    found = identify(path)
    if found.kind is Kind.ABSENT:
        return False
    if found.kind not in DISCARDABLE:
        raise refusal(path, found)
    if is_remote(path):
        _delete_remote(path)
    else:
        final = Path(local_path(path))
        _discard_tree(final, final)
    return True


def _exists_error(path: str) -> StoreError:
    """Why a new store cannot be created at ``path``, where something already is."""
    found = identify(path)
    if found.kind in (Kind.RUN_STORE, Kind.ABSENT):  # ABSENT: it went away meanwhile
        return StoreError(f"a run store already exists at {path}; "
                          "pass --force to overwrite it or choose another --run-dir")
    return refusal(path, found)


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


_DIGEST = "identity_digest"
_IDENTITY = ("config", "fingerprint", "inputs")
"""The attributes that say which run a store holds; their digest is recorded when the store is
made and checked on every open, so a hand edit (an lr changed in zarr.json) is refused instead
of silently retraining with it. Stores made before the digest existed are checked through the
config's fingerprint only (config.stored_config)."""


def _identity_digest(attrs: dict) -> str:
    """sha256 of the identity attributes as canonical JSON (what zarr reads back equals what
    was written: floats round-trip exactly)."""
    ident = {k: attrs.get(k) for k in _IDENTITY}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """A fastreplay run store (Zarr v3 group); see the package docs for the layout."""

    def __init__(self, path, group: zarr.Group, writer_maxsize: int = 4):
        self.path = str(path)
        self._group = group
        self._writer = AsyncWriter(writer_maxsize)
        self.run_dir = None  # the RunDir (store/rundir.py) whose locks close() releases

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
        now = _now()
        meta = {**_jsonable(attrs or {}), "config": config, "fingerprint": fingerprint,
                "versions": versions, "status": "created", "created": now, "updated": now}
        meta[_DIGEST] = _identity_digest(meta)
        if not _is_local(path):
            # One object write (zarr.json with the identity attrs) makes the group: it never
            # exists without its fingerprint.
            if identify(path).kind is not Kind.ABSENT:  # never mix into someone's objects
                raise _exists_error(path)
            from zarr.storage import FsspecStore
            with remote_errors(path):
                store = FsspecStore.from_url(path, storage_options=dict(_REMOTE_OPTIONS))
                try:
                    group = zarr.open_group(store=store, mode="w-", attributes=meta)
                except FileExistsError:
                    raise _exists_error(path) from None
            return cls(path, group)
        final = Path(local_path(path))
        if final.exists() or final.is_symlink():
            raise _exists_error(path)
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
                    raise _exists_error(path) from None
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
            if _is_local(path) and not os.path.isdir(local_path(path)):
                raise FileNotFoundError(path)  # don't let the store create an empty directory
            group = _open_zarr(path, mode)
        except Exception as exc:  # FileNotFoundError / GroupNotFoundError / array at path
            found = identify(path)
            if found.kind not in (Kind.ABSENT, Kind.RUN_STORE):  # damaged, or not ours
                raise refusal(path, found) from None
            raise StoreError(f"no run store at {path} ({type(exc).__name__}); run `fastreplay magic "
                             f"--run-dir DIR{' --store ' + path if is_remote(path) else ''} ...` "
                             f"first or check {'--store' if is_remote(path) else '--run-dir'}") from exc
        if "fingerprint" not in group.attrs or "config" not in group.attrs:
            raise StoreError(f"{path} is a Zarr group but not a fastreplay run store; "
                             "check --run-dir")
        attrs = group.attrs.asdict()
        if _DIGEST in attrs and attrs[_DIGEST] != _identity_digest(attrs):
            raise StoreError(f"the identity of {path} (its stored config, fingerprint or input "
                             "fingerprints) was edited or corrupted since the run was made; "
                             "restore the store's zarr.json from a copy, or rerun `fastreplay "
                             "magic` with --force (or another --run-dir) to train again")
        return cls(path, group)

    @staticmethod
    def exists(path) -> bool:
        """Whether ``path`` holds a run store. For a remote URL whose location cannot be used
        (unreachable endpoint, missing bucket or driver) this raises a one-line StoreError
        rather than answering no. The same answer as identify() (store/identity.py), which
        every delete and overwrite asks."""
        return identify(path).kind is Kind.RUN_STORE

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            if self.run_dir is not None:
                self.run_dir.release()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.__exit__(exc_type, exc, tb)
        finally:
            if self.run_dir is not None:
                self.run_dir.release()

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
                             "this far (or its checkpoints were cleaned): rerun `fastreplay magic` (with --force if cleaned)") from exc

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
                 num_params: int, num_buffers: int, dtype: str,
                 state_size: int | None = None) -> None:
        """Create every fixed-shape array; a no-op for arrays that already exist with these shapes.
        ``state_size``: length of the optimizer state, stored as checkpoints/momentum (SGD's
        momentum: num_params, the default; Adam's two moments: 2 num_params)."""
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
        S = P if state_size is None else state_size
        for name, n in (("params", P), ("momentum", S), ("buffers", Q)):
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

    def clean_command(self, what: str) -> str:
        """The `fastreplay clean` command line that deletes ``what`` from this store, for the
        fix part of error messages (RUN_DIR where the run directory is unknown)."""
        store = Path(local_path(self.path)) if _is_local(self.path) else None
        run_dir = str(self.run_dir.path) if self.run_dir is not None else None
        if run_dir is None and store is not None and store.name == STORE_NAME:
            run_dir = str(store.parent)
        command = f"fastreplay clean {shlex.quote(run_dir) if run_dir else 'RUN_DIR'} --what {what}"
        if store is not None and run_dir is not None and store == Path(run_dir) / STORE_NAME:
            return command
        return f"{command} --store {shlex.quote(self.path)}"

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
                             "(training crashed or is still running); rerun `fastreplay magic` to resume it")
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

    def _scores_fix(self) -> str:
        return (f"delete the stored scores with `{self.clean_command('scores')}` and rerun "
                "`fastreplay magic` to recompute them (training is reused)")

    def _score_array(self, name: str):
        """``scores/<name>``, or a one-line StoreError when its zarr.json cannot be read."""
        key = f"scores/{name}"
        try:
            return self._group[key]
        except KeyError:
            return self._array(key)  # its "no such array" message
        except Exception as exc:  # truncated or garbage metadata fails to parse or validate
            raise StoreError(f"{key} of {self.path} is corrupted (its zarr.json is unreadable: "
                             f"{type(exc).__name__}); {self._scores_fix()}") from None

    def read_scores(self, name: str) -> tuple[np.ndarray, dict]:
        """(rows sorted by target id, attrs with the sorted "targets"); rows are checked against
        their stored crc32."""
        arr = self._score_array(name)
        attrs = dict(arr.attrs)
        targets = [int(t) for t in attrs.get("targets", [])]
        fix = self._scores_fix()
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
        """The stored score arrays; a one-line StoreError naming the first one whose zarr.json
        cannot be read."""
        try:
            if "scores" not in self._group:
                return []
            return sorted(self._group["scores"].array_keys())
        except Exception:
            for name in self._listed_scores():
                self._score_array(name)  # raises for the damaged one
            raise StoreError(f"scores/ of {self.path} is corrupted (its metadata is unreadable); "
                             f"{self._scores_fix()}") from None

    def _listed_scores(self) -> list[str]:
        """The names under scores/ as the storage lists them (no metadata parsed)."""
        from zarr.core.sync import collect_aiterator
        with contextlib.suppress(Exception):
            group = self._group["scores"]
            keys = collect_aiterator(group.store.list_dir(group.path))
            return sorted(k for k in keys if k != "zarr.json")
        return []

    def lds_values(self, group: str, masks: np.ndarray, targets: list[int], attrs: dict) -> np.ndarray:
        """(M, K) measured values of an LDS experiment (NaN = model not trained yet), each stored
        row checked against its crc32 (see _verified_lds_values).

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
                                 f"targets; delete it with `{self.clean_command('lds')}` or change --keep")
            return self._verified_lds_values(group)
        self._group.create_array(f"{group}/masks", shape=packed.shape, dtype="uint8",
                                 chunks=(min(256, m), packed.shape[1]))[...] = packed
        crash_point("lds_init")
        self._group.create_array(f"{group}/values", shape=(m, k), dtype="float64",
                                 chunks=(1, max(1, k)), fill_value=np.nan)
        # crc32 of each row, one chunk per row, written after the row: a row counts once it is set.
        self._group.create_array(f"{group}/checksum", shape=(m,), dtype="int64", chunks=(1,),
                                 fill_value=_NO_CRC)
        # The commit of the set-up: until "targets" is there, the group is redone from scratch.
        self._group[group].attrs.update(_jsonable({**attrs, "targets": list(targets)}))
        return np.full((m, k), np.nan)

    def _verified_lds_values(self, group: str) -> np.ndarray:
        """The stored LDS values with every row checked against its crc32. A row whose checksum
        was never written (a crash between the two writes) reads as NaN, so it is retrained; a
        row that fails its checksum is a one-line StoreError. Groups written before LDS
        checksums existed (no ``checksum`` array) are read without the check."""
        fix = f"delete the LDS results with `{self.clean_command('lds')}` and rerun `fastreplay lds`"
        try:
            values = self._group[f"{group}/values"][...]
            crcs = (self._group[f"{group}/checksum"][...]
                    if f"{group}/checksum" in self._group else None)
        except Exception as exc:  # a truncated/garbled chunk or metadata file
            raise StoreError(f"{group} of {self.path} is unreadable ({type(exc).__name__}); "
                             f"{fix}") from None
        if crcs is None:
            return values
        for row, want in enumerate(crcs):
            if int(want) == _NO_CRC:
                values[row] = np.nan  # not committed: trained again
            elif _crc(values[row]) != int(want):
                raise StoreError(f"{group} of {self.path}: the values of model {row} are "
                                 f"corrupted (checksum mismatch); {fix}")
        return values

    def write_lds_row(self, group: str, row: int, values: np.ndarray) -> None:
        """One model's measurements: one chunk per row (one atomic file write), then its crc32
        (another), so a crash loses at most the model being trained; rows without a checksum read
        as NaN and are retrained."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        self._group[f"{group}/values"][row] = values
        crash_point("lds_partial")
        if f"{group}/checksum" in self._group:  # absent in groups from before LDS checksums
            self._group[f"{group}/checksum"][row] = _crc(values)
        crash_point("lds_model")

    def write_lds_result(self, group: str, result: dict) -> None:
        self._group[group].attrs.update({"result": _jsonable(result), "updated": _now()})

    def lds_experiment(self, group: str, num_train: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(masks (M, N) bool, measured values (M, K), targets) of the stored LDS experiment
        ``group``, only its models already measured, each row checked against its crc32: what
        any attribution method is held against (`fastreplay compare`)."""
        if group not in self.lds_groups() or "targets" not in self._group[group].attrs:
            raise StoreError(f"{self.path} holds no LDS experiment {group}; run `fastreplay lds` "
                             "with that --keep and --removal first")
        masks = np.unpackbits(self._group[f"{group}/masks"][...], axis=1,
                              count=num_train).astype(bool)
        values = self._verified_lds_values(group)
        done = ~np.isnan(values).any(axis=1)
        return masks[done], values[done], [int(t) for t in self._group[group].attrs["targets"]]

    def lds_groups(self) -> list[str]:
        return sorted(f"lds/{g}" for g in self._group["lds"].group_keys()) if "lds" in self._group else []

    def delete(self, name: str) -> None:
        """Delete a node; on a local store it disappears at once (renamed away, then removed),
        on a remote one object by object."""
        if _is_local(self.path):
            root = Path(local_path(self.path))
            _discard_tree(root / name, root)
        elif name in self._group:
            del self._group[name]

    def remove_partial_files(self) -> int:
        """Delete temporary files left by a killed writer (call only under the run lock); a
        remote store has none (each object write is atomic there)."""
        return remove_partial_files(local_path(self.path)) if _is_local(self.path) else 0

    def nbytes_on_disk(self) -> int:
        """Bytes the store takes (for a remote store: the sizes of its objects)."""
        if is_remote(self.path):
            fs, path = _remote_fs(self.path)
            with remote_errors(self.path):
                return int(fs.du(path.rstrip("/"), total=True))
        root = local_path(self.path)
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)

    def delete_checkpoints(self) -> None:
        """Drop checkpoints/ (the bulk of the store); schedule, final state and scores stay."""
        self._writer.flush()  # a queued write would otherwise recreate chunks after the delete
        self.delete("checkpoints")
