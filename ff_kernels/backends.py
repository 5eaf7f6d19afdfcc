"""Which backends exist, which are usable for a device, and what ``backend="auto"`` picks.

An unavailable backend is always an error that says why; there is no silent fallback.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

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


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``; otherwise the reason, for the error message."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    try:
        reason = triton_version_reason(importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:
        reason = None
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels run on CUDA tensors (or on the CPU with TRITON_INTERPRET=1); the tensors are on {device}"


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
