"""A roofline model of one fused FF layer step: its FLOPs and the fewest bytes it must move, against a GPU's peaks.

A model, never a measurement (DESIGN section 10): the floor is the slowest of three times no kernel can beat, the
two GEMMs on the tensor cores (on the CUDA cores for exact fp32), the elementwise work on the CUDA cores, and the
minimal HBM traffic, each at the device's peak. ``ff-kernels bench`` prints it beside every measured GPU figure.

The minimal traffic follows DESIGN section 3: GEMM 1 reads x, W and b and writes h; the per-row step turns the
goodness into c; GEMM 2 reads h and x again (it cannot start before every row's loss is known) and reads and writes
W, b and the optimizer state once. The per-row vectors (r, goodness partials, g, c) count once each way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    """Dense peaks of one GPU: tensor-core TFLOP/s per operand precision, CUDA-core fp32 TFLOP/s, HBM TB/s."""

    name: str
    mma_tflops: Mapping[str, float]
    fp32_tflops: float
    hbm_tbps: float


# NVIDIA H100 Tensor Core GPU datasheet (SXM5 column; the sparse figures halved): BF16/FP16 989.4, TF32 494.7,
# FP32 66.9 TFLOP/s, HBM3 3.35 TB/s. NVIDIA H200 datasheet (SXM): the same compute peaks, HBM3e 4.8 TB/s.
H100_SXM = Device("H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}, 66.9, 3.35)
H200_SXM = Device("H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}, 66.9, 4.8)

# Operand precision of the GEMMs: bf16/fp16 tensor cores, fp32 inputs on TF32 tensor cores, or exact fp32 FMAs.
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "ieee": 4}
# Per parameter: fp32 state tensors read and written by the update, and its elementwise FLOPs (the weight decay
# and momentum/moment updates, Adam's square root and division).
OPTIMIZER_STATE = {"none": 0, "sgd": 1, "adam": 2}
OPTIMIZER_FLOPS = {"none": 1, "sgd": 7, "adam": 12}
FP32 = 4


def precision_of(dtype: torch.dtype | str, tf32: bool = False) -> str:
    """The model's precision name for a tensor dtype (``torch.bfloat16`` or ``"bfloat16"``) and the TF32 switch."""
    name = str(dtype).removeprefix("torch.")
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "tf32" if tf32 else "ieee"}
    if name not in names:
        raise ValueError(f"no roofline precision for dtype {dtype!r}; expected float32, bfloat16 or float16")
    return names[name]


@dataclass(frozen=True)
class StepCost:
    """The work of one step: GEMM FLOPs (tensor cores), elementwise FLOPs (CUDA cores) and minimal HBM bytes."""

    gemm_flops: int
    elementwise_flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        """GEMM FLOPs per byte: above the device's ridge point (peak / bandwidth) the step is compute-bound."""
        return self.gemm_flops / self.bytes


def step_cost(
    rows_pos: int, rows_neg: int, in_features: int, out_features: int, precision: str, optimizer: str = "adam",
    bias: bool = True,
) -> StepCost:
    """FLOPs and minimal bytes of one fused step on (P, Q) rows of a K -> N layer.

    ``optimizer="none"`` writes grad_weight and grad_bias instead of updating the parameters in place.
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_BYTES)}; got {precision!r}")
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE)}; got {optimizer!r}")
    m, k, n = rows_pos + rows_neg, in_features, out_features
    size = PRECISION_BYTES[precision]
    params = n * k + (n if bias else 0)
    gemm_flops = 2 * (2 * m * n * k)
    elementwise = (
        2 * m * k + 5 * m * n  # GEMM 1: sum of x^2 per row; scale by r, bias, ReLU, h^2 and its row sum
        + m * k + m * n  # GEMM 2 operands: r x and (c / 2^s) h
        + 2 * m * n  # grad_bias = sum_i c_i h_i
        + OPTIMIZER_FLOPS[optimizer] * params
    )
    activations = 2 * m * k * size + 2 * m * n * size  # x read by both GEMMs, h written then read
    row_vectors = 7 * m * FP32  # r and the goodness partials written and read, g written, c written and read
    if optimizer == "none":
        parameters = params * size + params * size  # W, b read; grad_weight, grad_bias written
    else:
        parameters = params * size + 2 * params * size  # W, b read by GEMM 1, read and written by the update
    state = 2 * OPTIMIZER_STATE[optimizer] * params * FP32
    return StepCost(gemm_flops, elementwise, activations + row_vectors + parameters + state)


def floor_seconds(cost: StepCost, precision: str, device: Device = H100_SXM) -> float:
    """The roofline floor: the slowest of the GEMMs at the MMA (or exact-fp32) peak, the elementwise work at the
    CUDA-core peak and the bytes at the HBM bandwidth, each unit assumed perfectly overlapped with the others."""
    gemm_tflops = device.mma_tflops.get(precision, device.fp32_tflops)
    return max(
        cost.gemm_flops / (gemm_tflops * 1e12),
        cost.elementwise_flops / (device.fp32_tflops * 1e12),
        cost.bytes / (device.hbm_tbps * 1e12),
    )


def step_floor_ms(
    rows_pos: int, rows_neg: int, in_features: int, out_features: int, precision: str, optimizer: str = "adam",
    device: Device = H100_SXM,
) -> float:
    """The model floor of one step in milliseconds (a layer with bias)."""
    cost = step_cost(rows_pos, rows_neg, in_features, out_features, precision, optimizer)
    return 1e3 * floor_seconds(cost, precision, device)
