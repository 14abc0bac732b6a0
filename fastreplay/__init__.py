"""fastreplay: exact data attribution by replaying training backwards (MAGIC scores, REPLAY)."""
import os as _os

# Deterministic cuBLAS needs this before CUDA initialises; replay depends on bitwise-equal steps.
_os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__version__ = "0.1.0"
