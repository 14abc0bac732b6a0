#!/usr/bin/env bash
# The main job on a fresh machine: install, get CIFAR-10, score 4 test images with the quick preset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/cifar10.sh
fastreplay magic --preset quick --targets 0:3 --run-dir runs/quick --download "$@"
