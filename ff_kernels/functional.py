"""The public functions: ``ff_linear_step`` and ``ff_linear_forward``.

This is the boundary: arguments are checked here once, the backend is resolved, and the backend function runs
on trusted inputs. Everything runs under ``torch.no_grad``: parameters may be ``nn.Parameter``s and are updated
in place, and no autograd graph is recorded. Backends return gradients; where they cannot fuse the update, it is
applied here.
"""

from __future__ import annotations

import torch

from ff_kernels import _options as opt_checks
from ff_kernels import dispatch
from ff_kernels.backends import resolve_backend
from ff_kernels.optim import FusedOptimizer
from ff_kernels.types import FFStepOutput


def resolve_for(op: str, backend: str, compute: torch.dtype, weight: torch.Tensor) -> dispatch.Implementation:
    """The concrete backend's table entry for ``op``. A compute dtype other than the weight's is a feature of some
    backends only: ``auto`` then picks the first of them, and an explicit other backend is an error."""
    if compute == weight.dtype:
        name = resolve_backend(backend, weight.device)
        return dispatch.implementation(op, name)
    supporting = [b for b in dispatch.backends_for(op) if dispatch.spec(op, b).compute_dtype]
    name = resolve_backend(supporting[0] if backend == "auto" else backend, weight.device)
    if name not in supporting:
        raise ValueError(
            f"compute_dtype={compute} is supported by backend={' or '.join(map(repr, supporting))} only; "
            f"got backend={name!r}"
        )
    return dispatch.implementation(op, name)


@torch.no_grad()
def ff_linear_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
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
    """One FF layer step on a positive and a negative batch (DESIGN 1): forward, goodness, loss, gradient, update.

    Args:
        x_pos, x_neg: (P, K) and (Q, K) inputs, same dtype as ``weight``. Either batch may be empty (not both)
            for ``loss="logistic"``; ``loss="symba"`` pairs row i of each and needs P == Q > 0.
        weight, bias: (N, K) and (N,) or None; updated in place when ``optimizer`` is given.
        offset_pos, offset_neg: optional per-row goodness offsets (Layer Collaboration), treated as constants.
        optimizer: an ``ff_kernels.optim`` optimizer holding ``weight`` (and ``bias``), or None to get gradients.
        backend: "auto", "reference", "torch", "triton" or "cuda"; an unavailable one raises.
        compute_dtype: dtype of the matrix products (e.g. torch.bfloat16 with float32 weights); goodness, loss,
            gradients and optimizer state stay float32. Default: the weight dtype. Supported by the torch
            backend, which ``auto`` then picks.
        check_finite: scan the inputs for NaN/inf and raise ValueError (one reduction and, on a GPU, one host
            sync). With False, non-finite inputs give a NaN loss and, with an optimizer, NaN parameters.

    Returns:
        FFStepOutput; ``grad_weight``/``grad_bias`` are None when an optimizer applied the update.
    """
    opt_checks.check_weight_bias(weight, bias)
    compute = opt_checks.check_compute_dtype(compute_dtype, weight)
    x_pos = opt_checks.check_input("x_pos", x_pos, weight, check_finite, compute)
    x_neg = opt_checks.check_input("x_neg", x_neg, weight, check_finite, compute)
    if x_pos.dtype != x_neg.dtype:
        raise TypeError(f"x_pos dtype {x_pos.dtype} differs from x_neg dtype {x_neg.dtype}")
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    opts = opt_checks.check_step_options(
        threshold=threshold,
        goodness=goodness,
        loss=loss,
        normalize=normalize,
        eps=eps,
        alpha=alpha,
        out_features=weight.shape[0],
    )
    if opts.loss == "symba":
        if rows_pos != rows_neg:
            raise ValueError(f"loss='symba' pairs rows: x_pos has {rows_pos} rows but x_neg has {rows_neg}")
        if rows_pos == 0:
            raise ValueError("loss='symba' needs at least one pair: x_pos and x_neg are empty")
    elif rows_pos + rows_neg == 0:
        raise ValueError("x_pos and x_neg are both empty: the loss over zero rows is undefined")
    offset_pos = opt_checks.check_offset("offset_pos", offset_pos, rows_pos, weight, check_finite)
    offset_neg = opt_checks.check_offset("offset_neg", offset_neg, rows_neg, weight, check_finite)
    if optimizer is not None:
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(
                f"optimizer must be an ff_kernels.optim optimizer (SGD, Adam, AdamW); got {type(optimizer).__name__}"
            )
        optimizer.check_holds("weight", weight)
        if bias is not None:
            optimizer.check_holds("bias", bias)
    entry, step = resolve_for("linear_step", backend, compute, weight)
    extra = {"compute_dtype": compute} if entry.compute_dtype else {}
    if entry.fuses_update:
        return step(x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg, optimizer=optimizer, **extra)
    out = step(x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg, **extra)
    if optimizer is None:
        return out
    params = [weight] if bias is None else [weight, bias]
    grads = [out.grad_weight] if bias is None else [out.grad_weight, out.grad_bias]
    optimizer.update(params, grads, grads_are_scratch=True)
    return out._replace(grad_weight=None, grad_bias=None)


@torch.no_grad()
def ff_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    goodness: str = "mean",
    normalize: str = "l2",
    eps: float = 1e-4,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference (GEMM 1 alone): h = relu(r * (x @ W^T) + b) and goodness g (float32), DESIGN 1.1-1.3."""
    opt_checks.check_weight_bias(weight, bias)
    compute = opt_checks.check_compute_dtype(compute_dtype, weight)
    x = opt_checks.check_input("x", x, weight, check_finite, compute)
    opt_checks.check_choice("goodness", goodness, opt_checks.GOODNESS)
    opt_checks.check_normalize(normalize, eps)
    kappa = opt_checks.goodness_scale(goodness, weight.shape[0])
    entry, forward = resolve_for("linear_forward", backend, compute, weight)
    extra = {"compute_dtype": compute} if entry.compute_dtype else {}
    h, g = forward(x, weight, bias, kappa=kappa, normalize=normalize, eps=eps, **extra)
    return h, g.to(torch.promote_types(g.dtype, torch.float32))
