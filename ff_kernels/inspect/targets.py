"""What to inspect: the filters of a run (``Selection``, the CLI's presets), the precisions, optimizers and shapes
they choose from, and the steps (``StepSpec``, ``HeadSpec``, ``ConvSpec``) whose launches are captured. Plain data,
picklable, so the parent can hand it to the pool's workers."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import NamedTuple

import torch

from ff_kernels.bench import DESIGN_KN, DESIGN_ROWS
from ff_kernels.inspect.arch import ARCHS

PRECISIONS = ("bf16", "fp16", "tf32", "ieee")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "ieee": torch.float32}
OPTIMIZERS = ("none", "sgd", "adam")
# Conv layers (DESIGN 7) at CIFAR size, batch 128, 3x3 with padding 1: (B, C_in, C, H = W, kernel), the first layer
# and a 64 -> 128 layer after one pooling.
CONV_SHAPES = ((128, 3, 64, 32, 3), (128, 64, 128, 16, 3))


@dataclass(frozen=True)
class Selection:
    """The filters: kernel name substrings (empty: all), archs, precisions, optimizers, P = Q row counts, (K, N)
    layers, positions in each launch's autotune candidates (empty: all), sources (triton, cuda) and the conv
    layers (``CONV_SHAPES``' format; empty: none)."""

    kernels: tuple[str, ...] = ()
    archs: tuple[str, ...] = tuple(ARCHS)
    precisions: tuple[str, ...] = PRECISIONS
    optimizers: tuple[str, ...] = OPTIMIZERS
    rows: tuple[int, ...] = DESIGN_ROWS
    layers: tuple[tuple[int, int], ...] = DESIGN_KN
    configs: tuple[int, ...] = ()
    sources: tuple[str, ...] = ("triton", "cuda")
    conv_layers: tuple[tuple[int, int, int, int, int], ...] = CONV_SHAPES

    def wants_kernel(self, name: str) -> bool:
        return not self.kernels or any(part in name for part in self.kernels)


# The CI subset: both GEMMs (GEMM 2 with the Adam epilogue) and the row kernel, bf16, first config, sm_90, the
# 784x500 layer (500-wide, so the async-copy gate applies) at P = Q = 4096 (one wave is gated there), and the conv
# kernels at the 3-channel CIFAR layer (a 27-wide reduction, the alignment case of the conv GEMMs).
SUBSETS = {
    "ci": Selection(
        archs=("sm_90",), precisions=("bf16",), optimizers=("adam",), rows=(4096,), layers=((784, 500),),
        configs=(0,), sources=("triton",), conv_layers=(CONV_SHAPES[0],),
    ),
}


class StepSpec(NamedTuple):
    """One fused step whose launches are captured: precision, optimizer, P = Q rows, K inputs, N outputs."""

    precision: str
    optimizer: str
    rows: int
    in_features: int
    out_features: int


class HeadSpec(NamedTuple):
    """One block-wise head (DESIGN 8) whose class-goodness forward and backward launches are captured: precision,
    ``optimizer`` always "none" (the head hands its gradients to autograd), B rows, C channels, K classes, H x W."""

    precision: str
    optimizer: str
    rows: int
    in_features: int
    out_features: int
    height: int
    width: int


# ResNet-18 block outputs at CIFAR size, batch 128, into a 10-class head: the first and the last stage.
HEAD_SHAPES = ((128, 64, 32, 32, 10), (128, 512, 4, 4, 10))


class ConvSpec(NamedTuple):
    """One conv layer (DESIGN 7) whose positive/negative step (P = Q = ``rows``) and class-goodness step (B =
    ``rows``, 2 classes) are captured: precision, optimizer, rows, the GEMMs' K = C_in kh kw and N = C, then C_in,
    the image size H = W and the kernel size (padding kernel // 2)."""

    precision: str
    optimizer: str
    rows: int
    in_features: int
    out_features: int
    in_channels: int
    size: int
    kernel: int


class TritonJob(NamedTuple):
    """One compile: launch ``launch`` of the step ``spec`` under autotune config ``config`` (-1: not autotuned)."""

    spec: StepSpec
    launch: int
    config: int
    arch: str


def _step_specs(selection: Selection) -> list[StepSpec | HeadSpec | ConvSpec]:
    """The linear steps of the selection, the heads (which fuse no optimizer) when "none" is selected, and the conv
    layers."""
    heads = [HeadSpec(p, "none", b, c, k, height, width) for p, (b, c, height, width, k) in
             product(selection.precisions, HEAD_SHAPES)] if "none" in selection.optimizers else []
    convs = [ConvSpec(p, o, b, c_in * k * k, c, c_in, size, k) for p, o, (b, c_in, c, size, k) in
             product(selection.precisions, selection.optimizers, selection.conv_layers)]
    return [StepSpec(p, o, r, k, n) for p, o, r, (k, n) in
            product(selection.precisions, selection.optimizers, selection.rows, selection.layers)] + heads + convs
