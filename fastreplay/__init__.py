"""fastreplay: exact data attribution by replaying training backwards (MAGIC scores, REPLAY).

Layers, each using only those below it:
- ``interface``: the Python facade (``api``), the CLI, argument checks and figures;
- ``workflows``: LDS validation, the smoothness screen, benchmarks;
- ``core``: recipe, model, SGD step and adjoint, training, replay, measurements;
- ``store``: the Zarr run store, the run directory (lock, atomic writes) and input fingerprints;
- shared by all: ``config``, ``task`` (what a user brings), ``data``, ``distributed``,
  ``progress``, ``faults`` and the one ``exceptions`` module.

The names users need are importable from here: ``from fastreplay import Task, run_magic``.
"""
import os as _os

# Deterministic cuBLAS needs this before CUDA initialises; replay depends on bitwise-equal steps.
_os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__version__ = "0.1.0"

_PUBLIC = {
    "Task": "fastreplay.task", "ArrayData": "fastreplay.task", "load_task": "fastreplay.task",
    "ImageData": "fastreplay.data", "load_config": "fastreplay.config",
    "run_magic": "fastreplay.interface.api", "open_or_train": "fastreplay.interface.api",
    "open_trained": "fastreplay.interface.api", "counterfactual": "fastreplay.interface.api",
    "run_lds": "fastreplay.workflows.lds", "check_smoothness": "fastreplay.workflows.smoothness",
    "FastReplayError": "fastreplay.exceptions",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """The public names, imported on first use (so that `fastreplay --help` stays quick)."""
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fastreplay' has no attribute {name!r}")
