"""The closed-form conv and class-goodness steps in plain PyTorch (``backend="torch"``): no autograd.

The linear step of ``torch_step`` with its two matrix products written as convolutions (DESIGN 7), on any device:

- positives and negatives stacked into one channels-last batch, r_b x_b written in the stacking copy (oneDNN and
  cuDNN run channels-last convolutions without reordering activations, and much faster where the step is not
  compute-bound: 2.4x in fp32 and 4.6x in bf16 for a 3-channel first layer on the CPU);
- GEMM 1: h = relu(conv2d(r x, W) + b) (``F.conv2d``, the ReLU fused into oneDNN's convolution on the CPU), then
  the sum of squares of h per sample, or per (sample, class group) for the class-goodness loss;
- the per-sample step: the loss and the coefficients c (one per sample, or per sample and group);
- GEMM 2: the convolution's weight and bias gradients for the input r x and the output gradient (c / 2^s) h, in one
  ``aten.convolution_backward`` call, then 2^s undone in fp32 (the operand rule of ``ff_kernels.ops.scaling``;
  for fp16 GEMM 2 runs in fp32, see :func:`coefficient_times_h`).

On the CPU the passes between the two products avoid ATen's slow paths: no mixed-dtype elementwise op
(:func:`scale_into`), the goodness reduced a cache-sized slab at a time (:func:`group_goodness`), narrow channel rows
folded into wide ones (:func:`folded_positions`), and GEMM 2's operand written into a buffer reused from step to step
(:func:`scratch`). Measured against ``torch.compile`` of the same step by ``ff-kernels bench --op conv``.

Class groups are views in either memory layout (the channel dimension split in two), so h is never copied. The
class-goodness linear step is the same with ``torch.mm`` for the two products.

``compute_dtype`` as for linear layers: the products run in that dtype, while goodness, loss, coefficients and the
returned gradients stay float32.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ff_kernels._options import ClassStepOptions, ConvGeometry, StepOptions
from ff_kernels.ops.scaling import class_coefficient_scale, coefficient_scale, narrow_exponent
from ff_kernels.ops.torch_step import (
    accumulate_dtype,
    affine_relu,
    input_scale,
    loss_and_coefficient,
    stack_scaled_rows,
    unscale,
)
from ff_kernels.types import FFClassStepOutput, FFStepOutput


def scaled_rows(x: torch.Tensor, dtype: torch.dtype, normalize: str, eps: float) -> torch.Tensor:
    """The operand of both products of a class-goodness linear step, (B, K) in ``dtype``, holding r_i x_i.

    ``stack_scaled_rows`` with the scale never deferred to the output: a deferred r_i would have to be kept out of
    the bias gradient (sum c h, not sum c r h), costing a second h-sized tensor.
    """
    xs, r = stack_scaled_rows(x, x[:0], dtype, normalize, eps)
    return xs if r is None else torch.mul(xs, r.unsqueeze(1), out=torch.empty_like(xs))


def scaled_images(
    x_pos: torch.Tensor, x_neg: torch.Tensor, dtype: torch.dtype, normalize: str, eps: float
) -> torch.Tensor:
    """The operand of both convolutions: x_pos and x_neg stacked, (P+Q, C_in, H, W) channels-last in ``dtype``,
    holding r_b x_b (the product formed in fp32 and rounded once, in the pass that copies)."""
    rows_pos = x_pos.shape[0]
    out = torch.empty((rows_pos + x_neg.shape[0], *x_pos.shape[1:]), dtype=dtype, device=x_pos.device,
                      memory_format=torch.channels_last)
    for part, rows in ((x_pos, out[:rows_pos]), (x_neg, out[rows_pos:])):
        scale_into(rows, part, normalize, eps)
    return out


def scale_into(out: torch.Tensor, x: torch.Tensor, normalize: str, eps: float) -> None:
    """out = r_b x_b, formed in the accumulate dtype and rounded once into ``out``'s dtype.

    Never as one mixed-dtype ``torch.mul`` (a bf16 operand or output beside the fp32 scale): ATen runs those
    elementwise loops unvectorized, casting element by element, 10x slower than widening x first, scaling that
    copy in place and rounding in the copy into ``out`` (5 ms of a 20 ms bf16 first-layer step on the CPU).
    """
    if normalize == "none":
        out.copy_(x)
        return
    wide = x.to(accumulate_dtype(x.dtype))
    r = input_scale(wide, normalize, eps).view(-1, *([1] * (x.dim() - 1)))
    if wide is not x:
        out.copy_(wide.mul_(r))
    elif out.dtype == x.dtype:
        torch.mul(x, r, out=out)
    else:
        out.copy_(x * r)


def conv_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry
) -> torch.Tensor:
    """GEMM 1: h = relu(conv2d(r x, W) + b) on the operand of :func:`scaled_images` (h is channels-last too); on
    the CPU the ReLU is fused into oneDNN's convolution where that runs (one pass over h less; under
    ``torch.compile`` inductor makes this fusion itself)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and fused_conv_relu_runs(x.dtype):
        padding, stride, dilation = (list(v) for v in (geometry.padding, geometry.stride, geometry.dilation))
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, 1, "relu", [], "")
    return F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation).relu_()


@functools.cache
def fused_conv_relu_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused convolution + ReLU (``mkldnn::_convolution_pointwise``, the op inductor emits for
    this fusion) runs for ``dtype`` on this CPU and equals ``F.conv2d`` then ReLU; probed once per dtype (fp64 has
    no oneDNN path, and fp16 needs AVX512-FP16 or AVX-NE-CONVERT)."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(4, 3, 3, 2, generator=gen).to(dtype), torch.randn(4, generator=gen).to(dtype)
    try:
        fused = op(x, weight, bias, [1, 0], [2, 1], [1, 2], 1, "relu", [], "")
    except RuntimeError:
        return False
    return torch.equal(fused, F.conv2d(x, weight, bias, (2, 1), (1, 0), (1, 2)).relu_())


def channels_innermost(h: torch.Tensor) -> torch.Tensor:
    """h as (B, positions, C) with the channels (or units) contiguous: a view of (B, N) rows and of channels-last
    images (the layout of :func:`conv_relu`'s output), so a class group is a contiguous run at every position."""
    return h.movedim(1, -1).reshape(h.shape[0], math.prod(h.shape[2:]), h.shape[1])  # B may be 0


def folded_positions(hv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``hv`` (B, P, C) viewed as (B, P / m, m C) and m, a power of two dividing P with m C <= ``FOLD_WIDTH``.

    ATen's CPU elementwise and reduction loops vectorize only the innermost dimension, in blocks of 2 vectors (64
    bf16 or 32 fp32 elements) with a scalar tail: a per-channel operation on (B, P, 60) runs every bf16 element
    in the scalar tail. Folding m positions into the inner dimension (the per-channel operand repeated m times)
    makes the tail a small fraction: 1.4x faster for the 60-channel first layer in bf16. Wide rows stay as they are.
    """
    rows, positions, channels = hv.shape
    m = 1
    while channels < FOLD_BELOW and positions % (2 * m) == 0 and 2 * m * channels <= FOLD_WIDTH:
        m *= 2
    return hv.reshape(rows, positions // m, m * channels), m


# Inner width of :func:`folded_positions` (elements; beyond about 1000 the gain is flat), and the channel counts
# it folds: below one 64-element block (with 120 or 240 channels folding measured no faster, or slower). The
# extension's goodness pass (csrc/cpu/kernels_impl.h, kFoldBelow and kFoldWidth) folds with the same bounds.
FOLD_WIDTH = 1024
FOLD_BELOW = 64


def group_goodness(h: torch.Tensor, groups: int, kappa: float) -> torch.Tensor:
    """(B, groups): kappa times the sum of h^2 over each of ``groups`` contiguous channel (or unit) groups and all
    positions, accumulated in fp32: per-channel sums over the positions, then over each group. The squares are
    formed in fp32 too (from the exact widened h, as inductor's fused reduction does).

    On the CPU a slab of samples at a time, so that the widened squares stay in the cache: ``sum(dtype=fp32)``
    of a bf16 tensor writes a full fp32 copy to memory and reads it back, which made this reduction half of a
    bf16 first-layer step (a cast pass, a square pass and a sum pass over an 8 M-element h); and with the
    positions folded into the inner dimension (:func:`folded_positions`).
    """
    hv = channels_innermost(h)
    rows, channels = hv.shape[0], hv.shape[2]
    step, fold = rows, 1
    if h.device.type == "cpu" and not torch.compiler.is_compiling():
        step = max(1, SLAB_ELEMENTS // max(1, hv.shape[1] * channels))
        hv, fold = folded_positions(hv)
    sums = [wide_squares(slab).sum(dim=1) for slab in hv.split(step)]
    per_channel = sums[0] if len(sums) == 1 else torch.cat(sums)
    if fold > 1:
        per_channel = per_channel.view(rows, fold, channels).sum(dim=1)
    return per_channel.view(rows, groups, channels // groups).sum(dim=2).mul_(kappa)


# The goodness function of the steps below, (h, groups, kappa) -> (B, groups): group_goodness, or a backend's own.
Goodness = Callable[[torch.Tensor, int, float], torch.Tensor]


def wide_squares(t: torch.Tensor) -> torch.Tensor:
    """t^2 elementwise in the accumulate dtype (a fresh tensor)."""
    wide = t.to(accumulate_dtype(t.dtype))
    return wide.square_() if wide is not t else t * t


# Elements of h widened at a time by the CPU reductions: 2 MB of fp32, about the L2 cache of one core.
SLAB_ELEMENTS = 1 << 19


def class_loss_and_coefficient(
    g: torch.Tensor, labels: torch.Tensor, opts: ClassStepOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample step of the class-goodness loss: L = mean_b [logsumexp(g_b / tau) - g_{b,y_b} / tau] and
    c_bk = 2 kappa (softmax_k(g_b / tau) - [k = y_b]) / (B tau)."""
    rows = g.shape[0]
    logits = g / opts.temperature
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    loss = (lse - logits.gather(1, labels.unsqueeze(1))).mean()
    c = logits.sub_(lse).exp_()
    c.scatter_add_(1, labels.unsqueeze(1), c.new_full((rows, 1), -1.0))
    return loss, c.mul_(2.0 * opts.kappa / (rows * opts.temperature))


def coefficient_times_h(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """GEMM 2's output-side operand, in h's shape and layout: c_bk on every element of sample b's group k of h;
    ``c`` is (B, groups). Applied as one coefficient per channel along the contiguous channel dimension.

    In h's dtype, except fp16, where it is fp32 and GEMM 2 runs in fp32 on the fp16-rounded operands: a
    convolution sums B H' W' products into each weight-gradient entry, so the gradient over 2^s can leave fp16's
    range though both operands lie within it, and ATen writes an fp16 product in fp16 before 2^s can be undone (a
    fused kernel keeps its fp32 accumulator until then).
    """
    per_channel = c.repeat_interleave(h.shape[1] // c.shape[1], dim=1)
    if not narrow_exponent(h.dtype):
        per_channel = per_channel.to(h.dtype)
    hv = channels_innermost(h)
    if h.device.type != "cpu" or torch.compiler.is_compiling() or not hv.is_contiguous():
        product = hv * per_channel.unsqueeze(1)
    else:
        product = scratch(hv.numel(), per_channel.dtype, h.device).view(hv.shape)
        folded, fold = folded_positions(hv) if h.dtype == torch.bfloat16 else (hv, 1)
        torch.mul(folded, per_channel.repeat(1, fold).unsqueeze(1), out=product.view(folded.shape))
    return product.view(h.shape[0], *h.shape[2:], h.shape[1]).movedim(-1, 1)


_SCRATCH = threading.local()

# The largest scratch buffer kept between steps (bytes); larger ones are allocated per call.
SCRATCH_MAX_BYTES = 256 << 20


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat CPU buffer of ``numel`` elements for a transient that dies within the step (GEMM 2's operand),
    reused from step to step: one per thread, grown to the largest request. A step's peak is unchanged; between
    steps the thread keeps that one buffer (at most ``SCRATCH_MAX_BYTES``).

    A fresh h-sized buffer costs page faults on the CPU: glibc returns the freed operand and h together to the
    system (together they pass its trim threshold), so every step faulted them back in, zero-filled by the kernel:
    about as much system time as user time in a bf16 first-layer step.
    """
    size = numel * dtype.itemsize
    if size > SCRATCH_MAX_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    held = getattr(_SCRATCH, "buffer", None)
    if held is None or held.device != device or held.numel() < size:
        _SCRATCH.buffer = None  # freed before its successor is allocated
        held = _SCRATCH.buffer = torch.empty(size, dtype=torch.uint8, device=device)
    return held[:size].view(dtype)


def conv_parameter_grads(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geometry: ConvGeometry,
    with_bias: bool,
    scale: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GEMM 2: the weight (and bias) gradient of conv2d for input ``x`` and output gradient ``grad_out`` in one
    call, in ``grad_out``'s dtype, times the coefficient scale 2^s in fp32, returned in ``dtype``."""
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out,
        x.to(grad_out.dtype),
        weight.to(grad_out.dtype),
        [weight.shape[0]] if with_bias else None,
        geometry.stride,
        geometry.padding,
        geometry.dilation,
        False,
        [0, 0],
        1,
        [False, True, with_bias],
    )
    grad_weight = unscale(grad_weight, scale, dtype).contiguous()  # oneDNN may give it channels-last strides
    return grad_weight, unscale(grad_bias, scale, dtype) if with_bias else None


def _cast(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def ff_conv2d_forward_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: ConvGeometry,
    *,
    kappa: float,
    normalize: str,
    eps: float,
    num_classes: int | None,
    compute_dtype: torch.dtype,
    goodness: Goodness = group_goodness,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference (GEMM 1 alone): h in ``compute_dtype`` and the goodness per sample or per (sample, group)."""
    xs = scaled_images(x, x[:0], compute_dtype, normalize, eps)
    h = conv_relu(xs, *_cast(weight, bias, compute_dtype), geometry)
    g = goodness(h, num_classes or 1, kappa)
    return h, g if num_classes else g.squeeze(1)


def ff_conv2d_step_torch(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: StepOptions,
    geometry: ConvGeometry,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype,
    goodness: Goodness = group_goodness,
) -> FFStepOutput:
    """The positive/negative conv step: one coefficient per sample, DESIGN 1.4-1.6 on the per-sample goodness."""
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    x = scaled_images(x_pos, x_neg, compute_dtype, opts.normalize, opts.eps)
    w, b = _cast(weight, bias, compute_dtype)
    h = conv_relu(x, w, b, geometry)
    g = goodness(h, 1, opts.kappa).squeeze(1)
    loss, c = loss_and_coefficient(g[:rows_pos], g[rows_pos:], opts, offset_pos, offset_neg)
    scale = coefficient_scale(opts, rows_pos, rows_neg)
    grad_out = coefficient_times_h(h, c.div_(scale).unsqueeze(1))
    grad_weight, grad_bias = conv_parameter_grads(grad_out, x, w, geometry, bias is not None, scale, weight.dtype)
    return FFStepOutput.from_stacked(loss, g, h, rows_pos, grad_weight, grad_bias)


def ff_conv2d_class_step_torch(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    geometry: ConvGeometry,
    *,
    compute_dtype: torch.dtype,
    goodness: Goodness = group_goodness,
) -> FFClassStepOutput:
    """The class-goodness conv step: one coefficient per (sample, channel group)."""
    xs = scaled_images(x, x[:0], compute_dtype, opts.normalize, opts.eps)
    w, b = _cast(weight, bias, compute_dtype)
    h = conv_relu(xs, w, b, geometry)
    g = goodness(h, opts.num_classes, opts.kappa)
    loss, c = class_loss_and_coefficient(g, labels, opts)
    scale = class_coefficient_scale(opts, x.shape[0])
    grad_out = coefficient_times_h(h, c.div_(scale))
    grad_weight, grad_bias = conv_parameter_grads(grad_out, xs, w, geometry, bias is not None, scale, weight.dtype)
    return FFClassStepOutput(loss, g, h, grad_weight, grad_bias)


def ff_linear_class_step_torch(
    x: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: ClassStepOptions,
    *,
    compute_dtype: torch.dtype,
    goodness: Goodness = group_goodness,
) -> FFClassStepOutput:
    """The class-goodness linear step: one coefficient per (sample, group of units)."""
    xs = scaled_rows(x, compute_dtype, opts.normalize, opts.eps)
    w, b = _cast(weight, bias, compute_dtype)
    h = affine_relu(xs, w, b, None)
    g = goodness(h, opts.num_classes, opts.kappa)
    loss, c = class_loss_and_coefficient(g, labels, opts)
    scale = class_coefficient_scale(opts, x.shape[0])
    grad_out = coefficient_times_h(h, c.div_(scale))
    grad_weight = unscale(torch.mm(grad_out.t(), xs.to(grad_out.dtype)), scale, weight.dtype)
    grad_bias = None
    if bias is not None:
        grad_bias = unscale(grad_out.sum(dim=0, dtype=accumulate_dtype(grad_out.dtype)), scale, weight.dtype)
    return FFClassStepOutput(loss, g, h, grad_weight, grad_bias)
