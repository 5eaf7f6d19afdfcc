"""The public convolutional and class-goodness functions (DESIGN 7): ``ff_conv2d_step``, ``ff_conv2d_class_step``,
``ff_linear_class_step`` and ``ff_conv2d_forward``.

The boundary, as in ``ff_kernels.functional``: arguments are checked here once, the backend is resolved through
``ff_kernels.dispatch``, the backend runs on trusted inputs, and the update is applied here when the backend does
not fuse it. ``check_finite`` follows ``ff_kernels.finite``: a host scan on the CPU, a deferred device-side check on
the GPU paths. Everything runs under ``torch.no_grad``.
"""

from __future__ import annotations

import torch

from ff_kernels import _options as checks
from ff_kernels import finite
from ff_kernels.functional import (
    FINITE_DEFERRED,
    FINITE_SCAN,
    Route,
    call_step,
    check_optimizer,
    route_for,
)
from ff_kernels.optim import FusedOptimizer
from ff_kernels.types import FFClassStepOutput, FFStepOutput

IntPair = int | tuple[int, int]


@torch.no_grad()
def ff_conv2d_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    threshold: float = 2.0,
    goodness: str = "mean",
    loss: str = "logistic",
    normalize: str = "l2",
    eps: float = 1e-4,
    alpha: float = 4.0,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    optimizer: FusedOptimizer | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> FFStepOutput:
    """One positive/negative FF step of a conv layer (DESIGN 7; Hinton's loss or SymBa, as ``ff_linear_step``).

    Args:
        x_pos, x_neg: (P, C_in, H, W) and (Q, C_in, H, W) images of the same size; the label, if any, travels in
            them (e.g. as extra channels). Either may be empty for the logistic loss; SymBa needs P == Q > 0.
        weight, bias: (C, C_in, kh, kw) and (C,) or None; updated in place when ``optimizer`` is given.
        stride, padding, dilation: as ``F.conv2d`` (an int or an (h, w) pair; groups = 1).
        goodness: "mean" (kappa = 1/(C H' W')) or "sum" of h^2 per sample.
        normalize: r_b over all of C_in * H * W: "l2", "rms" or "none".
        Others as ``ff_linear_step``.

    Returns:
        FFStepOutput with goodness_* (P,), (Q,) and h_* (P, C, H', W'), (Q, C, H', W').
    """
    checks.check_conv_weight_bias(weight, bias)
    checks.check_flag("check_finite", check_finite)
    compute = checks.check_compute_dtype(compute_dtype, weight)
    geometry = checks.check_conv_geometry(stride, padding, dilation)
    route = route_for("conv2d_step", backend, compute, weight)
    scan = check_finite and route.finite == FINITE_SCAN
    x_pos = checks.check_image_input("x_pos", x_pos, weight, geometry, scan, compute)
    x_neg = checks.check_image_input("x_neg", x_neg, weight, geometry, scan, compute)
    if x_pos.dtype != x_neg.dtype:
        raise TypeError(f"x_pos dtype {x_pos.dtype} differs from x_neg dtype {x_neg.dtype}")
    if x_pos.shape[1:] != x_neg.shape[1:]:
        raise ValueError(
            f"x_pos images are {tuple(x_pos.shape[1:])} but x_neg images are {tuple(x_neg.shape[1:])}; they must "
            "match (the two batches run as one)"
        )
    out_h, out_w = geometry.output_size(x_pos.shape[2:], weight.shape[2:])
    opts = checks.check_step_options(
        threshold=threshold,
        goodness=goodness,
        loss=loss,
        normalize=normalize,
        eps=eps,
        alpha=alpha,
        out_features=weight.shape[0] * out_h * out_w,
    )
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    checks.check_pos_neg_rows(opts.loss, rows_pos, rows_neg)
    offset_pos = checks.check_offset("offset_pos", offset_pos, rows_pos, weight, scan)
    offset_neg = checks.check_offset("offset_neg", offset_neg, rows_neg, weight, scan)
    check_optimizer(optimizer, weight, bias)
    _defer_finite(check_finite, route, weight, x_pos=x_pos, x_neg=x_neg, offset_pos=offset_pos, offset_neg=offset_neg)
    args = (x_pos, x_neg, weight, bias, opts, geometry, offset_pos, offset_neg)
    return call_step(route, args, weight, bias, optimizer, compute, False)


@torch.no_grad()
def ff_conv2d_class_step(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_classes: int,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    goodness: str = "mean",
    temperature: float = 1.0,
    normalize: str = "none",
    eps: float = 1e-4,
    optimizer: FusedOptimizer | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> FFClassStepOutput:
    """One class-goodness FF step of a conv layer (CwComp; DESIGN 7): no negative data, no label in the input.

    The C output channels form ``num_classes`` contiguous groups; g_bk is kappa times the sum of h^2 over group k
    and all positions (kappa = 1/(G H' W') for "mean", 1 for "sum"), and the loss is the cross-entropy of
    softmax(g_b / temperature) against ``labels``.

    Args:
        x: (B, C_in, H, W), B > 0. labels: (B,) integers in [0, num_classes).
        check_finite: as ``ff_linear_step``. The labels' range is checked whatever it says: at once on the CPU,
            with the deferred finiteness check on the GPU paths (``ff_kernels.finite``).
        Others as :func:`ff_conv2d_step`.

    Returns:
        FFClassStepOutput: loss, goodness (B, num_classes) float32, h (B, C, H', W'), gradients (None with an
        optimizer).
    """
    checks.check_conv_weight_bias(weight, bias)
    checks.check_flag("check_finite", check_finite)
    compute = checks.check_compute_dtype(compute_dtype, weight)
    geometry = checks.check_conv_geometry(stride, padding, dilation)
    route = route_for("conv2d_class_step", backend, compute, weight)
    scan = check_finite and route.finite == FINITE_SCAN
    x = checks.check_image_input("x", x, weight, geometry, scan, compute)
    _check_not_empty(x)
    out_h, out_w = geometry.output_size(x.shape[2:], weight.shape[2:])
    opts = checks.check_class_options(
        num_classes=num_classes,
        goodness=goodness,
        temperature=temperature,
        normalize=normalize,
        eps=eps,
        channels=weight.shape[0],
        positions=out_h * out_w,
    )
    labels = checks.check_labels(labels, x.shape[0], num_classes, weight, weight.device.type == "cpu")
    check_optimizer(optimizer, weight, bias)
    _defer_finite(check_finite, route, weight, labels, num_classes, x=x)
    args = (x, labels, weight, bias, opts, geometry)
    return call_step(route, args, weight, bias, optimizer, compute, False)


@torch.no_grad()
def ff_linear_class_step(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_classes: int,
    goodness: str = "mean",
    temperature: float = 1.0,
    normalize: str = "l2",
    eps: float = 1e-4,
    optimizer: FusedOptimizer | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> FFClassStepOutput:
    """One class-goodness FF step of a linear layer: :func:`ff_conv2d_class_step` with the N units split into
    ``num_classes`` contiguous groups (kappa = 1/G for "mean"). x is (B, K), weight (N, K); h is (B, N)."""
    checks.check_weight_bias(weight, bias)
    checks.check_flag("check_finite", check_finite)
    compute = checks.check_compute_dtype(compute_dtype, weight)
    route = route_for("linear_class_step", backend, compute, weight)
    scan = check_finite and route.finite == FINITE_SCAN
    x = checks.check_input("x", x, weight, scan, compute)
    _check_not_empty(x)
    opts = checks.check_class_options(
        num_classes=num_classes,
        goodness=goodness,
        temperature=temperature,
        normalize=normalize,
        eps=eps,
        channels=weight.shape[0],
        positions=1,
    )
    labels = checks.check_labels(labels, x.shape[0], num_classes, weight, weight.device.type == "cpu")
    check_optimizer(optimizer, weight, bias)
    _defer_finite(check_finite, route, weight, labels, num_classes, x=x)
    args = (x, labels, weight, bias, opts)
    return call_step(route, args, weight, bias, optimizer, compute, False)


@torch.no_grad()
def ff_conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    goodness: str = "mean",
    normalize: str = "l2",
    eps: float = 1e-4,
    num_classes: int | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference (GEMM 1 alone): h = relu(r_b conv2d(x, W) + b) and its goodness in float32, per sample (B,) or,
    with ``num_classes``, per (sample, class group) (B, num_classes), with the kappa of the matching step."""
    weight, bias = checks.dense_parameters(weight, bias)
    checks.check_conv_weight_bias(weight, bias)
    checks.check_flag("check_finite", check_finite)
    compute = checks.check_compute_dtype(compute_dtype, weight)
    geometry = checks.check_conv_geometry(stride, padding, dilation)
    route = route_for("conv2d_forward", backend, compute, weight)
    x = checks.check_image_input("x", x, weight, geometry, check_finite and route.finite == FINITE_SCAN, compute)
    out_h, out_w = geometry.output_size(x.shape[2:], weight.shape[2:])
    positions = out_h * out_w
    if num_classes is None:
        checks.check_choice("goodness", goodness, checks.GOODNESS)
        checks.check_normalize(normalize, eps)
        kappa = checks.goodness_scale(goodness, weight.shape[0] * positions)
    else:
        kappa = checks.check_class_options(
            num_classes=num_classes,
            goodness=goodness,
            temperature=1.0,
            normalize=normalize,
            eps=eps,
            channels=weight.shape[0],
            positions=positions,
        ).kappa
    _defer_finite(check_finite, route, weight, x=x)
    extra = {"compute_dtype": compute} if route.entry.compute_dtype else {}
    options = dict(kappa=kappa, normalize=normalize, eps=eps, num_classes=num_classes)
    h, g = route.fn(x, weight, bias, geometry, **options, **extra)
    return h, g.to(torch.promote_types(g.dtype, torch.float32))


def _defer_finite(check_finite: bool, route: Route, weight: torch.Tensor, labels: torch.Tensor | None = None,
                  num_classes: int = 0, **named: torch.Tensor | None) -> None:
    """On the GPU paths, fold the inputs (with ``check_finite``) and the labels' range (always) into
    ``ff_kernels.finite``'s device-side check (no host sync)."""
    if route.finite == FINITE_DEFERRED:
        on_device = labels if weight.device.type != "cpu" else None  # on the CPU, checked at once
        if check_finite or on_device is not None:
            finite.defer(weight.device, named.items() if check_finite else (), on_device, num_classes)


def _check_not_empty(x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError("x is empty: the class-goodness loss over zero samples is undefined")
