#!/usr/bin/env bash
# The test command: sets up .venv (see setup-env.sh), checks style with ruff, runs the whole test suite.
# Triton kernels run under TRITON_INTERPRET=1 where no GPU is present (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh test
. .venv/bin/activate
ruff check .
python -m pytest "$@"
