"""The block-wise head loss in closed form (``backend="torch"``): two ``torch.library`` custom ops with fakes and an
autograd formula, so the loss is one differentiable op that ``torch.compile`` keeps whole (DESIGN 8).

Forward (``ff_kernels::class_goodness_loss``): the head a = W h + b (a 1x1 convolution of (B, C, H, W) images, a
linear map of (B, C) rows), class goodness g_bk = mean over positions of a_bk^2, and the loss
L = mean_b [logsumexp_k(g_bk / tau) - g_{b,y_b} / tau] (DESIGN 7 with kappa = 1 / positions). It returns a for the
backward, which is what autograd would save of the head anyway.

Backward (``ff_kernels::class_goodness_loss_backward``): with c_bk = 2 kappa dL/dg_bk (the per-sample step of the
class-goodness conv step, scaled by the incoming gradient), G = c (.) a, and the three gradients are the head's
transposed products of G: dL/dh = W^T G, dL/dW = G h^T, dL/db = sum G (one ``convolution_backward`` call for images,
two ``torch.mm`` for rows). Nothing of softmax, logsumexp or the squares is kept for autograd.

The head runs in h's dtype (under bf16 autocast the block's bf16 output meets an fp32 head); goodness and loss are
fp32 (fp64 for fp64 inputs); gradients come back in their inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ff_kernels._options import ClassStepOptions
from ff_kernels.ops.scaling import narrow_exponent
from ff_kernels.ops.torch_conv import class_loss_and_coefficient
from ff_kernels.ops.torch_step import accumulate_dtype

_FORWARD = "(Tensor h, Tensor weight, Tensor? bias, Tensor labels, float temperature) -> (Tensor, Tensor, Tensor)"
_BACKWARD = (
    "(Tensor grad_loss, Tensor? grad_goodness, Tensor h, Tensor weight, Tensor a, Tensor goodness, Tensor labels, "
    "float temperature, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)


def head_output(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a = W h + b in h's dtype; ``weight`` is (K, C)."""
    weight = weight.to(h.dtype)
    bias = None if bias is None else bias.to(h.dtype)
    if h.dim() == 2:
        return F.linear(h, weight, bias)
    return F.conv2d(h, weight[:, :, None, None], bias)


def positions(h: torch.Tensor) -> int:
    return h[0, 0].numel()


def _options(classes: int, temperature: float, positions: int) -> ClassStepOptions:
    """The class-goodness options of a head: one channel per class, goodness the mean over positions."""
    return ClassStepOptions(
        num_classes=classes, goodness="mean", temperature=temperature, normalize="none", eps=0.0, kappa=1.0 / positions
    )


def head_goodness(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, a): the class goodness (B, K) in fp32 (fp64 for fp64 h) and the head output. One reduction over the
    positions in whatever layout a has (a channels-last a is not copied)."""
    a = head_output(h, weight, bias)
    acc = accumulate_dtype(a.dtype)
    if a.dim() == 2:
        return a.to(acc).square(), a
    return torch.linalg.vector_norm(a, dim=(2, 3), dtype=acc).square_().div_(positions(h)), a


def coefficient_times_a(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """G = dL/da: c_bk on every position of a_bk, in a's layout; in a's dtype, or fp32 for fp16 a (as
    ``coefficient_times_h`` of the conv step: c a can leave fp16's range)."""
    coefficient = c if narrow_exponent(a.dtype) else c.to(a.dtype)
    return a * (coefficient if a.dim() == 2 else coefficient[:, :, None, None])


def class_goodness_torch(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Inference: the class goodness alone."""
    return head_goodness(h, weight, bias)[0]


@torch.library.custom_op("ff_kernels::class_goodness_loss", mutates_args=(), schema=_FORWARD)
def _forward_op(h, weight, bias, labels, temperature):
    with torch.autocast(h.device.type, enabled=False):
        g, a = head_goodness(h, weight, bias)
    loss, _ = class_loss_and_coefficient(g, labels, _options(weight.shape[0], temperature, positions(h)))
    return loss, g, a


@_forward_op.register_fake
def _(h, weight, bias, labels, temperature):
    acc = accumulate_dtype(h.dtype)
    rows, classes = h.shape[0], weight.shape[0]
    loss, goodness = h.new_empty((), dtype=acc), h.new_empty((rows, classes), dtype=acc)
    return loss, goodness, h.new_empty((rows, classes, *h.shape[2:]))


@torch.library.custom_op("ff_kernels::class_goodness_loss_backward", mutates_args=(), schema=_BACKWARD)
def _backward_op(grad_loss, grad_goodness, h, weight, a, goodness, labels, temperature, output_mask):
    kappa = 1.0 / positions(h)
    _, c = class_loss_and_coefficient(goodness, labels, _options(weight.shape[0], temperature, positions(h)))
    c.mul_(grad_loss)
    if grad_goodness is not None:
        c.add_(grad_goodness, alpha=2.0 * kappa)
    grad_a = coefficient_times_a(a, c)
    need_h, need_w, need_b = output_mask
    with torch.autocast(h.device.type, enabled=False):
        return _head_grads(grad_a, h, weight, need_h, need_w, need_b)


def _head_grads(
    grad_a: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, need_h: bool, need_w: bool, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's transposed products of G = dL/da, in G's dtype, returned in h's and the weight's dtypes (an empty
    tensor for each gradient not asked for)."""
    classes = weight.shape[0]
    if h.dim() == 2:
        grad_h = torch.mm(grad_a, weight.to(grad_a.dtype)) if need_h else None
        grad_w = torch.mm(grad_a.t(), h.to(grad_a.dtype)) if need_w else None
        grad_b = grad_a.sum(0) if need_b else None
    else:
        grad_h, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_a,
            h.to(grad_a.dtype),
            weight[:, :, None, None].to(grad_a.dtype),
            [classes] if need_b else None,
            [1, 1],
            [0, 0],
            [1, 1],
            False,
            [0, 0],
            1,
            [need_h, need_w, need_b],
        )
    return (
        weight.new_empty((0,)) if grad_h is None else grad_h.to(h.dtype),
        weight.new_empty((0,)) if grad_w is None else grad_w.view(weight.shape).to(weight.dtype),
        weight.new_empty((0,)) if grad_b is None else grad_b.to(weight.dtype),
    )


@_backward_op.register_fake
def _(grad_loss, grad_goodness, h, weight, a, goodness, labels, temperature, output_mask):
    need_h, need_w, need_b = output_mask
    return (
        torch.empty_like(h) if need_h else weight.new_empty((0,)),
        torch.empty_like(weight) if need_w else weight.new_empty((0,)),
        weight.new_empty((weight.shape[0] if need_b else 0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    h, weight, bias, labels, temperature = inputs
    _, goodness, a = output
    ctx.mark_non_differentiable(a)
    ctx.save_for_backward(h, weight, a, goodness, labels)
    ctx.temperature = temperature
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, grad_goodness, _grad_a):
    h, weight, a, goodness, labels = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_h, grad_w, grad_b = _backward_op(
        grad_loss, grad_goodness, h, weight, a, goodness, labels, ctx.temperature, mask
    )
    return grad_h if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def class_goodness_loss_torch(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The loss through the custom op (checked inputs; ``weight`` is (K, C))."""
    return _forward_op(h, weight, bias, labels, temperature)[0]
