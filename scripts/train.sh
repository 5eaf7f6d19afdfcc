#!/usr/bin/env bash
# The main job: sets up .venv, then trains an FFNet on scikit-learn's digits (mohammadpz's recipe: 500-500,
# Adam lr 0.03, 1000 greedy full-batch steps per layer) and prints accuracy, time and memory.
# Extra arguments go to `ff-kernels train`, e.g. `bash scripts/train.sh --compare-reference`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh examples
. .venv/bin/activate
ff-kernels train "$@"
