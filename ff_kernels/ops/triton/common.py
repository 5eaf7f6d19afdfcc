"""What the Triton kernels of the linear FF step share: option codes, autotune configurations and key, the jit
helpers (softplus, sigmoid, rounding casts), the precision switch and the launchers' input checks.

Precision: bf16/fp16 operands feed ``tl.dot`` with fp32 accumulation; fp32 operands use TF32 only when PyTorch's
cuBLAS switch allows it (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``allow_tf32 = True`` and
``torch.set_float32_matmul_precision("high")`` also set); "ieee" otherwise, and always exact under the interpreter.
Every downcast rounds to nearest even (see ``cast`` for the interpreter).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the interpreter (CPU, tests) one config runs and tl.dot is exact.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

NORMALIZE_CODE = {"none": 0, "l2": 1, "rms": 2}
LOSS_CODE = {"logistic": 0, "symba": 1}
OPT_NONE, OPT_SGD, OPT_ADAM = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# Autotune configurations. The interpreter runs one config (it cannot benchmark); on a GPU a small set keyed on
# (M_BUCKET, N, K, INPUT_PRECISION) (the autotuner adds the dtypes): square-ish 128/64 tiles for the
# compute-bound large shapes and 64-wide tiles so that small N*K layers (GEMM 2 has N/BN x K/BK programs) still
# fill the SMs.
# ---------------------------------------------------------------------------------------------------------------
if INTERPRETED:
    FORWARD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    GRAD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
else:
    FORWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    GRAD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
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


# ---------------------------------------------------------------------------------------------------------------
# host helpers
# ---------------------------------------------------------------------------------------------------------------


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
        raise TypeError(f"{name} is {x.dtype} but weight is {w.dtype}; the kernels take one dtype")
    if x.device != w.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {w.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels index its rows densely)")


def check_layer(w: torch.Tensor, b: torch.Tensor | None) -> None:
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"weight must be a contiguous (N, K) matrix, got shape {tuple(w.shape)}")
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
