"""The fused Triton path (``backend="triton"``): one FF layer step in three kernels (DESIGN section 3).

Layout follows Liger-Kernel's ``ops/<op>.py``: Triton kernels, then launchers, then the ``torch.library`` custom
ops (so ``torch.compile(fullgraph=True)`` sees opaque ops with fake implementations), then the two thin functions
that ``ff_kernels.functional`` calls on already-checked inputs.

1. ``_ff_forward_kernel`` (GEMM 1). The positive and negative batches are never concatenated: the row tiles are
   split between them (tiles ``[0, cdiv(P, BM))`` read ``x_pos``, the rest ``x_neg``), so at most one partly
   filled tile is added. The same K loop that feeds ``tl.dot`` accumulates sum_k x_ik^2 for r_i. The epilogue
   scales by r_i, adds the bias, applies ReLU, stores h (stacked, (P+Q, N), in x's dtype) and writes the tile's
   partial sum_j h_ij^2 to an fp32 (T, M) buffer, T = number of N tiles. No atomics: the reduction over N tiles is
   deterministic and is done by the next kernel, which reads the rows anyway; the buffer is T*4 bytes per row,
   at most 3% of h for bf16 with BLOCK_N >= 64.
2. ``_ff_row_kernel``: goodness g_i = kappa * sum_t partial_ti, the loss terms (logistic with offsets, or SymBa
   pairing row j of x_pos with row j of x_neg: one program handles both rows of a pair) and c_i = 2 kappa dL/dg_i.
   Each program writes its partial loss; the 0-dim loss is their (deterministic) sum.
3. ``_ff_grad_update_kernel`` (GEMM 2): each program owns one (BLOCK_N, BLOCK_K) tile of grad_weight and reduces
   over all P+Q rows (the positive rows, then the negative rows), forming the operands of ``ops/scaling.py`` as
   the tiles are loaded: h scaled by c_i / 2^s, x by r_i (neither scaled h nor normalised x exists in memory).
   Programs with ``pid_k == 0`` also reduce grad_bias = sum_i c_i h_i for their N range. The epilogue either
   stores the gradients or applies the optimizer update (SGD with momentum/dampening/nesterov/weight decay, Adam,
   AdamW) in place to the weight tile, the bias slice and their fp32 state, in fp32, rounding the parameter once
   when it is stored.

Precision: bf16/fp16 operands feed ``tl.dot`` with fp32 accumulation; fp32 operands use TF32 only when PyTorch's
cuBLAS switch allows it (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``allow_tf32 = True`` and
``torch.set_float32_matmul_precision("high")`` also set); "ieee" otherwise, and always exact under the interpreter.
GEMM 2's operands are conditioned as every backend does it (``ff_kernels.ops.scaling``): c_i / 2^s, with 2^s a
host-computed power of two bounding |c_i| (exact; undone on the fp32 accumulator), goes with h and r_i with x, so
neither operand overflows fp16 (a nearly zero row of x has r_i near 1/eps) or is pushed towards its subnormal
range by the batch size. Every downcast rounds to nearest even (see ``_cast`` for the interpreter).

Launches: each custom op runs with the weight's CUDA device current (Triton launches on the current device). The
grids are one-dimensional (CUDA allows 2^31 - 1 programs on axis 0, 65535 on the others), so any batch fits. The
autotuner's key is the row count rounded up to a power of two (``M_BUCKET``, so a new batch size re-tunes only
when it crosses one), N, K and the input precision; its hooks undo the benchmarked in-place updates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ff_kernels._options import StepOptions
from ff_kernels.ops.scaling import coefficient_scale
from ff_kernels.optim import SGD, Adam, FusedOptimizer
from ff_kernels.types import FFStepOutput

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_NORMALIZE_CODE = {"none": 0, "l2": 1, "rms": 2}
_LOSS_CODE = {"logistic": 0, "symba": 1}
_OPT_NONE, _OPT_SGD, _OPT_ADAM = 0, 1, 2

# ---------------------------------------------------------------------------------------------------------------
# Autotune configurations. The interpreter runs one config (it cannot benchmark); on a GPU a small set keyed on
# (M_BUCKET, N, K, INPUT_PRECISION) (the autotuner adds the dtypes): square-ish 128/64 tiles for the
# compute-bound large shapes and 64-wide tiles so that small N*K layers (GEMM 2 has N/BN x K/BK programs) still
# fill the SMs.
# ---------------------------------------------------------------------------------------------------------------
if _INTERPRET:
    _FORWARD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    _GRAD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
else:
    _FORWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    _GRAD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
_MIN_FORWARD_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _FORWARD_CONFIGS)
# Argument names; INPUT_PRECISION is a constexpr, which every triton 3.x puts in the key (3.0/3.1 index the key by
# position among the arguments passed, so every argument before it must be passed: only BLOCK_* are left out).
_TUNING_KEY = ["M_BUCKET", "N", "K", "INPUT_PRECISION"]


class _RestoreInPlace:
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


_GRAD_RESTORE = _RestoreInPlace(("w_ptr", "b_ptr", "s1w_ptr", "s2w_ptr", "s1b_ptr", "s2b_ptr"))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _softplus(x):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p written accurately for small arguments."""
    e = tl.exp(-tl.abs(x))
    one_plus = 1.0 + e
    exact = one_plus == 1.0
    log1p = tl.where(exact, e, tl.log(one_plus) * (e / tl.where(exact, 1.0, one_plus - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sigmoid(x):
    """Overflow-free logistic function."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even, as the GPU does. The interpreter (triton 3.9) truncates
    fp32 -> bf16, so there the rounding is done on the bits first and the truncation is then exact."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


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
    h = tl.maximum(z, 0.0)
    out_rows = (out_row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(
        h_ptr + out_rows[:, None] * N + offs_n[None, :],
        _cast(h, h_ptr.dtype.element_ty, INTERPRET),
        mask=m_mask[:, None] & n_mask[None, :],
    )
    h_sq = tl.where(n_mask[None, :], h * h, 0.0)
    tl.store(part_ptr + pid_n.to(tl.int64) * M + out_rows, tl.sum(h_sq, axis=1), mask=m_mask)


@triton.autotune(configs=_FORWARD_CONFIGS, key=_TUNING_KEY)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _ff_forward_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMM 1 with the row-norm, bias, ReLU and partial-goodness epilogue; grid ((P tiles + Q tiles) * N tiles,).

    N tiles vary fastest, so consecutive programs reuse one x row tile while the weight stays in L2. ``M_BUCKET``
    is only the autotuner's key.
    """
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


@triton.jit
def _ff_row_kernel(
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
            terms = tl.where(mask_p, _softplus(-logit_pos), 0.0) + tl.where(mask_n, _softplus(-logit_neg), 0.0)
            c_pos = -_sigmoid(-logit_pos) * inv_rows
            c_neg = _sigmoid(-logit_neg) * inv_rows
        else:
            arg = -alpha * (total_pos - total_neg)
            terms = tl.where(mask_p, _softplus(arg), 0.0)
            c_pos = -alpha * _sigmoid(arg) * inv_rows
            c_neg = -c_pos
        tl.store(c_ptr + j, (2.0 * kappa) * c_pos, mask=mask_p)
        tl.store(c_ptr + P + j, (2.0 * kappa) * c_neg, mask=mask_n)
        tl.store(loss_part_ptr + pid, tl.sum(terms, axis=0) * inv_rows)


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
            x = _cast(x.to(tl.float32) * r[:, None], x.dtype, INTERPRET)
        hf = h.to(tl.float32)
        hs = _cast(hf * (c * coef_inv_scale)[:, None], x.dtype, INTERPRET)
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
    tl.store(p_ptr + offs, _cast(p, p_ptr.dtype.element_ty, INTERPRET), mask=mask)


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
    tl.store(p_ptr + offs, _cast(p, p_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.autotune(configs=_GRAD_CONFIGS, key=_TUNING_KEY, pre_hook=_GRAD_RESTORE.save, post_hook=_GRAD_RESTORE.restore)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _ff_grad_update_kernel(
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
        tl.store(gw_ptr + tile, _cast(grad_w, gw_ptr.dtype.element_ty, INTERPRET), mask=tile_mask)
        if HAS_BIAS:
            if bias_tile:
                tl.store(gb_ptr + offs_n, _cast(gb, gb_ptr.dtype.element_ty, INTERPRET), mask=n_mask)
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


_GRAD_RESTORE.arg_names = tuple(_ff_grad_update_kernel.arg_names)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _tf32_allowed() -> bool:
    """PyTorch's cuBLAS TF32 switch. ``fp32_precision`` reflects both APIs (reading the legacy ``allow_tf32``
    raises once the new API has been used), so it is read first; older torch only has ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 operands only when PyTorch's matmul switch allows it; bf16/fp16 use the default MMA path."""
    if dtype == torch.float32 and not _tf32_allowed():
        return "ieee"
    return "tf32"


def _tuning_args(rows: int, dtype: torch.dtype) -> tuple[int, str]:
    """The autotuner's key beyond N and K: the rows rounded up to a power of two (tiles that win at 1000 rows win
    at 1020; only crossing a power of two re-tunes) and the input precision (TF32 and IEEE fp32 products differ)."""
    return triton.next_power_of_2(max(rows, 1)), _input_precision(dtype)


def _forward_grid(rows_pos: int, rows_neg: int, n: int, meta: dict) -> tuple[int]:
    """GEMM 1's programs, (P tiles + Q tiles) * N tiles, on axis 0 (2^31 - 1 programs: any batch that fits)."""
    tiles_m = triton.cdiv(rows_pos, meta["BLOCK_M"]) + triton.cdiv(rows_neg, meta["BLOCK_M"])
    return (tiles_m * triton.cdiv(n, meta["BLOCK_N"]),)


def _grad_grid(n: int, k: int, meta: dict) -> tuple[int]:
    """GEMM 2's programs, one per weight tile, on axis 0; the rows are a loop inside each program."""
    return (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _row_launch(rows: int) -> tuple[int, tuple[int]]:
    """The row kernel's block and grid: up to 1024 rows (or row pairs) per program, on axis 0."""
    block = max(16, min(1024, triton.next_power_of_2(max(rows, 1))))
    return block, (triton.cdiv(rows, block),)


def _check_rows(x: torch.Tensor, name: str, w: torch.Tensor) -> None:
    """x must be a contiguous (rows, K) matrix of the weight's dtype on its device (the kernels index it densely)."""
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name} must be (rows, {w.shape[1]}) to match weight {tuple(w.shape)}, got {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"{name} is {x.dtype} but weight is {w.dtype}; the kernels take one dtype")
    if x.device != w.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {w.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels index its rows densely)")


def _check_layer(w: torch.Tensor, b: torch.Tensor | None) -> None:
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"weight must be a contiguous (N, K) matrix, got shape {tuple(w.shape)}")
    if b is not None and (b.shape != (w.shape[0],) or not b.is_contiguous() or b.device != w.device):
        raise ValueError(f"bias must be a contiguous ({w.shape[0]},) vector on {w.device}, got {tuple(b.shape)}")


def _check_state(w: torch.Tensor, b: torch.Tensor | None, **state: torch.Tensor | None) -> None:
    """Optimizer state: fp32, contiguous, shaped like its parameter (``*_w`` the weight, ``*_b`` the bias)."""
    for name, s in state.items():
        param = w if name.endswith("_w") else b
        if s is None or param is None:
            continue
        if s.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 optimizer state, got {s.dtype}")
        if s.shape != param.shape or not s.is_contiguous() or s.device != param.device:
            raise ValueError(f"{name} must be contiguous, shaped {tuple(param.shape)} and on {param.device}")


def _launch_forward(
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
    _check_layer(w, b)
    _check_rows(x_pos, names[0], w)
    _check_rows(x_neg, names[1], w)
    n, k = w.shape
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    rows = rows_pos + rows_neg
    device = w.device
    h = torch.empty((rows, n), dtype=x_pos.dtype, device=device)
    norm_code = _NORMALIZE_CODE[normalize]
    r = torch.empty((rows,), dtype=torch.float32, device=device) if store_r and norm_code else None
    partials = torch.empty((triton.cdiv(n, _MIN_FORWARD_BLOCK_N), rows), dtype=torch.float32, device=device)
    if rows == 0:
        return h, r, partials, 0
    # An empty batch is never read (its tiles do not exist); pass the other one so no null pointer is seen.
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if rows_neg else x_pos
    bucket, precision = _tuning_args(rows, x_pos.dtype)

    def grid(meta: dict) -> tuple[int]:
        return _forward_grid(rows_pos, rows_neg, n, meta)

    _ff_forward_kernel[grid](
        xp,
        xn,
        w,
        b,
        h,
        r,
        partials,
        rows_pos,
        rows_neg,
        rows,
        n,
        k,
        bucket,
        eps,
        NORMALIZE=norm_code,
        HAS_BIAS=b is not None,
        STORE_R=r is not None,
        INPUT_PRECISION=precision,
        INTERPRET=_INTERPRET,
    )
    tiles_n = triton.cdiv(n, _ff_forward_kernel.best_config.kwargs["BLOCK_N"])
    return h, r, partials, tiles_n


def _launch_goodness(partials: torch.Tensor, tiles_n: int, rows: int, kappa: float) -> torch.Tensor:
    """Inference: g_i = kappa * sum over the N tiles of the partial sums of squares."""
    g = torch.empty((rows,), dtype=torch.float32, device=partials.device)
    if rows == 0:
        return g
    block, grid = _row_launch(rows)
    _ff_row_kernel[grid](
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


def _launch_row_step(
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
    block, grid = _row_launch(max(rows_pos, rows_neg))
    loss_parts = torch.empty(grid, dtype=torch.float32, device=device)
    inv_rows = 1.0 / (rows_pos if opts.loss == "symba" else rows)
    _ff_row_kernel[grid](
        partials,
        g,
        c,
        loss_parts,
        offset_pos,
        offset_neg,
        rows_pos,
        rows_neg,
        rows,
        tiles_n,
        opts.kappa,
        opts.threshold,
        opts.alpha,
        inv_rows,
        STEP=True,
        LOSS=_LOSS_CODE[opts.loss],
        HAS_OFFSET_POS=offset_pos is not None,
        HAS_OFFSET_NEG=offset_neg is not None,
        BLOCK=block,
    )
    return g, c, loss_parts.sum()


class _Update(NamedTuple):
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


def _launch_grad_update(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor | None,
    w: torch.Tensor,
    b: torch.Tensor | None,
    normalize: str,
    coef_scale: float,
    update: _Update,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GEMM 2: returns (grad_weight, grad_bias) without an update; with one, updates w, b and the state in place
    (the state was checked by the custom op, which knows its names)."""
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    n, k = w.shape
    grad_w = grad_b = None
    if update.kind == _OPT_NONE:
        grad_w = torch.empty_like(w)
        grad_b = None if b is None else torch.empty_like(b)
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if rows_neg else x_pos
    bucket, precision = _tuning_args(rows_pos + rows_neg, x_pos.dtype)

    def grid(meta: dict) -> tuple[int]:
        return _grad_grid(n, k, meta)

    _ff_grad_update_kernel[grid](
        xp,
        xn,
        h,
        c,
        r,
        None if update.kind == _OPT_NONE else w,
        None if update.kind == _OPT_NONE else b,
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
        NORMALIZE=_NORMALIZE_CODE[normalize],
        HAS_BIAS=b is not None,
        OPT=update.kind,
        MOMENTUM=update.momentum != 0.0,
        NESTEROV=update.nesterov,
        DECOUPLED=update.decoupled,
        INPUT_PRECISION=precision,
        INTERPRET=_INTERPRET,
    )
    return grad_w, grad_b


def _check_step(x_pos: torch.Tensor, x_neg: torch.Tensor, opts: StepOptions) -> None:
    """What the row step assumes of the batch sizes (checked before anything is launched)."""
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    if rows_pos + rows_neg == 0:
        raise ValueError("x_pos and x_neg are both empty: a step needs at least one row")
    if opts.loss == "symba" and rows_pos != rows_neg:
        raise ValueError(
            f"loss='symba' pairs row i of x_pos with row i of x_neg: x_pos has {rows_pos} rows, x_neg {rows_neg}"
        )


def _step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    opts: StepOptions,
    update: _Update,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The three launches of one step, on the weight's device: (loss, g, h, grad_weight, grad_bias)."""
    _check_step(x_pos, x_neg, opts)
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    with torch.cuda.device_of(w):
        h, r, partials, tiles_n = _launch_forward(x_pos, x_neg, w, b, opts.normalize, opts.eps, store_r=True)
        g, c, loss = _launch_row_step(partials, tiles_n, rows_pos, rows_neg, opts, offset_pos, offset_neg)
        scale = coefficient_scale(opts, rows_pos, rows_neg)
        grad_w, grad_b = _launch_grad_update(x_pos, x_neg, h, c, r, w, b, opts.normalize, scale, update)
    return loss, g, h, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops: the schemas in one place, then the implementations and their fake (meta) versions.
# ---------------------------------------------------------------------------------------------------------------
_STEP_ARGS = (
    "Tensor? offset_pos, Tensor? offset_neg, float threshold, float kappa, str loss, str normalize, float eps, "
    "float alpha"
)
_SCHEMAS = {
    "forward": "(Tensor x, Tensor w, Tensor? b, float kappa, str normalize, float eps) -> (Tensor, Tensor)",
    "step": (
        f"(Tensor x_pos, Tensor x_neg, Tensor w, Tensor? b, {_STEP_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "step_sgd_": (
        f"(Tensor x_pos, Tensor x_neg, Tensor(a!) w, Tensor(b!)? b, {_STEP_ARGS}, Tensor(c!)? buf_w, "
        "Tensor(d!)? buf_b, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "bool first_w, bool first_b) -> (Tensor, Tensor, Tensor)"
    ),
    "step_adam_": (
        f"(Tensor x_pos, Tensor x_neg, Tensor(a!) w, Tensor(b!)? b, {_STEP_ARGS}, Tensor(c!) exp_avg_w, "
        "Tensor(d!) exp_avg_sq_w, Tensor(e!)? exp_avg_b, Tensor(f!)? exp_avg_sq_b, float lr, float beta1, "
        "float beta2, float adam_eps, float weight_decay, bool decoupled, float step_size_w, float bc2_sqrt_w, "
        "float step_size_b, float bc2_sqrt_b) -> (Tensor, Tensor, Tensor)"
    ),
}
_MUTATES = {
    "forward": (),
    "step": (),
    "step_sgd_": ("w", "b", "buf_w", "buf_b"),
    "step_adam_": ("w", "b", "exp_avg_w", "exp_avg_sq_w", "exp_avg_b", "exp_avg_sq_b"),
}


def _custom_op(name: str):
    return torch.library.custom_op(f"ff_kernels::triton_{name}", mutates_args=_MUTATES[name], schema=_SCHEMAS[name])


def _options(threshold: float, kappa: float, loss: str, normalize: str, eps: float, alpha: float) -> StepOptions:
    """Rebuild the options inside an op; the goodness name is folded into kappa and never read by the kernels."""
    return StepOptions(
        threshold=threshold, goodness="", loss=loss, normalize=normalize, eps=eps, alpha=alpha, kappa=kappa
    )


@_custom_op("forward")
def _forward_op(x, w, b, kappa, normalize, eps):
    with torch.cuda.device_of(w):  # Triton launches on the current device, not the tensors'
        h, _, partials, tiles_n = _launch_forward(x, x[:0], w, b, normalize, eps, store_r=False, names=("x", "x"))
        return h, _launch_goodness(partials, tiles_n, x.shape[0], kappa)


@_forward_op.register_fake
def _(x, w, b, kappa, normalize, eps):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0],), dtype=torch.float32)


@_custom_op("step")
def _step_op(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha):
    opts = _options(threshold, kappa, loss, normalize, eps, alpha)
    out_loss, g, h, grad_w, grad_b = _step(x_pos, x_neg, w, b, offset_pos, offset_neg, opts, _Update(_OPT_NONE))
    return out_loss, g, h, grad_w, w.new_empty((0,)) if grad_b is None else grad_b


def _fake_step_outputs(x_pos, x_neg, w):
    rows = x_pos.shape[0] + x_neg.shape[0]
    return (
        x_pos.new_empty((), dtype=torch.float32),
        x_pos.new_empty((rows,), dtype=torch.float32),
        x_pos.new_empty((rows, w.shape[0])),
    )


@_step_op.register_fake
def _(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha):
    grad_b = w.new_empty((0,)) if b is None else torch.empty_like(b)
    return (*_fake_step_outputs(x_pos, x_neg, w), torch.empty_like(w), grad_b)


@_custom_op("step_sgd_")
def _step_sgd_op(
    x_pos,
    x_neg,
    w,
    b,
    offset_pos,
    offset_neg,
    threshold,
    kappa,
    loss,
    normalize,
    eps,
    alpha,
    buf_w,
    buf_b,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    first_w,
    first_b,
):
    opts = _options(threshold, kappa, loss, normalize, eps, alpha)
    update = _Update(
        _OPT_SGD,
        s1w=buf_w,
        s1b=buf_b,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        first_w=first_w,
        first_b=first_b,
    )
    if momentum != 0.0 and buf_w is None:
        raise ValueError("SGD with momentum needs buf_w, the weight's momentum buffer")
    if momentum != 0.0 and b is not None and buf_b is None:
        raise ValueError("SGD with momentum and a bias needs buf_b, the bias's momentum buffer")
    _check_state(w, b, buf_w=buf_w, buf_b=buf_b)
    out_loss, g, h, _, _ = _step(x_pos, x_neg, w, b, offset_pos, offset_neg, opts, update)
    return out_loss, g, h


@_step_sgd_op.register_fake
def _(
    x_pos,
    x_neg,
    w,
    b,
    offset_pos,
    offset_neg,
    threshold,
    kappa,
    loss,
    normalize,
    eps,
    alpha,
    buf_w,
    buf_b,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    first_w,
    first_b,
):
    return _fake_step_outputs(x_pos, x_neg, w)


@_custom_op("step_adam_")
def _step_adam_op(
    x_pos,
    x_neg,
    w,
    b,
    offset_pos,
    offset_neg,
    threshold,
    kappa,
    loss,
    normalize,
    eps,
    alpha,
    exp_avg_w,
    exp_avg_sq_w,
    exp_avg_b,
    exp_avg_sq_b,
    lr,
    beta1,
    beta2,
    adam_eps,
    weight_decay,
    decoupled,
    step_size_w,
    bc2_sqrt_w,
    step_size_b,
    bc2_sqrt_b,
):
    opts = _options(threshold, kappa, loss, normalize, eps, alpha)
    update = _Update(
        _OPT_ADAM,
        s1w=exp_avg_w,
        s2w=exp_avg_sq_w,
        s1b=exp_avg_b,
        s2b=exp_avg_sq_b,
        lr=lr,
        weight_decay=weight_decay,
        beta1=beta1,
        beta2=beta2,
        eps=adam_eps,
        decoupled=decoupled,
        step_size_w=step_size_w,
        bc2_sqrt_w=bc2_sqrt_w,
        step_size_b=step_size_b,
        bc2_sqrt_b=bc2_sqrt_b,
    )
    if b is not None and (exp_avg_b is None or exp_avg_sq_b is None):
        raise ValueError("Adam with a bias needs exp_avg_b and exp_avg_sq_b, the bias's moments")
    _check_state(w, b, exp_avg_w=exp_avg_w, exp_avg_sq_w=exp_avg_sq_w, exp_avg_b=exp_avg_b, exp_avg_sq_b=exp_avg_sq_b)
    out_loss, g, h, _, _ = _step(x_pos, x_neg, w, b, offset_pos, offset_neg, opts, update)
    return out_loss, g, h


@_step_adam_op.register_fake
def _(
    x_pos,
    x_neg,
    w,
    b,
    offset_pos,
    offset_neg,
    threshold,
    kappa,
    loss,
    normalize,
    eps,
    alpha,
    exp_avg_w,
    exp_avg_sq_w,
    exp_avg_b,
    exp_avg_sq_b,
    lr,
    beta1,
    beta2,
    adam_eps,
    weight_decay,
    decoupled,
    step_size_w,
    bc2_sqrt_w,
    step_size_b,
    bc2_sqrt_b,
):
    return _fake_step_outputs(x_pos, x_neg, w)


# ---------------------------------------------------------------------------------------------------------------
# The functions ff_kernels.functional calls (inputs already checked there).
# ---------------------------------------------------------------------------------------------------------------
def ff_linear_step_triton(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    optimizer: FusedOptimizer | None = None,
) -> FFStepOutput:
    """One fused FF step: three kernels, the update (if any) applied in the GEMM 2 epilogue in place."""
    rows_pos = x_pos.shape[0]
    step_args = (offset_pos, offset_neg, opts.threshold, opts.kappa, opts.loss, opts.normalize, opts.eps, opts.alpha)
    grad_w = grad_b = None
    if optimizer is None:
        loss, g, h, grad_w, gb = torch.ops.ff_kernels.triton_step(x_pos, x_neg, w, b, *step_args)
        grad_b = None if b is None else gb
    else:
        if isinstance(optimizer, SGD):
            bufs, firsts = optimizer.fused_state(w, b)
            loss, g, h = torch.ops.ff_kernels.triton_step_sgd_(
                x_pos,
                x_neg,
                w,
                b,
                *step_args,
                bufs[0],
                bufs[1],
                float(optimizer.lr),
                float(optimizer.momentum),
                float(optimizer.dampening),
                float(optimizer.weight_decay),
                bool(optimizer.nesterov),
                firsts[0],
                firsts[1],
            )
        elif isinstance(optimizer, Adam):
            moments, corrections = optimizer.fused_state(w, b)
            beta1, beta2 = optimizer.betas
            loss, g, h = torch.ops.ff_kernels.triton_step_adam_(
                x_pos,
                x_neg,
                w,
                b,
                *step_args,
                *moments,
                float(optimizer.lr),
                float(beta1),
                float(beta2),
                float(optimizer.eps),
                float(optimizer.weight_decay),
                bool(optimizer.decoupled_weight_decay),
                *corrections,
            )
        else:
            raise TypeError(f"the Triton backend has no fused update for {type(optimizer).__name__}")
    return FFStepOutput.from_stacked(loss, g, h, rows_pos, grad_w, grad_b)


def ff_linear_forward_triton(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, kappa: float, normalize: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference, GEMM 1 alone: h (x's dtype) and goodness g (fp32), DESIGN 1.1-1.3."""
    return torch.ops.ff_kernels.triton_forward(x, w, b, kappa, normalize, eps)
