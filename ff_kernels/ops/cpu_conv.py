"""``backend="cuda"`` for the conv and class-goodness ops on CPU tensors, the path ``auto`` takes where the extension
is built: the torch closed form (``ff_kernels.ops.torch_conv``: oneDNN's convolution and its weight gradient) with
the goodness in the extension's one fused pass (``csrc/cpu``, ``GroupGoodness``) instead of ATen's slab-wise cast,
square and sum, which cost a quarter of a bf16 first-layer step. The CUDA extension has no convolution kernels: CUDA
tensors are refused with a message that says so.
"""

from __future__ import annotations

import torch

from ff_kernels._options import ClassStepOptions, ConvGeometry, StepOptions
from ff_kernels.ops import torch_conv
from ff_kernels.ops.cuda_step import require_extension
from ff_kernels.types import FFClassStepOutput, FFStepOutput


def fused_goodness(h: torch.Tensor, groups: int, kappa: float) -> torch.Tensor:
    """``torch_conv.group_goodness`` in one pass over h. Under ``torch.compile`` the ATen form, which inductor fuses
    with the ReLU before it; h in another layout (never the steps' own) goes there too."""
    if torch.compiler.is_compiling():
        return torch_conv.group_goodness(h, groups, kappa)
    rows_or_images = h.is_contiguous() if h.dim() == 2 else h.is_contiguous(memory_format=torch.channels_last)
    if not rows_or_images:
        return torch_conv.group_goodness(h, groups, kappa)
    return torch.ops.ff_kernels_ext.cpu_group_goodness.default(h, groups, kappa)


def _cpu_only(op: str, weight: torch.Tensor) -> None:
    if weight.device.type != "cpu":
        raise NotImplementedError(
            f"{op} with backend='cuda' runs on CPU tensors only: the CUDA extension has no conv (or class-goodness) "
            f"kernels; use backend='triton' or 'torch' for {weight.device} tensors"
        )
    require_extension(weight.device)


def ff_conv2d_forward_cpu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry, **options: object
) -> tuple[torch.Tensor, torch.Tensor]:
    _cpu_only("conv2d_forward", weight)
    return torch_conv.ff_conv2d_forward_torch(x, weight, bias, geometry, **options, goodness=fused_goodness)


def ff_conv2d_step_cpu(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: StepOptions,
    geometry: ConvGeometry,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype,
) -> FFStepOutput:
    _cpu_only("conv2d_step", weight)
    return torch_conv.ff_conv2d_step_torch(x_pos, x_neg, weight, bias, opts, geometry, offset_pos, offset_neg,
                                           compute_dtype=compute_dtype, goodness=fused_goodness)


def ff_conv2d_class_step_cpu(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    geometry: ConvGeometry,
    *,
    compute_dtype: torch.dtype,
) -> FFClassStepOutput:
    _cpu_only("conv2d_class_step", weight)
    return torch_conv.ff_conv2d_class_step_torch(x, labels, weight, bias, opts, geometry, compute_dtype=compute_dtype,
                                                 goodness=fused_goodness)


def ff_linear_class_step_cpu(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    *,
    compute_dtype: torch.dtype,
) -> FFClassStepOutput:
    _cpu_only("linear_class_step", weight)
    return torch_conv.ff_linear_class_step_torch(x, labels, weight, bias, opts, compute_dtype=compute_dtype,
                                                 goodness=fused_goodness)
