"""The CUDA side: nvcc with ptxas's report for each .cu file under csrc/, and the kernel instantiations it reports
turned into records (kernel, config, element type from the demangled names). Needs only the CUDA toolkit, not
Triton."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ff_kernels.inspect.ptx import _ptx_entries, parse_ptxas, ptx_instructions

CSRC = Path(__file__).resolve().parents[2] / "csrc"  # the csrc/ beside the ff_kernels package
# What torch.utils.cpp_extension passes to nvcc (tests/test_nvcc.py compiles with the same flags).
NVCC_FLAGS = (
    "-std=c++17",
    "-O3",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@functools.lru_cache(maxsize=1)
def _nvcc_version() -> str:
    nvcc = _nvcc()
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip() if nvcc else ""


def _demangle(names: Sequence[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {name: name for name in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


ELEMENT_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def _cuda_name(demangled: str) -> tuple[str, str, str]:
    """(kernel, config, element type) from ``void ns::kernel<T, Cfg<...>, ...>(Params)``: the template arguments
    are the config, with namespaces dropped and element types shortened; no template arguments: ("-", "any")."""
    text = demangled.replace("(anonymous namespace)::", "").removeprefix("void ").strip()
    cut = min(i for i in (text.find("<"), text.find("("), len(text)) if i >= 0)
    base = text[:cut].split("::")[-1]
    if cut == len(text) or text[cut] != "<":
        return base, "-", "any"
    depth, end = 0, cut
    for end in range(cut, len(text)):
        depth += {"<": 1, ">": -1}.get(text[end], 0)
        if depth == 0:
            break
    args = re.sub(r"\b\w+::", "", text[cut + 1:end])
    for long, short in ELEMENT_TYPES.items():
        args = re.sub(rf"\b{long}\b", short, args)
    first = args.split(",", 1)[0].strip()
    return base, " ".join(args.split()), first if first in ELEMENT_TYPES.values() else "any"


def compile_cuda_file(path: str, arch: str) -> list[dict[str, Any]]:
    """nvcc for one arch with ptxas's report; one record per kernel instantiation, the PTX kept for the MMA and
    copy counts."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        command = [nvcc, *NVCC_FLAGS, f"-arch={arch}", "--resource-usage", "-keep", "-keep-dir", tmp, "-c", path,
                   "-o", str(Path(tmp) / "kernel.o")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return [{"kernel": Path(path).name, "config": "-", "dtype": "any", "error": result.stderr[-600:]}]
        ptx = "\n".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
    bodies = dict(_ptx_entries(ptx))
    entries = parse_ptxas(result.stdout + result.stderr)
    names = _demangle(list(entries))
    records = []
    for mangled, metrics in entries.items():
        kernel, config, element = _cuda_name(names[mangled])
        counts = ptx_instructions(bodies.get(mangled, ""))
        dtype = element
        if element == "fp32":
            dtype = "tf32" if counts["mma"] != "none" else "ieee"
        threads = re.search(r"\.maxntid\s+(\d+)", bodies.get(mangled, ""))
        shared = metrics.pop("static_shared")
        records.append({
            "kernel": kernel, "config": config, "dtype": dtype, "file": str(Path(path).relative_to(CSRC.parent)),
            "threads": int(threads.group(1)) if threads else None, **metrics, "shared_bytes": shared, **counts,
            "error": None,
        })
    return records
