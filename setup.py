"""Build script: the pure-Python package plus the optional compiled extension ``ff_kernels._C`` (metadata lives in
pyproject.toml).

``ff_kernels._C`` registers the ``torch.ops.ff_kernels_ext`` operators: a C++ CPU implementation (always, when a
C++ compiler and torch are present) and the CUDA kernels (when torch has CUDA and nvcc is found). Build it against
the installed torch, i.e. without build isolation::

    pip install --no-build-isolation -e .

Environment:
    FF_KERNELS_BUILD_EXT=0|1   0: pure-Python install; 1: fail if the extension cannot be built. Default: build
                               it when possible, and otherwise install without it (printing why).
    FF_KERNELS_BUILD_CUDA=0|1  0: CPU-only extension; 1: fail unless the CUDA kernels are built. Default: build
                               them when torch has CUDA and nvcc is found.
    MAX_JOBS, TORCH_CUDA_ARCH_LIST, CXX, CUDA_HOME: as for any torch extension.

Without torch in the build environment (an isolated build) the package installs as pure Python.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = Path("csrc")


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"{name} must be 0 or 1; got {os.environ[name]!r}")


def _note(message: str) -> None:
    print(f"ff-kernels setup: {message}", file=sys.stderr)


def _sources(subdir: str, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / subdir).glob(pattern))


def cpu_sources() -> list[str]:
    return [str(CSRC / "ops.cpp"), *_sources("cpu", "*.cpp")]


def cuda_sources() -> list[str]:
    return [*_sources("cuda", "*.cpp"), *_sources("cuda", "*.cu")]


# Flags beyond torch's own (its C++ standard, and for nvcc -D__CUDA_NO_HALF_CONVERSIONS__ and friends: the kernels
# convert explicitly). No --use_fast_math: the loss and the optimizer step need IEEE exp, log, sqrt and division.
NVCC_FLAGS = ["-O3"]
# OpenMP: at::parallel_for in the CPU operator's passes is an inline OpenMP loop, serial unless compiled with it.
# On Linux torch ships libgomp and the extension binds to that copy (same soname), so there is one thread pool.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
# As torch's own build: ATen's vector headers (the CPU operator's passes) carry CUDA unroll pragmas GCC does not know,
# and GCC 12 takes the deliberately undefined vectors of its AVX-512 intrinsics for uninitialised ones.
CXX_FLAGS = ["-O3", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", *OPENMP_FLAGS]


def _extension(force: bool | None):
    """The extension and build command, or (None, reason)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, (
            "torch is not importable in the build environment (an isolated build?): installing without the C++ "
            "extension; use `pip install --no-build-isolation` to build it"
        )
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} not found): installing without the C++ extension"

    want_cuda = _flag("FF_KERNELS_BUILD_CUDA")
    nvcc = None if cpp_extension.CUDA_HOME is None else Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    cuda_reason = None
    if torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} has no CUDA"
    elif nvcc is None or not nvcc.exists():
        cuda_reason = "nvcc was not found (set CUDA_HOME)"
    if want_cuda and cuda_reason:
        raise SystemExit(f"FF_KERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: {cuda_reason}")
    with_cuda = want_cuda is not False and cuda_reason is None
    if not with_cuda:
        _note(f"building the CPU extension only ({cuda_reason or 'FF_KERNELS_BUILD_CUDA=0'})")

    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "ff_kernels._C",
            cpu_sources() + cuda_sources(),
            define_macros=[("FF_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    else:
        ext = cpp_extension.CppExtension(
            "ff_kernels._C", cpu_sources(), extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=OPENMP_FLAGS
        )

    class BuildExt(cpp_extension.BuildExtension):
        """torch's build command; unless forced, a failed build leaves a working pure-Python install."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as error:  # compiler and linker failures come in many types
                if force:
                    raise
                _note(f"building ff_kernels._C failed ({error}); installing without it")

    use_ninja = shutil.which("ninja") is not None
    return (ext, BuildExt.with_options(use_ninja=use_ninja)), None


def _build_config() -> dict:
    force = _flag("FF_KERNELS_BUILD_EXT")
    if force is False:
        _note("FF_KERNELS_BUILD_EXT=0: installing without the C++ extension")
        return {}
    built, reason = _extension(force)
    if built is None:
        if force:
            raise SystemExit(f"FF_KERNELS_BUILD_EXT=1 but the extension cannot be built: {reason}")
        _note(reason)
        return {}
    ext, command = built
    return {"ext_modules": [ext], "cmdclass": {"build_ext": command}}


setup(**_build_config())
