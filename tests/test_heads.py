"""class_goodness_loss and class_goodness (DESIGN 8): the contract against a float64 autograd formula written here
independently, gradcheck, opcheck of both custom ops, torch.compile, and the boundary's checks."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import ff_kernels as ffk
import ff_kernels.ops.torch_heads  # noqa: F401  (registers the custom ops opcheck reads)

BACKENDS = ("reference", "torch")
SHAPES = {"image": (5, 7, 3, 5), "row": (5, 7)}
SMALL = {"image": (5, 3, 3, 1), "row": (5, 3)}  # gradcheck perturbs every element of h
CLASSES = 3


def _formula(h, weight, bias, labels, temperature):
    """The loss written with einsum and cross_entropy, in float64."""
    h, weight = h.double(), weight.double().reshape(CLASSES, -1)
    a = torch.einsum("kc,bc...->bk...", weight, h)
    if bias is not None:
        a = a + bias.double().reshape(1, CLASSES, *([1] * (h.dim() - 2)))
    g = a.pow(2).reshape(a.shape[0], CLASSES, -1).mean(2)
    return F.cross_entropy(g / temperature, labels), g


def _inputs(kind, bias, conv_weight=True, dtype=torch.float64, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    shape = shapes[kind]
    h = torch.randn(*shape, generator=gen, dtype=torch.float64).relu().to(dtype).requires_grad_()
    wshape = (CLASSES, shape[1], 1, 1) if kind == "image" and conv_weight else (CLASSES, shape[1])
    w = (torch.randn(*wshape, generator=gen, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(CLASSES, generator=gen, dtype=torch.float64) * 0.3).requires_grad_() if bias else None
    labels = torch.tensor([0, 2, 1, 1, 2])
    return h, w, b, labels


def _grads(loss, h, w, b):
    params = [h, w] if b is None else [h, w, b]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind,bias,temperature,conv_weight",
    [(k, b, t, c) for k, b, t, c in itertools.product(SHAPES, (True, False), (1.0, 0.37), (True, False))
     if k == "image" or c],
)
def test_matches_float64_formula(backend, kind, bias, temperature, conv_weight) -> None:
    h, w, b, labels = _inputs(kind, bias, conv_weight)
    loss = ffk.class_goodness_loss(h, w, b, labels, temperature=temperature, backend=backend)
    expected, g = _formula(h, w, b, labels, temperature)
    assert loss.dtype == torch.float64 and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(loss, h, w, b), _grads(expected, h, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ffk.class_goodness(h, w, b, backend=backend), g.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", SHAPES)
def test_float32_and_bf16_block_output_with_fp32_head(kind) -> None:
    h64, w64, b64, labels = _inputs(kind, True)
    expected = _formula(h64, w64, b64, labels, 0.5)[0]
    want = _grads(expected, h64, w64, b64)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        h = h64.detach().to(dtype).requires_grad_()
        w, b = (t.detach().float().requires_grad_() for t in (w64, b64))
        loss = ffk.class_goodness_loss(h, w, b, labels, temperature=0.5, backend="torch")
        assert loss.dtype == torch.float32
        got = _grads(loss, h, w, b)
        assert [g.dtype for g in got] == [dtype, torch.float32, torch.float32]
        torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=rtol)
        for g, ref in zip(got, want):
            scale = ref.abs().max()
            assert float((g.double() - ref).abs().max() / scale) < rtol


@pytest.mark.parametrize("kind,bias", list(itertools.product(SHAPES, (True, False))))
def test_gradcheck(kind, bias) -> None:
    h, w, b, labels = _inputs(kind, bias, shapes=SMALL)
    args = (h, w) if b is None else (h, w, b)

    def loss(*params):
        return ffk.class_goodness_loss(*params, *([None] if len(params) == 2 else []), labels, temperature=0.7,
                                       backend="torch")

    assert torch.autograd.gradcheck(loss, args)


def test_gradcheck_of_the_op_goodness_output() -> None:
    """The op's goodness output is differentiable too (its gradient enters the coefficient)."""
    h, w, b, labels = _inputs("image", True, shapes=SMALL)
    op = torch.ops.ff_kernels.class_goodness_loss

    assert torch.autograd.gradcheck(lambda h, w, b: op(h, w.reshape(CLASSES, -1), b, labels, 0.7)[:2], (h, w, b))


def test_only_requested_gradients_are_computed() -> None:
    h, w, b, labels = _inputs("image", True)
    h = h.detach()
    loss = ffk.class_goodness_loss(h, w, b, labels, backend="torch")
    got = torch.autograd.grad(loss, [w, b])
    want = torch.autograd.grad(_formula(h, w, b, labels, 1.0)[0], [w, b])
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("kind,bias", [("image", True), ("row", False)])
def test_opcheck(kind, bias) -> None:
    h, w, b, labels = _inputs(kind, bias, conv_weight=False)
    torch.library.opcheck(torch.ops.ff_kernels.class_goodness_loss.default, (h, w, b, labels, 0.7))
    with torch.no_grad():
        _, g, a = torch.ops.ff_kernels.class_goodness_loss(h, w, b, labels, 0.7)
    # the backward op has no autograd formula of its own (no double backward): its inputs require no grad
    args = (torch.tensor(1.5, dtype=torch.float64), torch.randn_like(g), h.detach(), w.detach(), a, g, labels, 0.7)
    for mask in ([True, True, bias], [False, True, False]):
        torch.library.opcheck(torch.ops.ff_kernels.class_goodness_loss_backward.default, (*args, mask))


def test_torch_compile_fullgraph_keeps_the_op() -> None:
    """The loss compiles whole (no graph break) and its backward runs the registered closed form."""
    h, w, b, labels = _inputs("image", True, dtype=torch.float32)
    w, b = (t.detach().float().requires_grad_() for t in (w, b))

    def loss(h, w, b):
        return ffk.class_goodness_loss(h, w, b, labels, temperature=0.7, check_finite=False)

    eager = loss(h, w, b)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(h, w, b)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(_grads(compiled, h, w, b), _grads(eager, h, w, b)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ("cuda",))
def test_missing_backends_say_why(backend) -> None:
    h, w, b, labels = _inputs("image", True)
    match = "class_goodness_loss has no backend.*class-goodness kernels.*available: reference"
    with pytest.raises(NotImplementedError, match=match):
        ffk.class_goodness_loss(h, w, b, labels, backend=backend)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {**a, "h": a["h"][0]}, ValueError, "h must be"),
        (lambda a: {**a, "h": a["h"].long()}, TypeError, "h must be a floating"),
        (lambda a: {**a, "head_weight": a["head_weight"][:, :4]}, ValueError, "expects 4 channels but h has 7"),
        (lambda a: {**a, "head_weight": a["head_weight"][:1]}, ValueError, "at least 2 rows"),
        (lambda a: {**a, "head_weight": a["head_weight"].expand(-1, -1, 3, 3)}, ValueError, "1x1 convolution"),
        (lambda a: {**a, "head_bias": a["head_bias"][:2]}, ValueError, r"head_bias must have shape \(3,\)"),
        (lambda a: {**a, "labels": a["labels"] + 2}, ValueError, r"labels must lie in \[0, 3\)"),
        (lambda a: {**a, "labels": a["labels"][:3]}, ValueError, "labels must have shape"),
        (lambda a: {**a, "temperature": 0.0}, ValueError, "temperature must be positive"),
        (lambda a: {**a, "h": a["h"] * float("nan")}, ValueError, "h contains NaN"),
        (lambda a: {**a, "backend": "nope"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match) -> None:
    h, w, b, labels = _inputs("image", True)
    args = change({"h": h.detach(), "head_weight": w.detach(), "head_bias": b.detach(), "labels": labels,
                   "temperature": 1.0, "backend": "torch"})
    with pytest.raises(error, match=match):
        ffk.class_goodness_loss(args.pop("h"), args.pop("head_weight"), args.pop("head_bias"), args.pop("labels"),
                                **args)
