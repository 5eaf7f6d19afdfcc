"""GEMM 2 of the FF step, with the optimizer update in its epilogue, and its launcher.

Each program owns one (BLOCK_N, BLOCK_K) tile of grad_weight and reduces over all P+Q rows (the positive rows,
then the negative rows), forming the operands of ``ff_kernels.ops.scaling`` as the tiles are loaded: h scaled by
c_i / 2^s, x by r_i (neither scaled h nor normalised x exists in memory), 2^s undone on the fp32 accumulator.
Programs with ``pid_k == 0`` also reduce grad_bias = sum_i c_i h_i for their N range. The epilogue either stores
the gradients or applies the optimizer update (SGD with momentum/dampening/nesterov/weight decay, Adam, AdamW) in
place to the weight tile, the bias slice and their fp32 state, in fp32, rounding the parameter once when it is
stored. The autotuner's hooks undo each benchmarked config's in-place update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ff_kernels.ops.triton.common import (
    GRAD_CONFIGS,
    INTERPRETED,
    NORMALIZE_CODE,
    OPT_NONE,
    TUNING_KEY,
    cast,
    tuning_args,
)


class RestoreInPlace:
    """Autotuner hooks that undo each benchmarked config's in-place update of the named tensors, skipping None.

    They replace ``restore_value``, which triton 3.0-3.7 applies by cloning every named argument (3.8 skips None),
    and the optional ones (bias, momentum or Adam state) are None for a plain step, SGD, a layer without bias. The
    autotuner passes the hooks all arguments by name (triton >= 3.2) or the positional ones (3.0, 3.1): both work.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.arg_names: tuple[str, ...] = ()  # the kernel's, for the positional form; set once it is defined
        self.copies: dict[str, torch.Tensor] = {}

    def _tensors(self, args: Mapping[str, Any] | Sequence[Any]) -> dict[str, torch.Tensor]:
        named = args if isinstance(args, Mapping) else dict(zip(self.arg_names, args))
        return {name: named[name] for name in self.names if named.get(name) is not None}

    def save(self, args: Mapping[str, Any] | Sequence[Any], reset_only: bool = False) -> None:
        """pre_hook; ``reset_only`` (after tuning, before the real launch) asks only for resets: there are none."""
        if not reset_only:
            self.copies = {name: t.clone() for name, t in self._tensors(args).items()}

    def restore(self, args: Mapping[str, Any] | Sequence[Any], exception: BaseException | None = None) -> None:
        """post_hook, also called when the config failed."""
        tensors = self._tensors(args)
        for name, copy in self.copies.items():
            tensors[name].copy_(copy)
        self.copies = {}


GRAD_RESTORE = RestoreInPlace(("w_ptr", "b_ptr", "s1w_ptr", "s2w_ptr", "s1b_ptr", "s2b_ptr"))


@triton.jit
def _grad_rows(
    acc,
    gb,
    x_ptr,
    h_ptr,
    c_ptr,
    r_ptr,
    rows,
    h_row0,
    N,
    K,
    offs_n,
    offs_k,
    n_mask,
    k_mask,
    coef_inv_scale,
    bias_tile,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """acc += ((c / 2^s) h)^T (r x) over the ``rows`` rows of one batch, whose h/c/r rows start at stacked row
    ``h_row0``: |c_i / 2^s| <= 1 and |r_i x_ik| <= 1, so neither low-precision operand can overflow."""
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(0, rows, BLOCK_M):
        rr = m0 + offs_m
        m_mask = rr < rows
        stacked = h_row0 + rr
        h = tl.load(
            h_ptr + stacked.to(tl.int64)[:, None] * N + offs_n[None, :],
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        c = tl.load(c_ptr + stacked, mask=m_mask, other=0.0)
        x = tl.load(
            x_ptr + rr.to(tl.int64)[:, None] * K + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if NORMALIZE != 0:
            r = tl.load(r_ptr + stacked, mask=m_mask, other=0.0)
            x = cast(x.to(tl.float32) * r[:, None], x.dtype, INTERPRET)
        hf = h.to(tl.float32)
        hs = cast(hf * (c * coef_inv_scale)[:, None], x.dtype, INTERPRET)
        if INTERPRET:
            acc = tl.dot(tl.trans(hs.to(tl.float32)), x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(hs), x, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            if bias_tile:
                gb += tl.sum(hf * c[:, None], axis=0)
    return acc, gb


@triton.jit
def _sgd_update(
    p_ptr,
    buf_ptr,
    offs,
    grad,
    mask,
    first,
    lr,
    momentum,
    dampening,
    weight_decay,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """torch.optim.SGD's single-tensor step on one tile, in fp32; the first momentum step sets buf = grad."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad = grad + weight_decay * p
    if MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        buf = tl.where(first != 0, grad, momentum * buf + (1.0 - dampening) * grad)
        tl.store(buf_ptr + offs, buf, mask=mask)
        if NESTEROV:
            grad = grad + momentum * buf
        else:
            grad = buf
    p = p - lr * grad
    tl.store(p_ptr + offs, cast(p, p_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _adam_update(
    p_ptr,
    m_ptr,
    v_ptr,
    offs,
    grad,
    mask,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_size,
    bc2_sqrt,
    DECOUPLED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """torch.optim.Adam/AdamW's single-tensor step on one tile; step_size and bc2_sqrt come from the host."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        grad = grad + weight_decay * p
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m = m + (1.0 - beta1) * (grad - m)
    v = v * beta2 + (1.0 - beta2) * grad * grad
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, cast(p, p_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.autotune(configs=GRAD_CONFIGS, key=TUNING_KEY, pre_hook=GRAD_RESTORE.save, post_hook=GRAD_RESTORE.restore)
@triton.jit(do_not_specialize=["M_BUCKET"])
def ff_grad_update_kernel(
    xp_ptr,
    xn_ptr,
    h_ptr,
    c_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    gw_ptr,
    gb_ptr,
    s1w_ptr,
    s2w_ptr,
    s1b_ptr,
    s2b_ptr,
    P,
    Q,
    M,
    N,
    K,
    M_BUCKET,
    coef_scale,
    coef_inv_scale,
    lr,
    weight_decay,
    momentum,
    dampening,
    first_w,
    first_b,
    beta1,
    beta2,
    adam_eps,
    step_size_w,
    bc2_sqrt_w,
    step_size_b,
    bc2_sqrt_b,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OPT: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    DECOUPLED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMM 2 over all rows for one weight tile, then the gradient store or the fused in-place update.

    Grid (K tiles * N tiles,), K tiles fastest. s1*/s2* are the state tensors: the SGD momentum buffer (s1) or
    Adam's exp_avg (s1) and exp_avg_sq (s2), for the weight (w) and the bias (b). ``M_BUCKET`` is only the
    autotuner's key.
    """
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_k = pid % tiles_k
    pid_n = pid // tiles_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    bias_tile = pid_k == 0

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    gb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc, gb = _grad_rows(
        acc,
        gb,
        xp_ptr,
        h_ptr,
        c_ptr,
        r_ptr,
        P,
        0,
        N,
        K,
        offs_n,
        offs_k,
        n_mask,
        k_mask,
        coef_inv_scale,
        bias_tile,
        NORMALIZE,
        HAS_BIAS,
        INPUT_PRECISION,
        INTERPRET,
        BLOCK_M,
    )
    acc, gb = _grad_rows(
        acc,
        gb,
        xn_ptr,
        h_ptr,
        c_ptr,
        r_ptr,
        Q,
        P,
        N,
        K,
        offs_n,
        offs_k,
        n_mask,
        k_mask,
        coef_inv_scale,
        bias_tile,
        NORMALIZE,
        HAS_BIAS,
        INPUT_PRECISION,
        INTERPRET,
        BLOCK_M,
    )
    grad_w = acc * coef_scale

    tile = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tile_mask = n_mask[:, None] & k_mask[None, :]
    if OPT == 0:
        tl.store(gw_ptr + tile, cast(grad_w, gw_ptr.dtype.element_ty, INTERPRET), mask=tile_mask)
        if HAS_BIAS:
            if bias_tile:
                tl.store(gb_ptr + offs_n, cast(gb, gb_ptr.dtype.element_ty, INTERPRET), mask=n_mask)
    elif OPT == 1:
        _sgd_update(
            w_ptr,
            s1w_ptr,
            tile,
            grad_w,
            tile_mask,
            first_w,
            lr,
            momentum,
            dampening,
            weight_decay,
            MOMENTUM,
            NESTEROV,
            INTERPRET,
        )
        if HAS_BIAS:
            if bias_tile:
                _sgd_update(
                    b_ptr,
                    s1b_ptr,
                    offs_n,
                    gb,
                    n_mask,
                    first_b,
                    lr,
                    momentum,
                    dampening,
                    weight_decay,
                    MOMENTUM,
                    NESTEROV,
                    INTERPRET,
                )
    else:
        _adam_update(
            w_ptr,
            s1w_ptr,
            s2w_ptr,
            tile,
            grad_w,
            tile_mask,
            lr,
            beta1,
            beta2,
            adam_eps,
            weight_decay,
            step_size_w,
            bc2_sqrt_w,
            DECOUPLED,
            INTERPRET,
        )
        if HAS_BIAS:
            if bias_tile:
                _adam_update(
                    b_ptr,
                    s1b_ptr,
                    s2b_ptr,
                    offs_n,
                    gb,
                    n_mask,
                    lr,
                    beta1,
                    beta2,
                    adam_eps,
                    weight_decay,
                    step_size_b,
                    bc2_sqrt_b,
                    DECOUPLED,
                    INTERPRET,
                )


GRAD_RESTORE.arg_names = tuple(ff_grad_update_kernel.arg_names)


# ---------------------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------------------


def grad_grid(n: int, k: int, meta: dict) -> tuple[int]:
    """GEMM 2's programs, one per weight tile, on axis 0; the rows are a loop inside each program."""
    return (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]),)


class Update(NamedTuple):
    """The kernel-side description of one optimizer step (unused fields are zero)."""

    kind: int
    s1w: torch.Tensor | None = None
    s2w: torch.Tensor | None = None
    s1b: torch.Tensor | None = None
    s2b: torch.Tensor | None = None
    lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first_w: bool = False
    first_b: bool = False
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    decoupled: bool = False
    step_size_w: float = 0.0
    bc2_sqrt_w: float = 1.0
    step_size_b: float = 0.0
    bc2_sqrt_b: float = 1.0


def launch_grad_update(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor | None,
    w: torch.Tensor,
    b: torch.Tensor | None,
    normalize: str,
    coef_scale: float,
    update: Update,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GEMM 2: returns (grad_weight, grad_bias) without an update; with one, updates w, b and the state in place
    (the state was checked by the custom op, which knows its names)."""
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    n, k = w.shape
    grad_w = grad_b = None
    if update.kind == OPT_NONE:
        grad_w = torch.empty_like(w)
        grad_b = None if b is None else torch.empty_like(b)
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if rows_neg else x_pos
    bucket, precision = tuning_args(rows_pos + rows_neg, x_pos.dtype)

    def grid(meta: dict) -> tuple[int]:
        return grad_grid(n, k, meta)

    ff_grad_update_kernel[grid](
        xp,
        xn,
        h,
        c,
        r,
        None if update.kind == OPT_NONE else w,
        None if update.kind == OPT_NONE else b,
        grad_w,
        grad_b,
        update.s1w,
        update.s2w,
        update.s1b,
        update.s2b,
        rows_pos,
        rows_neg,
        rows_pos + rows_neg,
        n,
        k,
        bucket,
        coef_scale,
        1.0 / coef_scale,
        update.lr,
        update.weight_decay,
        update.momentum,
        update.dampening,
        int(update.first_w),
        int(update.first_b),
        update.beta1,
        update.beta2,
        update.eps,
        update.step_size_w,
        update.bc2_sqrt_w,
        update.step_size_b,
        update.bc2_sqrt_b,
        NORMALIZE=NORMALIZE_CODE[normalize],
        HAS_BIAS=b is not None,
        OPT=update.kind,
        MOMENTUM=update.momentum != 0.0,
        NESTEROV=update.nesterov,
        DECOUPLED=update.decoupled,
        INPUT_PRECISION=precision,
        INTERPRET=INTERPRETED,
    )
    return grad_w, grad_b
