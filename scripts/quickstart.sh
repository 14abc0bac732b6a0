#!/usr/bin/env bash
# The main job on a fresh machine: install into .venv, get CIFAR-10, score 3 test images with the
# quick preset over its whole run, then check that the scores predict retraining (LDS, 16 models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/cifar10.sh
.venv/bin/fastreplay magic --preset quick --targets 0:3 --run-dir runs/quick --download "$@"
.venv/bin/fastreplay lds --run-dir runs/quick --models 16 --keep 0.99
