"""The reference for convolutional and class-goodness steps: DESIGN section 7 written out, gradients by autograd.

Like ``ff_kernels.reference`` it defines the numbers and is slow on purpose: positive and negative batches run in
separate passes and every intermediate is materialised. Inputs are assumed checked by the public boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ff_kernels._options import ClassStepOptions, ConvGeometry, StepOptions
from ff_kernels.reference import ff_linear_forward_ref, ff_loss_ref, input_scale_ref
from ff_kernels.types import FFClassStepOutput, FFStepOutput


def conv2d_relu_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: ConvGeometry,
    normalize: str,
    eps: float,
) -> torch.Tensor:
    """h = relu(r_b * conv2d(x_b, W) + b), with r_b computed over all of C_in * H * W (DESIGN 7)."""
    r = input_scale_ref(x.flatten(1), normalize, eps)
    z = r[:, None, None, None] * F.conv2d(x, weight, None, geometry.stride, geometry.padding, geometry.dilation)
    if bias is not None:
        z = z + bias[:, None, None]
    return torch.relu(z)


def linear_relu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, normalize: str, eps: float
) -> torch.Tensor:
    """h = relu(r_i * (x_i @ W^T) + b) (DESIGN 1.1-1.2)."""
    return ff_linear_forward_ref(x, weight, bias, kappa=1.0, normalize=normalize, eps=eps)[0]


def sample_goodness_ref(h: torch.Tensor, kappa: float) -> torch.Tensor:
    """g_b = kappa * sum over channels and positions of h^2."""
    return kappa * h.pow(2).flatten(1).sum(dim=1)


def class_goodness_ref(h: torch.Tensor, num_classes: int, kappa: float) -> torch.Tensor:
    """g_bk = kappa * sum of h^2 over group k's channels (or units) and all positions; groups are contiguous."""
    group = h.shape[1:].numel() // num_classes  # not -1, which an empty batch or layer leaves undetermined
    return kappa * h.pow(2).reshape(h.shape[0], num_classes, group).sum(dim=2)


def class_loss_ref(g: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """L = (1/B) sum_b [logsumexp_k(g_bk / tau) - g_{b, y_b} / tau]."""
    logits = g / temperature
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)).mean()


def ff_conv2d_forward_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: ConvGeometry,
    *,
    kappa: float,
    normalize: str,
    eps: float,
    num_classes: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h and the goodness per sample (``num_classes=None``) or per (sample, class group)."""
    h = conv2d_relu_ref(x, weight, bias, geometry, normalize, eps)
    if num_classes is None:
        return h, sample_goodness_ref(h, kappa)
    return h, class_goodness_ref(h, num_classes, kappa)


def ff_conv2d_step_ref(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: StepOptions,
    geometry: ConvGeometry,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    *,
    upcast: bool = True,
    loss_scale: float = 1.0,
) -> FFStepOutput:
    """The positive/negative conv step: per-sample goodness, then DESIGN 1.4-1.5's loss. ``upcast`` and
    ``loss_scale`` as in ``ff_kernels.reference.ff_linear_step_ref``."""
    dtype, goodness_dtype = _dtypes(weight, upcast)
    w, b = _leaves(weight, bias, dtype)
    with torch.enable_grad():
        h_pos = conv2d_relu_ref(x_pos.to(dtype), w, b, geometry, opts.normalize, opts.eps)
        h_neg = conv2d_relu_ref(x_neg.to(dtype), w, b, geometry, opts.normalize, opts.eps)
        g_pos = sample_goodness_ref(h_pos, opts.kappa).to(goodness_dtype)
        g_neg = sample_goodness_ref(h_neg, opts.kappa).to(goodness_dtype)
        loss = ff_loss_ref(
            g_pos,
            g_neg,
            threshold=opts.threshold,
            loss=opts.loss,
            alpha=opts.alpha,
            offset_pos=offset_pos,
            offset_neg=offset_neg,
        )
        grad_weight, grad_bias = _gradients(loss, w, b, loss_scale, weight.dtype)
    return FFStepOutput(
        loss=loss.detach().to(goodness_dtype),
        goodness_pos=g_pos.detach(),
        goodness_neg=g_neg.detach(),
        h_pos=h_pos.detach().to(x_pos.dtype),
        h_neg=h_neg.detach().to(x_neg.dtype),
        grad_weight=grad_weight,
        grad_bias=grad_bias,
    )


def ff_conv2d_class_step_ref(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    geometry: ConvGeometry,
    *,
    upcast: bool = True,
    loss_scale: float = 1.0,
) -> FFClassStepOutput:
    """The class-goodness conv step (CwComp): goodness per (sample, channel group), cross-entropy over g / tau."""
    layer = partial(conv2d_relu_ref, geometry=geometry, normalize=opts.normalize, eps=opts.eps)
    return _class_step_ref(layer, x, labels, weight, bias, opts, upcast, loss_scale)


def ff_linear_class_step_ref(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    *,
    upcast: bool = True,
    loss_scale: float = 1.0,
) -> FFClassStepOutput:
    """The class-goodness linear step: as the conv step, with groups of units instead of channels."""
    layer = partial(linear_relu_ref, normalize=opts.normalize, eps=opts.eps)
    return _class_step_ref(layer, x, labels, weight, bias, opts, upcast, loss_scale)


def _class_step_ref(
    layer: Callable[..., torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    upcast: bool,
    loss_scale: float,
) -> FFClassStepOutput:
    dtype, goodness_dtype = _dtypes(weight, upcast)
    w, b = _leaves(weight, bias, dtype)
    with torch.enable_grad():
        h = layer(x.to(dtype), w, b)
        g = class_goodness_ref(h, opts.num_classes, opts.kappa).to(goodness_dtype)
        loss = class_loss_ref(g, labels, opts.temperature)
        grad_weight, grad_bias = _gradients(loss, w, b, loss_scale, weight.dtype)
    return FFClassStepOutput(
        loss=loss.detach(), goodness=g.detach(), h=h.detach().to(x.dtype), grad_weight=grad_weight, grad_bias=grad_bias
    )


def _dtypes(weight: torch.Tensor, upcast: bool) -> tuple[torch.dtype, torch.dtype]:
    """The compute dtype (float32 or wider with ``upcast``, else the weight's) and the goodness/loss dtype."""
    dtype = torch.promote_types(weight.dtype, torch.float32) if upcast else weight.dtype
    return dtype, torch.promote_types(dtype, torch.float32)


def _leaves(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = weight.detach().to(dtype).requires_grad_(True)
    return w, None if bias is None else bias.detach().to(dtype).requires_grad_(True)


def _gradients(
    loss: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, loss_scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dL/dW and dL/db by autograd, the loss scale divided out in the loss's precision, returned in ``dtype``."""
    params = [w] if b is None else [w, b]
    grads = torch.autograd.grad(loss * loss_scale, params, allow_unused=True)
    grads = [
        torch.zeros_like(p, dtype=loss.dtype) if g is None else g.to(loss.dtype) / loss_scale
        for g, p in zip(grads, params)
    ]
    return grads[0].to(dtype), None if b is None else grads[1].to(dtype)
