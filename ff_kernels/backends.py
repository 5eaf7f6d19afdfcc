"""Which backends exist, which are usable for a device, and what ``backend="auto"`` picks.

``auto``: on CUDA tensors the Triton kernels where Triton is usable, else the torch backend; on CPU tensors the
C++ extension's fused CPU operator (``"cuda"``, the extension's name whatever the device) where the extension is
built, else the torch backend. An unavailable backend asked for by name is always an error that says why; there
is no silent fallback.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import warnings

import torch

from ff_kernels._options import BACKENDS, check_choice

# The Triton releases whose autotuner conventions the kernels were checked against (pyproject's ``triton`` extra).
TRITON_SUPPORTED = ((3, 0), (3, 10))


def triton_version_reason(version: str) -> str | None:
    """None for a supported Triton release; otherwise why not, and what to install."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # a source build with a custom version string: trust it
    low, high = TRITON_SUPPORTED
    if low <= major_minor < high:
        return None
    return (
        f"Triton {version} is outside the supported range {low[0]}.{low[1]} to {high[0]}.{high[1] - 1} "
        f"(pip install 'ff-kernels[triton]')"
    )


@functools.cache
def triton_install_reason() -> str | None:
    """None when a supported Triton is installed; otherwise why not. Looked up once: reading the package metadata
    costs more than a small step."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    try:
        return triton_version_reason(importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``; otherwise the reason, for the error message."""
    reason = triton_install_reason()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels run on CUDA tensors (or on the CPU with TRITON_INTERPRET=1); the tensors are on {device}"


@functools.cache
def triton_ops_available() -> bool:
    """Whether this build ships the Triton op module (added by the fused-kernel work)."""
    return importlib.util.find_spec("ff_kernels.ops.triton.ops") is not None


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """None when the C++/CUDA extension can run on ``device``; otherwise the reason and how to build it."""
    from ff_kernels.ops.cuda_step import extension_unavailable_reason

    return extension_unavailable_reason(device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; raises RuntimeError naming the reason if unusable."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None and triton_ops_available():
            return "triton"
        if device.type == "cpu" and cuda_unavailable_reason(device) is None:
            return "cuda"
        return "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is None and not triton_ops_available():
            reason = "this build of ff_kernels has no Triton kernels"
        if reason is not None:
            raise RuntimeError(f"backend='triton' is unavailable: {reason}")
    if backend == "cuda":
        reason = cuda_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    return backend


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), None)
    except OSError:
        return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    return frozenset((_cpuinfo("flags") or "").split())


@functools.cache
def cpu_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): as oneDNN sees it, or from the
    CPU's flags where torch has no oneDNN."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:  # a torch built without oneDNN
            pass
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_info() -> dict[str, object]:
    """What a CPU benchmark records beside its numbers: the model, ATen's vector ISA, bf16 matmul support and the
    library of the fused step's fp32 GEMMs."""
    from ff_kernels.ops import cuda_step

    model = _cpuinfo("model name")
    built = cuda_step.extension_unavailable_reason(torch.device("cpu")) is None
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_matmul": cpu_bf16_matmul(),
        "cpu_fp32_gemm": cuda_step.cpu_gemm_library() if built else "aten (extension not built)",
    }


_warned_bf16 = False


def warn_if_slow_bf16(device: torch.device, compute: torch.dtype) -> None:
    """Warn once per process when bf16 matrix products are asked of a CPU without bf16 instructions."""
    global _warned_bf16
    if _warned_bf16 or compute != torch.bfloat16 or device.type != "cpu" or cpu_bf16_matmul():
        return
    _warned_bf16 = True
    warnings.warn(
        f"bfloat16 matrix products on this CPU ({torch.backends.cpu.get_cpu_capability()}, without AVX512-BF16 or "
        "AMX) are emulated and run several times slower than float32 (8x for a 784x500 layer step on an AVX2-only "
        "AMD EPYC); for speed keep float32 here (float32 weights, no compute_dtype)",
        stacklevel=3,
    )
