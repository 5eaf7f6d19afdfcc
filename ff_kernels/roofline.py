"""A roofline model of one fused FF layer step: its FLOPs and the fewest bytes it must move, against a GPU's peaks.

A model, never a measurement (DESIGN section 10): the floor is the slowest of three times no kernel can beat, the
two GEMMs on the tensor cores (on the CUDA cores for exact fp32), the elementwise work on the CUDA cores, and the
minimal HBM traffic, each at the device's peak. ``ff-kernels bench`` prints it beside every measured GPU figure.

The minimal traffic follows DESIGN section 3: GEMM 1 reads x, W and b and writes h; the per-row step turns the
goodness into c; GEMM 2 reads h and x again (it cannot start before every row's loss is known) and reads and writes
W, b and the optimizer state once. The per-row vectors (r, goodness partials, g, c) count once each way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

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


def gemm_cost(rows: int, in_features: int, out_features: int, precision: str) -> StepCost:
    """The work of the step's two GEMMs alone (DESIGN 4's floor: ``h = x W^T`` and ``grad = h^T x`` through cuBLAS):
    each reads its operands once and writes its result once, in the operands' precision; no elementwise work."""
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_BYTES)}; got {precision!r}")
    m, k, n = rows, in_features, out_features
    size = PRECISION_BYTES[precision]
    gemm_1 = (m * k + n * k + m * n) * size
    gemm_2 = (m * n + m * k + n * k) * size
    return StepCost(2 * (2 * m * n * k), 0, gemm_1 + gemm_2)


def unit_seconds(cost: StepCost, precision: str, device: Device = H100_SXM) -> dict[str, float]:
    """The time of each unit at its peak: the GEMMs on the tensor cores (CUDA cores for exact fp32), the elementwise
    work on the CUDA cores, the bytes over HBM."""
    gemm_tflops = device.mma_tflops.get(precision, device.fp32_tflops)
    return {
        "gemm": cost.gemm_flops / (gemm_tflops * 1e12),
        "elementwise": cost.elementwise_flops / (device.fp32_tflops * 1e12),
        "memory": cost.bytes / (device.hbm_tbps * 1e12),
    }


def floor_seconds(cost: StepCost, precision: str, device: Device = H100_SXM) -> float:
    """The roofline floor: the slowest of the GEMMs at the MMA (or exact-fp32) peak, the elementwise work at the
    CUDA-core peak and the bytes at the HBM bandwidth, each unit assumed perfectly overlapped with the others."""
    return max(unit_seconds(cost, precision, device).values())


def step_floor_ms(
    rows_pos: int, rows_neg: int, in_features: int, out_features: int, precision: str, optimizer: str = "adam",
    device: Device = H100_SXM,
) -> float:
    """The model floor of one step in milliseconds (a layer with bias)."""
    cost = step_cost(rows_pos, rows_neg, in_features, out_features, precision, optimizer)
    return 1e3 * floor_seconds(cost, precision, device)


def gemm_floor_ms(rows: int, in_features: int, out_features: int, precision: str, device: Device = H100_SXM) -> float:
    """The model floor of the two GEMMs alone in milliseconds (``gemm_cost``)."""
    return 1e3 * floor_seconds(gemm_cost(rows, in_features, out_features, precision), precision, device)


# --- the table of floors (``ff-kernels bench --roofline``) ------------------------------------------------------

DEVICES = (H100_SXM, H200_SXM)
TABLE_PRECISIONS = ("bf16", "tf32", "ieee")  # fp16 has bf16's peaks and bytes


@dataclass(frozen=True)
class FloorRow:
    """One shape on one device: the fused Adam step's floor, the two GEMMs' floor and their ratio, the best
    ``fused / floor`` any implementation can reach under the model (DESIGN 4 asks for at most 1.2)."""

    device: str
    precision: str
    rows: int
    in_features: int
    out_features: int
    gemm_gflop: float
    step_mb: float
    intensity: float
    step_bound: str
    step_floor_us: float
    gemm_floor_us: float
    best_over_floor: float


def floor_rows(
    rows: Sequence[int], layers: Sequence[tuple[int, int]], precisions: Sequence[str] = TABLE_PRECISIONS,
    devices: Sequence[Device] = DEVICES,
) -> list[FloorRow]:
    """The floors of an Adam step on P = Q = ``rows`` for every (K, N) layer, precision and device."""
    out = []
    for device in devices:
        for precision in precisions:
            for p in rows:
                for k, n in layers:
                    step = step_cost(p, p, k, n, precision, "adam")
                    units = unit_seconds(step, precision, device)
                    step_s = max(units.values())
                    gemm_s = floor_seconds(gemm_cost(2 * p, k, n, precision), precision, device)
                    out.append(FloorRow(
                        device.name, precision, p, k, n, step.gemm_flops / 1e9, step.bytes / 1e6, step.intensity,
                        max(units, key=units.__getitem__), 1e6 * step_s, 1e6 * gemm_s, step_s / gemm_s,
                    ))
    return out


def format_floor_table(rows: Sequence[FloorRow]) -> str:
    """A plain-text table of ``floor_rows``, labelled as a model."""
    header = (f"{'device':<9} {'prec':<5} {'P=Q':>6} {'K x N':>10} {'GFLOP':>8} {'MB min':>8} {'FLOP/B':>7} "
              f"{'bound':<11} {'step us':>9} {'2 GEMMs us':>10} {'step/GEMMs':>10}")
    lines = ["Roofline model (not a measurement): one fused Adam step against its two GEMMs alone, each at the "
             "device's peak", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.device:<9} {r.precision:<5} {r.rows:>6} {f'{r.in_features}x{r.out_features}':>10} "
            f"{r.gemm_gflop:>8.2f} {r.step_mb:>8.2f} {r.intensity:>7.0f} {r.step_bound:<11} {r.step_floor_us:>9.1f} "
            f"{r.gemm_floor_us:>10.1f} {r.best_over_floor:>9.2f}x"
        )
    lines += [
        "step/GEMMs: the step's floor over the two GEMMs' floor, the best fused/floor ratio under this model",
        "(DESIGN 4: at most 1.2x). GEMM FLOPs at the tensor-core peak (exact fp32 'ieee' on the CUDA cores),",
        "elementwise work at the fp32 peak, the minimal bytes at HBM bandwidth, the three perfectly overlapped;",
        "Adam, layers with bias.",
    ]
    return "\n".join(lines)


def write_floor_report(rows: Sequence[int], layers: Sequence[tuple[int, int]], out: Path) -> str:
    """``roofline.txt`` and ``roofline.json`` (the devices' peaks with the rows) under ``out``; returns the table."""
    floors = floor_rows(rows, layers)
    table = format_floor_table(floors)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.txt").write_text(table + "\n")
    payload = {
        "model": "roofline (ff_kernels.roofline), not a measurement",
        "devices": [asdict(d) | {"mma_tflops": dict(d.mma_tflops)} for d in DEVICES],
        "rows": [asdict(r) for r in floors],
    }
    (out / "roofline.json").write_text(json.dumps(payload, indent=1) + "\n")
    return table
