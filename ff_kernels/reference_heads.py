"""The reference for the block-wise head loss: DESIGN 8 written out in plain differentiable ops, gradients by
autograd. Inputs are assumed checked by the public boundary; ``weight`` is (K, C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ff_kernels.reference_conv import class_loss_ref


def class_goodness_ref(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """g_bk = mean over positions of a_bk^2 for the head a = W h + b (run in h's dtype), in float32 or wider."""
    weight = weight.to(h.dtype)
    bias = None if bias is None else bias.to(h.dtype)
    a = F.linear(h, weight, bias) if h.dim() == 2 else F.conv2d(h, weight[:, :, None, None], bias)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    return a.pow(2).reshape(a.shape[0], a.shape[1], -1).mean(2)


def class_goodness_loss_ref(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """L = mean_b [logsumexp_k(g_bk / tau) - g_{b,y_b} / tau]."""
    return class_loss_ref(class_goodness_ref(h, weight, bias), labels, temperature)
