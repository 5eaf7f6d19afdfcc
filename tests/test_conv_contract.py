"""The conv and class-goodness contract (DESIGN 7): the reference against DESIGN's formulas written independently
(numpy, float64) and finite differences, and the torch backend against the reference for every option combination
at small odd shapes, in fp32, fp64 and low precision (FlashAttention's rule); boundary checks and dispatch errors."""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest
import torch

import ff_kernels as ffk
from ff_kernels._options import (
    GOODNESS,
    LOSSES,
    NORMALIZE,
    check_class_options,
    check_conv_geometry,
    check_step_options,
)
from ff_kernels.ops import cuda_step
from ff_kernels.reference import ff_loss_ref
from ff_kernels.reference_conv import (
    class_goodness_ref,
    class_loss_ref,
    conv2d_relu_ref,
    ff_conv2d_class_step_ref,
    ff_conv2d_step_ref,
    ff_linear_class_step_ref,
    linear_relu_ref,
    sample_goodness_ref,
)

EXT_REASON = cuda_step.extension_unavailable_reason()
# The closed-form backends on CPU tensors: torch, and the extension's (torch's closed form with the fused goodness).
FAST = ["torch", pytest.param("cuda", marks=pytest.mark.skipif(EXT_REASON is not None,
                                                              reason=f"extension unavailable: {EXT_REASON}"))]

EPS32 = torch.finfo(torch.float32).eps
STEP_FIELDS = ("loss", "goodness_pos", "goodness_neg", "h_pos", "h_neg", "grad_weight", "grad_bias")
CLASS_FIELDS = ("loss", "goodness", "h", "grad_weight", "grad_bias")
# (stride, padding, dilation): plain, strided with padding, dilated, and unequal pairs
GEOMETRIES = [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 0), (1, 2))]
STEP_COMBOS = list(itertools.product(NORMALIZE, GOODNESS, LOSSES, (False, True), (False, True)))
CLASS_COMBOS = list(itertools.product(NORMALIZE, GOODNESS, (False, True), (1.0, 0.5)))
IN_CHANNELS, HEIGHT, WIDTH, KERNEL = 3, 9, 7, (3, 2)


def geometry_id(g: tuple) -> str:
    return "s{}-p{}-d{}".format(*g).replace(" ", "")


def step_id(combo: tuple) -> str:
    normalize, goodness, loss, offsets, bias = combo
    return f"{normalize}-{goodness}-{loss}-{'off' if offsets else 'nooff'}-{'bias' if bias else 'nobias'}"


def class_id(combo: tuple) -> str:
    normalize, goodness, bias, tau = combo
    return f"{normalize}-{goodness}-{'bias' if bias else 'nobias'}-tau{tau}"


# ---------------------------------------------------------------------------------------------------------------
# cases: inputs scaled so that z ~ N(0, 1) for every normalisation, options that keep the losses unsaturated


def _weight_std(normalize: str, fan_in: int, numel: int) -> float:
    """z = r x * W: l2 rows of x have unit norm, so a patch of fan_in entries has norm sqrt(fan_in / numel)."""
    return (numel / fan_in) ** 0.5 if normalize == "l2" else fan_in**-0.5


def _positions(geometry: tuple, size=(HEIGHT, WIDTH), kernel=KERNEL) -> int:
    out_h, out_w = check_conv_geometry(*geometry).output_size(size, kernel)
    return out_h * out_w


def conv_case(
    rows_pos: int,
    rows_neg: int,
    out_channels: int,
    geometry: tuple,
    *,
    normalize: str = "l2",
    goodness: str = "mean",
    loss: str = "logistic",
    offsets: bool = False,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    shape = (IN_CHANNELS, HEIGHT, WIDTH)
    x_pos = torch.randn(rows_pos, *shape, generator=gen, dtype=torch.float64) + 0.3
    x_neg = torch.randn(rows_neg, *shape, generator=gen, dtype=torch.float64)
    std = _weight_std(normalize, IN_CHANNELS * KERNEL[0] * KERNEL[1], IN_CHANNELS * HEIGHT * WIDTH)
    weight = torch.randn(out_channels, IN_CHANNELS, *KERNEL, generator=gen, dtype=torch.float64) * std
    b = 0.3 * torch.randn(out_channels, generator=gen, dtype=torch.float64) if bias else None
    scale = 1.0 if goodness == "mean" else float(out_channels * _positions(geometry))
    stride, padding, dilation = geometry
    kwargs = dict(
        stride=stride,
        padding=padding,
        dilation=dilation,
        threshold=0.5 * scale,
        goodness=goodness,
        loss=loss,
        normalize=normalize,
        eps=1e-4,
        alpha=4.0 / scale,
    )
    if offsets:
        # about the goodness' own spread: |u| stays below 20, where F.softplus (in the reference) is exact
        spread = 0.3 * scale**0.5
        kwargs["offset_pos"] = spread * torch.randn(rows_pos, generator=gen, dtype=torch.float64).to(dtype)
        kwargs["offset_neg"] = spread * torch.randn(rows_neg, generator=gen, dtype=torch.float64).to(dtype)
    args = (x_pos.to(dtype), x_neg.to(dtype), weight.to(dtype), None if b is None else b.to(dtype))
    return args, kwargs


def conv_class_case(
    rows: int,
    num_classes: int,
    group: int,
    geometry: tuple,
    *,
    normalize: str = "none",
    goodness: str = "mean",
    bias: bool = True,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN_CHANNELS, HEIGHT, WIDTH, generator=gen, dtype=torch.float64)
    labels = torch.arange(rows) % num_classes
    std = _weight_std(normalize, IN_CHANNELS * KERNEL[0] * KERNEL[1], IN_CHANNELS * HEIGHT * WIDTH)
    weight = torch.randn(num_classes * group, IN_CHANNELS, *KERNEL, generator=gen, dtype=torch.float64) * std
    b = 0.3 * torch.randn(num_classes * group, generator=gen, dtype=torch.float64) if bias else None
    scale = 1.0 if goodness == "mean" else float(group * _positions(geometry))
    stride, padding, dilation = geometry
    kwargs = dict(
        num_classes=num_classes,
        stride=stride,
        padding=padding,
        dilation=dilation,
        goodness=goodness,
        temperature=temperature * scale,
        normalize=normalize,
        eps=1e-4,
    )
    return (x.to(dtype), labels, weight.to(dtype), None if b is None else b.to(dtype)), kwargs


def linear_class_case(
    rows: int,
    in_features: int,
    num_classes: int,
    group: int,
    *,
    normalize: str = "l2",
    goodness: str = "mean",
    bias: bool = True,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64)
    labels = (torch.arange(rows) * 7) % num_classes
    std = 1.0 if normalize == "l2" else in_features**-0.5
    weight = torch.randn(num_classes * group, in_features, generator=gen, dtype=torch.float64) * std
    b = 0.3 * torch.randn(num_classes * group, generator=gen, dtype=torch.float64) if bias else None
    scale = 1.0 if goodness == "mean" else float(group)
    kwargs = dict(
        num_classes=num_classes, goodness=goodness, temperature=temperature * scale, normalize=normalize, eps=1e-4
    )
    return (x.to(dtype), labels, weight.to(dtype), None if b is None else b.to(dtype)), kwargs


# ---------------------------------------------------------------------------------------------------------------
# fp32 tolerances: rtol 1e-4 with an absolute floor of a few eps32 times each output's summand magnitude


def _scale_rows(x: torch.Tensor, normalize: str, eps: float) -> torch.Tensor:
    flat = x.flatten(1)
    if normalize == "l2":
        return 1.0 / (flat.norm(dim=1) + eps)
    if normalize == "rms":
        return 1.0 / (flat.pow(2).mean(dim=1).sqrt() + eps)
    return torch.ones(x.shape[0], dtype=x.dtype)


def _magnitudes(x, weight, bias, h, kwargs, *, kappa: float, coefficient: float, conv: bool) -> dict[str, float]:
    """The largest sum of |summands| behind one entry of each output (float64): fp32 rounding errors are eps
    times this, not eps times the result, because z and the weight gradient can cancel."""
    x, w, h = x.double(), weight.double(), h.double()
    r = _scale_rows(x, kwargs["normalize"], kwargs["eps"])
    view = (-1,) + (1,) * (x.dim() - 1)
    scaled = (x.abs() * r.view(view))
    if conv:
        geometry = dict(stride=kwargs["stride"], padding=kwargs["padding"], dilation=kwargs["dilation"])
        z_mag = torch.nn.functional.conv2d(scaled, w.abs(), **geometry)
        z_mag = z_mag + (0.0 if bias is None else bias.double().abs().view(-1, 1, 1))
        grad_w = torch.nn.grad.conv2d_weight(scaled, w.shape, h, **geometry)
        grad_b = h.sum(dim=(0, 2, 3))
    else:
        z_mag = scaled @ w.abs().T + (0.0 if bias is None else bias.double().abs())
        grad_w, grad_b = h.T @ scaled, h.sum(dim=0)

    def top(t: torch.Tensor) -> float:
        return float(t.max()) if t.numel() else 0.0

    return {
        "h": top(z_mag),
        "goodness": kappa * top((h * z_mag).flatten(1).sum(dim=1)),
        "grad_weight": coefficient * top(grad_w),
        "grad_bias": coefficient * top(grad_b),
    }


def assert_close_fp32(actual, expected, fields, mags: dict[str, float], *, rtol: float = 1e-4) -> None:
    for name in fields:
        a, e = getattr(actual, name), getattr(expected, name)
        if e is None:
            assert a is None, name
            continue
        assert a is not None and a.shape == e.shape, (name, None if a is None else a.shape, e.shape)
        key = name.split("_")[0] if name.startswith(("goodness", "h_")) else name
        atol = 16 * EPS32 * mags.get(key, float(e.abs().max()) if e.numel() else 0.0) + 1e-30
        torch.testing.assert_close(a.to(e.dtype), e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# torch backend == reference, every option combination


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("combo", STEP_COMBOS, ids=step_id)
def test_conv_step_torch_matches_reference(combo, geometry, backend) -> None:
    normalize, goodness, loss, offsets, bias = combo
    p, q = (9, 9) if loss == "symba" else (9, 6)
    args, kwargs = conv_case(p, q, 5, geometry, normalize=normalize, goodness=goodness, loss=loss, offsets=offsets,
                             bias=bias)
    ref = ffk.ff_conv2d_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_conv2d_step(*args, **kwargs, backend=backend)
    out_h, out_w = check_conv_geometry(*geometry).output_size((HEIGHT, WIDTH), KERNEL)
    for out in (ref, fast):
        assert out.loss.shape == () and out.loss.dtype == torch.float32
        assert out.goodness_pos.shape == (p,) and out.goodness_pos.dtype == torch.float32
        assert out.goodness_neg.shape == (q,) and out.goodness_neg.dtype == torch.float32
        assert out.h_pos.shape == (p, 5, out_h, out_w) and out.h_neg.shape == (q, 5, out_h, out_w)
        assert out.grad_weight.shape == (5, IN_CHANNELS, *KERNEL) and out.grad_weight.dtype == torch.float32
        assert (out.grad_bias is None) == (not bias)
    assert 0 < float((ref.h_pos > 0).float().mean()) < 1
    assert float(ref.grad_weight.abs().max()) > 0
    kappa = 1.0 / (5 * out_h * out_w) if goodness == "mean" else 1.0
    coefficient = 2 * kappa * (abs(kwargs["alpha"]) / p if loss == "symba" else 1.0 / (p + q))
    x = torch.cat([args[0], args[1]])
    h = torch.cat([ref.h_pos, ref.h_neg])
    mags = _magnitudes(x, args[2], args[3], h, kwargs, kappa=kappa, coefficient=coefficient, conv=True)
    assert_close_fp32(fast, ref, STEP_FIELDS, mags)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("combo", CLASS_COMBOS, ids=class_id)
def test_conv_class_step_torch_matches_reference(combo, geometry, backend) -> None:
    normalize, goodness, bias, tau = combo
    args, kwargs = conv_class_case(11, 3, 2, geometry, normalize=normalize, goodness=goodness, bias=bias,
                                   temperature=tau)
    ref = ffk.ff_conv2d_class_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_conv2d_class_step(*args, **kwargs, backend=backend)
    out_h, out_w = check_conv_geometry(*geometry).output_size((HEIGHT, WIDTH), KERNEL)
    for out in (ref, fast):
        assert out.loss.shape == () and out.loss.dtype == torch.float32
        assert out.goodness.shape == (11, 3) and out.goodness.dtype == torch.float32
        assert out.h.shape == (11, 6, out_h, out_w)
        assert out.grad_weight.shape == (6, IN_CHANNELS, *KERNEL) and (out.grad_bias is None) == (not bias)
    assert 0 < float((ref.h > 0).float().mean()) < 1 and float(ref.grad_weight.abs().max()) > 0
    kappa = 1.0 / (2 * out_h * out_w) if goodness == "mean" else 1.0
    coefficient = 2 * kappa / (11 * kwargs["temperature"])
    mags = _magnitudes(args[0], args[2], args[3], ref.h, kwargs, kappa=kappa, coefficient=coefficient, conv=True)
    assert_close_fp32(fast, ref, CLASS_FIELDS, mags)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("features", [(13, 4), (5, 6)], ids=["N<K", "N>K"])
@pytest.mark.parametrize("combo", CLASS_COMBOS, ids=class_id)
def test_linear_class_step_torch_matches_reference(combo, features, backend) -> None:
    normalize, goodness, bias, tau = combo
    in_features, group = features
    args, kwargs = linear_class_case(17, in_features, 3, group, normalize=normalize, goodness=goodness, bias=bias,
                                     temperature=tau)
    ref = ffk.ff_linear_class_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_linear_class_step(*args, **kwargs, backend=backend)
    for out in (ref, fast):
        assert out.goodness.shape == (17, 3) and out.goodness.dtype == torch.float32 and out.h.shape == (17, 3 * group)
        assert out.grad_weight.shape == (3 * group, in_features) and (out.grad_bias is None) == (not bias)
    kappa = 1.0 / group if goodness == "mean" else 1.0
    coefficient = 2 * kappa / (17 * kwargs["temperature"])
    mags = _magnitudes(args[0], args[2], args[3], ref.h, kwargs, kappa=kappa, coefficient=coefficient, conv=False)
    assert_close_fp32(fast, ref, CLASS_FIELDS, mags)


@pytest.mark.parametrize("combo", STEP_COMBOS, ids=step_id)
def test_conv_step_closed_form_equals_autograd_float64(combo) -> None:
    normalize, goodness, loss, offsets, bias = combo
    # stride 3: six output positions, so that the sum goodness keeps |u| < 20, where the reference's F.softplus
    # is exact (beyond, it is linearised and its autograd gradient is off by ~1e-9 relative)
    args, kwargs = conv_case(7, 7 if loss == "symba" else 4, 4, (3, 0, 1), normalize=normalize, goodness=goodness,
                             loss=loss, offsets=offsets, bias=bias, dtype=torch.float64, seed=2)
    ref = ffk.ff_conv2d_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_conv2d_step(*args, **kwargs, backend="torch")
    assert fast.grad_weight.dtype == torch.float64 and fast.loss.dtype == torch.float64
    for name in STEP_FIELDS:
        e = getattr(ref, name)
        if e is not None:
            torch.testing.assert_close(getattr(fast, name), e, rtol=1e-11, atol=1e-13, msg=name)


@pytest.mark.parametrize("combo", CLASS_COMBOS, ids=class_id)
def test_class_steps_closed_form_equal_autograd_float64(combo) -> None:
    normalize, goodness, bias, tau = combo
    cases = [
        (ffk.ff_conv2d_class_step, conv_class_case(8, 4, 2, GEOMETRIES[1], normalize=normalize, goodness=goodness,
                                                   bias=bias, temperature=tau, dtype=torch.float64, seed=4)),
        (ffk.ff_linear_class_step, linear_class_case(8, 9, 4, 2, normalize=normalize, goodness=goodness, bias=bias,
                                                     temperature=tau, dtype=torch.float64, seed=4)),
    ]
    for step, (args, kwargs) in cases:
        ref = step(*args, **kwargs, backend="reference")
        fast = step(*args, **kwargs, backend="torch")
        for name in CLASS_FIELDS:
            e = getattr(ref, name)
            if e is not None:
                torch.testing.assert_close(getattr(fast, name), e, rtol=1e-11, atol=1e-13, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the reference against DESIGN 7 written independently: numpy, float64, an explicit sliding window


def _pairs(geometry: tuple) -> tuple[tuple[int, int], ...]:
    g = check_conv_geometry(*geometry)
    return g.stride, g.padding, g.dilation


def _patches(x: np.ndarray, kernel: tuple[int, int], geometry: tuple):
    """Yield (i, j, patch (B, C_in, kh, kw)) for every output position of the sliding window."""
    (sh, sw), (ph, pw), (dh, dw) = _pairs(geometry)
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (x.shape[2] + 2 * ph - dh * (kernel[0] - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (kernel[1] - 1) - 1) // sw + 1
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(i * sh, i * sh + dh * (kernel[0] - 1) + 1, dh)
            cols = slice(j * sw, j * sw + dw * (kernel[1] - 1) + 1, dw)
            yield i, j, out_h, out_w, padded[:, :, rows, cols]


def _hand_layer(x, w, b, geometry, normalize, eps):
    """r x (the scaled input), h = relu(r conv(x) + b), as numpy."""
    flat = x.reshape(x.shape[0], -1)
    if normalize == "l2":
        r = 1.0 / (np.sqrt((flat**2).sum(1)) + eps)
    elif normalize == "rms":
        r = 1.0 / (np.sqrt((flat**2).mean(1)) + eps)
    else:
        r = np.ones(x.shape[0])
    scaled = x * r.reshape(-1, *([1] * (x.ndim - 1)))
    if x.ndim == 2:
        return scaled, np.maximum(scaled @ w.T + (0 if b is None else b), 0)
    z = None
    for i, j, out_h, out_w, patch in _patches(scaled, w.shape[2:], geometry):
        if z is None:
            z = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
        z[:, :, i, j] = np.einsum("bcpq,ocpq->bo", patch, w)
    return scaled, np.maximum(z + (0 if b is None else b.reshape(-1, 1, 1)), 0)


def _hand_grads(scaled, dz, w_shape, geometry):
    """The weight and bias gradients of the layer for the output gradient dz (DESIGN 7's closed form)."""
    if scaled.ndim == 2:
        return dz.T @ scaled, dz.sum(0)
    grad_w = np.zeros(w_shape)
    for i, j, _, _, patch in _patches(scaled, w_shape[2:], geometry):
        grad_w += np.einsum("bo,bcpq->ocpq", dz[:, :, i, j], patch)
    return grad_w, dz.sum(axis=(0, 2, 3))


def _sigmoid(t):
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def hand_conv_step(x_pos, x_neg, w, b, *, stride, padding, dilation, threshold, goodness, loss, normalize, eps, alpha,
                   offset_pos=None, offset_neg=None):
    geometry = (stride, padding, dilation)
    x = np.concatenate([x_pos, x_neg])
    scaled, h = _hand_layer(x, w, b, geometry, normalize, eps)
    kappa = 1.0 / h[0].size if goodness == "mean" else 1.0
    g = kappa * (h**2).reshape(len(x), -1).sum(1)
    p = len(x_pos)
    o = np.concatenate([np.zeros(p) if offset_pos is None else offset_pos, np.zeros(len(x_neg))
                        if offset_neg is None else offset_neg])
    total = g + o
    if loss == "logistic":
        u = np.concatenate([total[:p] - threshold, threshold - total[p:]])
        value = np.logaddexp(0, -u).mean()
        sign = np.concatenate([np.ones(p), -np.ones(len(x_neg))])
        dg = -sign * _sigmoid(-u) / len(x)
    else:
        margin = total[:p] - total[p:]
        value = np.logaddexp(0, -alpha * margin).mean()
        d = -alpha * _sigmoid(-alpha * margin) / p
        dg = np.concatenate([d, -d])
    dz = (2 * kappa * dg).reshape(-1, 1, 1, 1) * h
    grad_w, grad_b = _hand_grads(scaled, dz, w.shape, geometry)
    return dict(loss=value, goodness_pos=g[:p], goodness_neg=g[p:], h_pos=h[:p], h_neg=h[p:], grad_weight=grad_w,
                grad_bias=None if b is None else grad_b)


def hand_class_step(x, labels, w, b, *, num_classes, goodness, temperature, normalize, eps, geometry=None):
    scaled, h = _hand_layer(x, w, b, geometry, normalize, eps)
    grouped = h.reshape(len(x), num_classes, -1)
    kappa = 1.0 / grouped.shape[2] if goodness == "mean" else 1.0
    g = kappa * (grouped**2).sum(2)
    logits = g / temperature
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    value = (lse - logits[np.arange(len(x)), labels]).mean()
    dg = (np.exp(logits - lse[:, None]) - np.eye(num_classes)[labels]) / (len(x) * temperature)
    dz = ((2 * kappa * dg)[:, :, None] * grouped).reshape(h.shape)
    grad_w, grad_b = _hand_grads(scaled, dz, w.shape, geometry)
    return dict(loss=value, goodness=g, h=h, grad_weight=grad_w, grad_bias=None if b is None else grad_b)


def _numpy(value):
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _assert_matches_hand(out, expected, fields) -> None:
    for name in fields:
        e = expected[name]
        if e is None:
            assert getattr(out, name) is None, name
            continue
        np.testing.assert_allclose(getattr(out, name).numpy(), e, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    "normalize,goodness,loss,offsets,geometry",
    [
        ("l2", "mean", "logistic", False, GEOMETRIES[0]),
        ("rms", "sum", "logistic", True, GEOMETRIES[1]),
        ("none", "mean", "symba", True, GEOMETRIES[2]),
        ("l2", "sum", "symba", False, GEOMETRIES[3]),
    ],
)
@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_conv_step_against_hand_written_formulas(normalize, goodness, loss, offsets, geometry, backend) -> None:
    args, kwargs = conv_case(5, 5 if loss == "symba" else 3, 4, geometry, normalize=normalize, goodness=goodness,
                             loss=loss, offsets=offsets, dtype=torch.float64, seed=3)
    out = ffk.ff_conv2d_step(*args, **kwargs, backend=backend)
    expected = hand_conv_step(*(_numpy(a) for a in args), **{k: _numpy(v) for k, v in kwargs.items()})
    _assert_matches_hand(out, expected, STEP_FIELDS)


@pytest.mark.parametrize("normalize,goodness,geometry", [("none", "mean", GEOMETRIES[3]), ("rms", "sum", GEOMETRIES[1]),
                                                          ("l2", "mean", GEOMETRIES[2])])
@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_class_steps_against_hand_written_formulas(normalize, goodness, geometry, backend) -> None:
    args, kwargs = conv_class_case(7, 3, 2, geometry, normalize=normalize, goodness=goodness, temperature=0.7,
                                   dtype=torch.float64, seed=5)
    out = ffk.ff_conv2d_class_step(*args, **kwargs, backend=backend)
    hand = {k: v for k, v in kwargs.items() if k not in ("stride", "padding", "dilation")}
    expected = hand_class_step(*(_numpy(a) for a in args), **hand, geometry=geometry)
    _assert_matches_hand(out, expected, CLASS_FIELDS)

    args, kwargs = linear_class_case(7, 5, 3, 2, normalize=normalize, goodness=goodness, temperature=0.7,
                                     dtype=torch.float64, seed=5)
    out = ffk.ff_linear_class_step(*args, **kwargs, backend=backend)
    _assert_matches_hand(out, hand_class_step(*(_numpy(a) for a in args), **kwargs), CLASS_FIELDS)


# ---------------------------------------------------------------------------------------------------------------
# gradients: finite differences of the reference's loss, and the returned gradients are those of the returned loss


def _geometry_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("stride", "padding", "dilation")}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_reference_conv_loss(normalize, loss) -> None:
    args, kwargs = conv_case(3, 3 if loss == "symba" else 2, 2, GEOMETRIES[3], normalize=normalize, loss=loss,
                             offsets=True, dtype=torch.float64, seed=11)
    x_pos, x_neg, w, b = args
    geometry = check_conv_geometry(**_geometry_kwargs(kwargs))
    kappa = 1.0 / (2 * _positions(GEOMETRIES[3]))

    def loss_of(w_, b_, o_pos, o_neg):
        g_pos = sample_goodness_ref(conv2d_relu_ref(x_pos, w_, b_, geometry, normalize, 1e-4), kappa)
        g_neg = sample_goodness_ref(conv2d_relu_ref(x_neg, w_, b_, geometry, normalize, 1e-4), kappa)
        return ff_loss_ref(g_pos, g_neg, threshold=kwargs["threshold"], loss=loss, alpha=kwargs["alpha"],
                           offset_pos=o_pos, offset_neg=o_neg)

    inputs = tuple(t.clone().requires_grad_(True) for t in (w, b, kwargs["offset_pos"], kwargs["offset_neg"]))
    assert torch.autograd.gradcheck(loss_of, inputs)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_reference_class_losses(normalize) -> None:
    args, kwargs = conv_class_case(4, 3, 1, GEOMETRIES[1], normalize=normalize, dtype=torch.float64, seed=12)
    x, labels, w, b = args
    geometry = check_conv_geometry(**_geometry_kwargs(kwargs))
    kappa = 1.0 / _positions(GEOMETRIES[1])

    def conv_loss(w_, b_):
        h = conv2d_relu_ref(x, w_, b_, geometry, normalize, 1e-4)
        return class_loss_ref(class_goodness_ref(h, 3, kappa), labels, 0.8)

    assert torch.autograd.gradcheck(conv_loss, (w.clone().requires_grad_(True), b.clone().requires_grad_(True)))
    args, _ = linear_class_case(5, 4, 3, 2, normalize=normalize, dtype=torch.float64, seed=12)
    x, labels, w, b = args

    def linear_loss(w_, b_):
        return class_loss_ref(class_goodness_ref(linear_relu_ref(x, w_, b_, normalize, 1e-4), 3, 0.5), labels, 0.8)

    assert torch.autograd.gradcheck(linear_loss, (w.clone().requires_grad_(True), b.clone().requires_grad_(True)))


class _StepLoss(torch.autograd.Function):
    """A step's loss as a function of (weight, bias), with the step's own gradients as its backward: gradcheck then
    compares the returned gradients with finite differences of the returned loss."""

    @staticmethod
    def forward(ctx, w, b, call):
        out = call(w, b)
        ctx.save_for_backward(out.grad_weight, out.grad_bias)
        return out.loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        gw, gb = ctx.saved_tensors
        return grad_loss * gw, grad_loss * gb, None


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("op", ["conv2d_step", "conv2d_class_step", "linear_class_step"])
def test_gradcheck_step_gradients(op, backend) -> None:
    if op == "conv2d_step":
        (x_pos, x_neg, w, b), kwargs = conv_case(3, 2, 2, GEOMETRIES[1], normalize="rms", offsets=True,
                                                 dtype=torch.float64, seed=13)
        call = lambda w_, b_: ffk.ff_conv2d_step(x_pos, x_neg, w_, b_, **kwargs, backend=backend)  # noqa: E731
    elif op == "conv2d_class_step":
        (x, labels, w, b), kwargs = conv_class_case(4, 2, 1, GEOMETRIES[3], normalize="l2", dtype=torch.float64)
        call = lambda w_, b_: ffk.ff_conv2d_class_step(x, labels, w_, b_, **kwargs, backend=backend)  # noqa: E731
    else:
        (x, labels, w, b), kwargs = linear_class_case(5, 4, 2, 2, dtype=torch.float64)
        call = lambda w_, b_: ffk.ff_linear_class_step(x, labels, w_, b_, **kwargs, backend=backend)  # noqa: E731
    inputs = (w.clone().requires_grad_(True), b.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda w_, b_: _StepLoss.apply(w_, b_, call), inputs)


# ---------------------------------------------------------------------------------------------------------------
# forward == the step's h and goodness; empty batches; optimizers; inputs left alone; layouts


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("goodness", GOODNESS)
def test_forward_equals_step(backend, goodness) -> None:
    args, kwargs = conv_case(9, 6, 4, GEOMETRIES[1], normalize="rms", goodness=goodness)
    x_pos, _, w, b = args
    out = ffk.ff_conv2d_step(*args, **kwargs, backend=backend)
    forward_kwargs = dict(**_geometry_kwargs(kwargs), goodness=goodness, normalize="rms", backend=backend)
    h, g = ffk.ff_conv2d_forward(x_pos, w, b, **forward_kwargs)
    torch.testing.assert_close(h, out.h_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, out.goodness_pos, rtol=1e-5, atol=1e-6)

    args, kwargs = conv_class_case(9, 2, 2, GEOMETRIES[2], normalize="l2", goodness=goodness)
    out = ffk.ff_conv2d_class_step(*args, **kwargs, backend=backend)
    forward_kwargs = dict(**_geometry_kwargs(kwargs), goodness=goodness, normalize="l2", num_classes=2)
    h, g = ffk.ff_conv2d_forward(args[0], args[2], args[3], **forward_kwargs, backend=backend)
    assert g.shape == (9, 2) and g.dtype == torch.float32
    torch.testing.assert_close(h, out.h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, out.goodness, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("empty", ["pos", "neg"])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_empty_batch_logistic(empty, normalize) -> None:
    p, q = (0, 7) if empty == "pos" else (7, 0)
    args, kwargs = conv_case(p, q, 3, GEOMETRIES[1], normalize=normalize, offsets=True)
    ref = ffk.ff_conv2d_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_conv2d_step(*args, **kwargs, backend="torch")
    for out in (ref, fast):
        assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.grad_weight).all())
        assert out.goodness_pos.shape == (p,) and out.goodness_neg.shape == (q,)
    assert float(ref.grad_weight.abs().max()) > 0
    for name in STEP_FIELDS:
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-4, atol=1e-6, msg=name)


def _torch_optimizer(name: str, params):
    options = {"sgd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), "adam": dict(lr=0.01),
               "adamw": dict(lr=0.01, weight_decay=0.1)}[name]
    ours = {"sgd": ffk.optim.SGD, "adam": ffk.optim.Adam, "adamw": ffk.optim.AdamW}[name]
    theirs = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return ours, theirs, options


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("op", ["conv2d_step", "conv2d_class_step", "linear_class_step"])
def test_optimizer_matches_torch_optim(op, optimizer, backend) -> None:
    """Two steps with the update applied by the step equal the returned gradients fed to torch.optim."""
    if op == "conv2d_step":
        (a, bb, w, b), kwargs = conv_case(6, 5, 3, GEOMETRIES[1], normalize="l2")
        step = ffk.ff_conv2d_step
    elif op == "conv2d_class_step":
        (a, bb, w, b), kwargs = conv_class_case(6, 3, 1, GEOMETRIES[0], normalize="rms")
        step = ffk.ff_conv2d_class_step
    else:
        (a, bb, w, b), kwargs = linear_class_case(6, 5, 3, 2)
        step = ffk.ff_linear_class_step
    ours, theirs, options = _torch_optimizer(optimizer, None)
    fused = [w.clone(), b.clone()]
    opt = ours(fused, **options)
    plain = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    torch_opt = theirs(plain, **options)
    for _ in range(2):
        out = step(a, bb, *fused, **kwargs, optimizer=opt, backend=backend)
        assert out.grad_weight is None and out.grad_bias is None
        grads = step(a, bb, plain[0].detach(), plain[1].detach(), **kwargs, backend=backend)
        plain[0].grad, plain[1].grad = grads.grad_weight, grads.grad_bias
        torch_opt.step()
    for mine, reference in zip(fused, plain):
        torch.testing.assert_close(mine, reference.detach(), rtol=1e-5, atol=1e-6)


def test_inputs_and_parameters_untouched_without_optimizer() -> None:
    args, kwargs = conv_case(5, 4, 3, GEOMETRIES[1], offsets=True)
    class_args, class_kwargs = conv_class_case(5, 3, 1, GEOMETRIES[1], normalize="rms")
    saved = [t.clone() for t in (*args, *class_args)]
    for backend in ("reference", "torch"):
        ffk.ff_conv2d_step(*args, **kwargs, backend=backend)
        ffk.ff_conv2d_class_step(*class_args, **class_kwargs, backend=backend)
        for before, after in zip(saved, (*args, *class_args), strict=True):
            assert torch.equal(before, after)


def test_non_contiguous_and_channels_last_inputs() -> None:
    args, kwargs = conv_class_case(6, 3, 1, GEOMETRIES[1], normalize="l2")
    x, labels, w, b = args
    expected = ffk.ff_conv2d_class_step(*args, **kwargs, backend="torch")
    wide = torch.cat([x, x], dim=3)[..., : x.shape[3]]
    for layout in (x.to(memory_format=torch.channels_last), wide, x.transpose(2, 3).contiguous().transpose(2, 3)):
        out = ffk.ff_conv2d_class_step(layout, labels, w, b, **kwargs, backend="torch")
        torch.testing.assert_close(out.grad_weight, expected.grad_weight, rtol=1e-5, atol=1e-7)
    out = ffk.ff_conv2d_class_step(x, labels.int(), w, b, **kwargs, backend="torch")
    torch.testing.assert_close(out.loss, expected.loss)


def test_adjacent_activations_are_read_not_written() -> None:
    """A previous layer's h_pos/h_neg are adjacent rows of one tensor: read in place, never modified."""
    args, kwargs = conv_case(5, 5, 3, GEOMETRIES[0], normalize="rms")
    stacked = torch.cat([args[0], args[1]])
    saved = stacked.clone()
    ref = ffk.ff_conv2d_step(stacked[:5], stacked[5:], *args[2:], **kwargs, backend="reference")
    fast = ffk.ff_conv2d_step(stacked[:5], stacked[5:], *args[2:], **kwargs, backend="torch")
    assert torch.equal(stacked, saved)
    for name in STEP_FIELDS:
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-4, atol=1e-6, msg=name)


def test_auto_on_cpu_is_the_extension_where_built() -> None:
    """auto on CPU tensors: the extension's path (the fused goodness pass) where it is built, else torch."""
    args, kwargs = conv_class_case(5, 3, 1, GEOMETRIES[1])
    auto = ffk.ff_conv2d_class_step(*args, **kwargs)
    fast = ffk.ff_conv2d_class_step(*args, **kwargs, backend="torch" if EXT_REASON else "cuda")
    for name in CLASS_FIELDS:
        assert torch.equal(getattr(auto, name), getattr(fast, name)), name


# ---------------------------------------------------------------------------------------------------------------
# low precision: errors at most about twice those of the reference run at that precision (FlashAttention's rule)

# torch.amp.GradScaler's initial scale: the fp16 baseline is PyTorch's mixed precision as a user gets it
FP16_LOSS_SCALE = 2.0**16
LOW = [torch.float16, torch.bfloat16]


def _pixels(rows: int, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Image-like inputs: non-negative, about a third of them lit."""
    lit = torch.rand(rows, channels, size, size, generator=gen) < 0.35
    return torch.rand(rows, channels, size, size, generator=gen) * lit


def _low_case(op: str, seed: int = 0):
    """A batch of 256 (128 + 128 for the pos/neg step) large enough that c r h leaves fp16's normal range, and
    weights that put the goodness near the threshold (the losses unsaturated, every coefficient matters)."""
    gen = torch.Generator().manual_seed(seed)
    if op == "linear_class_step":
        x = _pixels(256, 1, 16, gen).flatten(1)
        weight = torch.randn(40, 256, generator=gen) * 2.0
        bias = 0.3 * torch.randn(40, generator=gen)
        labels = torch.randint(0, 10, (256,), generator=gen)
        kwargs = dict(num_classes=10, normalize="l2", temperature=0.5)
        return (x, labels, weight, bias), kwargs
    weight = torch.randn(20, 4, 3, 3, generator=gen) * (4 * 9) ** -0.5 * 2.0
    bias = 0.3 * torch.randn(20, generator=gen)
    if op == "conv2d_class_step":
        labels = torch.randint(0, 10, (256,), generator=gen)
        kwargs = dict(num_classes=10, padding=1, normalize="rms", temperature=0.5)
        return (_pixels(256, 4, 12, gen) * 3.0, labels, weight, bias), kwargs
    kwargs = dict(padding=1, stride=2, normalize="rms", threshold=2.0)
    return (_pixels(128, 4, 12, gen) * 3.0, _pixels(128, 4, 12, gen) * 3.0, weight, bias), kwargs


STEPS = {"conv2d_step": ffk.ff_conv2d_step, "conv2d_class_step": ffk.ff_conv2d_class_step,
         "linear_class_step": ffk.ff_linear_class_step}


def _low_baseline(op: str, given: tuple, kwargs: dict, dtype: torch.dtype):
    """The reference computed at ``dtype`` (no upcast); for fp16 with a loss scale as ``torch.amp.GradScaler``
    finds it: 2^16, halved while the gradients overflow (GradScaler skips those steps)."""
    low = tuple(t if t.dtype == torch.int64 else t.to(dtype) for t in given)
    geometry = check_conv_geometry(kwargs.get("stride", 1), kwargs.get("padding", 0), 1)
    if op == "conv2d_step":
        out_h, out_w = geometry.output_size(given[0].shape[2:], given[2].shape[2:])
        opts = check_step_options(threshold=kwargs["threshold"], goodness="mean", loss="logistic",
                                  normalize=kwargs["normalize"], eps=1e-4, alpha=4.0,
                                  out_features=given[2].shape[0] * out_h * out_w)
        step = partial(ff_conv2d_step_ref, *low, opts, geometry, upcast=False)
    else:
        positions = 1
        if op == "conv2d_class_step":
            positions = int(np.prod(geometry.output_size(given[0].shape[2:], given[2].shape[2:])))
        opts = check_class_options(num_classes=10, goodness="mean", temperature=kwargs["temperature"],
                                   normalize=kwargs["normalize"], eps=1e-4, channels=given[2].shape[0],
                                   positions=positions)
        if op == "conv2d_class_step":
            step = partial(ff_conv2d_class_step_ref, *low, opts, geometry, upcast=False)
        else:
            step = partial(ff_linear_class_step_ref, *low, opts, upcast=False)
    if dtype != torch.float16:
        return step()
    for loss_scale in (FP16_LOSS_SCALE / 2**k for k in range(17)):
        out = step(loss_scale=loss_scale)
        if all(bool(torch.isfinite(g).all()) for g in (out.grad_weight, out.grad_bias)):
            return out
    raise AssertionError("the fp16 baseline overflows at every loss scale")


def _assert_flash_attention_rule(out, truth, baseline, dtype: torch.dtype, fields) -> None:
    """Every output's max error <= 2 x the baseline's + a quarter ulp of the output's largest value."""
    report = []
    for name in fields:
        actual, base, expected = (getattr(o, name) for o in (out, baseline, truth))
        assert torch.isfinite(actual).all(), f"{name} is not finite"
        err = float((actual.double() - expected).abs().max())
        err_base = float((base.double() - expected).abs().max())
        scale = float(expected.abs().max())
        report.append(f"{name}: {err:.3g} (baseline {err_base:.3g}, scale {scale:.3g})")
        assert err <= 2.0 * err_base + torch.finfo(dtype).eps / 4 * scale, "; ".join(report)
    gw = float(truth.grad_weight.abs().max())
    err_base = float((baseline.grad_weight.double() - truth.grad_weight).abs().max())
    assert 1e-5 * gw < err_base < 0.05 * gw, "; ".join(report)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("inputs_low", [True, False], ids=["low-inputs", "compute-dtype"])
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", list(STEPS))
def test_low_precision_flash_attention_rule(op, dtype, inputs_low, backend) -> None:
    """Low-precision inputs and parameters, or fp32 ones with ``compute_dtype``: every output against a float64
    truth computed from the values given, at most about twice the error of the reference run at that precision."""
    args32, kwargs = _low_case(op)
    given = tuple(t.to(dtype) if inputs_low and t.is_floating_point() else t for t in args32)
    fields = STEP_FIELDS if op == "conv2d_step" else CLASS_FIELDS
    truth = STEPS[op](*(t.double() if t.is_floating_point() else t for t in given), **kwargs, backend="reference")
    baseline = _low_baseline(op, given, kwargs, dtype)
    extra = {} if inputs_low else {"compute_dtype": dtype}
    out = STEPS[op](*given, **kwargs, backend=backend, **extra)
    assert out.loss.dtype == torch.float32 and out.grad_weight.dtype == (dtype if inputs_low else torch.float32)
    _assert_flash_attention_rule(out, truth, baseline, dtype, fields)


# ---------------------------------------------------------------------------------------------------------------
# the boundary: every bad argument is an error that names it; backends without conv kernels say so


def _bad_calls():
    (x_pos, x_neg, w, b), kwargs = conv_case(3, 3, 4, GEOMETRIES[0])
    (x, labels, cw, cb), ckw = conv_class_case(4, 2, 2, GEOMETRIES[0])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    step = ffk.ff_conv2d_step
    cstep = ffk.ff_conv2d_class_step
    lstep = ffk.ff_linear_class_step
    return [
        ("weight must have shape", lambda: step(x_pos, x_neg, w[:, :, :, 0], b)),
        ("bias must have shape", lambda: step(x_pos, x_neg, w, b[:2])),
        ("weight must be contiguous", lambda: step(x_pos, x_neg, w.transpose(2, 3).contiguous().transpose(2, 3), b)),
        ("x_pos must have shape", lambda: step(x_pos[0], x_neg, w, b)),
        ("x_neg has 2 channels", lambda: step(x_pos, x_neg[:, :2], w, b)),
        ("too small", lambda: step(x_pos[:, :, :2], x_neg[:, :, :2], w, b)),
        ("x_pos images are", lambda: step(x_pos, x_neg[:, :, :, :5], w, b)),
        ("x_neg dtype", lambda: step(x_pos, x_neg.double(), w, b)),
        ("stride must be", lambda: step(x_pos, x_neg, w, b, stride=0)),
        ("padding must be", lambda: step(x_pos, x_neg, w, b, padding=(1, -1))),
        ("dilation must be", lambda: step(x_pos, x_neg, w, b, dilation=True)),
        ("pairs rows", lambda: step(x_pos, x_neg[:2], w, b, loss="symba")),
        ("both empty", lambda: step(x_pos[:0], x_neg[:0], w, b)),
        ("offset_pos must have shape", lambda: step(x_pos, x_neg, w, b, offset_pos=torch.zeros(2))),
        ("x contains NaN", lambda: cstep(nan, labels, cw, cb, **ckw)),
        ("x is empty", lambda: cstep(x[:0], labels[:0], cw, cb, **ckw)),
        ("labels must be an integer tensor", lambda: cstep(x, labels.float(), cw, cb, **ckw)),
        ("labels must have shape", lambda: cstep(x, labels[:2], cw, cb, **ckw)),
        (r"labels must lie in \[0, 2\)", lambda: cstep(x, labels + 1, cw, cb, **ckw)),
        ("not divisible by num_classes=3", lambda: cstep(x, labels, cw, cb, **{**ckw, "num_classes": 3})),
        ("num_classes must be an integer of at least 2", lambda: cstep(x, labels * 0, cw, cb, **{**ckw,
                                                                                                  "num_classes": 1})),
        ("temperature must be positive", lambda: cstep(x, labels, cw, cb, **{**ckw, "temperature": 0.0})),
        ("normalize must be one of", lambda: cstep(x, labels, cw, cb, **{**ckw, "normalize": "batch"})),
        ("optimizer does not hold weight", lambda: cstep(x, labels, cw, cb, **ckw,
                                                         optimizer=ffk.optim.SGD([w.clone()], lr=0.1))),
        ("optimizer must be an ff_kernels.optim", lambda: cstep(x, labels, cw, cb, **ckw,
                                                                optimizer=torch.optim.SGD([cw], lr=0.1))),
        ("x has 4 features", lambda: lstep(torch.zeros(3, 4), labels[:3], torch.zeros(4, 5), num_classes=2)),
        ("compute_dtype=.*backend='torch'( or 'triton')?( or 'cuda')? only",
         lambda: cstep(x, labels, cw, cb, **ckw, backend="reference", compute_dtype=torch.bfloat16)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_name_themselves(case) -> None:
    message, call = _bad_calls()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("op", ["conv2d_step", "conv2d_class_step", "linear_class_step", "conv2d_forward"])
def test_cuda_backend_runs_conv_on_cpu_tensors_only(op) -> None:
    """backend='cuda' implements the conv ops for CPU tensors (the extension's fused goodness pass): tensors on a
    GPU (here on the meta device) are refused with a message that says the CUDA extension has no conv kernels."""
    from ff_kernels.ops import cpu_conv

    meta = torch.empty(2, 3, 4, 4, device="meta")
    calls = {
        "conv2d_step": lambda: cpu_conv.ff_conv2d_step_cpu(meta, meta, meta, None, None, None,
                                                           compute_dtype=torch.float32),
        "conv2d_class_step": lambda: cpu_conv.ff_conv2d_class_step_cpu(meta, meta, meta, None, None, None,
                                                                       compute_dtype=torch.float32),
        "linear_class_step": lambda: cpu_conv.ff_linear_class_step_cpu(meta, meta, meta, None, None,
                                                                       compute_dtype=torch.float32),
        "conv2d_forward": lambda: cpu_conv.ff_conv2d_forward_cpu(meta, meta, None, None),
    }
    with pytest.raises(NotImplementedError, match=rf"{op} with backend='cuda' runs on CPU tensors only.*no conv"):
        calls[op]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_conv_relu_equals_conv_then_relu(dtype, monkeypatch) -> None:
    """On the CPU the torch backend fuses the ReLU into oneDNN's convolution where it runs; it must change nothing."""
    from ff_kernels.ops import torch_conv

    if not torch_conv.fused_conv_relu_runs(dtype):
        pytest.skip(f"oneDNN's fused convolution + ReLU does not run for {dtype} here")
    args, kwargs = conv_class_case(16, 3, 4, GEOMETRIES[3], normalize="rms", dtype=dtype)
    fused = ffk.ff_conv2d_class_step(*args, **kwargs, backend="torch")
    monkeypatch.setattr(torch_conv, "fused_conv_relu_runs", lambda dtype: False)
    plain = ffk.ff_conv2d_class_step(*args, **kwargs, backend="torch")
    for name in CLASS_FIELDS:
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=0, atol=0, msg=name)
