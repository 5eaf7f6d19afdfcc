#!/usr/bin/env bash
# The test command: sets up .venv (see setup-env.sh), checks style with ruff, runs the whole test suite.
# Triton kernels run under TRITON_INTERPRET=1 where no GPU is present (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh test
. .venv/bin/activate
ruff check .
python -m pytest "$@"
# The full suite (no arguments) also runs the torchvision tests, in .venv-vision (torch 2.14.1 + torchvision 0.29.1,
# pure-Python ff-kernels; see scripts/setup-vision-env.sh): the CPU torch of .venv has no torchvision that loads.
if [ $# -eq 0 ]; then
  bash scripts/setup-vision-env.sh
  .venv-vision/bin/python -m pytest tests/test_blockwise_torchvision.py
fi
