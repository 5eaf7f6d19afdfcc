"""What the Triton kernels of the linear FF step share: option codes, autotune configurations (per precision) and
key, the jit helpers (softplus, sigmoid, rounding casts, alignment hints), the precision switch, the SM count and
the launchers' input checks.

Precision: bf16/fp16 operands feed ``tl.dot`` with fp32 accumulation; fp32 operands use TF32 only when PyTorch's
cuBLAS switch allows it (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``allow_tf32 = True`` and
``torch.set_float32_matmul_precision("high")`` also set); "ieee" otherwise, and always exact under the interpreter.
Every downcast rounds to nearest even (see ``cast`` for the interpreter).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

# Under the interpreter (CPU, tests) one config runs and tl.dot is exact.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

NORMALIZE_CODE = {"none": 0, "l2": 1, "rms": 2}
LOSS_CODE = {"logistic": 0, "symba": 1}
OPT_NONE, OPT_SGD, OPT_ADAM = 0, 1, 2
H100_SMS = 132


# ---------------------------------------------------------------------------------------------------------------
# Autotune configurations, per operand precision: "bf16" and "fp16" feed the tensor cores 2-byte operands, "tf32"
# 4-byte ones (half the tile per byte of shared memory), and "ieee" fp32 runs an FMA dot, which holds its operand
# slices in registers and so wants small tiles. Every config compiles without spills and within the shared memory
# of sm_80 and sm_90, and the MMA configs keep the dot's M side (GEMM 1's rows, GEMM 2's BLOCK_N) at 64 or more with
# a multiple of 4 warps, the shape wgmma needs on sm_90. The autotuner holds their union and its early prune keeps
# the precision's list (``by_precision``); the key is (M_BUCKET, N, K, INPUT_PRECISION) plus the dtypes the
# autotuner adds. The interpreter runs one small config (it cannot benchmark, and tl.dot is exact there); the GPU
# tables stay importable for the compile report and the wave checks.
# ---------------------------------------------------------------------------------------------------------------
PRECISIONS = ("bf16", "fp16", "tf32", "ieee")


def _configs(blocks: list[tuple[int, ...]]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, maxnreg])."""
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
            num_warps=warps,
            num_stages=stages,
            maxnreg=next(iter(reg), None),
        )
        for m, n, k, warps, stages, *reg in blocks
    ]


_FORWARD_16 = _configs([(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)])
_FORWARD_TF32 = _configs([(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)])
_FORWARD_IEEE = _configs([(128, 128, 8, 8, 3), (128, 64, 8, 4, 3), (64, 64, 16, 4, 3), (32, 64, 8, 4, 3)])
# GEMM 2: BLOCK_N x BLOCK_K is the weight tile (the dot's M x N), BLOCK_M the rows reduced per step. maxnreg=255
# lifts ptxas's own register target where it spilled: 168 for the 16-bit 64 x 64 tile on sm_80 at 500 x 500 (8-24 B;
# sm_80 runs the 2 blocks its shared memory allows anyway). Exact fp32: 128 x 64 tiles (128 x 128 spilled 4 B at 255
# registers on 500-wide layers); 16 x 64 x 64 with 2 stages and maxnreg=255 (targets of 128 and 96 spilled 8 B).
_GRAD_16 = _configs([(64, 128, 128, 8, 3), (32, 128, 64, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4, 255)])
_GRAD_TF32 = _configs([(32, 128, 128, 8, 3), (32, 128, 64, 4, 4), (32, 64, 128, 4, 4), (32, 64, 64, 4, 4)])
_GRAD_IEEE = _configs([(8, 128, 64, 8, 3, 255), (16, 64, 64, 4, 2, 255), (8, 64, 64, 4, 3), (8, 32, 64, 4, 3)])
GPU_FORWARD_CONFIGS = {"bf16": _FORWARD_16, "fp16": _FORWARD_16, "tf32": _FORWARD_TF32, "ieee": _FORWARD_IEEE}
GPU_GRAD_CONFIGS = {"bf16": _GRAD_16, "fp16": _GRAD_16, "tf32": _GRAD_TF32, "ieee": _GRAD_IEEE}
# GEMM 2's resident blocks per SM on an H100, per precision and (BLOCK_M, BLOCK_N, BLOCK_K): the most that
# ``ff-kernels inspect`` measures for the config's sm_90 binaries (any optimizer, layer and row count; registers and
# shared memory by the occupancy rules). A wave is H100_SMS times this, the row split plans for one, and inspect's
# wave gate divides by the measured value, so a figure here at least as large keeps the two in agreement
# (tests/test_inspect.py checks it against the committed report). The 16-bit 64 x 64 tile takes its shared-memory
# bound, 3: ptxas gives it 164-206 registers by optimizer and shape, so 2 or 3 blocks; TF32's 4-stage tiles are
# shared-bound (2 and 3) too; the rest are register-bound.
_BLOCKS_16 = {(64, 128, 128): 1, (32, 128, 64): 3, (32, 64, 128): 3, (64, 64, 64): 3}
GRAD_RESIDENT_BLOCKS = {
    "bf16": _BLOCKS_16,
    "fp16": _BLOCKS_16,
    "tf32": {(32, 128, 128): 1, (32, 128, 64): 2, (32, 64, 128): 2, (32, 64, 64): 3},
    "ieee": {(8, 128, 64): 1, (16, 64, 64): 2, (8, 64, 64): 5, (8, 32, 64): 7},
}

if INTERPRETED:
    _ONE = _configs([(32, 32, 32, 4, 1)])
    FORWARD_CONFIGS_BY_PRECISION = dict.fromkeys(PRECISIONS, _ONE)
    GRAD_CONFIGS_BY_PRECISION = dict.fromkeys(PRECISIONS, _ONE)
else:
    FORWARD_CONFIGS_BY_PRECISION = GPU_FORWARD_CONFIGS
    GRAD_CONFIGS_BY_PRECISION = GPU_GRAD_CONFIGS


def _union(table: dict[str, list[triton.Config]]) -> list[triton.Config]:
    """Each config once (bf16 and fp16 share theirs): the autotuner's list, which ``by_precision`` narrows."""
    return list({id(c): c for configs in table.values() for c in configs}.values())


FORWARD_CONFIGS = _union(FORWARD_CONFIGS_BY_PRECISION)
GRAD_CONFIGS = _union(GRAD_CONFIGS_BY_PRECISION)
MIN_FORWARD_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in FORWARD_CONFIGS)
# Argument names; INPUT_PRECISION is a constexpr, which every triton 3.x puts in the key (3.0/3.1 index the key by
# position among the arguments passed, so every argument before it must be passed: only BLOCK_* are left out).
TUNING_KEY = ["M_BUCKET", "N", "K", "INPUT_PRECISION"]


# ---------------------------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def softplus(x):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p written accurately for small arguments."""
    e = tl.exp(-tl.abs(x))
    one_plus = 1.0 + e
    exact = one_plus == 1.0
    log1p = tl.where(exact, e, tl.log(one_plus) * (e / tl.where(exact, 1.0, one_plus - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def sigmoid(x):
    """Overflow-free logistic function."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even, as the GPU does. The interpreter (triton 3.9) truncates
    fp32 -> bf16, so there the rounding is done on the bits first and the truncation is then exact."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """``x``, which the launcher guarantees is a multiple of ``ALIGN``, in a form Triton's alignment analysis reads
    (``tl.multiple_of`` does not attach to a scalar argument, and Triton only specializes multiples of 16). A row
    length of 500 then vectorizes as 4-element (8-byte bf16) groups, cp.async included, instead of scalar loads."""
    return (x // ALIGN) * ALIGN


# ---------------------------------------------------------------------------------------------------------------
# host helpers
# ---------------------------------------------------------------------------------------------------------------


def alignment(n: int) -> int:
    """The largest power of two <= 16 that divides ``n``: the ``ALIGN`` that ``aligned`` may claim for it."""
    return min(16, n & -n) if n > 0 else 16


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's SM count, which sizes the grids; an H100's 132 where there is no CUDA device (interpreter)."""
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def precision_name(dtype: torch.dtype, input_precision: str) -> str:
    """The config family of an operand dtype and ``tl.dot`` input precision: "bf16", "fp16", "tf32" or "ieee"."""
    if dtype == torch.float32:
        return input_precision
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def by_precision(table: dict[str, list[triton.Config]]) -> Callable[..., list[triton.Config]]:
    """An autotuner ``early_config_prune`` that keeps the configs of the launch's precision (the operand dtype is
    that of ``xp_ptr``, the first argument of both GEMMs)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        precision = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION"))
        return table[precision_name(named_args["xp_ptr"].dtype, precision)]

    return prune


def tf32_allowed() -> bool:
    """PyTorch's cuBLAS TF32 switch. ``fp32_precision`` reflects both APIs (reading the legacy ``allow_tf32``
    raises once the new API has been used), so it is read first; older torch only has ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 operands only when PyTorch's matmul switch allows it; bf16/fp16 use the default MMA path."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def tuning_args(rows: int, dtype: torch.dtype) -> tuple[int, str]:
    """The autotuner's key beyond N and K: the rows rounded up to a power of two (tiles that win at 1000 rows win
    at 1020; only crossing a power of two re-tunes) and the input precision (TF32 and IEEE fp32 products differ)."""
    return triton.next_power_of_2(max(rows, 1)), input_precision(dtype)


def check_rows(x: torch.Tensor, name: str, w: torch.Tensor) -> None:
    """x must be a contiguous (rows, K) matrix of the weight's dtype on its device (the kernels index it densely)."""
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name} must be (rows, {w.shape[1]}) to match weight {tuple(w.shape)}, got {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(
            f"{name} is {x.dtype} but weight is {w.dtype}; GEMM 1 takes one dtype (pass compute_dtype={x.dtype} "
            "to compute in the inputs' dtype)"
        )
    if x.device != w.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {w.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels index its rows densely)")


def in_compute_dtype(
    xs: tuple[torch.Tensor, ...], w: torch.Tensor, compute_dtype: torch.dtype | None
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """``compute_dtype`` for the fused steps: the inputs cast to it (their memory format kept) and, where the weight
    has another dtype, its copy in it for GEMM 1 (``w_gemm``); the gradient and the update stay the weight's (fp32
    master weights with bf16 compute). Unchanged inputs and None without a compute dtype."""
    if compute_dtype is None:
        return xs, None
    return tuple(x.to(compute_dtype) for x in xs), None if compute_dtype == w.dtype else w.to(compute_dtype)


def gemm_weight(w: torch.Tensor, w_gemm: torch.Tensor | None) -> torch.Tensor:
    """The weight GEMM 1 reads: ``w_gemm`` (``in_compute_dtype``'s copy, checked to be one of ``w``) or ``w``."""
    if w_gemm is None:
        return w
    if w_gemm.shape != w.shape or w_gemm.device != w.device:
        raise ValueError(f"w_gemm must be a copy of the weight {tuple(w.shape)} on {w.device}; got "
                         f"{tuple(w_gemm.shape)} on {w_gemm.device}")
    return w_gemm


def check_layer(w: torch.Tensor, b: torch.Tensor | None, name: str = "weight") -> None:
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (N, K) matrix, got shape {tuple(w.shape)}")
    if b is not None and (b.shape != (w.shape[0],) or not b.is_contiguous() or b.device != w.device):
        raise ValueError(f"bias must be a contiguous ({w.shape[0]},) vector on {w.device}, got {tuple(b.shape)}")


def check_state(w: torch.Tensor, b: torch.Tensor | None, **state: torch.Tensor | None) -> None:
    """Optimizer state: fp32, contiguous, shaped like its parameter (``*_w`` the weight, ``*_b`` the bias)."""
    for name, s in state.items():
        param = w if name.endswith("_w") else b
        if s is None or param is None:
            continue
        if s.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 optimizer state, got {s.dtype}")
        if s.shape != param.shape or not s.is_contiguous() or s.device != param.device:
            raise ValueError(f"{name} must be contiguous, shaped {tuple(param.shape)} and on {param.device}")
