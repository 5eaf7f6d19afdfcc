"""GEMM 2 of the FF step, with the optimizer update in its epilogue, and its launcher.

grad_weight = 2^s ((c / 2^s) h)^T (r x): the operands of ``ff_kernels.ops.scaling`` are formed as the tiles are
loaded (neither scaled h nor normalised x exists in memory) and 2^s is undone on the fp32 accumulator. Programs
with ``pid_k == 0`` also reduce grad_bias = sum_i c_i h_i for their N range. The epilogue either stores the
gradients or applies the optimizer update (SGD with momentum/dampening/nesterov/weight decay, Adam, AdamW) in
place to the weight tile, the bias slice and their fp32 state, in fp32, rounding the parameter once when stored.
It walks the tile in column blocks of at most 2048 elements, so that Adam's parameter, two moments and gradient
stay in registers next to the accumulator.

Row split. A layer of 784 x 500 has 28 weight tiles of 128 x 128: a fraction of an H100's 132 SMs, each looping
over every row. A wave is the programs the GPU holds at once: the SM count times the config's resident blocks per
SM (``resident_blocks``, the sm_90 occupancy that ``ff-kernels inspect`` measures, which its wave gate uses too).
When the tiles fill less than a wave, the rows are split into S contiguous ranges (the fewest that fill one, at
most ``MAX_SPLITS``) and program (split, tile) reduces one range into an fp32 workspace slab. The program that
arrives last at a tile (an atomic counter per tile, which it resets) sums the S slabs in split order and applies
the epilogue once: the result does not depend on which program came last, so two runs agree bit for bit, and the
optimizer sees each element exactly once. The workspace (S fp32 copies of the weight, whatever the batch) and the
zeroed counters are allocated per launch; only the configs that fill a wave with the fewest splits, hence the
smallest workspace, are tuned for the shape (``grad_candidates``), and batches under 2 ``MIN_SPLIT_ROWS`` rows,
launch-bound, do not split. The autotuner's hooks undo each benchmarked config's in-place update. N and K carry
alignment hints as in GEMM 1 (``forward_gemm``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ff_kernels.ops.triton.common import (
    GPU_GRAD_CONFIGS,
    GRAD_CONFIGS,
    GRAD_CONFIGS_BY_PRECISION,
    GRAD_RESIDENT_BLOCKS,
    INTERPRETED,
    NORMALIZE_CODE,
    OPT_NONE,
    TUNING_KEY,
    aligned,
    alignment,
    cast,
    precision_name,
    sm_count,
    tuning_args,
)

# A split reduces at least this many rows: writing and reading back its fp32 partial tile then costs at most a
# quarter of the h and x traffic of its rows (128 x 128 tiles in bf16). Smaller batches are launch-bound and do not
# split (no workspace, no counter memset).
MIN_SPLIT_ROWS = 1024
# At most this many fp32 copies of the weight as workspace, and as many partial tiles summed by the last program:
# enough for a wave of DESIGN 4's 500 x 500 layer (64 tiles of 64 x 64 at 3 blocks per SM: 7 splits, 16-bit, TF32).
MAX_SPLITS = 8
# The epilogue's column blocks hold at most this many elements (16 per thread at 4 warps).
EPILOGUE_ELEMENTS = tl.constexpr(2048)


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


# ---------------------------------------------------------------------------------------------------------------
# split policy
# ---------------------------------------------------------------------------------------------------------------


def weight_tiles(n: int, k: int, meta: Mapping[str, Any]) -> int:
    """GEMM 2's (BLOCK_N, BLOCK_K) tiles of an (n, k) weight: its programs per split."""
    return triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"])


BlocksTable = Mapping[str, Mapping[tuple[int, int, int], int]]


def resident_blocks(precision: str, meta: Mapping[str, Any], blocks: BlocksTable = GRAD_RESIDENT_BLOCKS) -> int:
    """Resident blocks per SM of a config (``common.GRAD_RESIDENT_BLOCKS``, by precision and block shape); one for
    a config outside the table (the interpreter's, another kernel's)."""
    return blocks.get(precision, {}).get((meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]), 1)


def split_count(tiles: int, rows: int, sms: int, blocks: int = 1) -> int:
    """Row splits of GEMM 2: none once the weight tiles fill a wave (``sms`` x ``blocks`` resident per SM);
    otherwise the fewest that do (more only lengthen the last program's sum and grow the workspace), at most
    ``MAX_SPLITS`` and ``MIN_SPLIT_ROWS`` rows each."""
    wave = sms * blocks
    if tiles >= wave:
        return 1
    return max(1, min(triton.cdiv(wave, tiles), MAX_SPLITS, rows // MIN_SPLIT_ROWS))


def grad_candidates(
    precision: str,
    n: int,
    k: int,
    rows: int,
    sms: int,
    table: Mapping[str, list[triton.Config]] = GRAD_CONFIGS_BY_PRECISION,
    blocks: BlocksTable | None = None,
) -> list[triton.Config]:
    """The precision's configs that fill a wave with the fewest splits (the smallest workspace), or, where none can
    (a small layer at a small batch: launch-bound), those with the most weight tiles. ``blocks`` (resident blocks
    per SM) defaults to ``GRAD_RESIDENT_BLOCKS`` for GEMM 2's own tables and to one block for another's."""
    if blocks is None:
        blocks = GRAD_RESIDENT_BLOCKS if any(table is t for t in (GRAD_CONFIGS_BY_PRECISION, GPU_GRAD_CONFIGS)) else {}
    configs = table[precision]
    tiles = {id(c): weight_tiles(n, k, c.kwargs) for c in configs}
    per_sm = {id(c): resident_blocks(precision, c.kwargs, blocks) for c in configs}
    splits = {id(c): split_count(tiles[id(c)], rows, sms, per_sm[id(c)]) for c in configs}
    full = [c for c in configs if tiles[id(c)] * splits[id(c)] >= sms * per_sm[id(c)]]
    if full:
        fewest = min(splits[id(c)] for c in full)
        return [c for c in full if splits[id(c)] == fewest]
    most = max(tiles.values())
    return [c for c in configs if tiles[id(c)] == most]


def grad_splits(precision: str, n: int, k: int, rows: int, sms: int, meta: Mapping[str, Any]) -> int:
    """``split_count`` of one GEMM 2 config at one shape, as the launcher's grid applies it."""
    return split_count(weight_tiles(n, k, meta), rows, sms, resident_blocks(precision, meta))


@functools.lru_cache(maxsize=256)
def split_workspace(precision: str, n: int, k: int, rows: int, sms: int, splits: int | None) -> tuple[int, int]:
    """What a launch's workspace must hold for every candidate config: (most splits, most weight tiles); ``splits``
    forces the split of every config."""
    candidates = grad_candidates(precision, n, k, rows, sms)
    most_splits = max(splits or grad_splits(precision, n, k, rows, sms, c.kwargs) for c in candidates)
    return most_splits, max(weight_tiles(n, k, c.kwargs) for c in candidates)


def workspace_bytes(precision: str, n: int, k: int, rows: int, sms: int, bias: bool = True) -> int:
    """The split's extra memory at one shape, a model: fp32 partial weights and biases, one per split, and an int32
    counter per tile; 0 without a split. It does not grow with the batch."""
    splits, tiles = split_workspace(precision, n, k, rows, sms, None)
    return 0 if splits <= 1 else 4 * (splits * (n * k + (n if bias else 0)) + tiles)


def prune_grad_configs(
    configs: list[triton.Config], named_args: Mapping[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """The autotuner's early prune: ``grad_candidates`` for the launch's precision, shape and device."""
    args = {**named_args, **kwargs}
    h = args["h_ptr"]
    precision = precision_name(h.dtype, args["INPUT_PRECISION"])
    return grad_candidates(precision, args["N"], args["K"], args["M"], sm_count(h.device))


@triton.jit
def _grad_rows(
    acc,
    gb,
    x_ptr,
    h_ptr,
    c_ptr,
    r_ptr,
    row_lo,
    row_hi,
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
    """acc += ((c / 2^s) h)^T (r x) over rows [row_lo, row_hi) of one batch, whose h/c/r rows start at stacked row
    ``h_row0``: |c_i / 2^s| <= 1 and |r_i x_ik| <= 1, so neither low-precision operand can overflow."""
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        rr = m0 + offs_m
        m_mask = rr < row_hi
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


@triton.jit
def _sum_splits(
    acc,
    gb,
    ws_ptr,
    wsb_ptr,
    count_ptr,
    split,
    splits,
    tile_id,
    tile,
    tile_mask,
    offs_n,
    n_mask,
    N,
    K,
    bias_tile,
    HAS_BIAS: tl.constexpr,
):
    """Publish this split's partial tile; the last of the tile's ``splits`` programs to arrive gets the sum of all
    partials in split order (and resets the counter for the next launch). Returns (acc, gb, is_last)."""
    slab = N.to(tl.int64) * K
    tl.store(ws_ptr + split * slab + tile, acc, mask=tile_mask)
    if HAS_BIAS:
        if bias_tile:
            tl.store(wsb_ptr + split * N + offs_n, gb, mask=n_mask)
    # Every thread's partial is stored before the release of the CTA's arrival; the acquire orders the reads of the
    # other partials after their programs' releases (loads bypass L1, which is not coherent).
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    is_last = arrived == splits - 1
    if is_last:
        acc = tl.zeros_like(acc)
        gb = tl.zeros_like(gb)
        for s in range(0, splits):
            acc += tl.load(ws_ptr + s * slab + tile, mask=tile_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                if bias_tile:
                    gb += tl.load(wsb_ptr + s * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tile_id, 0, sem="relaxed", scope="gpu")
    return acc, gb, is_last


@triton.jit
def _column_block(tile3, j: tl.constexpr, BLOCKS: tl.constexpr):
    """Column block ``j`` of a tile viewed as (rows, BLOCKS, columns // BLOCKS): a register selection."""
    return tl.sum(tl.where(tl.arange(0, BLOCKS)[None, :, None] == j, tile3, 0.0), axis=1)


@triton.jit
def _finish_tile(
    acc,
    gb,
    ws_ptr,
    wsb_ptr,
    count_ptr,
    split,
    splits,
    tile_id,
    offs_n,
    offs_k,
    n_mask,
    k_mask,
    N,
    K,
    pid_k,
    bias_tile,
    w_ptr,
    b_ptr,
    gw_ptr,
    gb_ptr,
    s1w_ptr,
    s2w_ptr,
    s1b_ptr,
    s2b_ptr,
    coef_scale,
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
    HAS_BIAS: tl.constexpr,
    OPT: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    DECOUPLED: tl.constexpr,
    SPLIT: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPILOGUE: tl.constexpr,
):
    """GEMM 2's epilogue for one weight tile, shared by the linear and the conv kernel: with a split grid, publish
    the partial tile (acc, and gb for the bias) and go on only as the last split to arrive, with the sum over splits
    in split order; then the gradient store or the SGD/Adam update, in column blocks of at most EPILOGUE elements,
    small enough for the update's operands to stay in registers."""
    finish = True
    if SPLIT:
        if splits > 1:
            tile = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
            tile_mask = n_mask[:, None] & k_mask[None, :]
            acc, gb, finish = _sum_splits(
                acc,
                gb,
                ws_ptr,
                wsb_ptr,
                count_ptr,
                split,
                splits,
                tile_id,
                tile,
                tile_mask,
                offs_n,
                n_mask,
                N,
                K,
                bias_tile,
                HAS_BIAS,
            )
    if finish:
        BLOCKS: tl.constexpr = (BLOCK_N * BLOCK_K + EPILOGUE - 1) // EPILOGUE
        SUB_K: tl.constexpr = BLOCK_K // BLOCKS
        grad3 = tl.reshape(acc * coef_scale, (BLOCK_N, BLOCKS, SUB_K))
        for j in tl.static_range(BLOCKS):
            offs_kj = pid_k * BLOCK_K + j * SUB_K + tl.arange(0, SUB_K)
            tile_j = offs_n.to(tl.int64)[:, None] * K + offs_kj[None, :]
            mask_j = n_mask[:, None] & (offs_kj < K)[None, :]
            grad_j = _column_block(grad3, j, BLOCKS)
            if OPT == 0:
                tl.store(gw_ptr + tile_j, cast(grad_j, gw_ptr.dtype.element_ty, INTERPRET), mask=mask_j)
            elif OPT == 1:
                _sgd_update(
                    w_ptr,
                    s1w_ptr,
                    tile_j,
                    grad_j,
                    mask_j,
                    first_w,
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
                    tile_j,
                    grad_j,
                    mask_j,
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
                if OPT == 0:
                    tl.store(gb_ptr + offs_n, cast(gb, gb_ptr.dtype.element_ty, INTERPRET), mask=n_mask)
                elif OPT == 1:
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


@triton.autotune(
    configs=GRAD_CONFIGS,
    key=TUNING_KEY,
    prune_configs_by={"early_config_prune": prune_grad_configs},
    pre_hook=GRAD_RESTORE.save,
    post_hook=GRAD_RESTORE.restore,
)
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
    ws_ptr,
    wsb_ptr,
    count_ptr,
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
    SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGN_N: tl.constexpr,
    ALIGN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GEMM 2 over one row range for one weight tile, then the gradient store or the fused in-place update.

    Grid (splits * K tiles * N tiles,), K tiles fastest, then N tiles, then splits: the number of splits is the
    grid over the tiles. ``SPLIT`` says a workspace (``ws``: splits x N x K, ``wsb``: splits x N, fp32) and zeroed
    per-tile counters were passed, so the grid may split. s1*/s2* are the state tensors: the SGD momentum buffer
    (s1) or Adam's exp_avg (s1) and exp_avg_sq (s2), for the weight (w) and the bias (b). ``M_BUCKET`` is only the
    autotuner's key.
    """
    N = aligned(N, ALIGN_N)
    K = aligned(K, ALIGN_K)
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

    # This split's stacked rows [lo, hi): whole BLOCK_M steps, the positive rows first.
    splits = tl.num_programs(0) // tiles
    span = tl.cdiv(tl.cdiv(M, splits), BLOCK_M) * BLOCK_M
    lo = tl.minimum(split * span, M)
    hi = tl.minimum(lo + span, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    gb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc, gb = _grad_rows(
        acc,
        gb,
        xp_ptr,
        h_ptr,
        c_ptr,
        r_ptr,
        lo,
        tl.minimum(hi, P),
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
        tl.maximum(lo, P) - P,
        hi - P,
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

    _finish_tile(
        acc, gb, ws_ptr, wsb_ptr, count_ptr, split, splits, tile_id, offs_n, offs_k, n_mask, k_mask, N, K, pid_k,
        bias_tile, w_ptr, b_ptr, gw_ptr, gb_ptr, s1w_ptr, s2w_ptr, s1b_ptr, s2b_ptr, coef_scale, lr, weight_decay,
        momentum, dampening, first_w, first_b, beta1, beta2, adam_eps, step_size_w, bc2_sqrt_w, step_size_b,
        bc2_sqrt_b, HAS_BIAS, OPT, MOMENTUM, NESTEROV, DECOUPLED, SPLIT, INTERPRET, BLOCK_N, BLOCK_K, EPILOGUE_ELEMENTS,
    )


GRAD_RESTORE.arg_names = tuple(ff_grad_update_kernel.arg_names)


# ---------------------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------------------


def grad_grid(n: int, k: int, meta: Mapping[str, Any], splits: int = 1) -> tuple[int]:
    """GEMM 2's programs, one per (split, weight tile), on axis 0."""
    return (weight_tiles(n, k, meta) * splits,)


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


class GradLaunch(NamedTuple):
    """What one GEMM 2 launch needs beside its tensors and optimizer scalars, computed once per shape, dtype,
    device and options (the Triton step caches it): the grid, the size arguments (P, Q, P+Q, N, K, the
    autotuner's row bucket), the split workspace (fp32 elements of the weight and bias slabs, int32 tile counters;
    all 0 without a split) and the constexprs that do not depend on the optimizer's hyperparameters."""

    grid: Callable[[Mapping[str, Any]], tuple[int]]
    sizes: tuple[int, int, int, int, int, int]
    workspace: tuple[int, int, int]
    constexprs: dict[str, Any]


def grad_launch(
    rows_pos: int,
    rows_neg: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    normalize: str,
    has_bias: bool,
    kind: int,
    splits: int | None = None,
    flags: tuple[bool, bool, bool] = (False, False, False),
) -> GradLaunch:
    """GEMM 2's launch plan; ``splits`` forces the row split of every config (tests), by default ``split_count``
    chooses it per config. ``flags`` are the update's constexprs (momentum, Nesterov, decoupled weight decay:
    :func:`update_flags`), so that a launch passes the plan's constexprs as they are."""
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    rows = rows_pos + rows_neg
    bucket, precision = tuning_args(rows, dtype)
    sms = sm_count(device)
    family = precision_name(dtype, precision)
    most_splits, most_tiles = split_workspace(family, n, k, rows, sms, splits)
    split = most_splits > 1
    workspace = (most_splits * n * k, most_splits * n if has_bias else 0, most_tiles) if split else (0, 0, 0)

    def grid(meta: Mapping[str, Any]) -> tuple[int]:
        return grad_grid(n, k, meta, splits or grad_splits(family, n, k, rows, sms, meta))

    constexprs = {
        "NORMALIZE": NORMALIZE_CODE[normalize],
        "HAS_BIAS": has_bias,
        "OPT": kind,
        "SPLIT": split,
        "INPUT_PRECISION": precision,
        "INTERPRET": INTERPRETED,
        "ALIGN_N": alignment(n),
        "ALIGN_K": alignment(k),
        "MOMENTUM": flags[0],
        "NESTEROV": flags[1],
        "DECOUPLED": flags[2],
    }
    return GradLaunch(grid, (rows_pos, rows_neg, rows, n, k, bucket), workspace, constexprs)


def update_flags(update: Update) -> tuple[bool, bool, bool]:
    """The update's constexprs: momentum, Nesterov, decoupled weight decay (a :class:`GradLaunch` holds them)."""
    return update.momentum != 0.0, update.nesterov, update.decoupled


def run_grad_update(
    launch: GradLaunch,
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor | None,
    w: torch.Tensor,
    b: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    coef_scale: float,
    update: Update,
    ws: torch.Tensor | None = None,
    wsb: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> None:
    """GEMM 2 into buffers the caller checked and sized: the gradients without an update, the split workspace
    ``launch.workspace`` asks for (``counts`` zeroed) with a split; ``launch`` was planned for ``update``'s
    flags."""
    rows_pos, rows_neg = launch.sizes[0], launch.sizes[1]
    xp = x_pos if rows_pos else x_neg
    xn = x_neg if rows_neg else x_pos
    apply = update.kind != OPT_NONE
    ff_grad_update_kernel[launch.grid](
        xp,
        xn,
        h,
        c,
        r,
        w if apply else None,
        b if apply else None,
        grad_w,
        grad_b,
        update.s1w,
        update.s2w,
        update.s1b,
        update.s2b,
        ws,
        wsb,
        counts,
        *launch.sizes,
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
        **launch.constexprs,
    )


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
    splits: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GEMM 2: returns (grad_weight, grad_bias) without an update; with one, updates w, b and the state in place
    (the state was checked by the custom op, which knows its names). ``splits`` forces the row split of every
    config (tests); by default ``split_count`` chooses it per config."""
    n, k = w.shape
    launch = grad_launch(
        x_pos.shape[0], x_neg.shape[0], n, k, x_pos.dtype, w.device, normalize, b is not None, update.kind, splits,
        update_flags(update),
    )
    grad_w = grad_b = None
    if update.kind == OPT_NONE:
        grad_w = torch.empty_like(w)
        grad_b = None if b is None else torch.empty_like(b)
    ws = wsb = counts = None
    size_w, size_b, tiles = launch.workspace
    if tiles:
        ws = torch.empty(size_w, dtype=torch.float32, device=w.device)
        wsb = torch.empty(size_b, dtype=torch.float32, device=w.device) if size_b else None
        counts = torch.zeros(tiles, dtype=torch.int32, device=w.device)
    run_grad_update(launch, x_pos, x_neg, h, c, r, w, b, grad_w, grad_b, coef_scale, update, ws, wsb, counts)
    return grad_w, grad_b
