"""The block-wise head functions (DESIGN 8): ``class_goodness_loss`` and ``class_goodness``.

The boundary, as in ``ff_kernels.functional``: arguments are checked once, the backend is resolved through
``ff_kernels.dispatch``. Unlike the layer steps, these are differentiable: a block's backprop runs through its head's
loss, so the torch backend's closed-form gradients reach autograd through a custom op (``ff_kernels.ops.torch_heads``).
"""

from __future__ import annotations

import torch

from ff_kernels import _options as checks
from ff_kernels import finite
from ff_kernels.functional import resolve_for


def class_goodness_loss(
    h: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """The class-goodness cross-entropy of a block's head, differentiable in h, head_weight and head_bias.

    The head is a 1x1 convolution of (B, C, H, W) images (a linear map of (B, C) rows) to K = num_classes channels:
    a = W h + b; the class goodness is g_bk = mean over positions of a_bk^2, and the loss
    L = mean_b [logsumexp_k(g_bk / tau) - g_{b,y_b} / tau] (DESIGN 7's loss with one channel per class).

    Args:
        h: the block's output, (B, C, H, W) or (B, C); may be bf16/fp16 with an fp32 head (autocast): the head then
            runs in h's dtype and its gradients come back in the parameters' dtypes.
        head_weight, head_bias: (K, C, 1, 1) or (K, C), and (K,) or None: e.g. an ``nn.Conv2d(C, K, 1)``'s.
        labels: (B,) integers in [0, K).
        temperature: tau > 0.
        backend: "auto", "reference" (autograd over plain ops), "torch" (closed-form backward in a custom op)
            or "triton" (fused kernels, ``ff_kernels.ops.triton.class_goodness``).
        check_finite: scan h for NaN/inf (a host sync on a GPU); trainers that check their data once pass False.
            The labels' range is checked whatever it says: at once on the CPU, with the deferred finiteness check
            on a GPU (``ff_kernels.finite``).

    Returns:
        The 0-dim loss, float32 (float64 for float64 h).
    """
    checks.check_flag("check_finite", check_finite)
    weight = checks.check_head(h, head_weight, head_bias, check_finite)
    checks.check_finite_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature!r}")
    on_host = h.device.type == "cpu"
    labels = checks.check_labels(labels, h.shape[0], weight.shape[0], head_weight, on_host)
    if not on_host and h.device.type != "meta":
        finite.defer(h.device, (), labels, weight.shape[0])
    _, loss = resolve_for("class_goodness_loss", backend, head_weight.dtype, head_weight)
    return loss(h, weight, head_bias, labels, float(temperature))


def class_goodness(
    h: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """The head's class goodness g (B, K) in float32 (float64 for float64 h), as in :func:`class_goodness_loss`:
    what prediction reads (softmax(g / tau), argmax)."""
    checks.check_flag("check_finite", check_finite)
    weight = checks.check_head(h, head_weight, head_bias, check_finite)
    _, goodness = resolve_for("class_goodness", backend, head_weight.dtype, head_weight)
    return goodness(h, weight, head_bias)
