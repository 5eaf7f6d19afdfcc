"""The block-wise head loss on Triton (``backend="triton"``, DESIGN 8): kernels, launchers, ``torch.library``
registration and the thin entry points with the torch backend's signatures.

Rows are the (sample, position) pairs of h viewed as (B, C, P), P = H*W (P = 1 for (B, C) rows), read through h's
own strides, so NCHW and channels-last h are both read in place. A row tile covers ``BLOCK_S`` samples times
``BLOCK_P`` positions (powers of two): one sample's positions when P is large, several samples of a 4x4 map, and
``BLOCK_P = 1`` for rows. The class dimension (10 for CIFAR-10) is padded to a tile of at least 16 so ``tl.dot``
compiles for the tensor cores.

Forward: ``head_forward_kernel`` is the GEMM a = h W^T + b (rows x channels times channels x classes) whose
epilogue stores a (in h's dtype, (B, K, P)) and each tile's per-(sample, class) sums of a^2 (fp32, deterministic, no
atomics); ``head_loss_kernel`` sums the position tiles into g = mean_p a^2, and writes the loss terms and
d = softmax(g / tau) - onehot(y). Backward in closed form, with c = s * d, s = 2 grad / (P B tau) applied to the
fp32 accumulators (so G' = d (.) a keeps a's magnitude and does not underflow fp16 the way c (.) a would):
``head_grad_h_kernel`` is dL/dh = s (d (.) a) W, a GEMM over the (padded) classes with d applied on load;
``head_grad_weight_kernel`` is dL/dW = s sum_rows (d (.) a)^T h and dL/db = s sum_rows d (.) a, split over the
rows into fp32 partial sums that one ``sum`` reduces.

a is stored, not recomputed: it is K/C of h (10/64 to 10/512 for ResNet-18 blocks, what autograd would save for the
head anyway, and what the torch backend saves), while recomputing it in the backward would read all of h once more
and repeat the forward GEMM.

Precision: bf16/fp16 operands with fp32 accumulation; fp32 operands use TF32 when PyTorch's matmul switch allows it,
exact fp32 otherwise; float64 (gradcheck, interpreter) accumulates in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ff_kernels.ops.torch_step import accumulate_dtype
from ff_kernels.ops.triton.common import INTERPRETED, cast, input_precision, sm_count

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


# ---------------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _rows(tile_b, tile_p, B, P, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """The (sample, position) of each row of a tile and its mask."""
    m = tl.arange(0, BLOCK_S * BLOCK_P)
    b = tile_b * BLOCK_S + m // BLOCK_P
    p = tile_p * BLOCK_P + m % BLOCK_P
    return b, p, (b < B) & (p < P)


@triton.jit
def head_forward_kernel(
    h_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    part_ptr,
    B,
    C,
    K,
    P,
    stride_hb,
    stride_hc,
    stride_hp,
    STORE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (rows, classes) tile of a = h W^T + b; partial sums of a^2 per (sample, class) into (tiles_p, B, K).

    Grid: (sample tiles * position tiles * class tiles,), classes fastest (the h tile is reused from L2)."""
    BLOCK_M: tl.constexpr = BLOCK_S * BLOCK_P
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(K, BLOCK_N)
    tiles_p = tl.cdiv(P, BLOCK_P)
    pid_n = pid % tiles_n
    pid_p = (pid // tiles_n) % tiles_p
    pid_b = pid // (tiles_n * tiles_p)
    b, p, m_mask = _rows(pid_b, pid_p, B, P, BLOCK_S, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < K
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + (b.to(tl.int64) * stride_hb + p.to(tl.int64) * stride_hp)[:, None] + offs_k[None, :] * stride_hc
    w_ptrs = w_ptr + offs_n[None, :] * C + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        k_mask = (k0 + offs_k) < C
        x = tl.load(h_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if INTERPRET:
            acc = tl.dot(x.to(ACC), wt.to(ACC), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_K * stride_hc
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if STORE_A:
        a_rows = b.to(tl.int64) * K * P + p
        tl.store(
            a_ptr + a_rows[:, None] + (offs_n * P)[None, :], cast(acc, a_ptr.dtype.element_ty, INTERPRET), mask=mask
        )
    squares = tl.where(mask, acc * acc, 0.0)
    if BLOCK_S == 1:
        part = tl.sum(squares, axis=0)[None, :]
    elif BLOCK_P == 1:
        part = squares
    else:
        part = tl.sum(tl.reshape(squares, (BLOCK_S, BLOCK_P, BLOCK_N)), axis=1)
    samples = pid_b * BLOCK_S + tl.arange(0, BLOCK_S)
    part_ptrs = part_ptr + (pid_p * B + samples.to(tl.int64))[:, None] * K + offs_n[None, :]
    tl.store(part_ptrs, part, mask=(samples < B)[:, None] & n_mask[None, :])


@triton.jit
def head_loss_kernel(
    part_ptr,
    labels_ptr,
    g_ptr,
    d_ptr,
    loss_part_ptr,
    B,
    K,
    T,
    inv_positions,
    inv_temperature,
    inv_rows,
    LOSS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Per sample: g = (1/P) sum over the T position tiles; with ``LOSS`` the loss terms (each program writes its
    partial mean, summed once on the host side) and d = softmax(g / tau) - onehot(y)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_N)
    r_mask = rows < B
    mask = r_mask[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    total = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
    ptrs = part_ptr + offs
    for _ in range(0, T):
        total += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += B * K
    g = total * inv_positions
    tl.store(g_ptr + offs, g, mask=mask)
    if LOSS:
        logits = tl.where(mask, g * inv_temperature, -float("inf"))
        top = tl.where(r_mask, tl.max(logits, axis=1), 0.0)
        e = tl.exp(logits - top[:, None])
        total_e = tl.where(r_mask, tl.sum(e, axis=1), 1.0)
        label = tl.load(labels_ptr + rows, mask=r_mask, other=0)
        onehot = cols[None, :] == label[:, None]
        target = tl.sum(tl.where(onehot & mask, logits, 0.0), axis=1)
        terms = tl.where(r_mask, top + tl.log(total_e) - target, 0.0)
        tl.store(loss_part_ptr + pid, tl.sum(terms, axis=0) * inv_rows)
        tl.store(d_ptr + offs, e / total_e[:, None] - tl.where(onehot, 1.0, 0.0), mask=mask)


@triton.jit
def head_grad_h_kernel(
    a_ptr,
    d_ptr,
    w_ptr,
    grad_ptr,
    dh_ptr,
    B,
    C,
    K,
    P,
    stride_b,
    stride_c,
    stride_p,
    scale,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dL/dh for one (rows, channels) tile: (d (.) a) W over the classes, d applied on load, the scale s = 2 grad /
    (P B tau) on the accumulator. Grid: (sample tiles * position tiles * channel tiles,), channels fastest."""
    BLOCK_M: tl.constexpr = BLOCK_S * BLOCK_P
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    tiles_p = tl.cdiv(P, BLOCK_P)
    pid_c = pid % tiles_c
    pid_p = (pid // tiles_c) % tiles_p
    pid_b = pid // (tiles_c * tiles_p)
    b, p, m_mask = _rows(pid_b, pid_p, B, P, BLOCK_S, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_n = tl.arange(0, BLOCK_N)
    a_rows = b.to(tl.int64) * K * P + p
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for n0 in range(0, K, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < K
        mask = m_mask[:, None] & n_mask[None, :]
        av = tl.load(a_ptr + a_rows[:, None] + (n * P)[None, :], mask=mask, other=0.0).to(ACC)
        dv = tl.load(d_ptr + (b.to(tl.int64) * K)[:, None] + n[None, :], mask=mask, other=0.0)
        gq = cast(av * dv, w_ptr.dtype.element_ty, INTERPRET)
        wv = tl.load(w_ptr + n[:, None] * C + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        if INTERPRET:
            acc = tl.dot(gq.to(ACC), wv.to(ACC), acc, input_precision="ieee")
        else:
            acc = tl.dot(gq, wv, acc, input_precision=INPUT_PRECISION)
    acc = acc * (scale * tl.load(grad_ptr).to(ACC))
    dh_rows = b.to(tl.int64) * stride_b + p.to(tl.int64) * stride_p
    tl.store(
        dh_ptr + dh_rows[:, None] + offs_c[None, :] * stride_c,
        cast(acc, dh_ptr.dtype.element_ty, INTERPRET),
        mask=m_mask[:, None] & c_mask[None, :],
    )


@triton.jit
def head_grad_weight_kernel(
    h_ptr,
    a_ptr,
    d_ptr,
    grad_ptr,
    gw_part_ptr,
    gb_part_ptr,
    B,
    C,
    K,
    P,
    stride_hb,
    stride_hc,
    stride_hp,
    SPLITS,
    scale,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(dL/dW)^T for one (channels, classes) tile, s * sum over this split's row tiles of h^T (d (.) a), into
    (SPLITS, K, C); the channel-tile-0 programs also write dL/db's partial sums into (SPLITS, K).

    The dot's M side is the channels (64 and more), so sm_90 runs it as wgmma; the classes are its N side.
    Grid: (channel tiles * class tiles * SPLITS,); split ``s`` takes row tiles s, s + SPLITS, ..."""
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    tiles_n = tl.cdiv(K, BLOCK_N)
    pid_c = pid % tiles_c
    pid_n = (pid // tiles_c) % tiles_n
    split = pid // (tiles_c * tiles_n)
    tiles_p = tl.cdiv(P, BLOCK_P)
    tiles = tl.cdiv(B, BLOCK_S) * tiles_p
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < K
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=ACC)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC)
    for t in range(split, tiles, SPLITS):
        b, p, m_mask = _rows(t // tiles_p, t % tiles_p, B, P, BLOCK_S, BLOCK_P)
        h_rows = b.to(tl.int64) * stride_hb + p.to(tl.int64) * stride_hp
        hv = tl.load(
            h_ptr + h_rows[None, :] + (offs_c * stride_hc)[:, None], mask=c_mask[:, None] & m_mask[None, :], other=0.0
        )
        mask = m_mask[:, None] & n_mask[None, :]
        av = tl.load(a_ptr + (b.to(tl.int64) * K * P + p)[:, None] + (n * P)[None, :], mask=mask, other=0.0)
        dv = tl.load(d_ptr + (b.to(tl.int64) * K)[:, None] + n[None, :], mask=mask, other=0.0)
        gv = av.to(ACC) * dv
        gq = cast(gv, h_ptr.dtype.element_ty, INTERPRET)
        if INTERPRET:
            acc = tl.dot(hv.to(ACC), gq.to(ACC), acc, input_precision="ieee")
        else:
            acc = tl.dot(hv, gq, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc_b += tl.sum(gv, axis=0)
    factor = scale * tl.load(grad_ptr).to(ACC)
    out = gw_part_ptr + split.to(tl.int64) * K * C
    tl.store(out + n[None, :] * C + offs_c[:, None], acc * factor, mask=c_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:
        if pid_c == 0:
            tl.store(gb_part_ptr + split * K + n, acc_b * factor, mask=n_mask)


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------
def _row_tile(positions: int, rows: int = 64) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_P): ``rows`` rows per tile on a GPU (16 under the interpreter, which runs every program in
    turn), one sample's positions when a sample has that many, else several samples."""
    rows = 16 if INTERPRETED else rows
    block_p = min(rows, triton.next_power_of_2(positions))
    return rows // block_p, block_p


def _class_tile(classes: int) -> int:
    """Classes per tile: padded to 16 at least (``tl.dot``'s smallest K and N on the tensor cores), 64 at most."""
    return min(64, max(16, triton.next_power_of_2(classes)))


def _reduction_tile(dtype: torch.dtype) -> int:
    """Channels per forward K step: 64 two-byte or 32 four-byte elements (128-byte rows); 16 in the interpreter."""
    if INTERPRETED:
        return 16
    return 64 if dtype.itemsize <= 2 else 32


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float64 is always exact; fp32 follows PyTorch's TF32 switch."""
    return "ieee" if dtype == torch.float64 else input_precision(dtype)


def _common(h3: torch.Tensor, w: torch.Tensor) -> dict:
    acc = accumulate_dtype(h3.dtype)
    return {
        "ACC": _TL_ACC[acc],
        "INPUT_PRECISION": _precision(w.dtype),
        "INTERPRET": INTERPRETED,
        "num_warps": 4,
        "num_stages": 1 if INTERPRETED else 3,
    }


def launch_head_forward(
    h3: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, store_a: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The head GEMM on h viewed as (B, C, P): a (B, K, P) in h's dtype (or None) and the partial sums of a^2,
    (position tiles, B, K) in the accumulator dtype."""
    rows, channels, positions = h3.shape
    classes = w.shape[0]
    samples, block_p = _row_tile(positions)
    block_n = _class_tile(classes)
    tiles_p = triton.cdiv(positions, block_p)
    acc = accumulate_dtype(h3.dtype)
    a = torch.empty((rows, classes, positions), dtype=h3.dtype, device=h3.device) if store_a else None
    partials = torch.empty((tiles_p, rows, classes), dtype=acc, device=h3.device)
    grid = (triton.cdiv(rows, samples) * tiles_p * triton.cdiv(classes, block_n),)
    head_forward_kernel[grid](
        h3,
        w,
        bias,
        a,
        partials,
        rows,
        channels,
        classes,
        positions,
        *h3.stride(),
        STORE_A=store_a,
        HAS_BIAS=bias is not None,
        BLOCK_S=samples,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        BLOCK_K=_reduction_tile(h3.dtype),
        **_common(h3, w),
    )
    return a, partials


def launch_head_loss(
    partials: torch.Tensor, labels: torch.Tensor | None, positions: int, temperature: float
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(loss, g, d) from the partial sums; without labels (prediction) only g, and None for the others."""
    _, rows, classes = partials.shape
    block_n = triton.next_power_of_2(classes)
    block_b = max(1, min(64, 4096 // block_n))
    grid = (triton.cdiv(rows, block_b),)
    g = torch.empty((rows, classes), dtype=partials.dtype, device=partials.device)
    loss_parts = d = None
    if labels is not None:
        d = torch.empty_like(g)
        loss_parts = torch.empty(grid, dtype=partials.dtype, device=partials.device)
    head_loss_kernel[grid](
        partials,
        labels,
        g,
        d,
        loss_parts,
        rows,
        classes,
        partials.shape[0],
        1.0 / positions,
        1.0 / temperature,
        1.0 / rows,
        LOSS=labels is not None,
        ACC=_TL_ACC[partials.dtype],
        BLOCK_B=block_b,
        BLOCK_N=block_n,
    )
    return None if loss_parts is None else loss_parts.sum(), g, d


def launch_head_grad_h(
    a: torch.Tensor, d: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, dh3: torch.Tensor, scale: float
) -> None:
    """dL/dh into ``dh3`` (B, C, P), any strides."""
    rows, channels, positions = dh3.shape
    samples, block_p = _row_tile(positions)
    block_c = 16 if INTERPRETED else 64
    grid = (triton.cdiv(rows, samples) * triton.cdiv(positions, block_p) * triton.cdiv(channels, block_c),)
    head_grad_h_kernel[grid](
        a,
        d,
        w,
        grad,
        dh3,
        rows,
        channels,
        w.shape[0],
        positions,
        *dh3.stride(),
        scale,
        BLOCK_S=samples,
        BLOCK_P=block_p,
        BLOCK_N=_class_tile(w.shape[0]),
        BLOCK_C=block_c,
        **_common(dh3, w),
    )


def launch_head_grad_weight(
    h3: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    w: torch.Tensor,
    grad: torch.Tensor,
    scale: float,
    with_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dL/dW (K, C) and dL/db (K,) or None, in the accumulator dtype: row splits enough to fill about two waves
    of the device's SMs, reduced by one ``sum``."""
    rows, channels, positions = h3.shape
    classes = w.shape[0]
    # The rows are this GEMM's reduction: an exact-fp32 (FMA) dot holds its operand slices in registers, and
    # spills with 64 of them (ptxas, sm_80 and sm_90), so it reduces 16 rows per step.
    exact = _precision(w.dtype) == "ieee"
    samples, block_p = _row_tile(positions, 16 if exact else 64)
    block_c = 16 if INTERPRETED else 64
    block_n = _class_tile(classes)
    tiles = triton.cdiv(rows, samples) * triton.cdiv(positions, block_p)
    column_tiles = triton.cdiv(channels, block_c) * triton.cdiv(classes, block_n)
    # The interpreter runs programs in turn: three splits there, so each program also loops over several tiles.
    wanted = 3 if INTERPRETED else triton.cdiv(2 * sm_count(h3.device), column_tiles)
    splits = max(1, min(tiles, wanted))
    acc = accumulate_dtype(h3.dtype)
    gw_parts = torch.empty((splits, classes, channels), dtype=acc, device=h3.device)
    gb_parts = torch.empty((splits, classes), dtype=acc, device=h3.device) if with_bias else None
    head_grad_weight_kernel[(column_tiles * splits,)](
        h3,
        a,
        d,
        grad,
        gw_parts,
        gb_parts,
        rows,
        channels,
        classes,
        positions,
        *h3.stride(),
        splits,
        scale,
        HAS_BIAS=with_bias,
        BLOCK_S=samples,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        **_common(h3, w),
    )
    return gw_parts.sum(0), None if gb_parts is None else gb_parts.sum(0)


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------------
_SCHEMAS = {
    "class_goodness_loss": (
        "(Tensor h, Tensor weight, Tensor? bias, Tensor labels, float temperature) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "class_goodness_loss_backward": (
        "(Tensor grad_loss, Tensor h, Tensor weight, Tensor a, Tensor d, float temperature, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "class_goodness": "(Tensor h, Tensor weight, Tensor? bias) -> Tensor",
}


def _custom_op(name: str):
    return torch.library.custom_op(f"ff_kernels::triton_{name}", mutates_args=(), schema=_SCHEMAS[name])


def _positions_view(h: torch.Tensor) -> torch.Tensor:
    """h as (B, C, P): a view for (B, C) rows, NCHW and channels-last images (a copy only for other strides)."""
    return h.unsqueeze(2) if h.dim() == 2 else h.reshape(h.shape[0], h.shape[1], -1)


def _operands(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(h3, the weight in h's dtype, contiguous, the bias contiguous): the head runs in h's dtype (autocast)."""
    w = weight.to(h.dtype).contiguous()
    return _positions_view(h), w, None if bias is None else bias.contiguous()


def _loss_forward(h, weight, bias, labels, temperature):
    with torch.cuda.device_of(h):  # Triton launches on the current device, not the tensors'
        h3, w, b = _operands(h, weight, bias)
        a, partials = launch_head_forward(h3, w, b, store_a=True)
        loss, g, d = launch_head_loss(partials, labels, h3.shape[2], temperature)
    return loss, g, a, d


_loss_op = _custom_op("class_goodness_loss")(_loss_forward)


@_loss_op.register_fake
def _(h, weight, bias, labels, temperature):
    acc = accumulate_dtype(h.dtype)
    rows, classes = h.shape[0], weight.shape[0]
    positions = h[0, 0].numel()
    return (
        h.new_empty((), dtype=acc),
        h.new_empty((rows, classes), dtype=acc),
        h.new_empty((rows, classes, positions)),
        h.new_empty((rows, classes), dtype=acc),
    )


def _loss_backward(grad_loss, h, weight, a, d, temperature, output_mask):
    need_h, need_w, need_b = output_mask
    with torch.cuda.device_of(h):
        h3, w, _ = _operands(h, weight, None)
        rows, _, positions = h3.shape
        scale = 2.0 / (positions * rows * temperature)
        grad = grad_loss.to(accumulate_dtype(h.dtype)).contiguous()
        # one empty tensor per gradient not asked for: a custom op's outputs may not alias each other
        grad_h, grad_w, grad_b = (weight.new_empty((0,)) for _ in range(3))
        if need_h:
            grad_h = torch.empty_like(h)
            launch_head_grad_h(a, d, w, grad, _positions_view(grad_h), scale)
        if need_w or need_b:
            gw, gb = launch_head_grad_weight(h3, a, d, w, grad, scale, need_b)
            if need_w:
                grad_w = gw.to(weight.dtype)
            if need_b:
                grad_b = gb.to(weight.dtype)
    return grad_h, grad_w, grad_b


_backward_op = _custom_op("class_goodness_loss_backward")(_loss_backward)


@_backward_op.register_fake
def _(grad_loss, h, weight, a, d, temperature, output_mask):
    need_h, need_w, need_b = output_mask
    return (
        torch.empty_like(h) if need_h else weight.new_empty((0,)),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty((0,)),
        weight.new_empty((weight.shape[0] if need_b else 0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    h, weight, bias, _, temperature = inputs
    _, goodness, a, d = output
    ctx.mark_non_differentiable(goodness, a, d)
    ctx.save_for_backward(h, weight, a, d)
    ctx.temperature = temperature
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, _grad_goodness, _grad_a, _grad_d):
    h, weight, a, d = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if grad_loss is None or not any(mask):
        return None, None, None, None, None
    grad_h, grad_w, grad_b = _backward_op(grad_loss, h, weight, a, d, ctx.temperature, mask)
    return grad_h if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _goodness(h, weight, bias):
    with torch.cuda.device_of(h):
        h3, w, b = _operands(h, weight, bias)
        _, partials = launch_head_forward(h3, w, b, store_a=False)
        return launch_head_loss(partials, None, h3.shape[2], 1.0)[1]


_goodness_op = _custom_op("class_goodness")(_goodness)


@_goodness_op.register_fake
def _(h, weight, bias):
    return h.new_empty((h.shape[0], weight.shape[0]), dtype=accumulate_dtype(h.dtype))


# ---------------------------------------------------------------------------------------------------------------
# entry points (checked inputs, ``weight`` (K, C): ``ff_kernels.heads``)
# ---------------------------------------------------------------------------------------------------------------
def class_goodness_loss_triton(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The loss through the fused custom op, differentiable in h, weight and bias."""
    return _loss_op(h, weight, bias, labels, temperature)[0]


def class_goodness_triton(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Inference: the class goodness (B, K), GEMM and the per-sample reduction only (a is never stored)."""
    return _goodness_op(h, weight, bias)
