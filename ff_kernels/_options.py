"""Option parsing and input checks for the public boundary.

Every public entry point calls :func:`check_step_inputs` or :func:`check_forward_inputs` once; the backends
below it trust their inputs. Messages always name the offending argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NORMALIZE = ("l2", "rms", "none")
GOODNESS = ("mean", "sum")
LOSSES = ("logistic", "symba")
BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def goodness_scale(goodness: str, out_features: int) -> float:
    """kappa of DESIGN 1.3: 1/N for the mean goodness, 1 for the sum."""
    return 1.0 / out_features if goodness == "mean" else 1.0


@dataclass(frozen=True)
class StepOptions:
    """The scalar options of one layer step, validated; the backends read them from here."""

    threshold: float
    goodness: str
    loss: str
    normalize: str
    eps: float
    alpha: float
    kappa: float


def _check_float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64); got {t.dtype}")
    return t


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; pass check_finite=False to skip this check")


def check_weight_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    _check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features); got {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have at least one row and one column; got {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (the fused update writes it in place); call .contiguous()")
    if bias is None:
        return
    _check_float_tensor("bias", bias)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight; got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    if not bias.is_contiguous():
        raise ValueError("bias must be contiguous (the fused update writes it in place); call .contiguous()")


def check_input(
    name: str, x: torch.Tensor, weight: torch.Tensor, check_finite: bool, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Check one input batch against the weight; returns it contiguous (a copy only if it was not).

    x must share the weight's dtype, or be in ``compute_dtype`` (a previous layer's bf16 output, say).
    """
    _check_float_tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, in_features); got {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name} has {x.shape[1]} features but weight expects in_features={weight.shape[1]}"
        )
    if x.dtype != weight.dtype and x.dtype != compute_dtype:
        raise TypeError(f"{name} dtype {x.dtype} differs from weight dtype {weight.dtype}; cast one of them")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {weight.device}")
    if check_finite:
        _check_finite(name, x)
    return x.contiguous()


def check_offset(
    name: str, offset: torch.Tensor | None, rows: int, weight: torch.Tensor, check_finite: bool
) -> torch.Tensor | None:
    """Offsets are per-row goodness terms: float32 (float64 with float64 weights), like the goodness itself."""
    if offset is None:
        return None
    _check_float_tensor(name, offset)
    if offset.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), one value per row; got {tuple(offset.shape)}")
    if offset.device != weight.device:
        raise ValueError(f"{name} is on {offset.device} but the inputs are on {weight.device}")
    if check_finite:
        _check_finite(name, offset)
    return offset.detach().to(torch.promote_types(weight.dtype, torch.float32)).contiguous()


def check_finite_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")


def check_normalize(normalize: str, eps: float) -> None:
    check_choice("normalize", normalize, NORMALIZE)
    check_finite_number("eps", eps)
    if eps <= 0 and normalize != "none":
        raise ValueError(f"eps must be positive; got {eps!r}")


def check_step_options(
    *,
    threshold: float,
    goodness: str,
    loss: str,
    normalize: str,
    eps: float,
    alpha: float,
    out_features: int,
) -> StepOptions:
    check_choice("goodness", goodness, GOODNESS)
    check_choice("loss", loss, LOSSES)
    check_normalize(normalize, eps)
    for name, value in (("threshold", threshold), ("alpha", alpha)):
        check_finite_number(name, value)
    return StepOptions(
        threshold=float(threshold),
        goodness=goodness,
        loss=loss,
        normalize=normalize,
        eps=float(eps),
        alpha=float(alpha),
        kappa=goodness_scale(goodness, out_features),
    )


def check_compute_dtype(compute_dtype: torch.dtype | None, weight: torch.Tensor) -> torch.dtype:
    if compute_dtype is None:
        return weight.dtype
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be a floating dtype; got {compute_dtype}")
    return compute_dtype
