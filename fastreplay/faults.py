"""Test-only fault injection: ``FASTREPLAY_CRASH_AT="point:count"`` SIGKILLs this process.

``crash_point(name)`` is called at the places where a crash is most likely to leave a store
half-written (after a training step, between the rows of a checkpoint, between a file's temporary
write and its rename, ...). When ``name`` equals ``point`` and it has been hit ``count`` times in
this process, the process kills itself with SIGKILL: no ``finally`` blocks, no flushes, exactly like
``kill -9`` or the OOM killer. Unset (the normal case), a call costs one dict lookup.

Points (see docs/errors.md): ``train_step``, ``rebuild_step``, ``retrain_step`` (after each forward
step of training, of a replay's segment rebuild, of an LDS retraining), ``checkpoint_partial``
(params/momentum written, commit marker not), ``checkpoint_written``, ``final_partial``,
``final_written``, ``trained``, ``scores_partial`` (rows written, target list not),
``replay_chunk``, ``lds_init``, ``lds_model``, ``store_write`` (a store file written to its
temporary name, not yet renamed), ``store_creating`` (new store not yet renamed into place),
``store_created``.
"""
from __future__ import annotations

import os
import signal
import threading

ENV = "FASTREPLAY_CRASH_AT"

_lock = threading.Lock()
_counts: dict[str, int] = {}
_target: tuple[str, int] | None = None
_parsed_from: str | None = None


def _parse(spec: str) -> tuple[str, int] | None:
    name, sep, count = spec.partition(":")
    try:
        return (name.strip(), int(count) if sep else 1)
    except ValueError:
        return None


def crash_point(name: str) -> None:
    """SIGKILL this process at the ``count``-th hit of ``name`` if FASTREPLAY_CRASH_AT asks for it."""
    global _target, _parsed_from
    spec = os.environ.get(ENV)
    if not spec:
        return
    with _lock:
        if spec != _parsed_from:
            _target, _parsed_from = _parse(spec), spec
            _counts.clear()
        if _target is None or _target[0] != name:
            return
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] >= _target[1]
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
