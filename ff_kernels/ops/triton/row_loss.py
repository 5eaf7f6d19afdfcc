"""The per-row kernel: goodness g_i = kappa * sum_t partial_ti from GEMM 1's partial sums, the loss terms
(logistic with offsets, or SymBa pairing row j of x_pos with row j of x_neg: one program handles both rows of a
pair) and c_i = 2 kappa dL/dg_i. Each program writes its partial loss; the 0-dim loss is their (deterministic) sum.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ff_kernels._options import StepOptions
from ff_kernels.ops.triton.common import LOSS_CODE, sigmoid, softplus


@triton.jit
def ff_row_kernel(
    part_ptr,
    g_ptr,
    c_ptr,
    loss_part_ptr,
    op_ptr,
    on_ptr,
    P,
    Q,
    M,
    T,
    kappa,
    threshold,
    alpha,
    inv_rows,
    STEP: tl.constexpr,
    LOSS: tl.constexpr,
    HAS_OFFSET_POS: tl.constexpr,
    HAS_OFFSET_NEG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-row step over j in [pid*BLOCK, (pid+1)*BLOCK): positive row j and negative row j (stacked row P + j).

    With ``STEP=False`` (inference) only the goodness of the first P rows is produced.
    """
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    mask_p = j < P
    mask_n = j < Q
    sum_p = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_n = tl.zeros((BLOCK,), dtype=tl.float32)
    base = part_ptr  # advanced by M per N tile: a pointer, so t * M never overflows int32
    for _ in range(0, T):
        sum_p += tl.load(base + j, mask=mask_p, other=0.0)
        if STEP:
            sum_n += tl.load(base + P + j, mask=mask_n, other=0.0)
        base += M
    g_pos = kappa * sum_p
    tl.store(g_ptr + j, g_pos, mask=mask_p)
    if STEP:
        g_neg = kappa * sum_n
        tl.store(g_ptr + P + j, g_neg, mask=mask_n)
        total_pos = g_pos
        total_neg = g_neg
        if HAS_OFFSET_POS:
            total_pos += tl.load(op_ptr + j, mask=mask_p, other=0.0)
        if HAS_OFFSET_NEG:
            total_neg += tl.load(on_ptr + j, mask=mask_n, other=0.0)
        if LOSS == 0:
            logit_pos = total_pos - threshold
            logit_neg = threshold - total_neg
            terms = tl.where(mask_p, softplus(-logit_pos), 0.0) + tl.where(mask_n, softplus(-logit_neg), 0.0)
            c_pos = -sigmoid(-logit_pos) * inv_rows
            c_neg = sigmoid(-logit_neg) * inv_rows
        else:
            arg = -alpha * (total_pos - total_neg)
            terms = tl.where(mask_p, softplus(arg), 0.0)
            c_pos = -alpha * sigmoid(arg) * inv_rows
            c_neg = -c_pos
        tl.store(c_ptr + j, (2.0 * kappa) * c_pos, mask=mask_p)
        tl.store(c_ptr + P + j, (2.0 * kappa) * c_neg, mask=mask_n)
        tl.store(loss_part_ptr + pid, tl.sum(terms, axis=0) * inv_rows)


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------


def row_launch(rows: int) -> tuple[int, tuple[int]]:
    """The row kernel's block and grid: up to 1024 rows (or row pairs) per program, on axis 0."""
    block = max(16, min(1024, triton.next_power_of_2(max(rows, 1))))
    return block, (triton.cdiv(rows, block),)


def launch_goodness(partials: torch.Tensor, tiles_n: int, rows: int, kappa: float) -> torch.Tensor:
    """Inference: g_i = kappa * sum over the N tiles of the partial sums of squares."""
    g = torch.empty((rows,), dtype=torch.float32, device=partials.device)
    if rows == 0:
        return g
    block, grid = row_launch(rows)
    ff_row_kernel[grid](
        partials,
        g,
        None,
        None,
        None,
        None,
        rows,
        0,
        rows,
        tiles_n,
        kappa,
        0.0,
        0.0,
        0.0,
        STEP=False,
        LOSS=0,
        HAS_OFFSET_POS=False,
        HAS_OFFSET_NEG=False,
        BLOCK=block,
    )
    return g


class RowLaunch(NamedTuple):
    """What one row-step launch needs beside its tensors and options, computed once per batch sizes and loss (the
    Triton step caches it): the grid, the row counts (P, Q, P+Q), 1 / the rows the loss averages, the constexprs."""

    grid: tuple[int]
    rows: tuple[int, int, int]
    inv_rows: float
    constexprs: dict[str, Any]


def row_step_launch(rows_pos: int, rows_neg: int, loss: str, has_offset_pos: bool, has_offset_neg: bool) -> RowLaunch:
    """The row step's launch plan: one program per ``BLOCK`` rows (or SymBa pairs), one partial loss each."""
    rows = rows_pos + rows_neg
    block, grid = row_launch(max(rows_pos, rows_neg))
    constexprs = {
        "STEP": True,
        "LOSS": LOSS_CODE[loss],
        "HAS_OFFSET_POS": has_offset_pos,
        "HAS_OFFSET_NEG": has_offset_neg,
        "BLOCK": block,
    }
    return RowLaunch(grid, (rows_pos, rows_neg, rows), 1.0 / (rows_pos if loss == "symba" else rows), constexprs)


def run_row_step(
    launch: RowLaunch,
    partials: torch.Tensor,
    tiles_n: int,
    g: torch.Tensor,
    c: torch.Tensor,
    loss_parts: torch.Tensor,
    opts: StepOptions,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
) -> None:
    """The row step into buffers the caller sized: ``loss_parts`` holds one partial loss per program (with one
    program, a 0-dim tensor is the loss itself)."""
    ff_row_kernel[launch.grid](
        partials,
        g,
        c,
        loss_parts,
        offset_pos,
        offset_neg,
        *launch.rows,
        tiles_n,
        opts.kappa,
        opts.threshold,
        opts.alpha,
        launch.inv_rows,
        **launch.constexprs,
    )


def launch_row_step(
    partials: torch.Tensor,
    tiles_n: int,
    rows_pos: int,
    rows_neg: int,
    opts: StepOptions,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Goodness (P+Q,), coefficients c (P+Q,) and the 0-dim fp32 loss; the rows were checked by ``_check_step``."""
    rows = rows_pos + rows_neg
    device = partials.device
    g = torch.empty((rows,), dtype=torch.float32, device=device)
    c = torch.empty((rows,), dtype=torch.float32, device=device)
    launch = row_step_launch(rows_pos, rows_neg, opts.loss, offset_pos is not None, offset_neg is not None)
    loss_parts = torch.empty(launch.grid, dtype=torch.float32, device=device)
    run_row_step(launch, partials, tiles_n, g, c, loss_parts, opts, offset_pos, offset_neg)
    return g, c, loss_parts.sum()
