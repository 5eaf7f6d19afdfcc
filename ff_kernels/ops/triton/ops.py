"""The fused Triton path (``backend="triton"``) of the linear FF step: its ``torch.library`` custom ops and the
thin functions ``ff_kernels.functional`` calls on already-checked inputs (DESIGN section 3).

One step is three launches: GEMM 1 with the goodness epilogue (``forward_gemm``), the per-row loss and coefficient
kernel (``row_loss``), GEMM 2 with the optimizer epilogue (``grad_update_gemm``). The custom ops make them opaque
to ``torch.compile(fullgraph=True)``, with fake implementations; each runs with the weight's CUDA device current
(Triton launches on the current device). Outside torch.compile the functions at the bottom call the
implementations directly: torch.library's Python wrapper of a custom op costs more host time than a small step's
kernels take on the GPU.
"""

from __future__ import annotations

import torch

from ff_kernels._options import StepOptions
from ff_kernels.ops.scaling import coefficient_scale
from ff_kernels.ops.triton.common import OPT_ADAM, OPT_NONE, OPT_SGD, check_state
from ff_kernels.ops.triton.forward_gemm import launch_forward
from ff_kernels.ops.triton.grad_update_gemm import Update, launch_grad_update
from ff_kernels.ops.triton.row_loss import launch_goodness, launch_row_step
from ff_kernels.optim import SGD, Adam, FusedOptimizer
from ff_kernels.types import FFStepOutput


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
    update: Update,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The three launches of one step, on the weight's device: (loss, g, h, grad_weight, grad_bias)."""
    _check_step(x_pos, x_neg, opts)
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    with torch.cuda.device_of(w):
        h, r, partials, tiles_n = launch_forward(x_pos, x_neg, w, b, opts.normalize, opts.eps, store_r=True)
        g, c, loss = launch_row_step(partials, tiles_n, rows_pos, rows_neg, opts, offset_pos, offset_neg)
        scale = coefficient_scale(opts, rows_pos, rows_neg)
        grad_w, grad_b = launch_grad_update(x_pos, x_neg, h, c, r, w, b, opts.normalize, scale, update)
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


def _forward(x, w, b, kappa, normalize, eps):
    with torch.cuda.device_of(w):  # Triton launches on the current device, not the tensors'
        h, _, partials, tiles_n = launch_forward(x, x[:0], w, b, normalize, eps, store_r=False, names=("x", "x"))
        return h, launch_goodness(partials, tiles_n, x.shape[0], kappa)


_forward_op = _custom_op("forward")(_forward)


@_forward_op.register_fake
def _(x, w, b, kappa, normalize, eps):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0],), dtype=torch.float32)


def _step_no_update(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha):
    opts = _options(threshold, kappa, loss, normalize, eps, alpha)
    out_loss, g, h, grad_w, grad_b = _step(x_pos, x_neg, w, b, offset_pos, offset_neg, opts, Update(OPT_NONE))
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
def _(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha):
    grad_b = w.new_empty((0,)) if b is None else torch.empty_like(b)
    return (*_fake_step_outputs(x_pos, x_neg, w), torch.empty_like(w), grad_b)


def _step_sgd(
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
    out_loss, g, h, _, _ = _step(x_pos, x_neg, w, b, offset_pos, offset_neg, opts, update)
    return out_loss, g, h


_step_sgd_op = _custom_op("step_sgd_")(_step_sgd)


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


def _step_adam(
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
    out_loss, g, h, _, _ = _step(x_pos, x_neg, w, b, offset_pos, offset_neg, opts, update)
    return out_loss, g, h


_step_adam_op = _custom_op("step_adam_")(_step_adam)


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
    traced = torch.compiler.is_compiling()
    grad_w = grad_b = None
    if optimizer is None:
        step = torch.ops.ff_kernels.triton_step if traced else _step_no_update
        loss, g, h, grad_w, gb = step(x_pos, x_neg, w, b, *step_args)
        grad_b = None if b is None else gb
    else:
        if isinstance(optimizer, SGD):
            bufs, firsts = optimizer.fused_state(w, b)
            step_sgd = torch.ops.ff_kernels.triton_step_sgd_ if traced else _step_sgd
            loss, g, h = step_sgd(
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
            step_adam = torch.ops.ff_kernels.triton_step_adam_ if traced else _step_adam
            loss, g, h = step_adam(
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
        if not traced:  # what the custom op's ADInplaceOrView kernel does: saved copies of w, b become stale
            torch.autograd.graph.increment_version(w if b is None else (w, b))
    return FFStepOutput.from_stacked(loss, g, h, rows_pos, grad_w, grad_b)


def ff_linear_forward_triton(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, kappa: float, normalize: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference, GEMM 1 alone: h (x's dtype) and goodness g (fp32), DESIGN 1.1-1.3."""
    forward = torch.ops.ff_kernels.triton_forward if torch.compiler.is_compiling() else _forward
    return forward(x, w, b, kappa, normalize, eps)
