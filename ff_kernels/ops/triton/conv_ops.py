"""The fused Triton path (``backend="triton"``) of the conv and class-goodness conv steps (DESIGN 7): the launch
sequence, its ``torch.library`` custom ops with fakes, and the thin functions ``ff_kernels.conv`` calls on
already-checked inputs.

One step is four launches (``conv_gemm``): r per sample (``normalize`` "l2" or "rms" only), GEMM 1 with the
goodness epilogue, the per-sample loss (``row_loss`` for positive/negative data, the class kernel for class
goodness), GEMM 2 with the optimizer epilogue. As in ``ops``, the custom ops make the step opaque to
``torch.compile(fullgraph=True)``; eager calls skip torch.library's wrapper. The fused optimizers share one op per
step, its hyperparameters packed in a float list and a bool list (``_HYPER``, ``_FLAGS``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ff_kernels._options import ClassStepOptions, ConvGeometry, StepOptions
from ff_kernels.ops.scaling import class_coefficient_scale, coefficient_scale
from ff_kernels.ops.triton.common import OPT_ADAM, OPT_NONE, OPT_SGD, check_state, gemm_weight, in_compute_dtype
from ff_kernels.ops.triton.conv_gemm import (
    launch_conv_class,
    launch_conv_forward,
    launch_conv_grad_update,
    launch_conv_scale,
)
from ff_kernels.ops.triton.grad_update_gemm import Update
from ff_kernels.ops.triton.ops import optimizer_update
from ff_kernels.ops.triton.row_loss import launch_goodness, launch_row_step
from ff_kernels.optim import FusedOptimizer
from ff_kernels.types import FFClassStepOutput, FFStepOutput

# The packed optimizer arguments of the update ops, in this order.
_HYPER = (
    "lr", "weight_decay", "momentum", "dampening", "beta1", "beta2", "eps", "step_size_w", "bc2_sqrt_w",
    "step_size_b", "bc2_sqrt_b",
)
_FLAGS = ("nesterov", "first_w", "first_b", "decoupled")


def _geometry(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> ConvGeometry:
    return ConvGeometry(tuple(stride), tuple(padding), tuple(dilation))


def _update(
    opt: int,
    w: torch.Tensor,
    b: torch.Tensor | None,
    state: Sequence[torch.Tensor | None],
    hyper: Sequence[float],
    flags: Sequence[bool],
) -> Update:
    """The kernel's update record from an op's packed arguments, its state checked (names as the linear ops')."""
    if opt not in (OPT_NONE, OPT_SGD, OPT_ADAM):
        raise ValueError(f"opt must be {OPT_NONE} (none), {OPT_SGD} (SGD) or {OPT_ADAM} (Adam), got {opt}")
    if len(hyper) != len(_HYPER) or len(flags) != len(_FLAGS):
        raise ValueError(f"hyper must hold {', '.join(_HYPER)} and flags {', '.join(_FLAGS)}")
    s1w, s2w, s1b, s2b = state
    values = dict(zip(_HYPER, map(float, hyper)), **dict(zip(_FLAGS, map(bool, flags))))
    if opt == OPT_SGD:
        if values["momentum"] != 0.0 and (s1w is None or (b is not None and s1b is None)):
            raise ValueError("SGD with momentum needs s1w (and s1b with a bias), the momentum buffers")
        check_state(w, b, buf_w=s1w, buf_b=s1b)
    elif opt == OPT_ADAM:
        if s1w is None or s2w is None or (b is not None and (s1b is None or s2b is None)):
            raise ValueError("Adam needs s1w, s2w (and s1b, s2b with a bias): exp_avg and exp_avg_sq")
        check_state(w, b, exp_avg_w=s1w, exp_avg_sq_w=s2w, exp_avg_b=s1b, exp_avg_sq_b=s2b)
    return Update(opt, s1w=s1w, s2w=s2w, s1b=s1b, s2b=s2b, **values)


def _conv_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    geometry: ConvGeometry,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    opts: StepOptions,
    update: Update,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The positive/negative step: (loss, g (P+Q,), h (P+Q, C, H', W'), grad_weight, grad_bias). GEMM 1 reads
    ``w_gemm`` where given (the inputs' dtype); the gradient and the update are the weight's."""
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    if rows_pos + rows_neg == 0:
        raise ValueError("x_pos and x_neg are both empty: a step needs at least one sample")
    if opts.loss == "symba" and rows_pos != rows_neg:
        raise ValueError(f"loss='symba' pairs the samples of x_pos and x_neg: got {rows_pos} and {rows_neg}")
    with torch.cuda.device_of(w):  # Triton launches on the current device, not the tensors'
        r = launch_conv_scale(x_pos, x_neg, opts.normalize, opts.eps)
        h, partials, tiles = launch_conv_forward(x_pos, x_neg, gemm_weight(w, w_gemm), b, geometry, r)
        g, c, loss = launch_row_step(partials, tiles * w.shape[0], rows_pos, rows_neg, opts, offset_pos, offset_neg)
        scale = coefficient_scale(opts, rows_pos, rows_neg)
        grad_w, grad_b = launch_conv_grad_update(x_pos, x_neg, h, c.view(-1, 1), r, w, b, geometry, scale, update)
    return loss, g, h, grad_w, grad_b


def _conv_class_step(
    x: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    geometry: ConvGeometry,
    opts: ClassStepOptions,
    update: Update,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The class-goodness step: (loss, g (B, num_classes), h (B, C, H', W'), grad_weight, grad_bias)."""
    if x.shape[0] == 0:
        raise ValueError("x is empty: the class-goodness loss over zero samples is undefined")
    if labels.shape != (x.shape[0],) or labels.is_floating_point() or labels.device != x.device:
        raise ValueError(f"labels must be ({x.shape[0]},) integers on {x.device}, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if w.shape[0] % opts.num_classes:
        raise ValueError(f"weight has {w.shape[0]} channels, not divisible by num_classes={opts.num_classes}")
    with torch.cuda.device_of(w):
        r = launch_conv_scale(x, x[:0], opts.normalize, opts.eps)
        h, partials, tiles = launch_conv_forward(x, x[:0], gemm_weight(w, w_gemm), b, geometry, r)
        g, c, loss = launch_conv_class(partials, tiles, labels, opts.num_classes, opts.kappa, opts.temperature)
        scale = class_coefficient_scale(opts, x.shape[0])
        grad_w, grad_b = launch_conv_grad_update(x, x[:0], h, c, r, w, b, geometry, scale, update)
    return loss, g, h, grad_w, grad_b


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops: the schemas in one place, then the implementations and their fakes.
# ---------------------------------------------------------------------------------------------------------------
_GEOMETRY = "int[] stride, int[] padding, int[] dilation"
_STEP_ARGS = (
    "Tensor? offset_pos, Tensor? offset_neg, float threshold, float kappa, str loss, str normalize, float eps, "
    "float alpha"
)
_CLASS_ARGS = "int num_classes, float kappa, float temperature, str normalize, float eps"
_UPDATE_ARGS = (
    "int opt, Tensor(c!)? s1w, Tensor(d!)? s2w, Tensor(e!)? s1b, Tensor(f!)? s2b, float[] hyper, bool[] flags"
)
_SCHEMAS = {
    "conv_forward": (
        f"(Tensor x, Tensor w, Tensor? b, {_GEOMETRY}, float kappa, str normalize, float eps, int num_classes) "
        "-> (Tensor, Tensor)"
    ),
    "conv_step": (
        f"(Tensor x_pos, Tensor x_neg, Tensor w, Tensor? b, Tensor? w_gemm, {_GEOMETRY}, {_STEP_ARGS}) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "conv_step_update_": (
        f"(Tensor x_pos, Tensor x_neg, Tensor(a!) w, Tensor(b!)? b, Tensor? w_gemm, {_GEOMETRY}, {_STEP_ARGS}, "
        f"{_UPDATE_ARGS}) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "conv_class_step": (
        f"(Tensor x, Tensor labels, Tensor w, Tensor? b, Tensor? w_gemm, {_GEOMETRY}, {_CLASS_ARGS}) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "conv_class_step_update_": (
        f"(Tensor x, Tensor labels, Tensor(a!) w, Tensor(b!)? b, Tensor? w_gemm, {_GEOMETRY}, {_CLASS_ARGS}, "
        f"{_UPDATE_ARGS}) "
        "-> (Tensor, Tensor, Tensor)"
    ),
}
_UPDATED = ("w", "b", "s1w", "s2w", "s1b", "s2b")
_MUTATES = {
    "conv_forward": (),
    "conv_step": (),
    "conv_step_update_": _UPDATED,
    "conv_class_step": (),
    "conv_class_step_update_": _UPDATED,
}


def _custom_op(name: str):
    return torch.library.custom_op(f"ff_kernels::triton_{name}", mutates_args=_MUTATES[name], schema=_SCHEMAS[name])


def _step_options(threshold, kappa, loss, normalize, eps, alpha) -> StepOptions:
    """The options inside an op; the goodness name is folded into kappa and never read by the kernels."""
    return StepOptions(
        threshold=threshold, goodness="", loss=loss, normalize=normalize, eps=eps, alpha=alpha, kappa=kappa
    )


def _class_options(num_classes, kappa, temperature, normalize, eps) -> ClassStepOptions:
    return ClassStepOptions(
        num_classes=num_classes, goodness="", temperature=temperature, normalize=normalize, eps=eps, kappa=kappa
    )


def _h_like(x: torch.Tensor, w: torch.Tensor, rows, stride, padding, dilation) -> torch.Tensor:
    out_h, out_w = _geometry(stride, padding, dilation).output_size(x.shape[2:], w.shape[2:])
    return x.new_empty((rows, w.shape[0], out_h, out_w))


def _grad_bias_like(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return w.new_empty((0,)) if b is None else torch.empty_like(b)


def _forward(x, w, b, stride, padding, dilation, kappa, normalize, eps, num_classes):
    geometry = _geometry(stride, padding, dilation)
    with torch.cuda.device_of(w):
        r = launch_conv_scale(x, x[:0], normalize, eps)
        h, partials, tiles = launch_conv_forward(x, x[:0], w, b, geometry, r)
        if num_classes:
            g = launch_conv_class(partials, tiles, None, num_classes, kappa, 1.0)[0]
        else:
            g = launch_goodness(partials, tiles * w.shape[0], x.shape[0], kappa)
    return h, g


_forward_op = _custom_op("conv_forward")(_forward)


@_forward_op.register_fake
def _(x, w, b, stride, padding, dilation, kappa, normalize, eps, num_classes):
    g_shape = (x.shape[0], num_classes) if num_classes else (x.shape[0],)
    return _h_like(x, w, x.shape[0], stride, padding, dilation), x.new_empty(g_shape, dtype=torch.float32)


def _step_no_update(x_pos, x_neg, w, b, w_gemm, stride, padding, dilation, offset_pos, offset_neg, threshold, kappa,
                    loss, normalize, eps, alpha):
    opts = _step_options(threshold, kappa, loss, normalize, eps, alpha)
    geometry = _geometry(stride, padding, dilation)
    out = _conv_step(x_pos, x_neg, w, b, w_gemm, geometry, offset_pos, offset_neg, opts, Update(OPT_NONE))
    return (*out[:4], _grad_bias_like(w, b) if out[4] is None else out[4])


_step_op = _custom_op("conv_step")(_step_no_update)


def _fake_step(x_pos, x_neg, w, stride, padding, dilation):
    rows = x_pos.shape[0] + x_neg.shape[0]
    return (
        x_pos.new_empty((), dtype=torch.float32),
        x_pos.new_empty((rows,), dtype=torch.float32),
        _h_like(x_pos, w, rows, stride, padding, dilation),
    )


@_step_op.register_fake
def _(x_pos, x_neg, w, b, w_gemm, stride, padding, dilation, offset_pos, offset_neg, threshold, kappa, loss,
      normalize, eps, alpha):
    return (*_fake_step(x_pos, x_neg, w, stride, padding, dilation), torch.empty_like(w), _grad_bias_like(w, b))


def _step_update(x_pos, x_neg, w, b, w_gemm, stride, padding, dilation, offset_pos, offset_neg, threshold, kappa,
                 loss, normalize, eps, alpha, opt, s1w, s2w, s1b, s2b, hyper, flags):
    opts = _step_options(threshold, kappa, loss, normalize, eps, alpha)
    update = _update(opt, w, b, (s1w, s2w, s1b, s2b), hyper, flags)
    geometry = _geometry(stride, padding, dilation)
    return _conv_step(x_pos, x_neg, w, b, w_gemm, geometry, offset_pos, offset_neg, opts, update)[:3]


_step_update_op = _custom_op("conv_step_update_")(_step_update)


@_step_update_op.register_fake
def _(x_pos, x_neg, w, b, w_gemm, stride, padding, dilation, offset_pos, offset_neg, threshold, kappa, loss,
      normalize, eps, alpha, opt, s1w, s2w, s1b, s2b, hyper, flags):
    return _fake_step(x_pos, x_neg, w, stride, padding, dilation)


def _class_no_update(x, labels, w, b, w_gemm, stride, padding, dilation, num_classes, kappa, temperature, normalize,
                     eps):
    opts = _class_options(num_classes, kappa, temperature, normalize, eps)
    out = _conv_class_step(x, labels, w, b, w_gemm, _geometry(stride, padding, dilation), opts, Update(OPT_NONE))
    return (*out[:4], _grad_bias_like(w, b) if out[4] is None else out[4])


_class_op = _custom_op("conv_class_step")(_class_no_update)


def _fake_class(x, w, stride, padding, dilation, num_classes):
    return (
        x.new_empty((), dtype=torch.float32),
        x.new_empty((x.shape[0], num_classes), dtype=torch.float32),
        _h_like(x, w, x.shape[0], stride, padding, dilation),
    )


@_class_op.register_fake
def _(x, labels, w, b, w_gemm, stride, padding, dilation, num_classes, kappa, temperature, normalize, eps):
    return (*_fake_class(x, w, stride, padding, dilation, num_classes), torch.empty_like(w), _grad_bias_like(w, b))


def _class_update(x, labels, w, b, w_gemm, stride, padding, dilation, num_classes, kappa, temperature, normalize, eps,
                  opt, s1w, s2w, s1b, s2b, hyper, flags):
    opts = _class_options(num_classes, kappa, temperature, normalize, eps)
    update = _update(opt, w, b, (s1w, s2w, s1b, s2b), hyper, flags)
    return _conv_class_step(x, labels, w, b, w_gemm, _geometry(stride, padding, dilation), opts, update)[:3]


_class_update_op = _custom_op("conv_class_step_update_")(_class_update)


@_class_update_op.register_fake
def _(x, labels, w, b, w_gemm, stride, padding, dilation, num_classes, kappa, temperature, normalize, eps, opt, s1w,
      s2w, s1b, s2b, hyper, flags):
    return _fake_class(x, w, stride, padding, dilation, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# The functions ff_kernels.conv calls (inputs already checked there).
# ---------------------------------------------------------------------------------------------------------------
def _update_args(optimizer: FusedOptimizer, w: torch.Tensor, b: torch.Tensor | None) -> tuple:
    """(opt, s1w, s2w, s1b, s2b, hyper, flags) of the update ops for ``optimizer``: the linear step's update record
    (:func:`~ff_kernels.ops.triton.ops.optimizer_update`, which advances Adam's step count), packed."""
    update = optimizer_update(optimizer, w, b)
    return (
        update.kind, update.s1w, update.s2w, update.s1b, update.s2b,
        [float(getattr(update, name)) for name in _HYPER], [bool(getattr(update, name)) for name in _FLAGS],
    )


def _geometry_lists(geometry: ConvGeometry) -> tuple[list[int], list[int], list[int]]:
    return list(geometry.stride), list(geometry.padding), list(geometry.dilation)


def ff_conv2d_step_triton(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: StepOptions,
    geometry: ConvGeometry,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    optimizer: FusedOptimizer | None = None,
    compute_dtype: torch.dtype | None = None,
) -> FFStepOutput:
    """One fused positive/negative conv step; the update (if any) applied in GEMM 2's epilogue, in place. With
    ``compute_dtype``, both GEMMs run in it (h returned in it) and the update is the weight's."""
    (x_pos, x_neg), w_gemm = in_compute_dtype((x_pos, x_neg), weight, compute_dtype)
    step_args = (
        w_gemm, *_geometry_lists(geometry), offset_pos, offset_neg, opts.threshold, opts.kappa, opts.loss,
        opts.normalize, opts.eps, opts.alpha,
    )
    traced = torch.compiler.is_compiling()
    grad_w = grad_b = None
    if optimizer is None:
        step = torch.ops.ff_kernels.triton_conv_step if traced else _step_no_update
        loss, g, h, grad_w, gb = step(x_pos, x_neg, weight, bias, *step_args)
        grad_b = None if bias is None else gb
    else:
        step_update = torch.ops.ff_kernels.triton_conv_step_update_ if traced else _step_update
        loss, g, h = step_update(x_pos, x_neg, weight, bias, *step_args, *_update_args(optimizer, weight, bias))
        if not traced:  # what the custom op's ADInplaceOrView kernel does: saved copies of w, b become stale
            torch.autograd.graph.increment_version(weight if bias is None else (weight, bias))
    return FFStepOutput.from_stacked(loss, g, h, x_pos.shape[0], grad_w, grad_b)


def ff_conv2d_class_step_triton(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    geometry: ConvGeometry,
    optimizer: FusedOptimizer | None = None,
    compute_dtype: torch.dtype | None = None,
) -> FFClassStepOutput:
    """One fused class-goodness conv step; the update (if any) applied in GEMM 2's epilogue, in place. With
    ``compute_dtype``, both GEMMs run in it (h returned in it) and the update is the weight's."""
    update = None if optimizer is None else _update_args(optimizer, weight, bias)
    (x,), w_gemm = in_compute_dtype((x,), weight, compute_dtype)
    return _class_step(x, labels, weight, bias, w_gemm, opts, geometry, update)


def _class_step(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_gemm: torch.Tensor | None,
    opts: ClassStepOptions,
    geometry: ConvGeometry,
    update: tuple | None,
) -> FFClassStepOutput:
    """The class step's op call, ``update`` being :func:`_update_args`'s tuple (None: return the gradients)."""
    class_args = (
        w_gemm, *_geometry_lists(geometry), opts.num_classes, opts.kappa, opts.temperature, opts.normalize, opts.eps
    )
    traced = torch.compiler.is_compiling()
    if update is None:
        step = torch.ops.ff_kernels.triton_conv_class_step if traced else _class_no_update
        loss, g, h, grad_w, gb = step(x, labels, weight, bias, *class_args)
        return FFClassStepOutput(loss, g, h, grad_w, None if bias is None else gb)
    step_update = torch.ops.ff_kernels.triton_conv_class_step_update_ if traced else _class_update
    loss, g, h = step_update(x, labels, weight, bias, *class_args, *update)
    if not traced:
        torch.autograd.graph.increment_version(weight if bias is None else (weight, bias))
    return FFClassStepOutput(loss, g, h, None, None)


# A linear layer as a convolution: a 1x1 kernel over 1x1 images.
_LINEAR_GEOMETRY = ConvGeometry((1, 1), (0, 0), (1, 1))


def ff_linear_class_step_triton(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    optimizer: FusedOptimizer | None = None,
    compute_dtype: torch.dtype | None = None,
) -> FFClassStepOutput:
    """One fused class-goodness linear step: the conv class step on x (B, K) as (B, K, 1, 1) images and the weight
    (N, K) as an (N, K, 1, 1) kernel, so one set of kernels serves both. Views throughout, never copies: the update
    writes through the weight view, and the optimizer state (kept in the weight's (N, K) shape, which the fused
    update checks against the kernel it is given) is viewed the same way. h and grad_weight come back as (B, N)
    and (N, K) views."""
    kernel = weight.view(*weight.shape, 1, 1)
    update = None
    if optimizer is not None:
        opt, s1w, s2w, *rest = _update_args(optimizer, weight, bias)  # the optimizer holds the (N, K) tensor
        update = (opt, *(None if s is None else s.view(kernel.shape) for s in (s1w, s2w)), *rest)
    (x,), w_gemm = in_compute_dtype((x,), kernel, compute_dtype)
    out = _class_step(x.view(*x.shape, 1, 1), labels, kernel, bias, w_gemm, opts, _LINEAR_GEOMETRY, update)
    grad_w = None if out.grad_weight is None else out.grad_weight.view(weight.shape)
    return out._replace(h=out.h.view(x.shape[0], weight.shape[0]), grad_weight=grad_w)


def ff_conv2d_forward_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: ConvGeometry,
    *,
    kappa: float,
    normalize: str,
    eps: float,
    num_classes: int | None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference, GEMM 1 alone: h (in ``compute_dtype``, by default x's dtype) and the goodness (fp32) per sample or
    per (sample, group)."""
    (x,), w_gemm = in_compute_dtype((x,), weight, compute_dtype)
    weight = gemm_weight(weight, w_gemm)
    forward = torch.ops.ff_kernels.triton_conv_forward if torch.compiler.is_compiling() else _forward
    return forward(x, weight, bias, *_geometry_lists(geometry), kappa, normalize, eps, num_classes or 0)
