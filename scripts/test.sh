#!/usr/bin/env bash
# The test suite on a fresh machine: install, then pytest (CUDA tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export FASTREPLAY_REQUIRE_EXT=1   # a broken extension build must fail the tests, not skip them
python3 -m pytest -q -ra "$@"
