"""The fused Triton path (``backend="triton"``) of the linear FF step: its ``torch.library`` custom ops and the
thin functions ``ff_kernels.functional`` calls on already-checked inputs (DESIGN section 3).

One step is three launches: GEMM 1 with the goodness epilogue (``forward_gemm``), the per-row loss and coefficient
kernel (``row_loss``), GEMM 2 with the optimizer epilogue (``grad_update_gemm``). The custom ops make them opaque
to ``torch.compile(fullgraph=True)``, with fake implementations; each runs with the weight's CUDA device current
(Triton launches on the current device).

Host cost (DESIGN 4: a step at a tiny shape costs at most 25 tiny matrix products on the host). Outside
torch.compile the functions at the bottom call the implementations directly: torch.library's Python wrapper of a
mutating custom op re-reads its schema argument by argument and costs more host time than a small step's kernels
take on the GPU. The inputs are checked once, at the public boundary (``ff_kernels.functional``, or the custom op
and :func:`ff_linear_step_triton` for callers below it); what a launch needs beside its tensors (grids,
constexprs, the autotuner's key, the split plan, the workspace layout, the coefficient scale) is planned once per
shape, dtype, device and options (:func:`step_plan`); and a step's scratch (c, r, the partial sums, the row
kernel's partial losses, GEMM 2's split workspace and tile counters) is one allocation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ff_kernels._options import StepOptions
from ff_kernels.ops.scaling import coefficient_scale
from ff_kernels.ops.triton.common import (
    OPT_ADAM,
    OPT_NONE,
    OPT_SGD,
    check_layer,
    check_rows,
    check_state,
    gemm_weight,
    in_compute_dtype,
)
from ff_kernels.ops.triton.forward_gemm import ForwardLaunch, forward_launch, launch_forward, partial_tiles, run_forward
from ff_kernels.ops.triton.grad_update_gemm import GradLaunch, Update, grad_launch, run_grad_update, update_flags
from ff_kernels.ops.triton.row_loss import RowLaunch, launch_goodness, row_step_launch, run_row_step
from ff_kernels.optim import SGD, Adam, FusedOptimizer
from ff_kernels.types import FFStepOutput

StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]

# Workspace pieces start at multiples of this many fp32 elements (128 bytes): every kernel sees aligned pointers.
_PIECE_ALIGN = 32
# Plans kept before the cache starts afresh (a loop over ever new batch sizes must not grow it without bound).
_MAX_PLANS = 4096
_NO_UPDATE = Update(OPT_NONE)


def _check_step(x_pos: torch.Tensor, x_neg: torch.Tensor, opts: StepOptions) -> None:
    """What the row step assumes of the batch sizes (checked before anything is launched)."""
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    if rows_pos + rows_neg == 0:
        raise ValueError("x_pos and x_neg are both empty: a step needs at least one row")
    if opts.loss == "symba" and rows_pos != rows_neg:
        raise ValueError(
            f"loss='symba' pairs row i of x_pos with row i of x_neg: x_pos has {rows_pos} rows, x_neg {rows_neg}"
        )


def _check_inputs(x_pos: torch.Tensor, x_neg: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  opts: StepOptions, w_gemm: torch.Tensor | None = None) -> None:
    """What the kernels assume of a step's tensors, for callers that did not come through the public boundary:
    the inputs in the weight's dtype, or in another with ``w_gemm``, the weight in theirs, for GEMM 1."""
    check_layer(w, b)
    if w_gemm is not None:
        check_layer(w_gemm, None, "w_gemm")
    gemm_w = gemm_weight(w, w_gemm)
    check_rows(x_pos, "x_pos", gemm_w)
    check_rows(x_neg, "x_neg", gemm_w)
    _check_step(x_pos, x_neg, opts)


class StepPlan(NamedTuple):
    """Everything about one step's launches that does not change from step to step at the same shape, dtype,
    device and options: the three launch plans, the outputs' shapes, the workspace layout and the coefficient
    scale. ``pieces`` are the workspace's fp32 pieces in the order c, partial sums, r, partial losses, GEMM 2's
    weight and bias slabs, tile counters, each padded to ``_PIECE_ALIGN`` elements and cut after the last one
    used. ``fp32`` and ``h_like`` are empty tensors on the device, fp32 and h's dtype, which the step's buffers are
    allocated from (``new_empty`` takes their dtype and device, where ``torch.empty`` would parse them at every
    step)."""

    forward: ForwardLaunch
    row: RowLaunch
    grad: GradLaunch
    h_shape: tuple[int, int]
    h_stride: tuple[int, int]
    rows_total: int
    rows: tuple[int, int]
    pieces: tuple[int, ...]
    workspace: int
    has_r: bool
    one_program: bool
    split: bool
    coef_scale: float
    fp32: torch.Tensor
    h_like: torch.Tensor


_plans: dict[tuple, StepPlan] = {}
_fp32_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def _tf32_switch() -> object:
    """PyTorch's fp32 matmul switch, the state ``common.input_precision`` derives fp32's precision from, read
    without ``torch.backends``' attribute lookups (they cost about a tiny matrix product, at every step)."""
    if _fp32_precision is not None:
        return _fp32_precision("cuda", "matmul")
    return torch._C._get_cublas_allow_tf32()


def _padded(elements: int) -> int:
    """``elements`` rounded up to a whole number of ``_PIECE_ALIGN``."""
    return -(-elements // _PIECE_ALIGN) * _PIECE_ALIGN


def _build_plan(
    rows_pos: int,
    rows_neg: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    has_bias: bool,
    opts: StepOptions,
    has_offsets: tuple[bool, bool],
    update: Update,
) -> StepPlan:
    """A step's plan from scratch (:func:`step_plan` caches it)."""
    rows = rows_pos + rows_neg
    forward = forward_launch(rows_pos, rows_neg, n, k, dtype, opts.normalize, has_bias, store_r=True)
    row = row_step_launch(rows_pos, rows_neg, opts.loss, *has_offsets)
    grad = grad_launch(
        rows_pos, rows_neg, n, k, dtype, device, opts.normalize, has_bias, update.kind, None, update_flags(update)
    )
    has_r = forward.constexprs["STORE_R"]
    one_program = row.grid == (1,)
    size_w, size_b, tiles = grad.workspace
    sizes = [rows, partial_tiles(n) * rows, rows if has_r else 0, 0 if one_program else row.grid[0], size_w, size_b,
             tiles]
    while not sizes[-1]:
        sizes.pop()
    pieces = tuple(_padded(size) for size in sizes)
    return StepPlan(
        forward, row, grad, (rows, n), (n, 1), rows, (rows_pos, rows_neg), pieces, sum(pieces), has_r, one_program,
        tiles > 0, coefficient_scale(opts, rows_pos, rows_neg), torch.empty(0, dtype=torch.float32, device=device),
        torch.empty(0, dtype=dtype, device=device),
    )


def step_plan(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    update: Update,
) -> StepPlan:
    """The step's launch plan, built on the first step of its shape, dtype, device, options and kind of update
    and looked up afterwards (for fp32, PyTorch's TF32 switch is in the key: it may change between steps)."""
    dtype = x_pos.dtype
    key = (
        x_pos.shape[0], x_neg.shape[0], w.shape, dtype, w.dtype, w.device, b is not None, offset_pos is not None,
        offset_neg is not None, update.kind, update.momentum != 0.0, update.nesterov, update.decoupled,
        _tf32_switch() if dtype == torch.float32 else None, opts.normalize, opts.loss, opts.kappa, opts.alpha,
    )
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        n, k = w.shape
        plan = _plans[key] = _build_plan(key[0], key[1], n, k, dtype, w.device, key[6], opts, key[7:9], update)
    return plan


def _guards_device(w: torch.Tensor) -> bool:
    """Whether a step enters the weight's device: on CUDA tensors (Triton launches on the current device, not the
    tensors'); elsewhere (the interpreter) ``torch.cuda.device_of`` is a no-op whose objects only cost host time."""
    return w.is_cuda


def _run_step(
    plan: StepPlan,
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    opts: StepOptions,
    update: Update,
) -> StepResult:
    """:func:`_launch_step` with the weight's device current. Callers pick one of the two by :func:`_guards_device`,
    so a step that needs no guard makes one call fewer."""
    previous = torch.cuda._exchange_device(w.get_device())  # torch.cuda.device_of(w)'s work, without its objects
    try:
        return _launch_step(plan, x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, opts, update)
    finally:
        torch.cuda._maybe_exchange_device(previous)


def _launch_step(
    plan: StepPlan,
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    opts: StepOptions,
    update: Update,
) -> StepResult:
    """The allocations and three launches of one step on checked inputs ``plan`` was made for: (loss, g, h,
    grad_weight, grad_bias). ``w_gemm``: the weight in the inputs' dtype for GEMM 1 where the weight itself (which
    the update writes, and the gradient's dtype) has another (``compute_dtype``); None where they agree."""
    (forward, row, grad, h_shape, h_stride, rows_total, _, pieces, size, has_r, one_program, split, coef_scale, fp32,
     h_like) = plan
    grad_w = grad_b = None
    if update.kind == OPT_NONE:
        grad_w = torch.empty_like(w)
        grad_b = None if b is None else torch.empty_like(b)
    # Host cost: sizes as integers or planned tuples (torch.empty parses a shape tuple at about a third of a step's
    # budget), and the ``new_*`` allocations take dtype and device from the plan's empty tensors (parsing
    # ``dtype=``, ``device=`` costs a fifth of a tiny matrix product each time). The scratch is cut with
    # ``unsafe_split_with_sizes``: its pieces never leave this function, so they need no autograd view records.
    parts = fp32.new_empty(size).unsafe_split_with_sizes(pieces)
    h = h_like.new_empty_strided(h_shape, h_stride)
    g = fp32.new_empty(rows_total)
    c, partials = parts[0], parts[1]
    r = parts[2] if has_r else None
    if one_program:
        loss = loss_parts = fp32.new_empty_strided((), ())
    else:
        loss_parts = parts[3]
    ws = wsb = counts = None
    if split:
        ws, counts = parts[4], parts[6].view(torch.int32).zero_()
        wsb = parts[5] if b is not None else None
    tiles_n = run_forward(forward, x_pos, x_neg, w if w_gemm is None else w_gemm, b, h, r, partials, opts.eps)
    run_row_step(row, partials, tiles_n, g, c, loss_parts, opts, offset_pos, offset_neg)
    run_grad_update(grad, x_pos, x_neg, h, c, r, w, b, grad_w, grad_b, coef_scale, update, ws, wsb, counts)
    if not one_program:
        loss = loss_parts.sum()
    return loss, g, h, grad_w, grad_b


def _step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    opts: StepOptions,
    update: Update,
) -> StepResult:
    """A custom op's step: its inputs checked (the op is a boundary of its own), then the launches."""
    _check_inputs(x_pos, x_neg, w, b, opts, w_gemm)
    plan = step_plan(x_pos, x_neg, w, b, opts, offset_pos, offset_neg, update)
    launch = _run_step if _guards_device(w) else _launch_step
    return launch(plan, x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, opts, update)


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops: the schemas in one place, then the implementations and their fake (meta) versions.
# ---------------------------------------------------------------------------------------------------------------
_STEP_ARGS = (
    "Tensor? w_gemm, Tensor? offset_pos, Tensor? offset_neg, float threshold, float kappa, str loss, "
    "str normalize, float eps, float alpha"
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


def _forward(x, w, b, kappa, normalize, eps):
    with torch.cuda.device_of(w):  # Triton launches on the current device, not the tensors'
        h, _, partials, tiles_n = launch_forward(x, x[:0], w, b, normalize, eps, store_r=False, names=("x", "x"))
        return h, launch_goodness(partials, tiles_n, x.shape[0], kappa)


_forward_op = _custom_op("forward")(_forward)


@_forward_op.register_fake
def _(x, w, b, kappa, normalize, eps):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0],), dtype=torch.float32)


def _step_no_update(x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps,
                    alpha):
    opts = _options(threshold, kappa, loss, normalize, eps, alpha)
    out_loss, g, h, grad_w, grad_b = _step(x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, opts,
                                           Update(OPT_NONE))
    return out_loss, g, h, grad_w, w.new_empty((0,)) if grad_b is None else grad_b


_step_op = _custom_op("step")(_step_no_update)


def _fake_step_outputs(x_pos, x_neg, w):
    rows = x_pos.shape[0] + x_neg.shape[0]
    return (
        x_pos.new_empty((), dtype=torch.float32),
        x_pos.new_empty((rows,), dtype=torch.float32),
        x_pos.new_empty((rows, w.shape[0])),
    )


@_step_op.register_fake
def _(x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha):
    grad_b = w.new_empty((0,)) if b is None else torch.empty_like(b)
    return (*_fake_step_outputs(x_pos, x_neg, w), torch.empty_like(w), grad_b)


def _step_sgd(
    x_pos,
    x_neg,
    w,
    b,
    w_gemm,
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
    update = Update(
        OPT_SGD,
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
    check_state(w, b, buf_w=buf_w, buf_b=buf_b)
    out_loss, g, h, _, _ = _step(x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, opts, update)
    return out_loss, g, h


_step_sgd_op = _custom_op("step_sgd_")(_step_sgd)


@_step_sgd_op.register_fake
def _(
    x_pos,
    x_neg,
    w,
    b,
    w_gemm,
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


def _step_adam(
    x_pos,
    x_neg,
    w,
    b,
    w_gemm,
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
    update = Update(
        OPT_ADAM,
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
    check_state(w, b, exp_avg_w=exp_avg_w, exp_avg_sq_w=exp_avg_sq_w, exp_avg_b=exp_avg_b, exp_avg_sq_b=exp_avg_sq_b)
    out_loss, g, h, _, _ = _step(x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, opts, update)
    return out_loss, g, h


_step_adam_op = _custom_op("step_adam_")(_step_adam)


@_step_adam_op.register_fake
def _(
    x_pos,
    x_neg,
    w,
    b,
    w_gemm,
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
    compute_dtype: torch.dtype | None = None,
) -> FFStepOutput:
    """One fused FF step: three kernels, the update (if any) applied in the GEMM 2 epilogue in place. For callers
    below the public API: checks what the kernels assume of the tensors (errors name the argument), then runs
    :func:`ff_linear_step_triton_checked`."""
    (x_pos, x_neg), w_gemm = in_compute_dtype((x_pos, x_neg), w, compute_dtype)
    _check_inputs(x_pos, x_neg, w, b, opts, w_gemm)
    return _fused_step(x_pos, x_neg, w, b, w_gemm, opts, offset_pos, offset_neg, optimizer)


def ff_linear_step_triton_checked(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    optimizer: FusedOptimizer | None = None,
    compute_dtype: torch.dtype | None = None,
) -> FFStepOutput:
    """:func:`ff_linear_step_triton` on inputs ``ff_kernels.functional`` has checked. Traced by torch.compile, it
    calls the custom ops; eagerly, the implementation, with the plan cached and the optimizer state checked here.

    ``compute_dtype`` (e.g. bf16 over fp32 weights): the inputs and a copy of the weight are cast to it, both GEMMs
    run in it with fp32 accumulation, h is returned in it, and the update (or the gradient) is the weight's dtype
    (the fp32 master weight and its state, written by GEMM 2's epilogue)."""
    (x_pos, x_neg), w_gemm = in_compute_dtype((x_pos, x_neg), w, compute_dtype)
    return _fused_step(x_pos, x_neg, w, b, w_gemm, opts, offset_pos, offset_neg, optimizer)


def _fused_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    optimizer: FusedOptimizer | None,
) -> FFStepOutput:
    """The step on inputs in the compute dtype (``w_gemm``: the weight's copy in it, or None)."""
    if torch.compiler.is_compiling():
        return _traced_step(x_pos, x_neg, w, b, w_gemm, opts, offset_pos, offset_neg, optimizer)
    update = _NO_UPDATE if optimizer is None else optimizer_update(optimizer, w, b)
    plan = step_plan(x_pos, x_neg, w, b, opts, offset_pos, offset_neg, update)
    launch = _run_step if _guards_device(w) else _launch_step
    loss, g, h, grad_w, grad_b = launch(plan, x_pos, x_neg, w, b, w_gemm, offset_pos, offset_neg, opts, update)
    if optimizer is not None:  # what the custom op's ADInplaceOrView kernel does: saved copies of w, b become stale
        torch._C._increment_version((w,) if b is None else (w, b))  # torch.autograd.graph.increment_version's work
    rows = plan.rows
    g_pos, g_neg = g.split_with_sizes(rows)
    h_pos, h_neg = h.split_with_sizes(rows)
    return FFStepOutput(loss, g_pos, g_neg, h_pos, h_neg, grad_w, grad_b)


def optimizer_update(optimizer: FusedOptimizer, w: torch.Tensor, b: torch.Tensor | None) -> Update:
    """The kernel's update record from the optimizer's state (advanced by one step) and hyperparameters; the state
    is checked as the custom ops check it, with the same names."""
    if isinstance(optimizer, Adam):
        moments, corrections = optimizer.fused_state(w, b)
        exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b = moments
        if not _state_fits(w, b, exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b):
            check_state(w, b, exp_avg_w=exp_avg_w, exp_avg_sq_w=exp_avg_sq_w, exp_avg_b=exp_avg_b,
                        exp_avg_sq_b=exp_avg_sq_b)
        beta1, beta2 = optimizer.betas
        # _make takes the fields as one tuple: binding twenty arguments to the generated constructor's parameters
        # costs about twice as much, at every step
        return Update._make((
            OPT_ADAM, exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b, float(optimizer.lr),
            float(optimizer.weight_decay), 0.0, 0.0, False, False, False, float(beta1), float(beta2),
            float(optimizer.eps), bool(optimizer.decoupled_weight_decay), *corrections,
        ))
    if isinstance(optimizer, SGD):
        (buf_w, buf_b), (first_w, first_b) = optimizer.fused_state(w, b)
        if not _state_fits(w, b, buf_w, None, buf_b, None):
            check_state(w, b, buf_w=buf_w, buf_b=buf_b)
        return Update(
            OPT_SGD, buf_w, None, buf_b, None, float(optimizer.lr), float(optimizer.weight_decay),
            float(optimizer.momentum), float(optimizer.dampening), bool(optimizer.nesterov), first_w, first_b,
        )
    raise TypeError(f"the Triton backend has no fused update for {type(optimizer).__name__}")


def _state_fits(
    w: torch.Tensor,
    b: torch.Tensor | None,
    s1w: torch.Tensor | None,
    s2w: torch.Tensor | None,
    s1b: torch.Tensor | None,
    s2b: torch.Tensor | None,
) -> bool:
    """``check_state``'s conditions as one fast test (fp32, the parameter's shape and device, contiguous; ``*w`` the
    weight's state, ``*b`` the bias's); where it fails, ``check_state`` runs to say which tensor and why."""
    device, f32 = w.device, torch.float32
    shape = w.shape
    for s in (s1w, s2w):
        if s is not None and not (s.dtype == f32 and s.is_contiguous() and s.device == device and s.shape == shape):
            return False
    if b is None:
        return True
    shape = b.shape
    for s in (s1b, s2b):
        if s is not None and not (s.dtype == f32 and s.is_contiguous() and s.device == device and s.shape == shape):
            return False
    return True


def _traced_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    optimizer: FusedOptimizer | None,
) -> FFStepOutput:
    """The step as torch.compile sees it: one custom op (with fakes), opaque to the graph."""
    rows_pos = x_pos.shape[0]
    step_args = (
        w_gemm, offset_pos, offset_neg, opts.threshold, opts.kappa, opts.loss, opts.normalize, opts.eps, opts.alpha
    )
    grad_w = grad_b = None
    if optimizer is None:
        loss, g, h, grad_w, gb = torch.ops.ff_kernels.triton_step(x_pos, x_neg, w, b, *step_args)
        grad_b = None if b is None else gb
    elif isinstance(optimizer, SGD):
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
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, kappa: float, normalize: str, eps: float,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference, GEMM 1 alone: h (in ``compute_dtype``, by default x's dtype) and goodness g (fp32), DESIGN
    1.1-1.3; with ``compute_dtype`` the input and a copy of the weight are cast to it."""
    (x,), w_gemm = in_compute_dtype((x,), w, compute_dtype)
    w = gemm_weight(w, w_gemm)
    forward = torch.ops.ff_kernels.triton_forward if torch.compiler.is_compiling() else _forward
    return forward(x, w, b, kappa, normalize, eps)
