#!/usr/bin/env bash
# Install fastreplay and its dependencies into .venv in the checkout (created here when missing),
# building the C++/CUDA core. The system's Python packages are left as they are.
# $PYTHON (default python3) creates the venv. When that interpreter imports a torch that
# pyproject.toml allows, .venv reuses it (torch, torchvision, the CUDA libraries, triton) through
# links instead of copying ~5 GB (scripts/system_torch.py); otherwise torch goes into .venv.
# Idempotent: a second run only rebuilds what changed (the extension only when its inputs did).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=$PWD/.venv
vpy=$venv/bin/python
if ! "$vpy" -c '' 2>/dev/null; then
  echo "creating $venv with $PY"
  "$PY" -m venv --clear "$venv" \
    || { echo "error: '$PY -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
pip=("$vpy" -m pip install -q)
# torch first: the extension builds against the venv's torch (no build isolation).
if "$PY" scripts/system_torch.py "$venv" "$site" "$PWD/.system-torch"; then
  pip+=(-c "$venv/system-torch-constraints.txt")   # pip must keep the linked versions
  "${pip[@]}" torch torchvision    # already there through the links; adds their small dependencies
else
  rc=$?; [ "$rc" -eq 10 ] || exit "$rc"
  "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null || "${pip[@]}" torch torchvision
fi
"${pip[@]}" setuptools wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/lib64 ]; then export CUDA_HOME=/usr/local/cuda; fi
# pip builds the extension from scratch in a temporary folder on every `pip install -e`, so skip
# it while its inputs are those of the last successful install (stamp) and the install works.
inputs() {
  find csrc -type f | LC_ALL=C sort | xargs sha256sum
  sha256sum setup.py pyproject.toml
  env | grep -E '^(CUDA_HOME|CUDA_PATH|FASTREPLAY_CUDA|TORCH_CUDA_ARCH_LIST|CC|CXX|CFLAGS|CXXFLAGS|CPPFLAGS|LDFLAGS)=' | LC_ALL=C sort || true
  readlink -f "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" || true
  "$vpy" -c 'import os, sys, torch; print(sys.version, torch.__version__, torch.version.cuda, os.path.realpath(torch.__file__))'
}
stamp=$venv/fastreplay-build.stamp
want=$(inputs | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$vpy" -m pip check > /dev/null 2>&1 \
   && "$vpy" -I -c "import fastreplay, fastreplay.core.kernels as k, os, sys; sys.exit(not (k.extension_loaded() and os.path.samefile(os.path.dirname(fastreplay.__file__), sys.argv[1])))" "$PWD/fastreplay" 2>/dev/null; then
  echo "fastreplay in .venv is up to date (build inputs unchanged since the last install)"
else
  rm -f "$stamp"
  "${pip[@]}" --no-build-isolation -e ".[test]"
  echo "$want" > "$stamp"
fi
"$vpy" -c "import fastreplay.core.kernels as k; print('fastreplay installed in .venv; compiled kernels:', k.extension_loaded(), '| cuda kernels:', k.cuda_kernels_built())"
echo "to use it by hand: source .venv/bin/activate"
