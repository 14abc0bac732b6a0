#!/usr/bin/env bash
# One device call (one H100): CUDA kernel tests, `fastreplay bench replay` on the full preset in
# fp32 (8 epochs to fit the call; last epoch attributed), and the pytest-benchmark suites saved
# as a baseline under $OUT/bm.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results.txt
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $R
FASTREPLAY_REQUIRE_EXT=1 timeout 150 python -m pytest -q -m cuda tests/test_kernels.py 2>&1 | tail -2 | tee -a $R
timeout 330 python -m fastreplay bench replay --device cuda --preset full --targets 1,4 \
  --set train.epochs=8 --json 2>>$OUT/bench.log | tee -a $R
timeout 120 python -m pytest -q benchmarks/ --benchmark-only --benchmark-save=h100 \
  --benchmark-storage=$OUT/bm 2>&1 | tail -14 | tee -a $R
true
