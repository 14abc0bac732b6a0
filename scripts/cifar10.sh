#!/usr/bin/env bash
# Make CIFAR-10 available at $CIFAR_ROOT (default ~/.cache/fastreplay/cifar10): from an optional
# local JPEG copy beside the checkout (../shared/data/) when present, else nothing (then pass
# --download to fastreplay, as scripts/quickstart.sh does). Runs the expander with .venv's python
# (scripts/install.sh; it has numpy and Pillow), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python; [ -x "$py" ] || py=python3
root=${CIFAR_ROOT:-$HOME/.cache/fastreplay/cifar10}
if [ -f "$root/cifar-10-batches-py/test_batch" ]; then echo "CIFAR-10 found at $root"; exit 0; fi
for expander in ../shared/data/expand_cifar10.py shared/data/expand_cifar10.py; do
  if [ -f "$expander" ]; then
    if "$py" "$expander" "$root"; then echo "CIFAR-10 written to $root"; exit 0; fi
    echo "warning: $expander failed; falling back to the download" >&2
  fi
done
echo "no local CIFAR-10 copy; fastreplay will fetch it with --download" >&2
