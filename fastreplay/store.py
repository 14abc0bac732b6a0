"""The run store: one Zarr v3 group holding the schedule, checkpoints, final state and scores.

Checkpoints are written on a background thread so training only waits when the write queue
is full; each checkpoint row has a commit marker written last, so a crash never leaves a
half-written checkpoint that reads as valid.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import queue
import threading
from datetime import datetime, timezone

import numpy as np
import torch
import zarr

from .exceptions import StoreError

_STEP_CHUNK = 256  # schedule rows per chunk
_SCORE_CHUNK = 16  # score targets per chunk


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

    @classmethod
    def create(cls, path, config: dict, fingerprint: str, versions: dict) -> RunStore:
        path = os.fspath(path)
        config, versions = _jsonable(config), _jsonable(versions)
        try:
            json.dumps({"config": config, "versions": versions})
        except (TypeError, ValueError) as exc:
            raise StoreError(f"config/versions are not JSON-serialisable ({exc}); "
                             "pass plain dicts of str/int/float/bool/list") from exc
        try:
            group = zarr.open_group(path, mode="w-")
        except FileExistsError as exc:
            raise StoreError(f"a run store already exists at {path}; "
                             "pass --force to overwrite it or choose another --run-dir") from exc
        now = _now()
        group.attrs.update({"config": config, "fingerprint": fingerprint, "versions": versions,
                            "status": "created", "created": now, "updated": now})
        return cls(path, group)

    @classmethod
    def open(cls, path, mode: str = "r+") -> RunStore:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = os.fspath(path)
        try:
            group = zarr.open_group(path, mode=mode)
        except Exception as exc:  # FileNotFoundError / GroupNotFoundError / array at path
            raise StoreError(f"no run store at {path} ({type(exc).__name__}); "
                             "run `fastreplay train` first or check --run-dir") from exc
        if "fingerprint" not in group.attrs or "config" not in group.attrs:
            raise StoreError(f"{path} is a Zarr group but not a fastreplay run store; "
                             "check --run-dir")
        return cls(path, group)

    @staticmethod
    def exists(path) -> bool:
        try:
            return "fingerprint" in zarr.open_group(os.fspath(path), mode="r").attrs
        except Exception:
            return False

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.__exit__(exc_type, exc, tb)

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
        value = _jsonable(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"run attribute {key!r} is not JSON-serialisable ({exc}); store plain values") from exc
        self._group.attrs.update({key: value, "updated": _now()})

    def _array(self, name: str):
        try:
            return self._group[name]
        except KeyError as exc:
            raise StoreError(f"{self.path} has no '{name}'; the run was not allocated/trained "
                             "this far (or its checkpoints were cleaned): rerun `fastreplay train`") from exc

    def _require(self, name: str, shape: tuple, dtype: str, chunks: tuple, fill=0) -> None:
        if name in self._group:
            arr = self._group[name]
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise StoreError(f"'{name}' in {self.path} is {arr.shape} {arr.dtype}, expected "
                                 f"{shape} {dtype}; the store belongs to another config: "
                                 "pass --force or choose another --run-dir")
            return
        chunks = tuple(max(1, c) for c in chunks)  # zero-length axes (Q == 0) still need chunk >= 1
        self._group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                 compressors=None, fill_value=fill)

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
        self._require("checkpoints/step", (K,), "int64", (1,), fill=-1)
        self._require("checkpoints/committed", (K,), "bool", (1,), fill=False)
        for name, n in (("params", P), ("momentum", P), ("buffers", Q)):
            self._require(f"checkpoints/{name}", (K, n), dtype, (1, n))
        self._require("final/params", (P,), dtype, (P,))
        self._require("final/buffers", (Q,), dtype, (Q,))

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

    def _write_row(self, name: str, row, value: np.ndarray) -> None:
        """Write one flat vector, refusing lossy casts: replay must be bitwise exact."""
        arr = self._array(name)
        value = np.asarray(value).reshape(-1)
        width = arr.shape[-1]
        if value.size != width or not np.can_cast(value.dtype, arr.dtype, "safe"):
            raise StoreError(f"cannot store {value.size} x {value.dtype} into '{name}' "
                             f"({width} x {arr.dtype}); the model/dtype differs from the "
                             "allocated store: pass --force or choose another --run-dir")
        arr[row] = value.astype(arr.dtype, copy=False)

    def _write_checkpoint_now(self, slot, step, params, momentum, buffers) -> None:
        committed = self._array("checkpoints/committed")
        committed[slot] = False  # an overwrite in progress must not read as the old checkpoint
        self._write_row("checkpoints/params", slot, params)
        self._write_row("checkpoints/momentum", slot, momentum)
        self._write_row("checkpoints/buffers", slot, buffers)
        self._array("checkpoints/step")[slot] = step
        committed[slot] = True

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

    def read_checkpoint(self, slot: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        slot = self._check_slot(slot)
        if not bool(self._array("checkpoints/committed")[slot]):
            raise StoreError(f"checkpoint slot {slot} in {self.path} was never fully written "
                             "(training crashed or is still running); rerun or resume `fastreplay train`")
        step = int(self._array("checkpoints/step")[slot])
        return (step, self._array("checkpoints/params")[slot], self._array("checkpoints/momentum")[slot],
                self._array("checkpoints/buffers")[slot])

    def _write_final_now(self, params, buffers) -> None:
        self._write_row("final/params", slice(None), params)
        self._write_row("final/buffers", slice(None), buffers)

    def write_final(self, params, buffers) -> None:
        self._writer.submit(self._write_final_now, _snapshot(params), _snapshot(buffers))

    def read_final(self) -> tuple[np.ndarray, np.ndarray]:
        return self._array("final/params")[...], self._array("final/buffers")[...]

    def write_scores(self, name: str, scores: np.ndarray, targets: list[int], kind: str,
                     extra_attrs: dict | None = None) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid score name {name!r}: use a plain name without '/'")
        if kind not in ("loss", "margin"):
            raise ValueError(f"kind must be 'loss' or 'margin', got {kind!r}")
        if scores.ndim != 2 or scores.shape[0] != len(targets):
            raise ValueError(f"scores must be len(targets) x N, got {scores.shape} for {len(targets)} targets")
        attrs = {**_jsonable(extra_attrs or {}), "targets": [int(t) for t in targets], "kind": kind}
        arr = self._group.create_array(
            f"scores/{name}", shape=scores.shape, dtype="float64", overwrite=True, attributes=attrs,
            chunks=(max(1, min(_SCORE_CHUNK, scores.shape[0])), max(1, scores.shape[1])))
        arr[...] = scores

    def read_scores(self, name: str) -> tuple[np.ndarray, dict]:
        arr = self._array(f"scores/{name}")
        return arr[...], dict(arr.attrs)

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
        self._group.create_array(f"{group}/values", shape=(m, k), dtype="float64",
                                 chunks=(1, max(1, k)), fill_value=np.nan)
        self._group[group].attrs.update(_jsonable({**attrs, "targets": list(targets)}))
        return np.full((m, k), np.nan)

    def write_lds_row(self, group: str, row: int, values: np.ndarray) -> None:
        """One model's measurements: one chunk per row, so a crash loses at most that model."""
        self._group[f"{group}/values"][row] = np.asarray(values, dtype=np.float64)

    def write_lds_result(self, group: str, result: dict) -> None:
        self._group[group].attrs.update({"result": _jsonable(result), "updated": _now()})

    def lds_groups(self) -> list[str]:
        return sorted(f"lds/{g}" for g in self._group["lds"].group_keys()) if "lds" in self._group else []

    def delete(self, name: str) -> None:
        if name in self._group:
            del self._group[name]

    def nbytes_on_disk(self) -> int:
        if "://" in self.path and not self.path.startswith("file://"):
            raise StoreError(f"disk usage is only measured for local stores, not {self.path}")
        root = self.path.removeprefix("file://")
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)

    def delete_checkpoints(self) -> None:
        """Drop checkpoints/ (the bulk of the store); schedule, final state and scores stay."""
        self._writer.flush()  # a queued write would otherwise recreate chunks after the delete
        if "checkpoints" in self._group:
            del self._group["checkpoints"]


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
