#!/usr/bin/env bash
# Install fastreplay and its dependencies into the current Python, building the C++/CUDA core.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first: the extension builds against the installed torch (no build isolation).
$PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null \
  || $PY -m pip install -q torch torchvision
$PY -m pip install -q setuptools wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/lib64 ]; then export CUDA_HOME=/usr/local/cuda; fi
$PY -m pip install -q --no-build-isolation -e ".[test]"
$PY -c "import fastreplay.core.kernels as k; print('fastreplay installed; compiled kernels:', k.extension_loaded(), '| cuda kernels:', k.cuda_kernels_built())"
