"""Compile checks of the CUDA sources, for machines without a GPU (CI has nvcc but no CUDA build of torch).

Every kernel file (csrc/**/*.cu) is compiled by nvcc for sm_80 and sm_90 with the macros torch's extension build
adds, and the CUDA binding (csrc/cuda/*.cpp, which needs only torch's CPU headers) by the host compiler. The
compilations run in parallel in one module fixture; the tests report them one by one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ff_kernels.inspect import _nvcc

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNELS = sorted(CSRC.rglob("*.cu"))
BINDINGS = sorted((CSRC / "cuda").glob("*.cpp"))
ARCHS = ("sm_80", "sm_90")
# What torch.utils.cpp_extension passes to nvcc: the kernels must not rely on implicit half/bf16 conversions.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
# Headers a kernel file may include: CUDA's own, the C++ standard library's, and the project's plain interface.
CUDA_HEADER = re.compile(r"<(cuda[\w/]*\.h|cuda_\w+\.h|mma\.h|cuda/\S+)>")
STD_HEADER = re.compile(r"<c?[a-z_]+>")


NVCC = _nvcc()


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    if NVCC is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    out = tmp_path_factory.mktemp("nvcc")
    jobs = {
        (path.name, arch): [
            NVCC, "-std=c++17", "-O3", *TORCH_NVCC_DEFINES, f"-arch={arch}", "--resource-usage", "-c", str(path),
            "-o", str(out / f"{path.stem}.{arch}.o"),
        ]
        for path in KERNELS
        for arch in ARCHS
    }
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(_run, command) for key, command in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def test_kernel_files_exist():
    assert {p.name for p in KERNELS} >= {"forward_kernel.cu", "grad_kernel.cu", "step.cu"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [p.name for p in KERNELS])
def test_kernel_compiles(nvcc_results, name, arch):
    result = nvcc_results[(name, arch)]
    assert result.returncode == 0, f"nvcc -arch={arch} {name} failed:\n{result.stderr[-6000:]}"
    assert "warning" not in result.stderr.lower(), result.stderr[-6000:]


# ptxas's resource report (--resource-usage): "Function properties for NAME" then "N bytes stack frame, S bytes spill
# stores, L bytes spill loads".
SPILLS = re.compile(
    r"Function properties for (\S+)\s+\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [p.name for p in KERNELS])
def test_kernels_do_not_spill(nvcc_results, name, arch):
    """DESIGN 10: zero spill bytes in every kernel instantiation."""
    result = nvcc_results[(name, arch)]
    if result.returncode != 0:
        pytest.skip("does not compile (test_kernel_compiles reports it)")
    kernels = SPILLS.findall(result.stderr)
    assert kernels, f"no ptxas resource report for {name}:\n{result.stderr[-3000:]}"
    spilling = [kernel for kernel, stores, loads in kernels if int(stores) or int(loads)]
    assert not spilling, f"{len(spilling)} of {len(kernels)} kernels spill on {arch}: {spilling}"


@pytest.mark.parametrize(
    "path", [*KERNELS, *sorted((CSRC / "cuda").glob("*.cuh")), *sorted((CSRC / "cuda").glob("*.h")),
             CSRC / "ff_kernels.h"],
    ids=lambda p: p.name,
)
def test_kernel_files_include_only_cuda_headers(path):
    """Kernel sources compile with nvcc alone: no torch, ATen or c10 headers."""
    for line in path.read_text().splitlines():
        include = re.match(r'\s*#\s*include\s*(\S+)', line)
        if include is None:
            continue
        header = include.group(1)
        if header.startswith('"'):
            assert (path.parent / header.strip('"')).resolve().is_relative_to(CSRC), header
        else:
            assert CUDA_HEADER.fullmatch(header) or STD_HEADER.fullmatch(header), f"{path.name}: {header}"


def test_cuda_binding_compiles_on_host():
    """csrc/cuda/*.cpp is built only with a CUDA torch; here it is syntax-checked against torch's CPU headers."""
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in torch_ext.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    for path in BINDINGS:
        result = _run([compiler, "-std=c++20", "-fsyntax-only", "-Wall", *includes, str(path)])
        assert result.returncode == 0, f"{path.name}:\n{result.stderr[-6000:]}"
