"""The public functions: ``ff_linear_step`` and ``ff_linear_forward``.

This is the boundary: arguments are checked here once, the backend is resolved, and the backend function runs
on trusted inputs. Everything runs under ``torch.no_grad``: parameters may be ``nn.Parameter``s and are updated
in place, and no autograd graph is recorded. Backends return gradients; where they cannot fuse the update, it is
applied here.
"""

from __future__ import annotations

import torch

from ff_kernels import _options as opt_checks
from ff_kernels.backends import resolve_backend
from ff_kernels.ops.cuda_step import ff_linear_forward_cuda, ff_linear_step_cuda
from ff_kernels.ops.torch_step import ff_linear_forward_torch, ff_linear_step_torch
from ff_kernels.optim import FusedOptimizer
from ff_kernels.reference import ff_linear_forward_ref, ff_linear_step_ref
from ff_kernels.types import FFStepOutput


def auto_for_compute_dtype(backend: str, compute: torch.dtype, weight: torch.Tensor) -> str:
    """A compute dtype other than the weight's is a feature of the torch backend: ``auto`` then means torch."""
    return "torch" if backend == "auto" and compute != weight.dtype else backend


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
    backend = resolve_backend(auto_for_compute_dtype(backend, compute, weight), weight.device)
    if compute != weight.dtype and backend != "torch":
        raise ValueError(f"compute_dtype={compute} is supported by backend='torch' only; got backend={backend!r}")

    if backend == "triton":
        from ff_kernels.ops.triton_step import ff_linear_step_triton

        return ff_linear_step_triton(x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg, optimizer)
    if backend == "cuda":
        return ff_linear_step_cuda(x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg, optimizer)
    if backend == "reference":
        out = ff_linear_step_ref(x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg)
    elif backend == "torch":
        out = ff_linear_step_torch(x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg, compute_dtype=compute)
    else:
        raise AssertionError(f"resolve_backend returned an unknown backend {backend!r}")
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
    backend = resolve_backend(auto_for_compute_dtype(backend, compute, weight), weight.device)
    if compute != weight.dtype and backend != "torch":
        raise ValueError(f"compute_dtype={compute} is supported by backend='torch' only; got backend={backend!r}")
    if backend == "triton":
        from ff_kernels.ops.triton_step import ff_linear_forward_triton

        return ff_linear_forward_triton(x, weight, bias, kappa=kappa, normalize=normalize, eps=eps)
    if backend == "cuda":
        return ff_linear_forward_cuda(x, weight, bias, kappa=kappa, normalize=normalize, eps=eps)
    if backend == "reference":
        h, g = ff_linear_forward_ref(x, weight, bias, kappa=kappa, normalize=normalize, eps=eps)
        return h, g.to(torch.promote_types(g.dtype, torch.float32))
    if backend != "torch":
        raise AssertionError(f"resolve_backend returned an unknown backend {backend!r}")
    return ff_linear_forward_torch(x, weight, bias, kappa=kappa, normalize=normalize, eps=eps, compute_dtype=compute)
