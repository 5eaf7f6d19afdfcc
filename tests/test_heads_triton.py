"""class_goodness_loss and class_goodness on ``backend="triton"`` (DESIGN 8), under the Triton interpreter on the CPU:
the loss and all three gradients against a float64 formula written here, float64 and fp32 tight, bf16/fp16 by
FlashAttention's rule (error against float64 at most twice the torch backend's in the same precision), gradcheck in
float64 (the kernels accumulate in float64 for float64 inputs), opcheck of the three custom ops, and a few block-wise
training steps. Shapes are small and odd: the interpreter runs every program in turn."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import ff_kernels as ffk
from ff_kernels.backends import triton_unavailable_reason
from ff_kernels.blockwise import build_blocks
from ff_kernels.ops.triton import class_goodness as cg

pytestmark = pytest.mark.skipif(
    triton_unavailable_reason(torch.device("cpu")) is not None, reason="needs Triton with TRITON_INTERPRET=1"
)

# (B, C, H, W) or (B, C), classes. Tiles under the interpreter are 16 rows and 16 channels: P = 15 is one sample per
# row tile, P = 35 three position tiles, P = 6 two samples per tile, rows sixteen samples; C = 33 three channel
# steps; K = 19 one class tile padded to 32, K = 70 two tiles of 64.
CASES = {
    "image": ((5, 7, 3, 5), 3),
    "wide": ((3, 33, 5, 7), 19),
    "many_classes": ((3, 5, 1, 3), 70),
    "tiny_map": ((7, 5, 2, 3), 10),
    "row": ((5, 7), 3),
    "channels_last": ((5, 7, 3, 5), 3),
}


def _formula(h, weight, bias, labels, temperature):
    """The loss written with einsum and cross_entropy, in float64."""
    classes = weight.shape[0]
    h, weight = h.double(), weight.double().reshape(classes, -1)
    a = torch.einsum("kc,bc...->bk...", weight, h)
    if bias is not None:
        a = a + bias.double().reshape(1, classes, *([1] * (h.dim() - 2)))
    g = a.pow(2).reshape(a.shape[0], classes, -1).mean(2)
    return F.cross_entropy(g / temperature, labels), g


def _inputs(case, bias, dtype=torch.float64, head_dtype=None, seed=0):
    shape, classes = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=gen, dtype=torch.float64).relu()
    if case == "channels_last":
        h = h.to(memory_format=torch.channels_last)
    w = torch.randn(classes, shape[1], generator=gen, dtype=torch.float64) * 0.7
    b = torch.randn(classes, generator=gen, dtype=torch.float64) * 0.3 if bias else None
    labels = torch.randint(0, classes, (shape[0],), generator=gen)
    head = head_dtype or dtype
    params = [h.to(dtype), w.to(head), None if b is None else b.to(head)]
    return [None if p is None else p.detach().requires_grad_() for p in params], labels


def _loss_and_grads(params, labels, temperature, backend):
    loss = ffk.class_goodness_loss(*params, labels, temperature=temperature, backend=backend)
    grads = torch.autograd.grad(loss, [p for p in params if p is not None])
    return [loss.detach(), *grads]


def _reference(params, labels, temperature):
    exact = [None if p is None else p.detach().double().requires_grad_() for p in params]
    loss, _ = _formula(*exact, labels, temperature)
    return [loss.detach(), *torch.autograd.grad(loss, [p for p in exact if p is not None])]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case,bias,temperature", list(itertools.product(CASES, (True, False), (1.0, 0.37))))
def test_float64_matches_formula(case, bias, temperature) -> None:
    params, labels = _inputs(case, bias)
    got = _loss_and_grads(params, labels, temperature, "triton")
    assert got[0].dtype == torch.float64 and got[0].shape == ()
    if case == "channels_last":
        assert got[1].is_contiguous(memory_format=torch.channels_last)  # dL/dh in h's layout
    for g, want in zip(got, _reference(params, labels, temperature)):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case,bias", [("image", True), ("wide", False), ("tiny_map", True), ("row", True),
                                       ("channels_last", False)])
def test_float32_close_to_float64(case, bias) -> None:
    params, labels = _inputs(case, bias, dtype=torch.float32)
    got = _loss_and_grads(params, labels, 0.37, "triton")
    assert got[0].dtype == torch.float32
    for g, want in zip(got, _reference(params, labels, 0.37)):
        assert g.dtype == torch.float32
        assert _relative_error(g, want) < 2e-6


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("head_fp32", (False, True), ids=("head_same", "head_fp32"))
@pytest.mark.parametrize("case", ("image", "wide", "row"))
def test_low_precision_within_twice_the_torch_backends_error(dtype, head_fp32, case) -> None:
    """FlashAttention's rule: against float64, at most twice the error of the torch backend in the same precision,
    plus the rounding of the output to its dtype (half an ulp, on the max-normalised error). The errors are summed
    over three draws: the loss is one number, whose error on a single draw is as much luck as rounding.

    ``head_fp32`` is the autocast case: a bf16/fp16 block output meets an fp32 head, which both backends run in h's
    dtype. The error of the exact formula on the head rounded to that dtype is then added to the bound: it is what
    any such implementation has, and the torch backend's further rounding of a to bf16 happens to offset part of it
    on these draws (checked: torch's loss equals the formula on bf16-rounded a to 1e-7)."""
    names = ("loss", "h", "weight", "bias")
    errors, bounds = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for seed in range(3):
        params, labels = _inputs(case, True, dtype, torch.float32 if head_fp32 else None, seed)
        want = _reference(params, labels, 0.37)
        rounded = _reference([p.detach().to(dtype).double().requires_grad_() for p in params], labels, 0.37)
        got = _loss_and_grads(params, labels, 0.37, "triton")
        baseline = _loss_and_grads(params, labels, 0.37, "torch")
        for name, g, base, exact, operand in zip(names, got, baseline, want, rounded):
            assert g.dtype == base.dtype, name
            errors[name] += _relative_error(g, exact)
            bounds[name] += (2 * _relative_error(base, exact) + _relative_error(operand, exact)
                             + torch.finfo(g.dtype).eps / 2)
    for name in names:
        assert errors[name] <= bounds[name], f"{name}: {errors[name] / 3:.2e}, bound {bounds[name] / 3:.2e} (means)"


@pytest.mark.parametrize("case,bias", [("image", True), ("row", False)])
def test_gradcheck_float64(case, bias) -> None:
    small = {"image": ((3, 5, 3, 1), 3), "row": ((5, 3), 3)}
    shape, classes = small[case]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.randn(classes, shape[1], generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(classes, generator=gen, dtype=torch.float64) * 0.3).requires_grad_() if bias else None
    labels = torch.randint(0, classes, (shape[0],), generator=gen)
    args = (h, w) if b is None else (h, w, b)

    def loss(*params):
        bias_arg = params[2] if len(params) == 3 else None
        return ffk.class_goodness_loss(params[0], params[1], bias_arg, labels, temperature=0.7, backend="triton")

    assert torch.autograd.gradcheck(loss, args)


def test_only_requested_gradients() -> None:
    params, labels = _inputs("image", True)
    h, w, b = params
    want = _reference(params, labels, 1.0)
    loss = ffk.class_goodness_loss(h.detach(), w, b, labels, backend="triton")
    grad_w, grad_b = torch.autograd.grad(loss, [w, b])
    torch.testing.assert_close(grad_w, want[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, want[3], rtol=1e-10, atol=1e-12)
    loss = ffk.class_goodness_loss(h, w.detach(), b.detach(), labels, backend="triton")
    (grad_h,) = torch.autograd.grad(loss, [h])
    torch.testing.assert_close(grad_h, want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case,bias", [("image", True), ("row", False), ("channels_last", True)])
def test_class_goodness_for_prediction(case, bias) -> None:
    params, labels = _inputs(case, bias)
    h, w, b = (None if p is None else p.detach() for p in params)
    got = ffk.class_goodness(h, w[:, :, None, None] if h.dim() == 4 else w, b, backend="triton")
    torch.testing.assert_close(got, _formula(h, w, b, labels, 1.0)[1], rtol=1e-12, atol=1e-12)
    g32 = ffk.class_goodness(h.float(), w.float(), None if b is None else b.float(), backend="triton")
    assert g32.dtype == torch.float32


@pytest.mark.parametrize("case,bias", [("image", True), ("row", False)])
def test_opcheck(case, bias) -> None:
    params, labels = _inputs(case, bias, dtype=torch.float32)
    h, w, b = params
    torch.library.opcheck(torch.ops.ff_kernels.triton_class_goodness_loss.default, (h, w, b, labels, 0.7))
    with torch.no_grad():
        _, _, a, d = torch.ops.ff_kernels.triton_class_goodness_loss(h, w, b, labels, 0.7)
        torch.library.opcheck(torch.ops.ff_kernels.triton_class_goodness.default, (h, w, b))
    # the backward op has no autograd formula of its own (no double backward): its inputs require no grad
    args = (torch.tensor(1.5), h.detach(), w.detach(), a, d, 0.7)
    for mask in ([True, True, bias], [False, True, False], [True, False, False]):
        torch.library.opcheck(torch.ops.ff_kernels.triton_class_goodness_loss_backward.default, (*args, mask))


def test_incoming_gradient_scales_all_three() -> None:
    params, labels = _inputs("image", True)
    loss = ffk.class_goodness_loss(*params, labels, backend="triton")
    grads = torch.autograd.grad(loss * -2.5, params)
    for g, want in zip(grads, _reference(params, labels, 1.0)[1:]):
        torch.testing.assert_close(g, -2.5 * want, rtol=1e-10, atol=1e-12)


def test_the_dispatch_table_has_the_triton_rows() -> None:
    from ff_kernels import dispatch

    assert dispatch.spec("class_goodness_loss", "triton").load() is cg.class_goodness_loss_triton
    assert dispatch.spec("class_goodness", "triton").load() is cg.class_goodness_triton
    assert ("class_goodness_loss", "triton") not in dispatch.MISSING


def test_blockwise_trains_with_the_triton_head() -> None:
    """Two block-wise steps of a tiny CNN on backend="triton" follow backend="torch" step for step."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 1, 8, 8, generator=gen), torch.randint(0, 10, (12,), generator=gen)
    losses = {}
    for backend in ("torch", "triton"):
        model = ffk.BlockwiseFF(build_blocks("small_cnn", in_channels=1, seed=0), 10, sample_shape=(1, 8, 8),
                                optimizer="adam", seed=0, backend=backend)
        losses[backend] = [torch.stack(model.step_batch(x, y)) for _ in range(2)]
        assert model.predict(x).shape == (12,)
    for got, want in zip(losses["triton"], losses["torch"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_keeps_the_op() -> None:
    params, labels = _inputs("image", True, dtype=torch.float32)

    def loss(h, w, b):
        return ffk.class_goodness_loss(h, w, b, labels, temperature=0.7, backend="triton", check_finite=False)

    eager = _loss_and_grads(params, labels, 0.7, "triton")
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*params)
    torch.testing.assert_close(compiled, eager[0])
    for got, want in zip(torch.autograd.grad(compiled, params), eager[1:]):
        torch.testing.assert_close(got, want)


def test_inspect_compiles_the_head_kernels_for_sm_90(tmp_path) -> None:
    """The ResNet-18 head shapes in bf16, ahead of time for sm_90 (no GPU): every gate holds, the three GEMMs on
    wgmma, no spills."""
    from ff_kernels import inspect as ffi

    selection = ffi.Selection(kernels=("head_",), archs=("sm_90",), precisions=("bf16",), optimizers=("none",),
                              rows=(512,), layers=((784, 500),), sources=("triton",))
    report = ffi.run_inspect(selection, jobs=2, cache_dir=tmp_path, progress=False)
    assert not report.failures, report.failures
    kernels = {r["kernel"] for r in report.kernels}
    assert kernels == {"head_forward_kernel", "head_loss_kernel", "head_grad_h_kernel", "head_grad_weight_kernel"}
    for record in report.kernels:
        assert record["spill_bytes"] == 0 and record["shared_bytes"] <= record["shared_limit"]
        if record["kernel"] != "head_loss_kernel":
            assert record["mma"] == "wgmma", record
