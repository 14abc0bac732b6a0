"""The run directory: what fastreplay writes there, so that cleaning deletes exactly that.

A run directory may also hold the user's own files (notes, data, a --scores-out file); those
are never touched. What fastreplay writes:

* ``run.zarr/`` (the store, unless --store puts it elsewhere) and ``.lock``;
* ``config.toml`` and ``magic_summary.json`` (api.write_text_atomic);
* ``plots/target_*.png`` (magic) and ``plots/lds_*.png`` (lds);
* ``debug/harm_GROUP.csv``, ``.json`` and ``.png`` (debug);
* temporaries a killed process can leave: ``.config.toml.PID.tmp`` and
  ``.magic_summary.json.PID.tmp`` (write_text_atomic), ``.write-probe-PID`` (the writability
  probe, store.check_writable) and ``.run.zarr.creating-PID`` / ``.run.zarr.deleting.ID-PID``
  (creating and discarding the store, store/diskio.py).

Symbolic links are never followed out of the run directory, nor removed (fastreplay writes
none); a symlinked store loses only the link (store/diskio.py, _discard_tree).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from . import LOCK_NAME, STORE_NAME
from .diskio import _remove_stale_temp_dirs

TEXT_FILES = ("config.toml", "magic_summary.json")
PLOTS = "plots"
PLOT_PATTERNS = ("target_*.png", "lds_*.png")
DEBUG = "debug"
DEBUG_PATTERNS = ("harm_*.csv", "harm_*.json", "harm_*.png")
_TEXT_TEMP = re.compile(r"^\.(?:config\.toml|magic_summary\.json|harm_[\w.-]+\.(?:csv|json))"
                        r"\.\d+\.tmp$")
_PROBE = re.compile(r"^\.write-probe-\d+$")


def text_temp(path: Path) -> Path:
    """The temporary name write_text_atomic writes ``path`` under before renaming it."""
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def _remove_file(path: Path) -> None:
    """Unlink ``path`` if it is a regular file (not a symlink, not a directory)."""
    if path.is_file() and not path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def remove_text_temps(run_dir) -> None:
    """Delete the temporaries of a killed write_text_atomic (call under the run lock)."""
    for path in Path(run_dir).iterdir():
        if _TEXT_TEMP.match(path.name):
            _remove_file(path)


def remove_run_files(run_dir) -> list[str]:
    """Delete what fastreplay wrote in ``run_dir`` apart from the store and ``.lock`` (the caller
    removes those, in that order, under the lock); ``plots/`` goes only if nothing else is in
    it. Returns the names of the entries left in the run directory besides ``.lock``."""
    run_dir = Path(run_dir)
    for name in TEXT_FILES:
        _remove_file(run_dir / name)
    for folder, patterns in ((PLOTS, PLOT_PATTERNS), (DEBUG, DEBUG_PATTERNS)):
        sub = run_dir / folder
        if _is_real_dir(sub):
            for path in sub.iterdir():
                if any(path.match(p) for p in patterns) or _TEXT_TEMP.match(path.name):
                    _remove_file(path)
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when empty: the user's own files stay
    for path in run_dir.iterdir():
        if _TEXT_TEMP.match(path.name) or _PROBE.match(path.name):
            _remove_file(path)
    _remove_stale_temp_dirs(run_dir / STORE_NAME)  # .run.zarr.creating-PID etc. of dead processes
    return sorted(path.name for path in run_dir.iterdir() if path.name != LOCK_NAME)
