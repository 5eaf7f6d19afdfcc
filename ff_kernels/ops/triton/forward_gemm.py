"""GEMM 1 of the FF step, with the goodness epilogue, and its launcher.

The positive and negative batches are never concatenated: the row tiles are split between them (tiles
``[0, cdiv(P, BM))`` read ``x_pos``, the rest ``x_neg``), so at most one partly filled tile is added. The same K
loop that feeds ``tl.dot`` accumulates sum_k x_ik^2 for r_i. The epilogue scales by r_i, adds the bias, applies
ReLU, stores h (stacked, (P+Q, N), in x's dtype) and writes the tile's partial sum_j h_ij^2 to an fp32 (T, M)
buffer, T = number of N tiles. No atomics: the reduction over N tiles is deterministic and is done by the row
kernel, which reads the rows anyway; the buffer is T*4 bytes per row, at most 3% of h for bf16 with BLOCK_N >= 64.
The grid is one-dimensional (CUDA allows 2^31 - 1 programs on axis 0, 65535 on the others), so any batch fits.
N and K reach the kernel with their power-of-two divisors (``ALIGN_N``, ``ALIGN_K``, at most 16) made visible: rows
of 500 elements then move as 4-element vectors (cp.async of 8 bytes in bf16/fp16, 16 in fp32) instead of one element
at a time. 16-byte copies in bf16, and TMA (16-byte row strides), would need rows padded to a multiple of 8 elements,
which contiguous tensors of width 500 (the user's x and weight, and h as the contract returns it) do not have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ff_kernels.ops.triton.common import (
    FORWARD_CONFIGS,
    FORWARD_CONFIGS_BY_PRECISION,
    INTERPRETED,
    MIN_FORWARD_BLOCK_N,
    NORMALIZE_CODE,
    TUNING_KEY,
    aligned,
    alignment,
    by_precision,
    cast,
    check_layer,
    check_rows,
    tuning_args,
)


@triton.jit
def _forward_tile(
    x_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    r_ptr,
    part_ptr,
    rows,
    row0,
    out_row0,
    pid_n,
    M,
    N,
    K,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of h for rows [row0, row0 + BLOCK_M) of one input batch."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < rows
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if NORMALIZE != 0:
            af = a.to(tl.float32)
            sumsq_x += tl.sum(af * af, axis=1)
        if INTERPRET:
            acc = tl.dot(a.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)

    z = acc
    if NORMALIZE != 0:
        if NORMALIZE == 1:
            norm = tl.sqrt_rn(sumsq_x)
        else:
            norm = tl.sqrt_rn(sumsq_x / K)
        r = tl.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), norm + eps)
        z = z * r[:, None]
        if STORE_R:
            if pid_n == 0:
                tl.store(r_ptr + out_row0 + tl.arange(0, BLOCK_M), r, mask=m_mask)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = z + bias[None, :]
    h = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu keeps NaN, as torch.relu does
    out_rows = (out_row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(
        h_ptr + out_rows[:, None] * N + offs_n[None, :],
        cast(h, h_ptr.dtype.element_ty, INTERPRET),
        mask=m_mask[:, None] & n_mask[None, :],
    )
    h_sq = tl.where(n_mask[None, :], h * h, 0.0)
    tl.store(part_ptr + pid_n.to(tl.int64) * M + out_rows, tl.sum(h_sq, axis=1), mask=m_mask)


@triton.autotune(
    configs=FORWARD_CONFIGS,
    key=TUNING_KEY,
    prune_configs_by={"early_config_prune": by_precision(FORWARD_CONFIGS_BY_PRECISION)},
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def ff_forward_kernel(
    xp_ptr,
    xn_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    r_ptr,
    part_ptr,
    P,
    Q,
    M,
    N,
    K,
    M_BUCKET,
    eps,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGN_N: tl.constexpr,
    ALIGN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMM 1 with the row-norm, bias, ReLU and partial-goodness epilogue; grid ((P tiles + Q tiles) * N tiles,).

    N tiles vary fastest, so consecutive programs reuse one x row tile while the weight stays in L2. ``M_BUCKET``
    is only the autotuner's key.
    """
    N = aligned(N, ALIGN_N)
    K = aligned(K, ALIGN_K)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % tiles_n
    pid_m = pid // tiles_n
    tiles_p = tl.cdiv(P, BLOCK_M)
    if pid_m < tiles_p:
        _forward_tile(
            xp_ptr,
            w_ptr,
            b_ptr,
            h_ptr,
            r_ptr,
            part_ptr,
            P,
            pid_m * BLOCK_M,
            pid_m * BLOCK_M,
            pid_n,
            M,
            N,
            K,
            eps,
            NORMALIZE,
            HAS_BIAS,
            STORE_R,
            INPUT_PRECISION,
            INTERPRET,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
    else:
        row0 = (pid_m - tiles_p) * BLOCK_M
        _forward_tile(
            xn_ptr,
            w_ptr,
            b_ptr,
            h_ptr,
            r_ptr,
            part_ptr,
            Q,
            row0,
            P + row0,
            pid_n,
            M,
            N,
            K,
            eps,
            NORMALIZE,
            HAS_BIAS,
            STORE_R,
            INPUT_PRECISION,
            INTERPRET,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )


# ---------------------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------------------


def forward_grid(rows_pos: int, rows_neg: int, n: int, meta: dict) -> tuple[int]:
    """GEMM 1's programs, (P tiles + Q tiles) * N tiles, on axis 0 (2^31 - 1 programs: any batch that fits)."""
    tiles_m = triton.cdiv(rows_pos, meta["BLOCK_M"]) + triton.cdiv(rows_neg, meta["BLOCK_M"])
    return (tiles_m * triton.cdiv(n, meta["BLOCK_N"]),)


class ForwardLaunch(NamedTuple):
    """What one GEMM 1 launch needs beside its tensors, computed once per shape, dtype and options (the Triton
    step caches it): the grid, the size arguments (P, Q, P+Q, N, K, the autotuner's row bucket) and the
    constexprs."""

    grid: Callable[[dict], tuple[int]]
    sizes: tuple[int, int, int, int, int, int]
    constexprs: dict[str, Any]


def forward_launch(
    rows_pos: int, rows_neg: int, n: int, k: int, dtype: torch.dtype, normalize: str, has_bias: bool, store_r: bool
) -> ForwardLaunch:
    """GEMM 1's launch plan; ``store_r`` without a normalisation stores nothing (there is no r)."""
    rows = rows_pos + rows_neg
    bucket, precision = tuning_args(rows, dtype)
    norm_code = NORMALIZE_CODE[normalize]

    def grid(meta: dict) -> tuple[int]:
        return forward_grid(rows_pos, rows_neg, n, meta)

    constexprs = {
        "NORMALIZE": norm_code,
        "HAS_BIAS": has_bias,
        "STORE_R": store_r and norm_code != 0,
        "INPUT_PRECISION": precision,
        "INTERPRET": INTERPRETED,
        "ALIGN_N": alignment(n),
        "ALIGN_K": alignment(k),
    }
    return ForwardLaunch(grid, (rows_pos, rows_neg, rows, n, k, bucket), constexprs)


def run_forward(
    launch: ForwardLaunch,
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    h: torch.Tensor,
    r: torch.Tensor | None,
    partials: torch.Tensor,
    eps: float,
) -> int:
    """GEMM 1 into buffers the caller checked and sized (at least one row); returns the N tiles it wrote."""
    rows_pos, rows_neg = launch.sizes[0], launch.sizes[1]
    # An empty batch is never read (its tiles do not exist); pass the other one so no null pointer is seen.
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if rows_neg else x_pos
    ff_forward_kernel[launch.grid](xp, xn, w, b, h, r, partials, *launch.sizes, eps, **launch.constexprs)
    block_n = ff_forward_kernel.best_config.kwargs["BLOCK_N"]
    return (launch.sizes[3] + block_n - 1) // block_n


def partial_tiles(n: int) -> int:
    """Rows of the partial-sum buffer: the N tiles of the narrowest config, so any config fits."""
    return triton.cdiv(n, MIN_FORWARD_BLOCK_N)


def launch_forward(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    normalize: str,
    eps: float,
    store_r: bool,
    names: tuple[str, str] = ("x_pos", "x_neg"),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """GEMM 1: returns h (P+Q, N), r (P+Q,) or None, the partial sums of squares (T_alloc, P+Q) and T used.

    ``names`` are the inputs' names in the errors (the forward op passes its one input twice)."""
    check_layer(w, b)
    check_rows(x_pos, names[0], w)
    check_rows(x_neg, names[1], w)
    n, k = w.shape
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    rows = rows_pos + rows_neg
    device = w.device
    h = torch.empty((rows, n), dtype=x_pos.dtype, device=device)
    r = torch.empty((rows,), dtype=torch.float32, device=device) if store_r and NORMALIZE_CODE[normalize] else None
    partials = torch.empty((partial_tiles(n), rows), dtype=torch.float32, device=device)
    if rows == 0:
        return h, r, partials, 0
    launch = forward_launch(rows_pos, rows_neg, n, k, x_pos.dtype, normalize, b is not None, r is not None)
    return h, r, partials, run_forward(launch, x_pos, x_neg, w, b, h, r, partials, eps)
