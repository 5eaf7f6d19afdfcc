"""``FFLinear``: an FF layer as an ``nn.Module``, so porting an existing FF loop is a few-line change."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ff_kernels import dispatch
from ff_kernels._options import BACKENDS, INT_DTYPES, check_choice, check_compute_dtype, check_step_options
from ff_kernels.functional import ff_linear_forward, ff_linear_step
from ff_kernels.optim import FusedOptimizer
from ff_kernels.types import FFStepOutput


def is_count(value: object) -> bool:
    """Whether ``value`` is a count: a positive integer (numpy's too), not a bool or a float."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value > 0


def check_batch_size(batch_size: object, allow_none: bool = False) -> None:
    """The batch size of fit, predict and accuracy: zero or a negative one would loop not at all or forever."""
    if not (is_count(batch_size) or (allow_none and batch_size is None)):
        full = " or None (full batch)" if allow_none else ""
        raise ValueError(f"batch_size must be positive: an integer >= 1{full}; got {batch_size!r}")


def check_targets(y: object, rows: int, num_classes: int) -> None:
    """The labels of a model's fit or accuracy: one integer label per sample (any integer dtype), in range."""
    if not isinstance(y, torch.Tensor) or y.shape != (rows,) or y.dtype not in INT_DTYPES:
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be an integer tensor of shape ({rows},); got {got}")
    low, high = (int(v) for v in torch.aminmax(y))  # one reduction, as _options.check_labels
    if low < 0 or high >= num_classes:
        raise ValueError(f"y must hold labels in [0, {num_classes}); got values from {low} to {high}")


def labelled_accuracy(predicted: torch.Tensor, y: object, num_classes: int) -> float:
    """The fraction of ``predicted`` labels equal to ``y``, checked as a model's labels (``check_targets``): the
    accuracy of FFNet, FFConvNet and the block-wise trainers once their predict has checked x."""
    check_targets(y, predicted.shape[0], num_classes)
    return float((predicted.cpu() == y.cpu()).float().mean())


def check_backend(backend: str, *ops: str) -> None:
    """A backend name that implements ``ops``, checked at construction with the messages the calls give (whether
    it is usable depends on the device, so that waits for the first call)."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        for op in ops:
            dispatch.spec(op, backend)


class FFLinear(nn.Module):
    """A linear + ReLU layer trained by its own FF loss.

    ``layer(x)`` returns the activations h (the next layer's input; no gradient flows, FF trains layer-locally),
    ``layer.goodness(x)`` the goodness, and ``layer.train_step(x_pos, x_neg, optimizer)`` one fused step.
    Parameters are initialised as ``nn.Linear``'s.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        threshold: float = 2.0,
        goodness: str = "mean",
        loss: str = "logistic",
        normalize: str = "l2",
        eps: float = 1e-4,
        alpha: float = 4.0,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not (is_count(in_features) and is_count(out_features)):
            raise ValueError(
                f"in_features and out_features must be positive integers; got {in_features!r}, {out_features!r}"
            )
        check_step_options(
            threshold=threshold, goodness=goodness, loss=loss, normalize=normalize, eps=eps, alpha=alpha,
            out_features=out_features,
        )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.threshold, self.eps, self.alpha = threshold, eps, alpha
        self.goodness_kind, self.loss, self.normalize = goodness, loss, normalize
        check_backend(backend, "linear_step", "linear_forward")
        self.backend, self.compute_dtype, self.check_finite = backend, compute_dtype, check_finite
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if bias else None
        check_compute_dtype(compute_dtype, self.weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward_with_goodness(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h and its goodness from one pass (GEMM 1 alone)."""
        return ff_linear_forward(
            x,
            self.weight,
            self.bias,
            goodness=self.goodness_kind,
            normalize=self.normalize,
            eps=self.eps,
            backend=self.backend,
            compute_dtype=self.compute_dtype,
            check_finite=self.check_finite,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_goodness(x)[0]

    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_goodness(x)[1]

    def train_step(
        self,
        x_pos: torch.Tensor,
        x_neg: torch.Tensor,
        optimizer: FusedOptimizer | None = None,
        *,
        offset_pos: torch.Tensor | None = None,
        offset_neg: torch.Tensor | None = None,
    ) -> FFStepOutput:
        """One fused step with this layer's options; with ``optimizer=None`` it returns gradients only."""
        return ff_linear_step(
            x_pos,
            x_neg,
            self.weight,
            self.bias,
            threshold=self.threshold,
            goodness=self.goodness_kind,
            loss=self.loss,
            normalize=self.normalize,
            eps=self.eps,
            alpha=self.alpha,
            offset_pos=offset_pos,
            offset_neg=offset_neg,
            optimizer=optimizer,
            backend=self.backend,
            compute_dtype=self.compute_dtype,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}, goodness={self.goodness_kind!r}, loss={self.loss!r}, "
            f"normalize={self.normalize!r}, backend={self.backend!r}"
        )
