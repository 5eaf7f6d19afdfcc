#!/usr/bin/env bash
# Creates (or reuses) .venv-vision: ff-kernels with torchvision, for the block-wise torchvision tests and the
# ResNet-18 / MobileNetV3 commands. A second environment because the CPU torch of .venv (2.13.0) has no matching
# torchvision on this machine's registries (PyPI's fails to import beside it: "operator torchvision::nms does not
# exist"); torch 2.14.1 with torchvision 0.29.1 (a CUDA build, about 5.5 GB, that runs on the CPU) works. Override
# the pair with FF_KERNELS_VISION_TORCH and FF_KERNELS_TORCHVISION. The package is installed as pure Python
# (FF_KERNELS_BUILD_EXT=0): the C++ extension is built and tested in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
torch_req="${FF_KERNELS_VISION_TORCH:-torch==2.14.1}"
vision_req="${FF_KERNELS_TORCHVISION:-torchvision==0.29.1}"
if [ ! -x .venv-vision/bin/python ]; then
  "$python" -m venv .venv-vision
fi
. .venv-vision/bin/activate
if ! python -c "import torchvision" >/dev/null 2>&1; then
  . scripts/require-space.sh
  require_space 7 "installing $torch_req and $vision_req (a 5.5 GB CUDA build) into .venv-vision"
  pip install --quiet --disable-pip-version-check "$torch_req" "$vision_req"
fi
pip install --quiet --disable-pip-version-check "setuptools>=64" wheel
FF_KERNELS_BUILD_EXT=0 pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test,vision,bench]"
