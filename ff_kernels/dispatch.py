"""One table from (op, backend) to the implementation; every public function dispatches through it.

The public functions check their arguments once, resolve the backend (``ff_kernels.backends``) and call
:func:`implementation`. Implementations are named by import path and imported on first use, so a backend's
dependencies (Triton, the compiled extension) are loaded only when it is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Implementation:
    """One backend's function for one op.

    ``fuses_update``: the function takes ``optimizer=`` and applies the update itself (in a kernel epilogue);
    otherwise it returns gradients and the caller applies the update. ``compute_dtype``: it takes
    ``compute_dtype=`` (matrix products in another dtype than the weight's). ``checks_finite``: it takes
    ``check_finite=`` and scans the inputs itself on CPU tensors, inside its first pass (``ff_kernels.finite``).
    ``auto``: ``backend="auto"`` may pick it; a correct but slow route (asked for by name only) sets it False.
    ``float64``: it keeps DESIGN's float64 contract (the Triton layer kernels accumulate in fp32: they do not, and
    ``auto`` passes them by for float64 weights).
    """

    target: str
    fuses_update: bool = False
    compute_dtype: bool = False
    checks_finite: bool = False
    auto: bool = True
    float64: bool = True

    def load(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


TABLE: dict[tuple[str, str], Implementation] = {
    ("linear_step", "reference"): Implementation("ff_kernels.reference:ff_linear_step_ref"),
    ("linear_step", "torch"): Implementation("ff_kernels.ops.torch_step:ff_linear_step_torch", compute_dtype=True),
    ("linear_step", "triton"): Implementation(
        "ff_kernels.ops.triton.ops:ff_linear_step_triton_checked", fuses_update=True, compute_dtype=True,
        float64=False
    ),
    ("linear_step", "cuda"): Implementation(
        "ff_kernels.ops.cuda_step:ff_linear_step_cuda", fuses_update=True, compute_dtype=True, checks_finite=True
    ),
    ("linear_forward", "reference"): Implementation("ff_kernels.reference:ff_linear_forward_ref"),
    ("linear_forward", "torch"): Implementation(
        "ff_kernels.ops.torch_step:ff_linear_forward_torch", compute_dtype=True
    ),
    ("linear_forward", "triton"): Implementation(
        "ff_kernels.ops.triton.ops:ff_linear_forward_triton", compute_dtype=True, float64=False
    ),
    ("linear_forward", "cuda"): Implementation(
        "ff_kernels.ops.cuda_step:ff_linear_forward_cuda", compute_dtype=True, checks_finite=True
    ),
    ("linear_class_step", "reference"): Implementation("ff_kernels.reference_conv:ff_linear_class_step_ref"),
    ("linear_class_step", "torch"): Implementation(
        "ff_kernels.ops.torch_conv:ff_linear_class_step_torch", compute_dtype=True
    ),
    # Through the conv class step on 1x1 images: one sample per row tile, correct but slow on a GPU, so ``auto``
    # keeps the torch backend (cuBLAS) there.
    ("linear_class_step", "triton"): Implementation(
        "ff_kernels.ops.triton.conv_ops:ff_linear_class_step_triton", fuses_update=True, auto=False,
        compute_dtype=True, float64=False
    ),
    ("conv2d_step", "reference"): Implementation("ff_kernels.reference_conv:ff_conv2d_step_ref"),
    ("conv2d_step", "torch"): Implementation("ff_kernels.ops.torch_conv:ff_conv2d_step_torch", compute_dtype=True),
    ("conv2d_class_step", "reference"): Implementation("ff_kernels.reference_conv:ff_conv2d_class_step_ref"),
    ("conv2d_class_step", "torch"): Implementation(
        "ff_kernels.ops.torch_conv:ff_conv2d_class_step_torch", compute_dtype=True
    ),
    ("conv2d_forward", "reference"): Implementation("ff_kernels.reference_conv:ff_conv2d_forward_ref"),
    ("conv2d_forward", "torch"): Implementation(
        "ff_kernels.ops.torch_conv:ff_conv2d_forward_torch", compute_dtype=True
    ),
    ("conv2d_step", "triton"): Implementation(
        "ff_kernels.ops.triton.conv_ops:ff_conv2d_step_triton", fuses_update=True, compute_dtype=True, float64=False
    ),
    ("conv2d_class_step", "triton"): Implementation(
        "ff_kernels.ops.triton.conv_ops:ff_conv2d_class_step_triton", fuses_update=True, compute_dtype=True,
        float64=False
    ),
    ("conv2d_forward", "triton"): Implementation(
        "ff_kernels.ops.triton.conv_ops:ff_conv2d_forward_triton", compute_dtype=True, float64=False
    ),
    # CPU tensors only: the torch closed form with the extension's fused goodness pass (ops/cpu_conv.py).
    ("linear_class_step", "cuda"): Implementation(
        "ff_kernels.ops.cpu_conv:ff_linear_class_step_cpu", compute_dtype=True
    ),
    ("conv2d_step", "cuda"): Implementation("ff_kernels.ops.cpu_conv:ff_conv2d_step_cpu", compute_dtype=True),
    ("conv2d_class_step", "cuda"): Implementation(
        "ff_kernels.ops.cpu_conv:ff_conv2d_class_step_cpu", compute_dtype=True
    ),
    ("conv2d_forward", "cuda"): Implementation("ff_kernels.ops.cpu_conv:ff_conv2d_forward_cpu", compute_dtype=True),
    ("class_goodness_loss", "reference"): Implementation("ff_kernels.reference_heads:class_goodness_loss_ref"),
    ("class_goodness_loss", "torch"): Implementation("ff_kernels.ops.torch_heads:class_goodness_loss_torch"),
    ("class_goodness", "reference"): Implementation("ff_kernels.reference_heads:class_goodness_ref"),
    ("class_goodness", "torch"): Implementation("ff_kernels.ops.torch_heads:class_goodness_torch"),
    ("class_goodness_loss", "triton"): Implementation(
        "ff_kernels.ops.triton.class_goodness:class_goodness_loss_triton"
    ),
    ("class_goodness", "triton"): Implementation("ff_kernels.ops.triton.class_goodness:class_goodness_triton"),
}

# Pairs known to be missing, and why: the error says so instead of only listing the backends that exist.
_NOT_BUILT = {
    "cuda": "the C++/CUDA extension has no convolution or class-goodness kernels",
}
MISSING: dict[tuple[str, str], str] = {
    (op, backend): reason
    for op in (
        "linear_class_step", "conv2d_step", "conv2d_class_step", "conv2d_forward", "class_goodness_loss",
        "class_goodness",
    )
    for backend, reason in _NOT_BUILT.items()
    if (op, backend) not in TABLE
}

_loaded: dict[tuple[str, str], Callable] = {}


def backends_for(op: str) -> tuple[str, ...]:
    """The backends that implement ``op``, in the table's order."""
    return tuple(backend for (name, backend) in TABLE if name == op)


def spec(op: str, backend: str) -> Implementation:
    """The table entry; a backend without this op is an error that lists the ones that have it."""
    try:
        return TABLE[(op, backend)]
    except KeyError:
        reason = MISSING.get((op, backend))
        raise NotImplementedError(
            f"{op} has no backend={backend!r} implementation{f' ({reason})' if reason else ''}; "
            f"available: {', '.join(backends_for(op))}"
        ) from None


def implementation(op: str, backend: str) -> tuple[Implementation, Callable]:
    """The table entry and its function (imported once)."""
    entry = spec(op, backend)
    fn = _loaded.get((op, backend))
    if fn is None:
        fn = _loaded[(op, backend)] = entry.load()
    return entry, fn
