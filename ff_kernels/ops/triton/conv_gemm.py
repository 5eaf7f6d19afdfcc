"""The convolutional FF step (DESIGN 7) as implicit GEMMs: its kernels and their launchers.

Four kernels, the linear step's structure again (``forward_gemm``, ``row_loss``, ``grad_update_gemm``):

- ``ff_conv_scale_kernel``: r_b per sample over all of C_in H W (the patch a GEMM tile reads never covers a whole
  image, so the norm cannot ride in GEMM 1's K loop as it does for linear layers). Any strides: channels-last and
  sliced batches are read in place.
- ``ff_conv_forward_kernel``: GEMM 1 with rows = the output positions of one sample, reduction = C_in kh kw (the
  patches gathered on load, padding masked), columns = the C channels. Epilogue: r_b, bias, ReLU, h stored NCHW,
  and per-channel partial sums of h^2 over the tile's positions into an fp32 (T, C, B) buffer (T = position tiles).
  A row tile never straddles two samples, so no segmented reduction is needed; read as (T C, B) the buffer is what
  ``row_loss.ff_row_kernel`` sums into the per-sample goodness, and class groups are runs of its C axis.
- ``ff_conv_class_kernel``: the class-goodness loss (softmax cross-entropy with temperature) and c per (sample,
  group); the positive/negative loss reuses ``row_loss``.
- ``ff_conv_grad_update_kernel``: GEMM 2, grad_weight = 2^s ((c / 2^s) h)^T (r x patches) reducing over samples and
  positions (the operand rule of ``ff_kernels.ops.scaling``), grad_bias from the same h tiles, and the optimizer in
  the epilogue (``grad_update_gemm``'s update functions, row splits and split sum).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from ff_kernels._options import ConvGeometry
from ff_kernels.ops.triton.common import (
    INTERPRETED,
    NORMALIZE_CODE,
    OPT_NONE,
    PRECISIONS,
    TUNING_KEY,
    _configs,
    by_precision,
    cast,
    precision_name,
    sm_count,
    tuning_args,
)
from ff_kernels.ops.triton.grad_update_gemm import (
    MIN_SPLIT_ROWS,
    RestoreInPlace,
    Update,
    _finish_tile,
    weight_tiles,
)

# GEMM 1: BLOCK_M output positions x BLOCK_N channels, BLOCK_K of the C_in kh kw reduction per step (32: a 3-channel
# 3x3 layer has 27). GEMM 2: BLOCK_N x BLOCK_K is the weight tile (the dot's M x N, M >= 64 for wgmma), BLOCK_M the
# positions reduced per step. The gathered operands cost registers for their 64-bit addresses, so the tiles are
# smaller than the linear kernels' (GEMM 2 at 64 x 64 x 64 or 64 x 64 x 32 with Adam spilled 0.5-1 KB on sm_80 and
# sm_90; 32-position steps in 2 stages do not). TF32 tiles hold twice the bytes: 128-position GEMM 1 tiles spilled.
# Where ptxas's own register target (128 or 168 for 3-4 blocks per SM) spilled a few bytes, maxnreg=255 lifts it;
# the fp32 GEMM 2 tiles that still spilled at 255 (TF32 32 x 64 x 32, exact 16 x 64 x 32) are left out, one config
# remaining. At most two configs per precision keep the compile report short.
_FORWARD_16 = _configs([(128, 64, 32, 4, 3), (64, 64, 32, 4, 3)])
_FORWARD_TF32 = _configs([(64, 64, 32, 4, 3, 255), (64, 64, 16, 4, 3, 255)])
_FORWARD_IEEE = _configs([(64, 64, 16, 4, 2), (32, 64, 16, 4, 2)])
_GRAD_16 = _configs([(32, 64, 32, 4, 2, 255), (32, 128, 32, 4, 2, 255)])
_GRAD_TF32 = _configs([(16, 64, 32, 4, 2, 255)])
_GRAD_IEEE = _configs([(16, 32, 32, 4, 2, 255)])
GPU_CONV_FORWARD_CONFIGS = {"bf16": _FORWARD_16, "fp16": _FORWARD_16, "tf32": _FORWARD_TF32, "ieee": _FORWARD_IEEE}
GPU_CONV_GRAD_CONFIGS = {"bf16": _GRAD_16, "fp16": _GRAD_16, "tf32": _GRAD_TF32, "ieee": _GRAD_IEEE}
if INTERPRETED:  # one config (the interpreter cannot benchmark); BLOCK_K >= 16 as tl.dot needs on a GPU
    _ONE = _configs([(32, 32, 32, 4, 1)])
    CONV_FORWARD_BY_PRECISION = dict.fromkeys(PRECISIONS, _ONE)
    CONV_GRAD_BY_PRECISION = dict.fromkeys(PRECISIONS, _ONE)
else:
    CONV_FORWARD_BY_PRECISION = GPU_CONV_FORWARD_CONFIGS
    CONV_GRAD_BY_PRECISION = GPU_CONV_GRAD_CONFIGS
CONV_FORWARD_CONFIGS = list({id(c): c for v in CONV_FORWARD_BY_PRECISION.values() for c in v}.values())
CONV_GRAD_CONFIGS = list({id(c): c for v in CONV_GRAD_BY_PRECISION.values() for c in v}.values())
MIN_CONV_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONV_FORWARD_CONFIGS)
# The output positions per sample join the key: they set how full the row tiles are.
CONV_TUNING_KEY = [*TUNING_KEY, "HW"]
SCALE_BLOCK = 1024
# GEMM 2 reduces over every output position of the batch (131072 for 128 CIFAR images) into a weight of few tiles
# (one for a 3 -> 64 3x3 layer), so it splits further than the linear GEMM 2 (at most 4): a conv weight is small,
# and so are up to 32 fp32 copies of it as workspace and the last program's sum over them.
MAX_CONV_SPLITS = 32
# The epilogue's column blocks: half the linear kernel's, as the gathers' addresses already hold many registers
# (the Adam update keeps a parameter, two moments, the gradient and their addresses live per element).
EPILOGUE_ELEMENTS = tl.constexpr(1024)
CONV_GRAD_RESTORE = RestoreInPlace(("w_ptr", "b_ptr", "s1w_ptr", "s2w_ptr", "s1b_ptr", "s2b_ptr"))


# ---------------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sample_sumsq(x_ptr, sample, sxb, sxc, sxh, sxw, numel, HW_in, W, BLOCK: tl.constexpr):
    """sum of x^2 over one sample's C_in H W elements, in fp32, in any memory layout."""
    base = x_ptr + sample.to(tl.int64) * sxb
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, numel, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ch = idx // HW_in
        rem = idx - ch * HW_in
        row = rem // W
        col = rem - row * W
        v = tl.load(base + ch * sxc + row * sxh + col * sxw, mask=idx < numel, other=0.0).to(tl.float32)
        acc += v * v
    return tl.sum(acc, axis=0)


@triton.jit
def ff_conv_scale_kernel(
    xp_ptr,
    xn_ptr,
    r_ptr,
    P,
    spb,
    spc,
    sph,
    spw,
    snb,
    snc,
    snh,
    snw,
    numel,
    HW_in,
    W,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """r_b = 1 / (||x_b|| + eps) ("l2") or 1 / (sqrt(mean x_b^2) + eps) ("rms"); one program per sample, the
    positive samples first (stacked index b, x_neg's samples at P + j)."""
    b = tl.program_id(0)
    if b < P:
        s = _sample_sumsq(xp_ptr, b, spb, spc, sph, spw, numel, HW_in, W, BLOCK)
    else:
        s = _sample_sumsq(xn_ptr, b - P, snb, snc, snh, snw, numel, HW_in, W, BLOCK)
    if NORMALIZE == 1:
        norm = tl.sqrt_rn(s)
    else:
        norm = tl.sqrt_rn(s / numel)
    tl.store(r_ptr + b, tl.div_rn(1.0, norm + eps))


@triton.jit
def _patches(
    x_base,
    sxc,
    sxh,
    sxw,
    ih0,
    iw0,
    m_mask,
    kk,
    K,
    H,
    W,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
):
    """The implicit-GEMM operand: x at (channel, ih0 + ki dil_h, iw0 + kj dil_w) for reduction index kk = (channel,
    ki, kj) in weight order, (BLOCK_M, BLOCK_K); padding and the tails read as 0."""
    ch = kk // (KH * KW)
    rem = kk - ch * (KH * KW)
    ki = rem // KW
    kj = rem - ki * KW
    ih = ih0[:, None] + (ki * dil_h)[None, :]
    iw = iw0[:, None] + (kj * dil_w)[None, :]
    inside = m_mask[:, None] & (kk < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_base + ch[None, :] * sxc + ih * sxh + iw * sxw, mask=inside, other=0.0)


@triton.jit
def _conv_forward_tile(
    x_ptr,
    sxb,
    sxc,
    sxh,
    sxw,
    x_sample,
    sample,
    pos_tile,
    pid_n,
    w_ptr,
    b_ptr,
    h_ptr,
    r_ptr,
    part_ptr,
    M,
    N,
    K,
    K_ROW,
    HW,
    OW,
    H,
    W,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M positions, BLOCK_N channels) tile of h for stacked sample ``sample`` (``x_sample`` of x). The
    weight rows are K_ROW >= K long, zero past K (``weight_rows``); the weight loads are masked at K_ROW, not K, so
    that the mask is uniform over 16-element runs and the loads can be vectorised into async copies."""
    offs_m = pos_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < HW
    n_mask = offs_n < N
    oh = offs_m // OW
    ih0 = oh * stride_h - pad_h
    iw0 = (offs_m - oh * OW) * stride_w - pad_w
    x_base = x_ptr + x_sample.to(tl.int64) * sxb
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K_ROW + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _patches(x_base, sxc, sxh, sxw, ih0, iw0, m_mask, k0 + offs_k, K, H, W, dil_h, dil_w, KH, KW)
        bt = tl.load(w_ptrs + k0, mask=((k0 + offs_k) < K_ROW)[:, None] & n_mask[None, :], other=0.0)
        if INTERPRET:
            acc = tl.dot(a.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)
    z = acc
    if NORMALIZE != 0:
        z = z * tl.load(r_ptr + sample)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu keeps NaN, as torch.relu does
    h_rows = (sample.to(tl.int64) * N + offs_n)[None, :] * HW + offs_m[:, None]
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(h_ptr + h_rows, cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
    squares = tl.sum(tl.where(mask, h * h, 0.0), axis=0)
    tl.store(part_ptr + (pos_tile.to(tl.int64) * N + offs_n) * M + sample, squares, mask=n_mask)


@triton.autotune(
    configs=CONV_FORWARD_CONFIGS,
    key=CONV_TUNING_KEY,
    prune_configs_by={"early_config_prune": by_precision(CONV_FORWARD_BY_PRECISION)},
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def ff_conv_forward_kernel(
    xp_ptr,
    xn_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    r_ptr,
    part_ptr,
    spb,
    spc,
    sph,
    spw,
    snb,
    snc,
    snh,
    snw,
    P,
    M,
    N,
    K,
    K_ROW,
    HW,
    M_BUCKET,
    OW,
    H,
    W,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMM 1 of the conv step; grid (M samples * position tiles * channel tiles,), channel tiles fastest (the
    programs of one patch tile run together and share it in L2), then the position tiles of one sample."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_pos = tl.cdiv(HW, BLOCK_M)
    pid_n = pid % tiles_n
    pid_m = pid // tiles_n
    sample = pid_m // tiles_pos
    pos_tile = pid_m - sample * tiles_pos
    if sample < P:
        _conv_forward_tile(
            xp_ptr, spb, spc, sph, spw, sample, sample, pos_tile, pid_n, w_ptr, b_ptr, h_ptr, r_ptr, part_ptr,
            M, N, K, K_ROW, HW, OW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            NORMALIZE, HAS_BIAS, KH, KW, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    else:
        _conv_forward_tile(
            xn_ptr, snb, snc, snh, snw, sample - P, sample, pos_tile, pid_n, w_ptr, b_ptr, h_ptr, r_ptr, part_ptr,
            M, N, K, K_ROW, HW, OW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            NORMALIZE, HAS_BIAS, KH, KW, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
        )


@triton.jit
def ff_conv_class_kernel(
    part_ptr,
    labels_ptr,
    g_ptr,
    c_ptr,
    loss_part_ptr,
    M,
    N,
    T,
    G,
    GROUPS,
    kappa,
    inv_tau,
    coef,
    inv_rows,
    STEP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """g_bk = kappa * sum over the T position tiles and group k's G channels of the partial sums; with ``STEP``, the
    loss terms logsumexp_k(g_b / tau) - g_{b,y_b} / tau and c_bk = coef (softmax_k(g_b / tau) - [k = y_b]),
    coef = 2 kappa / (B tau). Each program writes its share of the loss; the 0-dim loss is their sum."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_G)
    b_mask = offs_b < M
    k_mask = offs_k < GROUPS
    mask = b_mask[:, None] & k_mask[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_G), dtype=tl.float32)
    for t in range(0, T):
        for j in range(0, G):
            channel = t * N + offs_k * G + j
            acc += tl.load(part_ptr + channel.to(tl.int64)[None, :] * M + offs_b[:, None], mask=mask, other=0.0)
    g = kappa * acc
    out = offs_b.to(tl.int64)[:, None] * GROUPS + offs_k[None, :]
    tl.store(g_ptr + out, g, mask=mask)
    if STEP:
        logits = tl.where(k_mask[None, :], g * inv_tau, -float("inf"))
        top = tl.max(logits, axis=1)
        e = tl.exp(logits - top[:, None])
        total = tl.sum(e, axis=1)
        labels = tl.load(labels_ptr + offs_b, mask=b_mask, other=0)
        target = offs_k[None, :] == labels[:, None]
        picked = tl.sum(tl.where(target, logits, 0.0), axis=1)
        terms = tl.where(b_mask, top + tl.log(total) - picked, 0.0)
        tl.store(loss_part_ptr + pid, tl.sum(terms, axis=0) * inv_rows)
        c = coef * (e / total[:, None] - tl.where(target, 1.0, 0.0))
        tl.store(c_ptr + out, c, mask=mask)


@triton.jit
def _conv_grad_samples(
    acc,
    gb,
    x_ptr,
    sxb,
    sxc,
    sxh,
    sxw,
    lo,
    hi,
    h_sample0,
    h_ptr,
    c_ptr,
    r_ptr,
    offs_n,
    offs_k,
    n_mask,
    N,
    K,
    HW,
    OW,
    H,
    W,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    G,
    GROUPS,
    coef_inv_scale,
    bias_tile,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """acc += ((c / 2^s) h)^T (r x patches) over samples [lo, hi) of one batch, whose h, c and r rows start at
    stacked sample ``h_sample0``; gb += sum c h (for the bias) in the programs of the first reduction tile."""
    offs_p = tl.arange(0, BLOCK_M)
    group = offs_n // G
    for s in range(lo, hi):
        stacked = tl.cast(h_sample0 + s, tl.int64)  # the loop index is a plain int under the interpreter
        c = tl.load(c_ptr + stacked * GROUPS + group, mask=n_mask, other=0.0)
        x_base = x_ptr + tl.cast(s, tl.int64) * sxb
        h_base = h_ptr + (stacked * N + offs_n)[:, None] * HW
        if NORMALIZE != 0:
            r = tl.load(r_ptr + stacked)
        for p0 in range(0, HW, BLOCK_M):
            offs_m = p0 + offs_p
            m_mask = offs_m < HW
            oh = offs_m // OW
            ih0 = oh * stride_h - pad_h
            iw0 = (offs_m - oh * OW) * stride_w - pad_w
            x = _patches(x_base, sxc, sxh, sxw, ih0, iw0, m_mask, offs_k, K, H, W, dil_h, dil_w, KH, KW)
            if NORMALIZE != 0:
                x = cast(x.to(tl.float32) * r, x.dtype, INTERPRET)
            ht = tl.load(h_base + offs_m[None, :], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
            hf = ht.to(tl.float32)
            hs = cast(hf * (c * coef_inv_scale)[:, None], x.dtype, INTERPRET)
            if INTERPRET:
                acc = tl.dot(hs.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(hs, x, acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                if bias_tile:
                    gb += tl.sum(hf * c[:, None], axis=1)
    return acc, gb


def conv_split_count(tiles: int, rows: int, sms: int) -> int:
    """Sample splits of GEMM 2: none once the weight tiles fill a wave of ``sms`` SMs, otherwise the fewest that do,
    at most ``MAX_CONV_SPLITS`` and about ``MIN_SPLIT_ROWS`` output positions (``rows`` in all) each."""
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), MAX_CONV_SPLITS, rows // MIN_SPLIT_ROWS))


def conv_grad_candidates(precision: str, n: int, k: int, rows: int, sms: int) -> list[triton.Config]:
    """The precision's configs that fill a wave with their splits, or, where none can, those with the most tiles."""
    configs = CONV_GRAD_BY_PRECISION[precision]
    tiles = {id(c): weight_tiles(n, k, c.kwargs) for c in configs}
    full = [c for c in configs if tiles[id(c)] * conv_split_count(tiles[id(c)], rows, sms) >= sms]
    if full:
        return full
    most = max(tiles.values())
    return [c for c in configs if tiles[id(c)] == most]


def _prune_conv_grad(configs: list[triton.Config], named_args: Mapping[str, Any], **kwargs: Any) -> list[triton.Config]:
    """The autotuner's early prune: ``conv_grad_candidates`` for the launch, the rows reduced being every output
    position of every sample."""
    args = {**named_args, **kwargs}
    h = args["h_ptr"]
    precision = precision_name(h.dtype, args["INPUT_PRECISION"])
    return conv_grad_candidates(precision, args["N"], args["K"], args["M"] * args["HW"], sm_count(h.device))


@triton.autotune(
    configs=CONV_GRAD_CONFIGS,
    key=CONV_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_conv_grad},
    pre_hook=CONV_GRAD_RESTORE.save,
    post_hook=CONV_GRAD_RESTORE.restore,
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def ff_conv_grad_update_kernel(
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
    ws_ptr,
    wsb_ptr,
    count_ptr,
    spb,
    spc,
    sph,
    spw,
    snb,
    snc,
    snh,
    snw,
    P,
    M,
    N,
    K,
    HW,
    M_BUCKET,
    OW,
    H,
    W,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    G,
    GROUPS,
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
    KH: tl.constexpr,
    KW: tl.constexpr,
    OPT: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    DECOUPLED: tl.constexpr,
    SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMM 2 of the conv step for one (BLOCK_N channels, BLOCK_K of C_in kh kw) weight tile over one range of
    samples, then the gradient store or the fused update, as ``grad_update_gemm.ff_grad_update_kernel`` (grid,
    splits, workspace and state arguments alike; the splits divide the samples). c is (M, GROUPS): channel n
    takes its group's coefficient, group n // G."""
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(N, BLOCK_N) * tiles_k
    split = pid // tiles
    tile_id = pid - split * tiles
    pid_k = tile_id % tiles_k
    pid_n = tile_id // tiles_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    bias_tile = pid_k == 0

    splits = tl.num_programs(0) // tiles
    span = tl.cdiv(M, splits)
    lo = tl.minimum(split * span, M)
    hi = tl.minimum(lo + span, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    gb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc, gb = _conv_grad_samples(
        acc, gb, xp_ptr, spb, spc, sph, spw, lo, tl.minimum(hi, P), 0, h_ptr, c_ptr, r_ptr, offs_n, offs_k, n_mask,
        N, K, HW, OW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, G, GROUPS, coef_inv_scale, bias_tile,
        NORMALIZE, HAS_BIAS, KH, KW, INPUT_PRECISION, INTERPRET, BLOCK_M,
    )
    acc, gb = _conv_grad_samples(
        acc, gb, xn_ptr, snb, snc, snh, snw, tl.maximum(lo, P) - P, hi - P, P, h_ptr, c_ptr, r_ptr, offs_n, offs_k,
        n_mask, N, K, HW, OW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, G, GROUPS, coef_inv_scale,
        bias_tile, NORMALIZE, HAS_BIAS, KH, KW, INPUT_PRECISION, INTERPRET, BLOCK_M,
    )

    # N as a tensor: a one-channel layer's N arrives as the constant 1, which _sum_splits cannot widen
    _finish_tile(
        acc, gb, ws_ptr, wsb_ptr, count_ptr, split, splits, tile_id, offs_n, offs_k, n_mask, k_mask,
        tl.cast(N, tl.int32), K, pid_k, bias_tile, w_ptr, b_ptr, gw_ptr, gb_ptr, s1w_ptr, s2w_ptr, s1b_ptr, s2b_ptr,
        coef_scale, lr, weight_decay, momentum, dampening, first_w, first_b, beta1, beta2, adam_eps, step_size_w,
        bc2_sqrt_w, step_size_b, bc2_sqrt_b, HAS_BIAS, OPT, MOMENTUM, NESTEROV, DECOUPLED, SPLIT, INTERPRET, BLOCK_N,
        BLOCK_K, EPILOGUE_ELEMENTS,
    )


CONV_GRAD_RESTORE.arg_names = tuple(ff_conv_grad_update_kernel.arg_names)


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------
CONV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_conv_operands(x_pos: torch.Tensor, x_neg: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """What the kernels index: images of the weight's dtype and device with its C_in channels and one size, a
    contiguous (C, C_in, kh, kw) weight, a contiguous (C,) bias."""
    if w.dim() != 4 or not w.is_contiguous():
        raise ValueError(f"weight must be a contiguous (C, C_in, kh, kw) tensor, got shape {tuple(w.shape)}")
    if w.dtype not in CONV_DTYPES:
        raise TypeError(f"weight is {w.dtype}; the Triton conv kernels take float32, bfloat16 or float16")
    if b is not None and (b.shape != (w.shape[0],) or not b.is_contiguous() or b.device != w.device):
        raise ValueError(f"bias must be a contiguous ({w.shape[0]},) vector on {w.device}, got {tuple(b.shape)}")
    for name, x in (("x_pos", x_pos), ("x_neg", x_neg)):
        if x.dim() != 4 or x.shape[1] != w.shape[1] or x.shape[2:] != x_pos.shape[2:]:
            raise ValueError(f"{name} must be (B, {w.shape[1]}, H, W) images of one size, got {tuple(x.shape)}")
        if x.dtype != w.dtype:
            raise TypeError(f"{name} is {x.dtype} but weight is {w.dtype}; the kernels take one dtype")
        if x.device != w.device:
            raise ValueError(f"{name} is on {x.device} but weight is on {w.device}")


def _geometry_args(x: torch.Tensor, w: torch.Tensor, geometry: ConvGeometry) -> tuple[int, int, tuple[int, ...]]:
    """(H' W', W', the scalar geometry arguments both GEMMs take after M_BUCKET)."""
    out_h, out_w = geometry.output_size(x.shape[2:], w.shape[2:])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"x images of {tuple(x.shape[2:])} leave no output positions for this kernel and geometry")
    return out_h * out_w, out_w, (
        out_w, x.shape[2], x.shape[3], *geometry.stride, *geometry.padding, *geometry.dilation,
    )


def launch_conv_scale(
    x_pos: torch.Tensor, x_neg: torch.Tensor, normalize: str, eps: float
) -> torch.Tensor | None:
    """r (P+Q,) fp32 for the stacked samples, or None for ``normalize="none"``."""
    code = NORMALIZE_CODE[normalize]
    rows_pos, rows = x_pos.shape[0], x_pos.shape[0] + x_neg.shape[0]
    if code == 0:
        return None
    r = torch.empty((rows,), dtype=torch.float32, device=x_pos.device)
    if rows == 0:
        return r
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if x_neg.shape[0] else x_pos
    _, channels, height, width = x_pos.shape
    ff_conv_scale_kernel[(rows,)](
        xp, xn, r, rows_pos, *xp.stride(), *xn.stride(), channels * height * width, height * width, width, eps,
        NORMALIZE=code, BLOCK=SCALE_BLOCK,
    )
    return r


# GEMM 1 reads the weight as (C, K_ROW) rows, K_ROW = C_in kh kw rounded up to this many elements (16 bytes or more
# in every dtype, and Triton's divisibility-by-16 hint on the stride): unaligned rows (27 elements of a 3-channel 3x3
# layer, 54 bytes in bf16) would make the weight tile loads plain loads instead of cp.async / TMA copies.
WEIGHT_ROW_ALIGN = 16


def weight_rows(w: torch.Tensor) -> torch.Tensor:
    """The (C, K) weight as GEMM 1 reads it: a view where K is a multiple of ``WEIGHT_ROW_ALIGN``, otherwise a
    zero-padded (C, K_ROW) copy (a few KB for the layers that need it: those have few input channels)."""
    rows = w.view(w.shape[0], -1)
    tail = -rows.shape[1] % WEIGHT_ROW_ALIGN
    return rows if tail == 0 else torch.nn.functional.pad(rows, (0, tail))


def launch_conv_forward(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    geometry: ConvGeometry,
    r: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """GEMM 1: h (P+Q, C, H', W') in x's dtype, the partial sums of squares (T_alloc, C, P+Q) fp32 and T used."""
    check_conv_operands(x_pos, x_neg, w, b)
    rows_pos, rows = x_pos.shape[0], x_pos.shape[0] + x_neg.shape[0]
    n = w.shape[0]
    k = w[0].numel()
    hw, _, geo = _geometry_args(x_pos, w, geometry)
    out_h, out_w = geometry.output_size(x_pos.shape[2:], w.shape[2:])
    h = torch.empty((rows, n, out_h, out_w), dtype=x_pos.dtype, device=w.device)
    partials = torch.empty((triton.cdiv(hw, MIN_CONV_BLOCK_M), n, rows), dtype=torch.float32, device=w.device)
    if rows == 0:
        return h, partials, 0
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if x_neg.shape[0] else x_pos
    bucket, precision = tuning_args(rows * hw, x_pos.dtype)
    w_rows = weight_rows(w)

    def grid(meta: dict) -> tuple[int]:
        return (rows * triton.cdiv(hw, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    ff_conv_forward_kernel[grid](
        xp, xn, w_rows, b, h, r, partials, *xp.stride(), *xn.stride(), rows_pos, rows, n, k, w_rows.shape[1], hw,
        bucket, *geo,
        NORMALIZE=0 if r is None else 1, HAS_BIAS=b is not None, KH=w.shape[2], KW=w.shape[3],
        INPUT_PRECISION=precision, INTERPRET=INTERPRETED,
    )
    return h, partials, triton.cdiv(hw, ff_conv_forward_kernel.best_config.kwargs["BLOCK_M"])


def class_launch(rows: int, groups: int) -> tuple[int, int, tuple[int]]:
    """The class kernel's (BLOCK_B, BLOCK_G, grid): about 2048 (sample, group) cells per program."""
    block_g = max(2, triton.next_power_of_2(groups))
    block_b = max(16, min(triton.next_power_of_2(max(rows, 1)), 2048 // block_g))
    return block_b, block_g, (triton.cdiv(rows, block_b),)


def launch_conv_class(
    partials: torch.Tensor,
    tiles: int,
    labels: torch.Tensor | None,
    groups: int,
    kappa: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """g (B, groups) fp32; with ``labels`` also c (B, groups) and the 0-dim fp32 loss (without: inference)."""
    _, channels, rows = partials.shape
    device = partials.device
    g = torch.empty((rows, groups), dtype=torch.float32, device=device)
    step = labels is not None
    c = torch.empty((rows, groups), dtype=torch.float32, device=device) if step else None
    block_b, block_g, grid = class_launch(rows, groups)
    loss_parts = torch.empty(grid, dtype=torch.float32, device=device) if step else None
    if rows == 0:
        return g, c, None if loss_parts is None else loss_parts.sum()
    ff_conv_class_kernel[grid](
        partials, labels, g, c, loss_parts, rows, channels, tiles, channels // groups, groups, kappa,
        1.0 / temperature, 2.0 * kappa / (rows * temperature), 1.0 / rows,
        STEP=step, BLOCK_B=block_b, BLOCK_G=block_g,
    )
    return g, c, None if loss_parts is None else loss_parts.sum()


@functools.lru_cache(maxsize=256)
def conv_split_workspace(precision: str, n: int, k: int, rows: int, sms: int, splits: int | None) -> tuple[int, int]:
    """What a launch's workspace must hold for every candidate config: (most splits, most weight tiles)."""
    candidates = conv_grad_candidates(precision, n, k, rows, sms)
    most = max(splits or conv_split_count(weight_tiles(n, k, c.kwargs), rows, sms) for c in candidates)
    return most, max(weight_tiles(n, k, c.kwargs) for c in candidates)


def launch_conv_grad_update(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor | None,
    w: torch.Tensor,
    b: torch.Tensor | None,
    geometry: ConvGeometry,
    coef_scale: float,
    update: Update,
    splits: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GEMM 2: (grad_weight, grad_bias) without an update; with one, w, b and the state are updated in place. c is
    (P+Q, groups) fp32. ``splits`` forces the sample split of every config (tests)."""
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    rows_pos, rows = x_pos.shape[0], x_pos.shape[0] + x_neg.shape[0]
    n = w.shape[0]
    k = w[0].numel()
    groups = c.shape[1]
    hw, _, geo = _geometry_args(x_pos, w, geometry)
    grad_w = grad_b = None
    if update.kind == OPT_NONE:
        grad_w = torch.empty_like(w)
        grad_b = None if b is None else torch.empty_like(b)
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if x_neg.shape[0] else x_pos
    bucket, precision = tuning_args(rows * hw, x_pos.dtype)
    sms = sm_count(w.device)
    most_splits, most_tiles = conv_split_workspace(precision_name(x_pos.dtype, precision), n, k, rows * hw, sms,
                                                   splits)
    ws = wsb = counts = None
    if most_splits > 1:
        ws = torch.empty((most_splits, n, k), dtype=torch.float32, device=w.device)
        wsb = None if b is None else torch.empty((most_splits, n), dtype=torch.float32, device=w.device)
        counts = torch.zeros(most_tiles, dtype=torch.int32, device=w.device)

    def grid(meta: dict) -> tuple[int]:
        tiles = weight_tiles(n, k, meta)
        return (tiles * (splits or conv_split_count(tiles, rows * hw, sms)),)

    fused = update.kind != OPT_NONE
    ff_conv_grad_update_kernel[grid](
        xp, xn, h, c, r, w if fused else None, b if fused else None, grad_w, grad_b,
        update.s1w, update.s2w, update.s1b, update.s2b, ws, wsb, counts,
        *xp.stride(), *xn.stride(), rows_pos, rows, n, k, hw, bucket, *geo, n // groups, groups,
        coef_scale, 1.0 / coef_scale, update.lr, update.weight_decay, update.momentum, update.dampening,
        int(update.first_w), int(update.first_b), update.beta1, update.beta2, update.eps,
        update.step_size_w, update.bc2_sqrt_w, update.step_size_b, update.bc2_sqrt_b,
        NORMALIZE=0 if r is None else 1, HAS_BIAS=b is not None, KH=w.shape[2], KW=w.shape[3], OPT=update.kind,
        MOMENTUM=update.momentum != 0.0, NESTEROV=update.nesterov, DECOUPLED=update.decoupled,
        SPLIT=ws is not None, INPUT_PRECISION=precision, INTERPRET=INTERPRETED,
    )
    return grad_w, grad_b
