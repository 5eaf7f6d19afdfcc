"""The reference: DESIGN section 1 written out in PyTorch, gradients by autograd. It defines the numbers.

Slow on purpose: two separate passes for the positive and negative batches, every intermediate materialised.
Every fast path is tested against these functions. Inputs are assumed checked by the public boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ff_kernels._options import StepOptions
from ff_kernels.types import FFStepOutput


def input_scale_ref(x: torch.Tensor, normalize: str, eps: float) -> torch.Tensor:
    """r_i of DESIGN 1.1."""
    if normalize == "l2":
        return 1.0 / (x.norm(dim=1) + eps)
    if normalize == "rms":
        return 1.0 / (x.pow(2).mean(dim=1).sqrt() + eps)
    return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)


def ff_linear_forward_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, kappa: float, normalize: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_i = relu(r_i * (x_i @ W^T) + b) and g_i = kappa * sum_j h_ij^2 (DESIGN 1.1-1.3)."""
    r = input_scale_ref(x, normalize, eps)
    z = r[:, None] * (x @ weight.T)
    if bias is not None:
        z = z + bias
    h = torch.relu(z)
    g = kappa * h.pow(2).sum(dim=1)
    return h, g


def ff_loss_ref(
    g_pos: torch.Tensor,
    g_neg: torch.Tensor,
    *,
    threshold: float,
    loss: str,
    alpha: float,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
) -> torch.Tensor:
    """DESIGN 1.4-1.5: logistic loss on u_i = s_i (g_i + o_i - theta), or SymBa's paired loss."""
    total_pos = g_pos if offset_pos is None else g_pos + offset_pos
    total_neg = g_neg if offset_neg is None else g_neg + offset_neg
    if loss == "symba":
        return F.softplus(-alpha * (total_pos - total_neg)).mean()
    u = torch.cat([total_pos - threshold, -(total_neg - threshold)])
    return F.softplus(-u).mean()


def ff_linear_step_ref(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    *,
    upcast: bool = True,
    loss_scale: float = 1.0,
) -> FFStepOutput:
    """One layer step by autograd over the contract; returns the gradients and leaves the parameters alone.

    ``upcast`` computes in float32 (or float64 when given) whatever the input precision, as the contract asks;
    ``upcast=False`` computes in the input dtype, which is the "same computation in PyTorch at that precision"
    that low-precision tolerances are measured against; for fp16 that computation is done as PyTorch's mixed
    precision does it, with a loss scale (a power of two, as ``torch.amp.GradScaler`` uses) that keeps the
    backward pass out of fp16's subnormal range and is divided out of the gradients in fp32.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32) if upcast else weight.dtype
    w = weight.detach().to(dtype).requires_grad_(True)
    b = None if bias is None else bias.detach().to(dtype).requires_grad_(True)
    with torch.enable_grad():
        h_pos, g_pos = ff_linear_forward_ref(
            x_pos.to(dtype), w, b, kappa=opts.kappa, normalize=opts.normalize, eps=opts.eps
        )
        h_neg, g_neg = ff_linear_forward_ref(
            x_neg.to(dtype), w, b, kappa=opts.kappa, normalize=opts.normalize, eps=opts.eps
        )
        goodness_dtype = torch.promote_types(dtype, torch.float32)
        loss = ff_loss_ref(
            g_pos.to(goodness_dtype),
            g_neg.to(goodness_dtype),
            threshold=opts.threshold,
            loss=opts.loss,
            alpha=opts.alpha,
            offset_pos=offset_pos,
            offset_neg=offset_neg,
        )
        params = [w] if b is None else [w, b]
        grads = torch.autograd.grad(loss * loss_scale, params, allow_unused=True)
    grads = [None if g is None else g.to(goodness_dtype) / loss_scale for g in grads]
    grad_w = grads[0] if grads[0] is not None else torch.zeros_like(w)
    grad_b = None if b is None else (grads[1] if grads[1] is not None else torch.zeros_like(b))
    return FFStepOutput(
        loss=loss.detach().to(goodness_dtype),
        goodness_pos=g_pos.detach().to(goodness_dtype),
        goodness_neg=g_neg.detach().to(goodness_dtype),
        h_pos=h_pos.detach().to(x_pos.dtype),
        h_neg=h_neg.detach().to(x_neg.dtype),
        grad_weight=grad_w.to(weight.dtype),
        grad_bias=None if grad_b is None else grad_b.to(weight.dtype),
    )
