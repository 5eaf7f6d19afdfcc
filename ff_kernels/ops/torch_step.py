"""The closed-form layer step in plain PyTorch (``backend="torch"``): no autograd, one stacked GEMM per direction.

Positive and negative rows are stacked into one (M, K) batch, so the forward and the weight gradient are one
GEMM each. GEMM 2's operands are (c_i / 2^s) h_i and r_i x_i (``ff_kernels.ops.scaling``): r_i x_i is written into
the stacked batch as it is copied, so GEMM 1 runs on it too and the row scale costs no extra pass. Works on any
device.

``compute_dtype`` (e.g. bfloat16) runs the two GEMMs in that dtype with fp32 accumulation inside the GEMM, while
goodness, loss, coefficients and the returned gradients stay float32 (the optimizer keeps fp32 master weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ff_kernels._options import StepOptions
from ff_kernels.ops.scaling import coefficient_scale, narrow_exponent
from ff_kernels.types import FFStepOutput


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Goodness, loss and row scales are float32 at least (float64 stays float64, for gradchecks)."""
    return torch.promote_types(dtype, torch.float32)


def input_scale(x: torch.Tensor, normalize: str, eps: float) -> torch.Tensor | None:
    """r_i of DESIGN 1.1 (over all of a row's features, or of an image's C_in H W in any memory layout) in
    float32, or None for ``normalize="none"`` (r_i = 1, nothing to apply)."""
    if normalize == "none":
        return None
    norm = torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), dtype=accumulate_dtype(x.dtype))
    if normalize == "rms":
        norm = norm.mul_(math.prod(x.shape[1:]) ** -0.5)
    return norm.add_(eps).reciprocal_()


def forward_stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    r: torch.Tensor | None,
    *,
    kappa: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM 1 and its epilogue on x and the row scale still to apply to its output (None when x already holds
    r_i x_i, or r_i = 1): returns h (M, N) in x's dtype and the goodness g (M,) in fp32."""
    h = affine_relu(x, weight, bias, r)
    g = torch.linalg.vector_norm(h, dim=1, dtype=accumulate_dtype(h.dtype)).square_().mul_(kappa)
    return h, g


def affine_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r: torch.Tensor | None
) -> torch.Tensor:
    """h = relu(r_i (x_i W^T) + b), GEMM 1 without the goodness (``r`` as in :func:`forward_stacked`)."""
    if r is None and bias is not None:
        h = torch.addmm(bias, x, weight.t())
    else:
        h = torch.mm(x, weight.t())
        if r is not None:
            h.mul_(r.to(h.dtype).unsqueeze(1))
        if bias is not None:
            h.add_(bias)
    return h.relu_()


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


def stacked_view(x_pos: torch.Tensor, x_neg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The (P+Q, K) batch as a view of the inputs when it is one, else None.

    A previous layer's ``h_pos``/``h_neg`` are adjacent rows of one tensor: then nothing is copied (one
    activation-sized buffer less at every layer after the first); an empty batch leaves the other one.
    """
    if x_pos.dtype != dtype or x_neg.dtype != dtype:
        return None
    if x_pos.shape[0] == 0 or x_neg.shape[0] == 0:
        return x_neg if x_pos.shape[0] == 0 else x_pos
    if not (x_pos.is_contiguous() and x_neg.is_contiguous()):
        return None
    adjacent = x_neg.data_ptr() == x_pos.data_ptr() + x_pos.numel() * x_pos.element_size()
    if adjacent and x_pos.untyped_storage().data_ptr() == x_neg.untyped_storage().data_ptr():
        return x_pos.as_strided((x_pos.shape[0] + x_neg.shape[0], x_pos.shape[1]), (x_pos.shape[1], 1))
    return None


def stack_scaled_rows(
    x_pos: torch.Tensor, x_neg: torch.Tensor, dtype: torch.dtype, normalize: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stacked (P+Q, K) operand of both GEMMs in ``dtype``, and the row scale r still to apply to GEMM 1's
    output (None when the operand already holds r_i x_i).

    Usually the operand is a fresh buffer and r_i x_i is written into it in the copy's single pass (the product
    is formed in fp32 and rounded once). A view of the caller's tensors cannot be overwritten: wide-exponent
    dtypes keep it and defer r_i, fp16 pays for a scaled copy (``ff_kernels.ops.scaling``).
    """
    view = stacked_view(x_pos, x_neg, dtype)
    if view is not None:
        r = input_scale(view, normalize, eps)
        if r is None or not narrow_exponent(dtype):
            return view, r
        return torch.mul(view, r.unsqueeze(1), out=torch.empty_like(view)), None
    x = torch.empty((x_pos.shape[0] + x_neg.shape[0], x_pos.shape[1]), dtype=dtype, device=x_pos.device)
    for part, rows in ((x_pos, x[: x_pos.shape[0]]), (x_neg, x[x_pos.shape[0] :])):
        r = input_scale(part, normalize, eps)
        if r is None:
            rows.copy_(part)
        else:
            torch.mul(part, r.unsqueeze(1), out=rows)
    return x, None


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
    """Inference: GEMM 1 alone, with the step's operand rule. h in ``compute_dtype``, goodness in fp32."""
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    xs, r = stack_scaled_rows(x, x[:0], compute_dtype, normalize, eps)
    return forward_stacked(xs, w, b, r, kappa=kappa)


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
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    x, r = stack_scaled_rows(x_pos, x_neg, compute_dtype, opts.normalize, opts.eps)
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    h, g = forward_stacked(x, w, b, r, kappa=opts.kappa)
    loss, c = loss_and_coefficient(g[:rows_pos], g[rows_pos:], opts, offset_pos, offset_neg)

    scale = coefficient_scale(opts, rows_pos, rows_neg)
    c_scaled = c.mul(1.0 / scale)
    if r is None:
        grad_weight = torch.mm((h * c_scaled.to(h.dtype).unsqueeze(1)).t(), x)
    else:
        # deferred r (a view, wide exponent): c_i r_i goes on the smaller operand
        row_coef = (c_scaled * r).to(h.dtype).unsqueeze(1)
        if h.shape[1] <= x.shape[1]:
            grad_weight = torch.mm((h * row_coef).t(), x)
        else:
            grad_weight = torch.mm(h.t(), x * row_coef)
    grad_bias = None if bias is None else unscale(torch.mv(h.t(), c_scaled.to(h.dtype)), scale, weight.dtype)
    return FFStepOutput.from_stacked(loss, g, h, rows_pos, unscale(grad_weight, scale, weight.dtype), grad_bias)


def unscale(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """2^s * t in the accumulate precision, then ``dtype``: it leaves fp16's range only if the gradient does."""
    return t.to(accumulate_dtype(t.dtype)).mul_(scale).to(dtype)
