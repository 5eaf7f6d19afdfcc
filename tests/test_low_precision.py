"""fp16 and bf16 at the shape of a real MNIST layer (P = Q = 4096, K = 784, N = 500), every output against a float64
reference under FlashAttention's rule: the error is at most about twice that of the same computation done by
PyTorch at that precision (``ff_linear_step_ref(upcast=False)``, with a GradScaler-style loss scale for fp16).

Small shapes cannot show the faults these tests guard: at this shape c_i r_i is about 1e-8, below fp16's smallest
subnormal, so a GEMM 2 operand formed as (c_i r_i) h_i in fp16 is all zeros. The C++ operator runs here on CPU
tensors (``backend="cuda"``); the Triton kernels' large-M checks run under the interpreter in test_triton.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

import ff_kernels as ffk
from ff_kernels._options import check_step_options
from ff_kernels.ops import cuda_step, torch_step
from ff_kernels.reference import ff_linear_step_ref

ROWS, IN_FEATURES, OUT_FEATURES = 4096, 784, 500
FIELDS = ("loss", "goodness_pos", "goodness_neg", "h_pos", "h_neg", "grad_weight", "grad_bias")
# torch.amp.GradScaler's initial scale: what a PyTorch user training in fp16 gets by default.
FP16_LOSS_SCALE = 2.0**16
CASES = [("l2", "logistic"), ("rms", "symba")]
LOW = [torch.float16, torch.bfloat16]

EXT_REASON = cuda_step.extension_unavailable_reason("cpu")
BACKENDS = [
    "torch",
    pytest.param("cuda", marks=pytest.mark.skipif(EXT_REASON is not None, reason=f"no C++ operator: {EXT_REASON}")),
]


def mnist_like(normalize: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Pixel-like inputs (non-negative, about a fifth of them lit) and weights that put the mean goodness near the
    threshold of 2, so that the loss is not saturated and every row's coefficient matters."""
    gen = torch.Generator().manual_seed(seed)

    def pixels() -> torch.Tensor:
        lit = torch.rand(ROWS, IN_FEATURES, generator=gen) < 0.2
        return torch.rand(ROWS, IN_FEATURES, generator=gen) * lit

    x_pos, x_neg = pixels(), pixels()
    # z = r x W^T has unit-norm rows for l2; rms rows have norm sqrt(K)
    w_scale = 2.0 if normalize == "l2" else 2.0 * IN_FEATURES**-0.5
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * w_scale
    bias = 0.5 * torch.randn(OUT_FEATURES, generator=gen)
    return x_pos, x_neg, weight, bias


def options(normalize: str, loss: str) -> dict:
    return dict(threshold=2.0, goodness="mean", loss=loss, normalize=normalize, eps=1e-4, alpha=4.0)


@functools.cache
def truth_and_baseline(normalize: str, loss: str, dtype: torch.dtype, inputs_low: bool):
    """(float64 truth, PyTorch-at-that-precision baseline) for one case; shared by the backends' tests.

    ``inputs_low``: the inputs and parameters are given in ``dtype`` (the truth is computed from those rounded
    values); otherwise they are fp32 and only the compute dtype is low (the truth is computed from the fp32 values).
    """
    args32 = mnist_like(normalize)
    given = tuple(t.to(dtype) for t in args32) if inputs_low else args32
    kwargs = options(normalize, loss)
    truth = ffk.ff_linear_step(*(t.double() for t in given), **kwargs, backend="reference")
    opts = check_step_options(**kwargs, out_features=OUT_FEATURES)
    scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    baseline = ff_linear_step_ref(*(t.to(dtype) for t in given), opts, upcast=False, loss_scale=scale)
    return given, truth, baseline


def max_error(out, truth, name: str) -> float:
    actual, expected = getattr(out, name), getattr(truth, name)
    assert torch.isfinite(actual).all(), f"{name} is not finite"
    return float((actual.double() - expected).abs().max())


def assert_flash_attention_rule(out, truth, baseline, dtype: torch.dtype) -> None:
    """Every output's max error <= 2 x the baseline's + a floor of a quarter ulp of the output's largest value
    (for outputs the baseline gets exactly right, e.g. a loss computed in fp32 in both)."""
    report = []
    for name in FIELDS:
        err, err_base = max_error(out, truth, name), max_error(baseline, truth, name)
        scale = float(getattr(truth, name).abs().max())
        bound = 2.0 * err_base + torch.finfo(dtype).eps / 4 * scale
        report.append(f"{name}: {err:.3g} (baseline {err_base:.3g}, scale {scale:.3g})")
        assert err <= bound, "; ".join(report)
    # the baseline is really low precision, and it is a good one (else the rule proves nothing)
    gw = float(truth.grad_weight.abs().max())
    assert 1e-5 * gw < max_error(baseline, truth, "grad_weight") < 0.05 * gw, "; ".join(report)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("normalize,loss", CASES, ids=["l2-logistic", "rms-symba"])
def test_low_precision_inputs_at_mnist_shape(backend: str, dtype: torch.dtype, normalize: str, loss: str) -> None:
    given, truth, baseline = truth_and_baseline(normalize, loss, dtype, True)
    out = ffk.ff_linear_step(*given, **options(normalize, loss), backend=backend)
    assert out.grad_weight.dtype == dtype and out.h_pos.dtype == dtype and out.loss.dtype == torch.float32
    assert_flash_attention_rule(out, truth, baseline, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("normalize,loss", CASES, ids=["l2-logistic", "rms-symba"])
def test_low_precision_compute_dtype_at_mnist_shape(
    backend: str, dtype: torch.dtype, normalize: str, loss: str
) -> None:
    given, truth, baseline = truth_and_baseline(normalize, loss, dtype, False)
    out = ffk.ff_linear_step(*given, **options(normalize, loss), backend=backend, compute_dtype=dtype)
    assert out.grad_weight.dtype == torch.float32 and out.h_pos.dtype == dtype
    assert_flash_attention_rule(out, truth, baseline, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_adjacent_activations_at_mnist_shape(backend: str) -> None:
    """A previous layer's h_pos/h_neg are adjacent rows of one tensor (the torch path then keeps a view instead of
    copying): the fp16 gradient must hold there too."""
    x_pos, x_neg, weight, bias = (t.to(torch.float16) for t in mnist_like("l2", seed=1))
    stacked = torch.cat([x_pos, x_neg])
    x_pos, x_neg = stacked[:ROWS], stacked[ROWS:]
    kwargs = options("l2", "logistic")
    truth = ffk.ff_linear_step(*(t.double() for t in (x_pos, x_neg, weight, bias)), **kwargs, backend="reference")
    opts = check_step_options(**kwargs, out_features=OUT_FEATURES)
    baseline = ff_linear_step_ref(x_pos, x_neg, weight, bias, opts, upcast=False, loss_scale=FP16_LOSS_SCALE)
    out = ffk.ff_linear_step(x_pos, x_neg, weight, bias, **kwargs, backend=backend)
    assert torch.equal(stacked, torch.cat([x_pos, x_neg])), "the inputs were modified"
    assert_flash_attention_rule(out, truth, baseline, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fp16_near_zero_row_and_large_bias_stay_finite(backend: str, optimizer: str) -> None:
    """r_i reaches 1/eps on a nearly zero row; with a large bias, c_i r_i h_ij would leave fp16's range. With r_i
    on x's operand (|r_i x_ik| <= 1) nothing overflows: the step's gradient and update are finite and right."""
    gen = torch.Generator().manual_seed(3)
    x_pos = torch.rand(33, 48, generator=gen)
    x_neg = torch.rand(31, 48, generator=gen)
    x_pos[5] = 1e-7 * torch.rand(48, generator=gen)
    weight = torch.randn(40, 48, generator=gen) * 0.5
    bias = 20.0 + torch.rand(40, generator=gen)
    kwargs = dict(threshold=400.0, goodness="mean", normalize="l2", eps=1e-4)
    low = [t.to(torch.float16) for t in (x_pos, x_neg, weight, bias)]
    truth = ffk.ff_linear_step(*(t.double() for t in low), **kwargs, backend="reference")
    grads = ffk.ff_linear_step(*low, **kwargs, backend=backend)
    for name in ("grad_weight", "grad_bias"):
        err = max_error(grads, truth, name)
        assert err <= 4e-3 * float(getattr(truth, name).abs().max()), (name, err)
    params = [low[2].clone(), low[3].clone()]
    opt = ffk.optim.SGD(params, lr=0.1, momentum=0.9) if optimizer == "sgd" else ffk.optim.Adam(params, lr=0.01)
    ffk.ff_linear_step(low[0], low[1], *params, **kwargs, optimizer=opt, backend=backend)
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert not torch.equal(params[0], low[2]), "the weights were not updated"


def test_touching_column_slices_are_not_taken_for_a_stacked_batch() -> None:
    """Two non-contiguous slices whose first addresses meet are not one (P+Q, K) matrix: no view of them.
    (The public functions pass contiguous inputs; the backends' helper must not rely on that.)"""
    flat = torch.rand(3000)
    x_pos = flat.as_strided((20, 37), (50, 1))
    x_neg = flat.as_strided((20, 37), (50, 1), storage_offset=x_pos.numel())  # starts where a dense x_pos ends
    assert torch_step.stacked_view(x_pos, x_neg, torch.float32) is None
    rows = torch.rand(30, 37)
    assert torch_step.stacked_view(rows[:20], rows[20:], torch.float32).data_ptr() == rows.data_ptr()
