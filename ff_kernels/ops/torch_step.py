"""The closed-form layer step in plain PyTorch (``backend="torch"``): no autograd, one stacked GEMM per direction.

Positive and negative rows are stacked into one (M, K) batch, so the forward and the weight gradient are one
GEMM each. The per-row scale r_i is applied to the GEMM output (never to a copy of x), and the gradient's row
coefficient c_i r_i is applied to whichever of h (M, N) or x (M, K) is smaller. Works on any device.

``compute_dtype`` (e.g. bfloat16) runs the two GEMMs in that dtype with fp32 accumulation inside the GEMM, while
goodness, loss, coefficients and the returned gradients stay float32 (the optimizer keeps fp32 master weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ff_kernels._options import StepOptions
from ff_kernels.types import FFStepOutput


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Goodness, loss and row scales are float32 at least (float64 stays float64, for gradchecks)."""
    return torch.promote_types(dtype, torch.float32)


def input_scale(x: torch.Tensor, normalize: str, eps: float) -> torch.Tensor | None:
    """r_i of DESIGN 1.1 in float32, or None for ``normalize="none"`` (r_i = 1, nothing to apply)."""
    if normalize == "none":
        return None
    norm = torch.linalg.vector_norm(x, dim=1, dtype=accumulate_dtype(x.dtype))
    if normalize == "rms":
        norm = norm.mul_(x.shape[1] ** -0.5)
    return norm.add_(eps).reciprocal_()


def forward_stacked(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, kappa: float, normalize: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GEMM 1 and its epilogue: returns h (M, N) in x's dtype, goodness g (M,) in fp32 and the row scale r."""
    r = input_scale(x, normalize, eps)
    if r is None and bias is not None:
        h = torch.addmm(bias, x, weight.t())
    else:
        h = torch.mm(x, weight.t())
        if r is not None:
            h.mul_(r.to(h.dtype).unsqueeze(1))
        if bias is not None:
            h.add_(bias)
    h.relu_()
    g = torch.linalg.vector_norm(h, dim=1, dtype=accumulate_dtype(h.dtype)).square_().mul_(kappa)
    return h, g, r


def loss_and_coefficient(
    g_pos: torch.Tensor,
    g_neg: torch.Tensor,
    opts: StepOptions,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row step (DESIGN 1.5-1.6): the loss (0-dim, float32 or wider) and c_i = 2 kappa dL/dg_i per row."""
    total_pos = g_pos if offset_pos is None else g_pos + offset_pos
    total_neg = g_neg if offset_neg is None else g_neg + offset_neg
    if opts.loss == "symba":
        rows = g_pos.shape[0]
        margin = total_pos - total_neg
        loss = F.softplus(-opts.alpha * margin).mean()
        dloss_dmargin = torch.sigmoid(-opts.alpha * margin).mul_(-opts.alpha / rows)
        c = torch.cat([dloss_dmargin, -dloss_dmargin])
    else:
        rows = g_pos.shape[0] + g_neg.shape[0]
        logit_pos = total_pos - opts.threshold
        logit_neg = opts.threshold - total_neg
        loss = (F.softplus(-logit_pos).sum() + F.softplus(-logit_neg).sum()) / rows
        c = torch.cat([torch.sigmoid(-logit_pos).neg_(), torch.sigmoid(-logit_neg)]).div_(rows)
    return loss, c.mul_(2.0 * opts.kappa)


def stack_rows(x_pos: torch.Tensor, x_neg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One (P+Q, K) batch in ``dtype``, written in a single pass (the cast, if any, happens in the copy).

    A previous layer's ``h_pos``/``h_neg`` are adjacent rows of one tensor: then the stacked batch is a view of
    it and nothing is copied (one activation-sized buffer less at every layer after the first).
    """
    if x_pos.dtype == dtype and x_neg.dtype == dtype:
        if x_pos.shape[0] == 0 or x_neg.shape[0] == 0:
            return x_neg if x_pos.shape[0] == 0 else x_pos
        adjacent = x_neg.data_ptr() == x_pos.data_ptr() + x_pos.numel() * x_pos.element_size()
        if adjacent and x_pos.untyped_storage().data_ptr() == x_neg.untyped_storage().data_ptr():
            return x_pos.as_strided((x_pos.shape[0] + x_neg.shape[0], x_pos.shape[1]), (x_pos.shape[1], 1))
    x = torch.empty((x_pos.shape[0] + x_neg.shape[0], x_pos.shape[1]), dtype=dtype, device=x_pos.device)
    x[: x_pos.shape[0]].copy_(x_pos)
    x[x_pos.shape[0] :].copy_(x_neg)
    return x


def ff_linear_forward_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    kappa: float,
    normalize: str,
    eps: float,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: GEMM 1 alone. h in ``compute_dtype``, goodness in fp32."""
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    h, g, _ = forward_stacked(x.to(compute_dtype), w, b, kappa=kappa, normalize=normalize, eps=eps)
    return h, g


def ff_linear_step_torch(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype,
) -> FFStepOutput:
    """Forward, goodness, loss and the closed-form gradient of DESIGN 1.6, with no autograd."""
    rows_pos = x_pos.shape[0]
    x = stack_rows(x_pos, x_neg, compute_dtype)
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    h, g, r = forward_stacked(x, w, b, kappa=opts.kappa, normalize=opts.normalize, eps=opts.eps)
    loss, c = loss_and_coefficient(g[:rows_pos], g[rows_pos:], opts, offset_pos, offset_neg)

    row_coef = c if r is None else c * r
    if h.shape[1] <= x.shape[1]:
        grad_weight = torch.mm((h * row_coef.to(h.dtype).unsqueeze(1)).t(), x)
    else:
        grad_weight = torch.mm(h.t(), x * row_coef.to(x.dtype).unsqueeze(1))
    grad_bias = None if bias is None else torch.mv(h.t(), c.to(h.dtype))
    return FFStepOutput.from_stacked(
        loss, g, h, rows_pos, grad_weight.to(weight.dtype), None if grad_bias is None else grad_bias.to(weight.dtype)
    )
