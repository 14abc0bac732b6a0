#!/usr/bin/env bash
# One device call: CUDA tests, a step-timing probe, then the full recipe with 10 measurements.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
python -m fastreplay.interface.cli info --json | tee $OUT/info.json
FASTREPLAY_REQUIRE_EXT=1 timeout 150 python -m pytest -q -m cuda tests/test_kernels.py tests/test_store.py 2>&1 | tail -15 | tee $OUT/cuda_tests.txt
timeout 120 python benchmarks/step_probe.py --preset full --targets 5 | tee $OUT/probe.json
timeout ${MAGIC_TIMEOUT:-330} python -m fastreplay.interface.cli magic --preset full --targets 0:10 --run-dir runs/full --json --log-file $OUT/magic.log --no-plots | tee $OUT/magic.json
ls -la runs/full; du -sh runs/full/run.zarr
