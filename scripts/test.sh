#!/usr/bin/env bash
# The test suite on a fresh machine: install into .venv, the C++ test (CMake + ctest), then pytest
# (CUDA tests skip without a GPU). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
py=.venv/bin/python
prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')
mkdir -p build && cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 \
  || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j 2 >> build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
(cd build/cmake && ctest --output-on-failure)
export FASTREPLAY_REQUIRE_EXT=1   # a broken extension build must fail the tests, not skip them
export FASTREPLAY_REQUIRE_HF=1    # so must a missing Hugging Face extra (tests/test_huggingface.py)
"$py" -m pytest -q -ra "$@"
