"""The numerical contract (DESIGN section 1): the reference against hand-written formulas and finite differences,
and every fast path (``backend="torch"`` here) against the reference for every option combination."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ff_kernels as ffk
from ff_kernels import backends
from ff_kernels._options import GOODNESS, LOSSES, NORMALIZE, check_step_options
from ff_kernels.reference import ff_linear_forward_ref, ff_linear_step_ref, ff_loss_ref

EPS32 = torch.finfo(torch.float32).eps
FIELDS = ("loss", "goodness_pos", "goodness_neg", "h_pos", "h_neg", "grad_weight", "grad_bias")
COMBOS = list(itertools.product(NORMALIZE, GOODNESS, LOSSES, (False, True), (False, True)))


def combo_id(combo: tuple) -> str:
    normalize, goodness, loss, offsets, bias = combo
    return f"{normalize}-{goodness}-{loss}-{'off' if offsets else 'nooff'}-{'bias' if bias else 'nobias'}"


def make_case(
    rows_pos: int,
    rows_neg: int,
    in_features: int,
    out_features: int,
    *,
    normalize: str = "l2",
    goodness: str = "mean",
    loss: str = "logistic",
    offsets: bool = False,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[tuple, dict]:
    """Random inputs scaled so that z ~ N(0, 1) for every normalisation, and options that keep the loss away from
    saturation: theta near the typical goodness, alpha scaled by the goodness' magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.randn(rows_pos, in_features, generator=gen, dtype=torch.float64)
    x_neg = torch.randn(rows_neg, in_features, generator=gen, dtype=torch.float64)
    w_scale = 1.0 if normalize == "l2" else in_features**-0.5
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) * w_scale
    b = 0.3 * torch.randn(out_features, generator=gen, dtype=torch.float64) if bias else None
    scale = 1.0 if goodness == "mean" else float(out_features)
    kwargs = dict(
        threshold=0.5 * scale,
        goodness=goodness,
        loss=loss,
        normalize=normalize,
        eps=1e-4,
        alpha=4.0 / scale,
    )
    if offsets:
        kwargs["offset_pos"] = 0.3 * scale * torch.randn(rows_pos, generator=gen, dtype=torch.float64).to(dtype)
        kwargs["offset_neg"] = 0.3 * scale * torch.randn(rows_neg, generator=gen, dtype=torch.float64).to(dtype)
    args = (x_pos.to(dtype), x_neg.to(dtype), weight.to(dtype), None if b is None else b.to(dtype))
    return args, kwargs


def fp32_atol(expected: torch.Tensor, terms: int) -> float:
    """Absolute floor for an fp32 result without cancellation (a sum of ``terms`` same-signed or small terms):
    its rounding error is a few ``terms * eps`` times its own magnitude."""
    if expected.numel() == 0:
        return 0.0
    return 4 * terms * EPS32 * float(expected.abs().max()) + 1e-30


def summand_magnitudes(args, kwargs, ref) -> dict[str, float]:
    """For each output, the largest sum of |summands| behind one of its entries (float64). The fp32 rounding error
    of a sum is eps times this, not eps times the result: grad_weight and z (hence h) can cancel, e.g. two
    symba rows with nearly equal normalised inputs give a gradient far smaller than either row's term."""
    x_pos, x_neg, w, b = (None if t is None else t.double() for t in args)
    x = torch.cat([x_pos, x_neg])
    n, k = w.shape
    if kwargs["normalize"] == "l2":
        r = 1.0 / (x.norm(dim=1) + kwargs["eps"])
    elif kwargs["normalize"] == "rms":
        r = 1.0 / (x.pow(2).mean(dim=1).sqrt() + kwargs["eps"])
    else:
        r = torch.ones(x.shape[0], dtype=torch.float64)
    z_mag = r[:, None] * (x.abs() @ w.abs().T) + (0.0 if b is None else b.abs())
    h = torch.cat([ref.h_pos, ref.h_neg]).double()
    kappa = 1.0 / n if kwargs["goodness"] == "mean" else 1.0
    if kwargs["loss"] == "logistic":
        cmax = 2 * kappa / x.shape[0]  # |dL/dg_i| <= 1/(P+Q)
    else:
        cmax = 2 * kappa * abs(kwargs["alpha"]) / x_pos.shape[0]  # |dL/dg_i| <= alpha/P

    def top(t: torch.Tensor) -> float:
        return float(t.max()) if t.numel() else 0.0

    h_mag = top(z_mag)
    g_mag = top(kappa * (h * z_mag).sum(dim=1))  # d(goodness) = 2 kappa sum_j h dh, dh ~ eps z_mag
    return {
        "loss": float(ref.loss.abs()),
        "h_pos": h_mag,
        "h_neg": h_mag,
        "goodness_pos": g_mag,
        "goodness_neg": g_mag,
        "grad_weight": cmax * top((r[:, None] * h).T @ x.abs()),
        "grad_bias": cmax * top(h.sum(dim=0)),
    }


def assert_outputs_close(actual, expected, args, kwargs, *, rtol: float = 1e-4, factor: float = 16.0) -> None:
    """rtol on every output, with an absolute floor of ``factor * eps32`` times the output's summand magnitude.

    Measured over every option combination and the property test: the torch backend's error stays below
    2.5 eps32 times the magnitude; 16 leaves room for other BLAS builds without hiding a real error (a wrong
    coefficient or eps is off by 1e-4 relative or more)."""
    mags = summand_magnitudes(args, kwargs, expected)
    for name in FIELDS:
        a, e = getattr(actual, name), getattr(expected, name)
        if e is None:
            assert a is None, name
            continue
        assert a is not None, name
        assert a.shape == e.shape, (name, a.shape, e.shape)
        atol = factor * EPS32 * mags[name] + 1e-30
        torch.testing.assert_close(a.to(e.dtype), e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def step_opts(**kwargs):
    """StepOptions as the boundary would build them, for calling the reference directly."""
    return check_step_options(
        threshold=kwargs.get("threshold", 2.0),
        goodness=kwargs.get("goodness", "mean"),
        loss=kwargs.get("loss", "logistic"),
        normalize=kwargs.get("normalize", "l2"),
        eps=kwargs.get("eps", 1e-4),
        alpha=kwargs.get("alpha", 4.0),
        out_features=kwargs["out_features"],
    )


# ---------------------------------------------------------------------------------------------------------------
# torch backend == reference for every option combination


# The fast CPU paths: the torch backend everywhere, the extension's fused CPU operator where it is built (what
# backend="auto" runs on CPU tensors).
CPU_FAST = ["torch", pytest.param("cuda", marks=pytest.mark.skipif(
    backends.cuda_unavailable_reason(torch.device("cpu")) is not None, reason="the C++ extension is not built"))]


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("shape", [(37, 29, 45, 23), (37, 29, 23, 45)], ids=["N<K", "N>K"])
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_fast_path_matches_reference_every_option(combo, shape, backend) -> None:
    normalize, goodness, loss, offsets, bias = combo
    p, q, k, n = shape
    if loss == "symba":
        q = p
    args, kwargs = make_case(p, q, k, n, normalize=normalize, goodness=goodness, loss=loss, offsets=offsets, bias=bias)
    ref = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_linear_step(*args, **kwargs, backend=backend)

    # output record: shapes and dtypes of DESIGN 1.8
    for out in (ref, fast):
        assert out.loss.shape == () and out.loss.dtype == torch.float32
        assert out.goodness_pos.shape == (p,) and out.goodness_pos.dtype == torch.float32
        assert out.goodness_neg.shape == (q,) and out.goodness_neg.dtype == torch.float32
        assert out.h_pos.shape == (p, n) and out.h_neg.shape == (q, n)
        assert out.grad_weight.shape == (n, k) and out.grad_weight.dtype == torch.float32
        assert (out.grad_bias is None) == (not bias)
        assert bool(torch.isfinite(out.loss))
    # the case exercises both sides of the ReLU and a non-trivial gradient
    assert 0 < float((ref.h_pos > 0).float().mean()) < 1
    assert float(ref.grad_weight.abs().max()) > 0
    assert_outputs_close(fast, ref, args, kwargs)


def test_inputs_and_parameters_untouched_without_optimizer() -> None:
    args, kwargs = make_case(9, 7, 11, 5, offsets=True)
    saved = [t.clone() for t in args]
    for backend in ("reference", "torch"):
        ffk.ff_linear_step(*args, **kwargs, backend=backend)
        for before, after in zip(saved, args, strict=True):
            assert torch.equal(before, after)


def test_auto_backend_on_cpu_is_the_fused_operator_or_torch() -> None:
    """auto on CPU tensors: the extension's CPU operator where it is built, the torch backend otherwise."""
    args, kwargs = make_case(6, 5, 7, 4)
    auto = ffk.ff_linear_step(*args, **kwargs)
    built = backends.cuda_unavailable_reason(torch.device("cpu")) is None
    fast = ffk.ff_linear_step(*args, **kwargs, backend="cuda" if built else "torch")
    for name in FIELDS:
        assert torch.equal(getattr(auto, name), getattr(fast, name)), name


# ---------------------------------------------------------------------------------------------------------------
# the reference against DESIGN's formulas written independently (float64, Python loops)


def _softplus(t: float) -> float:
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


def _sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))


def hand_step(
    x_pos, x_neg, weight, bias, *, threshold, goodness, loss, normalize, eps, alpha, offset_pos=None, offset_neg=None
):
    """DESIGN 1.1-1.6 with lists and loops: loss, goodness, h and the closed-form gradient."""
    w = weight.tolist()
    b = bias.tolist() if bias is not None else None
    n, k = len(w), len(w[0])
    kappa = 1.0 / n if goodness == "mean" else 1.0

    def rows(x):
        out = []
        for xi in x.tolist():
            if normalize == "l2":
                r = 1.0 / (math.sqrt(sum(v * v for v in xi)) + eps)
            elif normalize == "rms":
                r = 1.0 / (math.sqrt(sum(v * v for v in xi) / k) + eps)
            else:
                r = 1.0
            h = []
            for j in range(n):
                z = r * sum(xi[kk] * w[j][kk] for kk in range(k)) + (b[j] if b is not None else 0.0)
                h.append(z if z > 0 else 0.0)
            out.append((xi, r, h, kappa * sum(v * v for v in h)))
        return out

    pos, neg = rows(x_pos), rows(x_neg)
    o_pos = offset_pos.tolist() if offset_pos is not None else [0.0] * len(pos)
    o_neg = offset_neg.tolist() if offset_neg is not None else [0.0] * len(neg)
    # dL/dg per row
    if loss == "logistic":
        m = len(pos) + len(neg)
        total = 0.0
        dg_pos, dg_neg = [], []
        for (_, _, _, g), o in zip(pos, o_pos, strict=True):
            u = g + o - threshold
            total += _softplus(-u)
            dg_pos.append(-_sigmoid(-u) / m)
        for (_, _, _, g), o in zip(neg, o_neg, strict=True):
            u = -(g + o - threshold)
            total += _softplus(-u)
            dg_neg.append(_sigmoid(-u) / m)
        value = total / m
    else:
        p = len(pos)
        value = 0.0
        dg_pos, dg_neg = [], []
        for i in range(p):
            margin = (pos[i][3] + o_pos[i]) - (neg[i][3] + o_neg[i])
            value += _softplus(-alpha * margin) / p
            d = -alpha * _sigmoid(-alpha * margin) / p
            dg_pos.append(d)
            dg_neg.append(-d)
    grad_w = [[0.0] * k for _ in range(n)]
    grad_b = [0.0] * n
    for (xi, r, h, _), dg in itertools.chain(zip(pos, dg_pos, strict=True), zip(neg, dg_neg, strict=True)):
        c = 2.0 * kappa * dg
        for j in range(n):
            grad_b[j] += c * h[j]
            for kk in range(k):
                grad_w[j][kk] += c * r * h[j] * xi[kk]
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return dict(
        loss=as64(value),
        goodness_pos=as64([g for *_, g in pos]),
        goodness_neg=as64([g for *_, g in neg]),
        h_pos=as64([h for _, _, h, _ in pos]).reshape(len(pos), n),
        h_neg=as64([h for _, _, h, _ in neg]).reshape(len(neg), n),
        grad_weight=as64(grad_w),
        grad_bias=as64(grad_b) if bias is not None else None,
    )


@pytest.mark.parametrize(
    "normalize,goodness,loss,offsets",
    [
        ("l2", "mean", "logistic", False),
        ("rms", "sum", "logistic", True),
        ("none", "mean", "symba", True),
        ("l2", "sum", "symba", False),
    ],
)
@pytest.mark.parametrize("backend", ["reference", *CPU_FAST])
def test_against_hand_written_formulas_float64(normalize, goodness, loss, offsets, backend) -> None:
    p, q = (7, 7) if loss == "symba" else (7, 5)
    args, kwargs = make_case(
        p, q, 6, 4, normalize=normalize, goodness=goodness, loss=loss, offsets=offsets, dtype=torch.float64, seed=3
    )
    if offsets:
        # the boundary stores offsets as float32 (they are goodness); give it values that are exact in float32
        kwargs["offset_pos"] = kwargs["offset_pos"].float().double()
        kwargs["offset_neg"] = kwargs["offset_neg"].float().double()
    out = ffk.ff_linear_step(*args, **kwargs, backend=backend)
    expected = hand_step(*args, **kwargs)
    assert out.loss.dtype == torch.float64
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), expected[name], rtol=1e-10, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# gradients: finite differences (gradcheck) and closed form == autograd


def _loss_from_parts(w, b, o_pos, o_neg, x_pos, x_neg, opts):
    kw = dict(kappa=opts.kappa, normalize=opts.normalize, eps=opts.eps)
    _, g_pos = ff_linear_forward_ref(x_pos, w, b, **kw)
    _, g_neg = ff_linear_forward_ref(x_neg, w, b, **kw)
    return ff_loss_ref(
        g_pos, g_neg, threshold=opts.threshold, loss=opts.loss, alpha=opts.alpha, offset_pos=o_pos, offset_neg=o_neg
    )


class _StepLoss(torch.autograd.Function):
    """The loss of a whole step as a function of (weight, bias), with the step's own gradients as its backward:
    gradcheck then compares the returned gradients with finite differences of the returned loss."""

    @staticmethod
    def forward(ctx, w, b, x_pos, x_neg, kwargs):
        out = ffk.ff_linear_step(x_pos, x_neg, w, b, **kwargs)
        ctx.save_for_backward(out.grad_weight, out.grad_bias)
        return out.loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        gw, gb = ctx.saved_tensors
        return grad_loss * gw, grad_loss * gb, None, None, None


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_reference_loss(normalize, loss) -> None:
    args, kwargs = make_case(
        5, 5 if loss == "symba" else 4, 6, 3, normalize=normalize, loss=loss, offsets=True, dtype=torch.float64, seed=11
    )
    x_pos, x_neg, w, b = args
    opts = step_opts(**kwargs, out_features=w.shape[0])
    inputs = tuple(t.clone().requires_grad_(True) for t in (w, b, kwargs["offset_pos"], kwargs["offset_neg"]))
    assert torch.autograd.gradcheck(lambda *t: _loss_from_parts(*t, x_pos, x_neg, opts), inputs)
    # with the sum goodness too (kappa = 1)
    opts_sum = step_opts(**{**kwargs, "goodness": "sum", "threshold": 1.5, "alpha": 1.0}, out_features=w.shape[0])
    assert torch.autograd.gradcheck(lambda *t: _loss_from_parts(*t, x_pos, x_neg, opts_sum), inputs)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_gradcheck_step_gradients(normalize, loss, backend) -> None:
    """The grad_weight/grad_bias a step returns are the derivatives of the loss it returns (float64)."""
    args, kwargs = make_case(
        5, 5 if loss == "symba" else 4, 6, 3, normalize=normalize, loss=loss, offsets=True, dtype=torch.float64, seed=5
    )
    x_pos, x_neg, w, b = args
    kwargs["backend"] = backend
    inputs = (w.clone().requires_grad_(True), b.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda w_, b_: _StepLoss.apply(w_, b_, x_pos, x_neg, kwargs), inputs)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_closed_form_equals_autograd_float64(combo) -> None:
    normalize, goodness, loss, offsets, bias = combo
    p, q = (13, 13) if loss == "symba" else (13, 10)
    args, kwargs = make_case(
        p,
        q,
        17,
        9,
        normalize=normalize,
        goodness=goodness,
        loss=loss,
        offsets=offsets,
        bias=bias,
        dtype=torch.float64,
        seed=7,
    )
    ref = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_linear_step(*args, **kwargs, backend="torch")
    assert ref.grad_weight.dtype == torch.float64 and fast.grad_weight.dtype == torch.float64
    for name in FIELDS:
        e = getattr(ref, name)
        if e is None:
            assert getattr(fast, name) is None
            continue
        torch.testing.assert_close(getattr(fast, name), e, rtol=1e-11, atol=1e-13, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# forward == the step's h and goodness; empty batches


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("goodness", GOODNESS)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_step(backend, normalize, goodness, bias) -> None:
    args, kwargs = make_case(37, 29, 45, 23, normalize=normalize, goodness=goodness, bias=bias)
    x_pos, x_neg, w, b = args
    out = ffk.ff_linear_step(*args, **kwargs, backend=backend)
    for x, h_step, g_step in ((x_pos, out.h_pos, out.goodness_pos), (x_neg, out.h_neg, out.goodness_neg)):
        h, g = ffk.ff_linear_forward(x, w, b, goodness=goodness, normalize=normalize, eps=1e-4, backend=backend)
        assert h.shape == h_step.shape and h.dtype == torch.float32
        assert g.shape == g_step.shape and g.dtype == torch.float32
        torch.testing.assert_close(h, h_step, rtol=1e-5, atol=fp32_atol(h_step, 45))
        torch.testing.assert_close(g, g_step, rtol=1e-5, atol=fp32_atol(g_step, 45))


def test_forward_torch_equals_reference() -> None:
    args, kwargs = make_case(37, 1, 45, 23, normalize="rms", goodness="sum")
    x, _, w, b = args
    h_ref, g_ref = ffk.ff_linear_forward(x, w, b, goodness="sum", normalize="rms", backend="reference")
    h, g = ffk.ff_linear_forward(x, w, b, goodness="sum", normalize="rms", backend="torch")
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=fp32_atol(h_ref, 45))
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=fp32_atol(g_ref, 45))


@pytest.mark.parametrize("empty", ["pos", "neg"])
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("offsets", [False, True])
def test_empty_batch_logistic(empty, normalize, offsets) -> None:
    p, q = (0, 11) if empty == "pos" else (11, 0)
    args, kwargs = make_case(p, q, 9, 5, normalize=normalize, offsets=offsets)
    ref = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_linear_step(*args, **kwargs, backend="torch")
    for out in (ref, fast):
        assert bool(torch.isfinite(out.loss))
        assert bool(torch.isfinite(out.grad_weight).all()) and bool(torch.isfinite(out.grad_bias).all())
        assert out.goodness_pos.shape == (p,) and out.goodness_neg.shape == (q,)
        assert out.h_pos.shape == (p, 5) and out.h_neg.shape == (q, 5)
    assert float(ref.grad_weight.abs().max()) > 0
    assert_outputs_close(fast, ref, args, kwargs)
    # the mean runs over the rows that exist: the loss equals that of the non-empty side alone
    x_pos, x_neg, w, b = args
    expected = hand_step(
        x_pos.double(),
        x_neg.double(),
        w.double(),
        b.double(),
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
    )
    torch.testing.assert_close(ref.loss, expected["loss"].float(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# low precision: errors at most about twice those of the same computation done by PyTorch at that precision


def _max_errors(out, truth) -> dict[str, float]:
    errs = {}
    for name in FIELDS:
        e = getattr(truth, name)
        if e is not None:
            errs[name] = float((getattr(out, name).double() - e.double()).abs().max())
    return errs


def _check_low_precision(fast, low_ref, truth, *, floor_rel: float) -> None:
    err_fast, err_low = _max_errors(fast, truth), _max_errors(low_ref, truth)
    for name, e in err_fast.items():
        scale = float(getattr(truth, name).abs().max())
        bound = 2.0 * err_low[name] + floor_rel * scale
        assert e <= bound, f"{name}: error {e:.3g} > 2 x {err_low[name]:.3g} + floor (scale {scale:.3g})"
        # the low-precision run is really low precision (otherwise the bound proves nothing)
    assert err_low["grad_weight"] > 1e-5 * float(truth.grad_weight.abs().max())


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_compute_dtype(normalize, loss) -> None:
    p, q = (64, 64) if loss == "symba" else (64, 48)
    args, kwargs = make_case(p, q, 96, 40, normalize=normalize, loss=loss, offsets=True)
    x_pos, x_neg, w, b = args
    truth = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_linear_step(*args, **kwargs, backend="torch", compute_dtype=torch.bfloat16)
    assert fast.loss.dtype == torch.float32 and fast.goodness_pos.dtype == torch.float32
    assert fast.grad_weight.dtype == torch.float32 and fast.grad_bias.dtype == torch.float32
    opts = step_opts(**kwargs, out_features=w.shape[0])
    low = ff_linear_step_ref(
        *(t.to(torch.bfloat16) for t in args), opts, kwargs["offset_pos"], kwargs["offset_neg"], upcast=False
    )
    _check_low_precision(fast, low, truth, floor_rel=torch.finfo(torch.bfloat16).eps / 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("loss", LOSSES)
def test_low_precision_inputs_and_weights(dtype, normalize, loss) -> None:
    p, q = (64, 64) if loss == "symba" else (64, 48)
    args32, kwargs = make_case(p, q, 96, 40, normalize=normalize, loss=loss, offsets=True)
    args = tuple(t.to(dtype) for t in args32)
    # the truth: the contract computed in float32 on the given (low-precision) values
    truth = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    assert truth.grad_weight.dtype == dtype
    truth = truth._replace(
        grad_weight=truth.grad_weight.float(),
        grad_bias=truth.grad_bias.float(),
        h_pos=truth.h_pos.float(),
        h_neg=truth.h_neg.float(),
    )
    opts = step_opts(**kwargs, out_features=args[2].shape[0])
    truth32 = ff_linear_step_ref(*(t.float() for t in args), opts, kwargs["offset_pos"], kwargs["offset_neg"])
    fast = ffk.ff_linear_step(*args, **kwargs, backend="torch")
    assert fast.loss.dtype == torch.float32 and fast.goodness_neg.dtype == torch.float32
    assert fast.h_pos.dtype == dtype and fast.grad_weight.dtype == dtype
    low = ff_linear_step_ref(*args, opts, kwargs["offset_pos"], kwargs["offset_neg"], upcast=False)
    _check_low_precision(fast, low, truth32, floor_rel=torch.finfo(dtype).eps / 4)


# ---------------------------------------------------------------------------------------------------------------
# property test: random small shapes and options


@settings(max_examples=int(os.environ.get("FF_HYPOTHESIS_EXAMPLES", "60")), deadline=None)
@given(
    p=st.integers(0, 9),
    q=st.integers(0, 9),
    k=st.integers(1, 12),
    n=st.integers(1, 12),
    normalize=st.sampled_from(NORMALIZE),
    goodness=st.sampled_from(GOODNESS),
    loss=st.sampled_from(LOSSES),
    offsets=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_torch_equals_reference(p, q, k, n, normalize, goodness, loss, offsets, bias, seed) -> None:
    if loss == "symba":
        q = p = max(p, 1)
    elif p + q == 0:
        p = 1
    args, kwargs = make_case(
        p, q, k, n, normalize=normalize, goodness=goodness, loss=loss, offsets=offsets, bias=bias, seed=seed
    )
    ref = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_linear_step(*args, **kwargs, backend="torch")
    assert bool(torch.isfinite(ref.loss))
    assert_outputs_close(fast, ref, args, kwargs)
