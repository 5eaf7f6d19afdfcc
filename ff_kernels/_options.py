"""Option parsing and input checks for the public boundary.

Every public entry point calls :func:`check_step_inputs` or :func:`check_forward_inputs` once; the backends
below it trust their inputs. Messages always name the offending argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NORMALIZE = ("l2", "rms", "none")
GOODNESS = ("mean", "sum")
LOSSES = ("logistic", "symba")
BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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
    if t.numel() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; pass check_finite=False to skip this check")


def check_weight_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """A (out_features, in_features) floating, contiguous weight and a matching bias or None: one test where all
    holds (every step pays it), then the named checks, which raise."""
    if isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES and weight.dim() == 2:
        shape = weight.shape
        if shape[0] and shape[1] and weight.is_contiguous() and (
            bias is None
            or (isinstance(bias, torch.Tensor) and bias.dtype == weight.dtype and bias.shape == shape[:1]
                and bias.device == weight.device and bias.is_contiguous())
        ):
            return
    _check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features); got {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have at least one row and one column; got {tuple(weight.shape)}")
    _check_parameters(weight, bias)


def dense_parameters(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inference writes no parameter, so any layout serves it: contiguous copies where they are not (a tied or
    transposed weight, a module moved to channels-last), checked afterwards as the steps' own parameters are."""
    if isinstance(weight, torch.Tensor) and not weight.is_contiguous():
        weight = weight.contiguous()
    if isinstance(bias, torch.Tensor) and not bias.is_contiguous():
        bias = bias.contiguous()
    return weight, bias


def check_conv_weight_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    _check_float_tensor("weight", weight)
    if weight.dim() != 4:
        raise ValueError(
            "weight must have shape (out_channels, in_channels, kernel_height, kernel_width); "
            f"got {tuple(weight.shape)}"
        )
    if 0 in weight.shape:
        raise ValueError(f"weight must have no empty dimension; got {tuple(weight.shape)}")
    _check_parameters(weight, bias)


def _check_parameters(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
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


def check_inputs(
    x_pos: torch.Tensor, x_neg: torch.Tensor, weight: torch.Tensor, check_finite: bool, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`check_input` of a step's two batches, which must also share a dtype: one test where everything holds
    (at a small shape a step's checks cost as much as its launches), the named checks, which raise, where not.
    Returns the batches contiguous."""
    if isinstance(x_pos, torch.Tensor) and isinstance(x_neg, torch.Tensor):
        dtype, in_features, device = x_pos.dtype, weight.shape[1], weight.device
        if (
            (dtype == weight.dtype or (dtype == compute_dtype and dtype in FLOAT_DTYPES))
            and x_neg.dtype == dtype and x_pos.dim() == 2 and x_neg.dim() == 2
            and x_pos.shape[1] == in_features and x_neg.shape[1] == in_features
            and x_pos.device == device and x_neg.device == device
        ):
            if check_finite:
                _check_finite("x_pos", x_pos)
                _check_finite("x_neg", x_neg)
            return x_pos.contiguous(), x_neg.contiguous()
    x_pos = check_input("x_pos", x_pos, weight, check_finite, compute_dtype)
    x_neg = check_input("x_neg", x_neg, weight, check_finite, compute_dtype)
    if x_pos.dtype != x_neg.dtype:
        raise TypeError(f"x_pos dtype {x_pos.dtype} differs from x_neg dtype {x_neg.dtype}")
    return x_pos, x_neg


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
    return _check_batch(name, x, weight, check_finite, compute_dtype)


def check_image_input(
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    geometry: ConvGeometry,
    check_finite: bool,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`check_input` for a (batch, channels, height, width) batch of a convolution, which must leave an
    output of at least one position; channels-last batches are kept as they are (the backends read either)."""
    _check_float_tensor(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (batch, channels, height, width); got {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name} has {x.shape[1]} channels but weight expects in_channels={weight.shape[1]}")
    out_h, out_w = geometry.output_size(x.shape[2:], weight.shape[2:])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"{name} images of {x.shape[2]}x{x.shape[3]} are too small for a {weight.shape[2]}x{weight.shape[3]} "
            f"kernel with padding={geometry.padding}, dilation={geometry.dilation}: the output would be "
            f"{out_h}x{out_w}"
        )
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    return _check_batch(name, x, weight, check_finite, compute_dtype, dense=channels_last)


def _check_batch(
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    check_finite: bool,
    compute_dtype: torch.dtype | None,
    dense: bool = False,
) -> torch.Tensor:
    """dtype, device and finiteness; returns x contiguous (``dense``: x is already laid out densely, keep it)."""
    if x.dtype != weight.dtype and x.dtype != compute_dtype:
        raise TypeError(f"{name} dtype {x.dtype} differs from weight dtype {weight.dtype}; cast one of them")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {weight.device}")
    if check_finite:
        _check_finite(name, x)
    return x if dense else x.contiguous()


def check_pos_neg_rows(loss: str, rows_pos: int, rows_neg: int) -> None:
    """SymBa pairs rows, so it needs P == Q > 0; the logistic loss needs one row in all."""
    if loss == "symba":
        if rows_pos != rows_neg:
            raise ValueError(f"loss='symba' pairs rows: x_pos has {rows_pos} rows but x_neg has {rows_neg}")
        if rows_pos == 0:
            raise ValueError("loss='symba' needs at least one pair: x_pos and x_neg are empty")
    elif rows_pos + rows_neg == 0:
        raise ValueError("x_pos and x_neg are both empty: the loss over zero rows is undefined")


def check_labels(
    labels: torch.Tensor, rows: int, num_classes: int, weight: torch.Tensor, check_range: bool
) -> torch.Tensor:
    """Class labels, one per row, as int64. ``check_range``: check [0, num_classes) here, with one reduction read
    on the host (CPU labels); the GPU paths check it on the device with their deferred finiteness check instead
    (``ff_kernels.finite.defer``)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), one label per sample; got {tuple(labels.shape)}")
    if labels.device != weight.device:
        raise ValueError(f"labels is on {labels.device} but weight is on {weight.device}")
    if check_range and rows and not torch.compiler.is_compiling():  # a traced graph cannot branch on the values
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}); got values from {low} to {high}")
    return labels.to(torch.int64).contiguous()


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


def check_flag(name: str, value: object) -> None:
    """A bool option: a string such as "no" would otherwise read as True."""
    if value is not True and value is not False:
        raise TypeError(f"{name} must be True or False; got {value!r}")


def check_finite_number(name: str, value: object) -> None:
    """Any finite real number (int, float, a numpy scalar), but not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
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
    """The validated options; a training loop passes the same ones at every step, so they are validated once (the
    key has the numbers' types: True == 1 but a bool is no threshold)."""
    key = (threshold, type(threshold), goodness, loss, normalize, eps, type(eps), alpha, type(alpha), out_features)
    try:
        return _STEP_OPTIONS[key]
    except (KeyError, TypeError):  # not seen yet, or unhashable (and so about to be refused)
        pass
    check_choice("goodness", goodness, GOODNESS)
    check_choice("loss", loss, LOSSES)
    check_normalize(normalize, eps)
    for name, value in (("threshold", threshold), ("alpha", alpha)):
        check_finite_number(name, value)
    if loss == "symba" and alpha <= 0:
        raise ValueError(f"alpha must be positive for loss='symba' (it scales the margin); got {alpha!r}")
    opts = StepOptions(
        threshold=float(threshold),
        goodness=goodness,
        loss=loss,
        normalize=normalize,
        eps=float(eps),
        alpha=float(alpha),
        kappa=goodness_scale(goodness, out_features),
    )
    if len(_STEP_OPTIONS) < 1024:
        _STEP_OPTIONS[key] = opts
    return opts


_STEP_OPTIONS: dict[tuple, StepOptions] = {}


@dataclass(frozen=True)
class ClassStepOptions:
    """The scalar options of a class-goodness step (DESIGN 7), validated. ``kappa`` is 1/(G * positions) for the
    mean goodness, G = channels (or units) / num_classes."""

    num_classes: int
    goodness: str
    temperature: float
    normalize: str
    eps: float
    kappa: float


def check_class_options(
    *, num_classes: int, goodness: str, temperature: float, normalize: str, eps: float, channels: int, positions: int
) -> ClassStepOptions:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2; got {num_classes!r}")
    if channels % num_classes:
        raise ValueError(
            f"weight has {channels} output channels (units), not divisible by num_classes={num_classes}: each class "
            "needs a group of the same size"
        )
    check_choice("goodness", goodness, GOODNESS)
    check_normalize(normalize, eps)
    check_finite_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive; got {temperature!r}")
    return ClassStepOptions(
        num_classes=num_classes,
        goodness=goodness,
        temperature=float(temperature),
        normalize=normalize,
        eps=float(eps),
        kappa=goodness_scale(goodness, channels // num_classes * positions),
    )


@dataclass(frozen=True)
class ConvGeometry:
    """stride, padding and dilation of a convolution (groups = 1), each as (height, width)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def output_size(self, size: Sequence[int], kernel: Sequence[int]) -> tuple[int, int]:
        """(H', W') as ``F.conv2d`` computes them."""
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(size, kernel, self.stride, self.padding, self.dilation)
        )


def check_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``, as an (h, w) pair (kernel sizes, strides, ...)."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an integer >= {minimum} or a pair of them; got {value!r}")
    return pair


def check_conv_geometry(stride: object, padding: object, dilation: object) -> ConvGeometry:
    return ConvGeometry(
        check_pair("stride", stride, 1), check_pair("padding", padding, 0), check_pair("dilation", dilation, 1)
    )


def check_compute_dtype(compute_dtype: torch.dtype | None, weight: torch.Tensor) -> torch.dtype:
    if compute_dtype is None:
        return weight.dtype
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be a floating dtype; got {compute_dtype}")
    if (compute_dtype == torch.float64) != (weight.dtype == torch.float64):
        raise TypeError(
            f"compute_dtype={compute_dtype} with {weight.dtype} weights: float64 does not mix with the other dtypes "
            "(float64 weights compute in float64, and float64 compute needs float64 weights)"
        )
    return compute_dtype


def check_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, check_finite: bool) -> torch.Tensor:
    """The operands of a block-wise head (DESIGN 8): h (B, C) rows or (B, C, H, W) images, B > 0; weight (K, C) or a
    1x1 convolution's (K, C, 1, 1), K >= 2 classes; bias (K,) or None. h may have a lower precision than the head
    (a bf16 block output under autocast). Returns the weight as a (K, C) view."""
    _check_float_tensor("h", h)
    if h.dim() not in (2, 4) or 0 in h.shape:
        raise ValueError(
            f"h must be (batch, channels) or (batch, channels, height, width) with no empty dimension; got "
            f"{tuple(h.shape)}"
        )
    _check_float_tensor("head_weight", weight)
    if weight.dim() not in (2, 4) or tuple(weight.shape[2:]) not in ((), (1, 1)):
        raise ValueError(
            "head_weight must be (num_classes, channels) or a 1x1 convolution's (num_classes, channels, 1, 1); got "
            f"{tuple(weight.shape)}"
        )
    classes, channels = weight.shape[:2]
    if channels != h.shape[1]:
        raise ValueError(f"head_weight expects {channels} channels but h has {h.shape[1]}")
    if classes < 2:
        raise ValueError(f"head_weight must have at least 2 rows (one per class); got {classes}")
    if weight.device != h.device:
        raise ValueError(f"head_weight is on {weight.device} but h is on {h.device}")
    if bias is not None:
        _check_float_tensor("head_bias", bias)
        if bias.shape != (classes,):
            raise ValueError(f"head_bias must have shape ({classes},); got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"head_bias dtype {bias.dtype} differs from head_weight dtype {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"head_bias is on {bias.device} but head_weight is on {weight.device}")
    if check_finite:
        _check_finite("h", h)
    return weight.reshape(classes, channels)
