"""The fused Triton path against the reference (DESIGN 1): every option, the fused optimizers, low precision.

On a machine without CUDA the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes are small and odd (masked tails everywhere) and the parametrizations cover each option value and the
interacting pairs rather than the full product. Realistic shapes run only on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ff_kernels as ffk
from ff_kernels import optim
from ff_kernels._options import check_step_options
from ff_kernels.ops.scaling import coefficient_scale
from ff_kernels.ops.torch_step import loss_and_coefficient
from ff_kernels.ops.triton import common
from ff_kernels.ops.triton.ops import ff_linear_forward_triton, ff_linear_step_triton
from ff_kernels.reference import ff_linear_forward_ref, ff_linear_step_ref, input_scale_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="realistic shapes need a GPU (too slow under the Triton interpreter)"
)
FIELDS = ("loss", "goodness_pos", "goodness_neg", "h_pos", "h_neg", "grad_weight", "grad_bias")


def make_inputs(rows_pos, rows_neg, k, n, *, dtype=torch.float32, bias=True, offsets=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(rows_pos, k, generator=gen)
    x_neg = torch.rand(rows_neg, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * (2.0 / k) ** 0.5
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    off_pos = torch.randn(rows_pos, generator=gen) if offsets else None
    off_neg = torch.randn(rows_neg, generator=gen) if offsets else None
    cast = [x_pos.to(dtype), x_neg.to(dtype), w.to(dtype), None if b is None else b.to(dtype)]
    return [None if t is None else t.to(DEVICE) for t in cast] + [
        None if t is None else t.to(DEVICE) for t in (off_pos, off_neg)
    ]


def step_options(n, *, goodness="mean", loss="logistic", normalize="l2", threshold=2.0, alpha=4.0):
    return check_step_options(
        threshold=threshold, goodness=goodness, loss=loss, normalize=normalize, eps=1e-4, alpha=alpha, out_features=n
    )


def _max_error(a, ref):
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def _max_abs(t):
    return t.float().abs().max().item() if t.numel() else 0.0


def _rounding_floor(ref):
    """The absolute floor of the low-precision rule: one final rounding of the largest value for outputs stored
    in bf16/fp16 (PyTorch's own product can be exact where the kernel, summing in another order, lands on the
    other side of a rounding boundary), a tiny one for fp32 outputs."""
    if ref.dtype in (torch.bfloat16, torch.float16):
        return 0.5 * torch.finfo(ref.dtype).eps * _max_abs(ref)
    return 1e-6 * _max_abs(ref)


def assert_close_fp32(actual, expected, name, rtol=1e-4):
    """Elementwise rtol with an absolute floor of rtol times the tensor's largest magnitude."""
    assert actual.shape == expected.shape, name
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * scale + 1e-12, msg=name)


def _term_scales(ref64, x_pos, x_neg, opts, off_pos, off_neg):
    """The sums behind the gradients with every term made positive: sum_i |c_i| r_i h_i^T |x_i| and
    sum_i |c_i| h_i. A gradient that cancels (K=1 with l2 normalisation makes all rows alike) is only determined
    to rounding of these, not of its own size."""
    _, c = loss_and_coefficient(ref64.goodness_pos, ref64.goodness_neg, opts, off_pos, off_neg)
    x = torch.cat([x_pos, x_neg]).double()
    r = input_scale_ref(x, opts.normalize, opts.eps)
    h = torch.cat([ref64.h_pos, ref64.h_neg])
    return {"grad_weight": (h * (c.abs() * r)[:, None]).T @ x.abs(), "grad_bias": h.T @ c.abs()}


def check_against_reference(out, x_pos, x_neg, w, b, opts, off_pos=None, off_neg=None, rtol=1e-4):
    """fp32 outputs against the float64 reference: elementwise within rtol of the value, with a floor of rtol
    times the tensor's largest magnitude, and for the gradients rtol times the size of the terms summed."""
    ref = ff_linear_step_ref(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    ref64 = ff_linear_step_ref(
        x_pos.double(), x_neg.double(), w.double(), None if b is None else b.double(), opts, off_pos, off_neg
    )
    terms = _term_scales(ref64, x_pos, x_neg, opts, off_pos, off_neg)
    for name in FIELDS:
        a, r, r64 = getattr(out, name), getattr(ref, name), getattr(ref64, name)
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == r.dtype and a.shape == r.shape, (name, a.dtype, r.dtype)
        allowed = rtol * (r64.abs() + _max_abs(r64) + terms.get(name, 0.0)) + 1e-12
        error = (a.double() - r64).abs()
        assert bool((error <= allowed).all()), (name, error.max().item(), (error / allowed).max().item())


# normalize, goodness, loss, offsets, bias, P, Q, K, N: each option value, and the interacting pairs
# (symba + offsets, rms + sum, empty batches with offsets), with tails in every dimension.
STEP_CASES = [
    ("l2", "mean", "logistic", False, True, 37, 29, 45, 23),
    ("rms", "sum", "logistic", True, True, 37, 29, 45, 23),
    ("none", "mean", "logistic", True, False, 37, 29, 45, 23),
    ("l2", "sum", "symba", True, True, 37, 37, 45, 23),
    ("rms", "mean", "symba", False, False, 33, 33, 45, 23),
    ("none", "sum", "symba", False, True, 20, 20, 45, 23),
    ("l2", "mean", "logistic", True, True, 0, 41, 45, 23),
    ("rms", "sum", "logistic", False, False, 41, 0, 45, 23),
    ("l2", "mean", "logistic", False, True, 1, 1, 1, 1),
    ("rms", "mean", "symba", True, True, 50, 50, 100, 70),
]


@pytest.mark.parametrize("normalize,goodness,loss,offsets,bias,rows_pos,rows_neg,k,n", STEP_CASES)
def test_step_matches_reference(normalize, goodness, loss, offsets, bias, rows_pos, rows_neg, k, n):
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(rows_pos, rows_neg, k, n, bias=bias, offsets=offsets)
    opts = step_options(n, goodness=goodness, loss=loss, normalize=normalize)
    w0, b0 = w.clone(), None if b is None else b.clone()
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    check_against_reference(out, x_pos, x_neg, w, b, opts, off_pos, off_neg)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert torch.equal(w, w0) and (b is None or torch.equal(b, b0)), "optimizer=None must leave the parameters alone"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows_pos=st.integers(0, 40),
    rows_neg=st.integers(0, 40),
    k=st.integers(1, 70),
    n=st.integers(1, 70),
    normalize=st.sampled_from(["l2", "rms", "none"]),
    goodness=st.sampled_from(["mean", "sum"]),
    loss=st.sampled_from(["logistic", "symba"]),
    bias=st.booleans(),
    offsets=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_step_random_shapes(rows_pos, rows_neg, k, n, normalize, goodness, loss, bias, offsets, seed):
    """Masked tails in every dimension, any option: the kernels against the reference."""
    if loss == "symba":
        rows_neg = rows_pos = max(rows_pos, 1)
    elif rows_pos + rows_neg == 0:
        rows_pos = 1
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(rows_pos, rows_neg, k, n, bias=bias, offsets=offsets, seed=seed)
    opts = step_options(n, goodness=goodness, loss=loss, normalize=normalize)
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    check_against_reference(out, x_pos, x_neg, w, b, opts, off_pos, off_neg)


def test_step_is_deterministic():
    """No atomics anywhere: two runs agree bit for bit (the N-tile reduction happens in a fixed order)."""
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(37, 29, 45, 70, offsets=True)
    opts = step_options(70, normalize="rms")
    first = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    second = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    for name in FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@pytest.mark.parametrize(
    "normalize,goodness,bias,rows,k,n",
    [
        ("l2", "mean", True, 37, 45, 23),
        ("rms", "sum", False, 37, 45, 70),
        ("none", "mean", True, 5, 3, 2),
        ("l2", "sum", True, 0, 45, 23),
    ],
)
def test_forward_matches_reference(normalize, goodness, bias, rows, k, n):
    x, _, w, b, _, _ = make_inputs(rows, 0, k, n, bias=bias)
    kappa = 1.0 / n if goodness == "mean" else 1.0
    h, g = ff_linear_forward_triton(x, w, b, kappa=kappa, normalize=normalize, eps=1e-4)
    h_ref, g_ref = ff_linear_forward_ref(x, w, b, kappa=kappa, normalize=normalize, eps=1e-4)
    assert h.dtype == x.dtype and g.dtype == torch.float32
    assert_close_fp32(h, h_ref, "h")
    assert_close_fp32(g, g_ref, "g")


def _sgd_nesterov(params):
    return optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)


def _sgd_dampened(params):
    return optim.SGD(params, lr=0.05, momentum=0.8, dampening=0.3)


def _sgd_plain(params):
    return optim.SGD(params, lr=0.1)


def _adam(params):
    return optim.Adam(params, lr=1e-2, weight_decay=1e-2)


def _adamw(params):
    return optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)


@pytest.mark.parametrize(
    "make_opt,loss,normalize,bias",
    [
        (_sgd_nesterov, "logistic", "l2", True),
        (_sgd_dampened, "symba", "rms", True),
        (_sgd_plain, "logistic", "none", False),
        (_adam, "logistic", "rms", True),
        (_adamw, "symba", "l2", False),
    ],
)
def test_fused_update_matches_optimizer(make_opt, loss, normalize, bias):
    """Three fused steps against optimizer.update on reference gradients, on a clone with its own optimizer."""
    rows, k, n = 37, 45, 23
    _, _, w, b, _, _ = make_inputs(1, 1, k, n, bias=bias)
    w_ref, b_ref = w.clone(), None if b is None else b.clone()
    params, params_ref = [p for p in (w, b) if p is not None], [p for p in (w_ref, b_ref) if p is not None]
    opt, opt_ref = make_opt(params), make_opt(params_ref)
    opts = step_options(n, loss=loss, normalize=normalize)
    for step in range(3):
        x_pos, x_neg, _, _, off_pos, off_neg = make_inputs(rows, rows, k, n, offsets=step == 1, seed=step + 1)
        ref = ff_linear_step_ref(x_pos, x_neg, w_ref, b_ref, opts, off_pos, off_neg)
        out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg, optimizer=opt)
        opt_ref.update(params_ref, [ref.grad_weight] + ([] if b is None else [ref.grad_bias]))
        assert out.grad_weight is None and out.grad_bias is None
        for name in ("loss", "goodness_pos", "goodness_neg", "h_pos", "h_neg"):
            assert_close_fp32(getattr(out, name), getattr(ref, name), f"step {step} {name}")
        for p, p_ref, label in zip(params, params_ref, ("weight", "bias")):
            assert_close_fp32(p, p_ref, f"step {step} {label}")
            state, state_ref = opt.check_holds(label, p), opt_ref.check_holds(label, p_ref)
            assert state.keys() == state_ref.keys()
            for key, value in state_ref.items():
                if isinstance(value, torch.Tensor):
                    assert state[key].dtype == torch.float32
                    assert_close_fp32(state[key], value, f"step {step} {label} {key}")
                else:
                    assert state[key] == value, key


def test_fused_update_low_precision_params_keep_fp32_state():
    """bf16 parameters: fp32 momentum state; each step is computed in fp32 and rounded once when stored.

    Each step starts the spec (optimizer.update with fp32 gradients) from the kernel's parameters, so the result
    may differ from it by one rounding of the parameter plus the error of the step itself (the kernel's gradient
    uses the bf16 h: about 1% of the largest gradient).
    """
    rows, k, n = 37, 45, 23
    x_pos, x_neg, w, b, _, _ = make_inputs(rows, rows, k, n, dtype=torch.bfloat16)
    w_ref, b_ref = w.clone(), b.clone()
    opt, opt_ref = _sgd_nesterov([w, b]), _sgd_nesterov([w_ref, b_ref])
    opts = step_options(n)
    for step in range(2):
        w_ref.copy_(w)
        b_ref.copy_(b)
        before = (w.float(), b.float())
        ref = ff_linear_step_ref(x_pos.float(), x_neg.float(), w_ref.float(), b_ref.float(), opts)
        ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=opt)
        opt_ref.update([w_ref, b_ref], [ref.grad_weight, ref.grad_bias])
        for p, p_ref, p_before, label in ((w, w_ref, before[0], "weight"), (b, b_ref, before[1], "bias")):
            assert p.dtype == torch.bfloat16
            buf = opt.check_holds(label, p)["momentum_buffer"]
            buf_ref = opt_ref.check_holds(label, p_ref)["momentum_buffer"]
            assert buf.dtype == torch.float32
            assert_close_fp32(buf, buf_ref, f"step {step} {label} momentum", rtol=2e-2)
            p_ref = p_ref.float()
            tolerance = p_ref.abs() * 2.0**-7 + 2e-2 * (p_ref - p_before).abs().max() + 1e-7
            assert bool(((p.float() - p_ref).abs() <= tolerance).all()), (step, label)


@pytest.mark.parametrize(
    "dtype,normalize,loss,goodness,bias,rows_pos,rows_neg",
    [
        (torch.bfloat16, "l2", "logistic", "mean", True, 37, 29),
        (torch.bfloat16, "rms", "symba", "sum", False, 37, 37),
        (torch.bfloat16, "none", "logistic", "sum", True, 0, 29),
        (torch.float16, "l2", "logistic", "sum", False, 37, 29),
        (torch.float16, "none", "symba", "mean", True, 37, 37),
        (torch.float16, "rms", "logistic", "mean", True, 37, 0),
    ],
)
def test_low_precision_error_bound(dtype, normalize, loss, goodness, bias, rows_pos, rows_neg):
    """FlashAttention's rule: error vs the fp32 reference <= 2x that of the same computation in PyTorch at dtype
    (plus one final rounding of the output)."""
    k, n = 45, 23
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(
        rows_pos, rows_neg, k, n, dtype=dtype, bias=bias, offsets=loss == "symba"
    )
    opts = step_options(n, goodness=goodness, loss=loss, normalize=normalize)
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    exact = ff_linear_step_ref(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    same_precision = ff_linear_step_ref(x_pos, x_neg, w, b, opts, off_pos, off_neg, upcast=False)
    for name in FIELDS:
        a, r, low = getattr(out, name), getattr(exact, name), getattr(same_precision, name)
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == r.dtype, name
        assert _max_error(a, r) <= 2.0 * _max_error(low, r) + _rounding_floor(r), (name, _max_error(a, r))


def test_fp16_row_coefficients_do_not_underflow():
    """With large inputs r_i is small and c_i r_i h_ij falls below fp16's normal range (PyTorch's fp16 gradient
    is then about 15% off); the kernel scales the coefficients by a power of two and stays at fp16 rounding."""
    x_pos, x_neg, w, b, _, _ = make_inputs(37, 29, 45, 23, dtype=torch.float16)
    x_pos, x_neg = x_pos * 1000, x_neg * 1000
    opts = step_options(23)
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts)
    exact = ff_linear_step_ref(x_pos, x_neg, w, b, opts)
    scale = exact.grad_weight.float().abs().max().item()
    assert _max_error(out.grad_weight, exact.grad_weight) <= 2e-3 * scale


def _low_precision_floor(out, truth):
    """The absolute floor of the low-precision rule against a float64 truth: one final rounding of the largest
    value at the output's own dtype."""
    if out.dtype in (torch.bfloat16, torch.float16):
        return 0.5 * torch.finfo(out.dtype).eps * _max_abs(truth)
    return 1e-6 * _max_abs(truth)


def assert_low_precision_rule(out, truth, same_precision, fields=FIELDS):
    """FlashAttention's rule against a float64 truth: every output's error <= 2x the error of the same computation
    in PyTorch at the input precision, plus one final rounding of the output; and every output finite."""
    for name in fields:
        a, r, low = getattr(out, name), getattr(truth, name), getattr(same_precision, name)
        if r is None:
            assert a is None, name
            continue
        assert bool(a.isfinite().all()), name
        allowed = 2.0 * _max_error(low, r) + _low_precision_floor(a, r)
        assert _max_error(a, r) <= allowed, (name, _max_error(a, r), allowed)


def _truth64(x_pos, x_neg, w, b, opts, off_pos=None, off_neg=None):
    """The contract evaluated in float64 on the (already rounded) low-precision inputs."""
    return ff_linear_step_ref(
        x_pos.double(), x_neg.double(), w.double(), None if b is None else b.double(), opts, off_pos, off_neg
    )


def _near_zero_row_inputs():
    """fp16 inputs where negative row 3 of x is nearly zero (r_3 = 1/(||x_3|| + eps), about 1e4) and the bias is 20:
    h_3j is about 20 and row 3's c is the largest of the batch (a confidently wrong negative), so the product
    c_3 r_3 h_3j / 2^s is about 1e5, beyond fp16's 65504."""
    x_pos, x_neg, w, b, _, _ = make_inputs(37, 29, 45, 23, dtype=torch.float16)
    x_neg[3] = (1e-6 * torch.randn(45, generator=torch.Generator().manual_seed(1))).to(x_neg)
    b.fill_(20.0)
    return x_pos, x_neg, w, b


def test_fp16_near_zero_row_with_large_bias_gradients():
    """GEMM 2 scales x by r_i (|r_i x_ik| <= 1) and h by c_i / 2^s (<= |h_ij|): neither operand can overflow, so
    the gradients stay finite and within the low-precision rule (scaling r into the h tile gave inf and NaN)."""
    x_pos, x_neg, w, b = _near_zero_row_inputs()
    opts = step_options(23)
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts)
    same_precision = ff_linear_step_ref(x_pos, x_neg, w, b, opts, upcast=False)
    assert bool(same_precision.grad_weight.isfinite().all())  # PyTorch's own fp16 step holds here
    assert_low_precision_rule(out, _truth64(x_pos, x_neg, w, b, opts), same_precision)


def test_fp16_near_zero_row_with_large_bias_sgd_update():
    """The fused update of the same step: finite fp16 weights, within one rounding plus lr times the gradient
    rule of the float64 step."""
    x_pos, x_neg, w, b = _near_zero_row_inputs()
    opts = step_options(23)
    w0, b0 = w.clone(), b.clone()
    truth = _truth64(x_pos, x_neg, w0, b0, opts)
    same_precision = ff_linear_step_ref(x_pos, x_neg, w0, b0, opts, upcast=False)
    lr = 0.5
    ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=optim.SGD([w, b], lr=lr))
    for p, p0, name in ((w, w0, "grad_weight"), (b, b0, "grad_bias")):
        assert bool(p.isfinite().all()), name
        grad, low = getattr(truth, name), getattr(same_precision, name)
        expected = p0.double() - lr * grad
        allowed = 2.0**-11 * expected.abs() + lr * (2.0 * _max_error(low, grad) + _low_precision_floor(low, grad))
        assert bool(((p.double() - expected).abs() <= allowed).all()), name


MANY_ROWS_OPTIONS = [
    ("l2", "logistic", "mean", True, 611, 592),
    ("rms", "symba", "sum", False, 601, 601),
    ("none", "logistic", "sum", True, 517, 700),
]


@pytest.mark.parametrize("normalize,loss,goodness,bias,rows_pos,rows_neg", MANY_ROWS_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_many_rows_low_precision(dtype, normalize, loss, goodness, bias, rows_pos, rows_neg):
    """M >= 1202 rows (38 row tiles of 32 under the interpreter, 19 of 64 on a GPU), odd K and N, three option
    sets (normalisations, losses, goodness, with and without bias): every output within the low-precision rule of
    the float64 truth."""
    k, n = 41, 23
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(rows_pos, rows_neg, k, n, dtype=dtype, bias=bias,
                                                       offsets=True)
    opts = step_options(n, normalize=normalize, loss=loss, goodness=goodness)
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    same_precision = ff_linear_step_ref(x_pos, x_neg, w, b, opts, off_pos, off_neg, upcast=False)
    assert_low_precision_rule(out, _truth64(x_pos, x_neg, w, b, opts, off_pos, off_neg), same_precision)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_many_rows_compute_dtype(dtype):
    """fp32 inputs and weights with ``compute_dtype``: both GEMMs in ``dtype`` (h returned in it), gradients in
    fp32. Every output within the low-precision rule of the float64 truth, against the torch backend's
    ``compute_dtype`` step as the same computation in PyTorch."""
    rows_pos, rows_neg, k, n = 611, 592, 41, 23
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(rows_pos, rows_neg, k, n, offsets=True)
    opts = step_options(n)
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, off_pos, off_neg, compute_dtype=dtype)
    assert out.h_pos.dtype == dtype and out.grad_weight.dtype == torch.float32 and out.grad_bias.dtype == w.dtype
    same_precision = ffk.ff_linear_step(x_pos, x_neg, w, b, offset_pos=off_pos, offset_neg=off_neg,
                                        backend="torch", compute_dtype=dtype)
    assert_low_precision_rule(out, _truth64(x_pos, x_neg, w, b, opts, off_pos, off_neg), same_precision)


@pytest.mark.parametrize("make_opt", [_sgd_nesterov, _adam, _adamw])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compute_dtype_fused_update_writes_the_fp32_master_weight(make_opt, dtype):
    """With bf16/fp16 compute over fp32 weights, GEMM 2's epilogue updates the fp32 weight and its fp32 state:
    three fused steps equal the same step's own fp32 gradients applied by optimizer.update, on a clone."""
    rows, k, n = 37, 45, 23
    _, _, w, b, _, _ = make_inputs(1, 1, k, n)
    w_ref, b_ref = w.clone(), b.clone()
    opt, opt_ref = make_opt([w, b]), make_opt([w_ref, b_ref])
    opts = step_options(n)
    for step in range(3):
        x_pos, x_neg, _, _, _, _ = make_inputs(rows, rows, k, n, seed=step + 1)
        ref = ff_linear_step_triton(x_pos, x_neg, w_ref, b_ref, opts, compute_dtype=dtype)
        out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=opt, compute_dtype=dtype)
        opt_ref.update([w_ref, b_ref], [ref.grad_weight, ref.grad_bias])
        assert w.dtype == torch.float32 and out.h_pos.dtype == dtype
        if step == 0:  # same weights: the same kernels give the same forward
            assert torch.equal(out.h_pos, ref.h_pos) and torch.equal(out.loss, ref.loss)
        assert_close_fp32(out.loss, ref.loss, f"step {step} loss")
        for p, p_ref, label in ((w, w_ref, "weight"), (b, b_ref, "bias")):
            assert_close_fp32(p, p_ref, f"step {step} {label}")


def test_compute_dtype_routes_to_triton_and_forward_matches_torch():
    """``auto`` and ``backend="triton"`` take ``compute_dtype`` (no fall back to the unfused torch path), and
    inference in bf16 over fp32 weights agrees with the torch backend's within bf16 rounding."""
    from ff_kernels import dispatch

    assert dispatch.spec("linear_step", "triton").compute_dtype
    assert dispatch.spec("linear_forward", "triton").compute_dtype
    x, _, w, b, _, _ = make_inputs(29, 0, 41, 23)
    h, g = ffk.ff_linear_forward(x, w, b, backend="triton", compute_dtype=torch.bfloat16)
    h_ref, g_ref = ffk.ff_linear_forward(x, w, b, backend="torch", compute_dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and g.dtype == torch.float32
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2)


def test_coefficient_scale_is_a_power_of_two_bound():
    cases = (("logistic", 4.0, 25000, 25000), ("symba", 3.0, 7, 7), ("symba", 1e-30, 3, 3))
    for loss, alpha, rows_pos, rows_neg in cases:
        opts = step_options(500, loss=loss, alpha=alpha)  # symba's alpha is positive (checked at the boundary)
        scale = coefficient_scale(opts, rows_pos, rows_neg)
        mantissa, _ = math.frexp(scale)
        assert mantissa == 0.5
        bound = 2 * opts.kappa * (abs(alpha) if loss == "symba" else 1.0) / (rows_pos if loss == "symba" else 50000)
        assert scale >= bound and (bound == 0 or scale < 2 * bound)


def _opcheck_inputs(bias=True):
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(5, 5, 7, 3, bias=bias, offsets=True)
    return x_pos, x_neg, w, b, None, off_pos, off_neg, 2.0, 1.0 / 3, "symba", "l2", 1e-4, 4.0


def test_opcheck_forward():
    x, _, w, b, _, _ = make_inputs(5, 0, 7, 3)
    torch.library.opcheck(torch.ops.ff_kernels.triton_forward.default, (x, w, b, 1.0 / 3, "rms", 1e-4))


def test_opcheck_step():
    torch.library.opcheck(torch.ops.ff_kernels.triton_step.default, _opcheck_inputs())


def test_opcheck_step_sgd():
    args = _opcheck_inputs()
    w, b = args[2], args[3]
    bufs = (torch.zeros_like(w), torch.zeros_like(b))
    torch.library.opcheck(
        torch.ops.ff_kernels.triton_step_sgd_.default, (*args, *bufs, 0.1, 0.9, 0.0, 0.01, True, True, True)
    )


def test_opcheck_step_adam():
    args = _opcheck_inputs(bias=False)
    w = args[2]
    state = (torch.zeros_like(w), torch.zeros_like(w), None, None)
    torch.library.opcheck(
        torch.ops.ff_kernels.triton_step_adam_.default,
        (*args, *state, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, 0.1, 0.0316, 0.1, 0.0316),
    )


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_torch_compile_fullgraph(compute_dtype):
    """The ops are opaque to torch.compile: a whole step (with a fused optimizer; also with bf16 compute over fp32
    weights, where the weight copy for GEMM 1 enters the op) compiles without graph breaks."""
    torch._dynamo.reset()
    rows, k, n = 9, 11, 5
    x_pos, x_neg, w, b, _, _ = make_inputs(rows, rows, k, n)
    w_next = make_inputs(1, 1, n, 7)[2]
    opts = step_options(n)
    w_eager, b_eager = w.clone(), b.clone()
    opt = optim.SGD([w, b], lr=0.1, momentum=0.9)
    opt_eager = optim.SGD([w_eager, b_eager], lr=0.1, momentum=0.9)

    def step(x_pos, x_neg, w, b, optimizer):
        out = ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=optimizer, compute_dtype=compute_dtype)
        h, g = ff_linear_forward_triton(out.h_pos, w_next, None, kappa=1.0, normalize="rms", eps=1e-4,
                                        compute_dtype=compute_dtype)
        return out.loss, out.goodness_neg, h, g

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        got = compiled(x_pos, x_neg, w, b, opt)
        want = step(x_pos, x_neg, w_eager, b_eager, opt_eager)
        for a, e in zip(got, want):
            assert_close_fp32(a, e, "compiled")
        assert_close_fp32(w, w_eager, "weight")
    torch._dynamo.reset()


def test_interpreter_uses_single_config():
    if DEVICE == "cuda":
        pytest.skip("only meaningful under the interpreter")
    assert len(common.FORWARD_CONFIGS) == 1 and len(common.GRAD_CONFIGS) == 1


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(512, 784, 500), (4096, 2000, 2000)])
def test_realistic_shapes_cuda(dtype, rows, k, n):
    """DESIGN 4 shapes: fp32 (TF32 off, PyTorch's default) within rtol; bf16 by the low-precision rule."""
    x_pos, x_neg, w, b, _, _ = make_inputs(rows, rows, k, n, dtype=dtype)
    opts = step_options(n)
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts)
    if dtype == torch.float32:
        check_against_reference(out, x_pos, x_neg, w, b, opts, rtol=2e-4)
        return
    exact = ff_linear_step_ref(x_pos, x_neg, w, b, opts)
    low = ff_linear_step_ref(x_pos, x_neg, w, b, opts, upcast=False)
    for name in FIELDS:
        a, r, lo = getattr(out, name), getattr(exact, name), getattr(low, name)
        assert _max_error(a, r) <= 2.0 * _max_error(lo, r) + _rounding_floor(r), name


@CUDA_ONLY
def test_realistic_adam_cuda():
    """The mohammadpz set-up (784-500, Adam lr 0.03): three fused steps against the spec on a clone."""
    rows, k, n = 4096, 784, 500
    _, _, w, b, _, _ = make_inputs(1, 1, k, n)
    w_ref, b_ref = w.clone(), b.clone()
    opt, opt_ref = optim.Adam([w, b], lr=0.03), optim.Adam([w_ref, b_ref], lr=0.03)
    opts = step_options(n)
    for step in range(3):
        x_pos, x_neg, _, _, _, _ = make_inputs(rows, rows, k, n, seed=step)
        ref = ff_linear_step_ref(x_pos, x_neg, w_ref, b_ref, opts)
        ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=opt)
        opt_ref.update([w_ref, b_ref], [ref.grad_weight, ref.grad_bias])
    # Adam's first steps move every element by about lr * sign(g): an element whose gradient is within rounding
    # of zero may move the other way, so a handful of the 392k elements are allowed to differ.
    for p, p_ref in ((w, w_ref), (b, b_ref)):
        differ = (p - p_ref).abs() > 1e-3 * p_ref.abs() + 1e-5
        assert int(differ.sum()) <= max(1, int(1e-4 * p.numel()))
    assert opt.check_holds("weight", w)["step"] == 3


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_tf32_follows_torch_switch(api):
    """fp32 operands use TF32 only when PyTorch's matmul switch says so (either API); bf16 is unaffected."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        if api == "legacy":
            matmul.allow_tf32 = True
        else:
            matmul.fp32_precision = "tf32"
        assert common.input_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert common.input_precision(torch.float32) == "ieee"
        assert common.input_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.allow_tf32 = saved == "tf32"  # the legacy setter leaves both APIs readable for later tests
