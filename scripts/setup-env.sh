#!/usr/bin/env bash
# Creates (or reuses) .venv and installs ff-kernels into it with the given extras, e.g. `setup-env.sh test`.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, pinned, so that nothing pulls the
# multi-GB CUDA wheels; override the torch requirement with FF_KERNELS_TORCH (e.g. FF_KERNELS_TORCH=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
if command -v nvidia-smi >/dev/null 2>&1; then
  torch_req="${FF_KERNELS_TORCH:-torch>=2.4}"
else
  torch_req="${FF_KERNELS_TORCH:-torch==2.13.0}"
fi
. scripts/require-space.sh
if ! python -c "import torch" >/dev/null 2>&1; then
  require_space 3 "installing torch, triton and the test tools into .venv"
fi
pip install --quiet --disable-pip-version-check "$torch_req"
# The C++/CUDA extension (ff_kernels._C) is compiled against the torch installed above, so the project is built
# without build isolation; these are the build requirements that pip would otherwise have installed.
pip install --quiet --disable-pip-version-check "setuptools>=64" wheel ninja
if [ -n "$extras" ]; then
  pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[$extras]"
else
  pip install --quiet --disable-pip-version-check --no-build-isolation -e .
fi
