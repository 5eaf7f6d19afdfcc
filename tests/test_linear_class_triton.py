"""The Triton class-goodness linear step (``conv_ops.ff_linear_class_step_triton``: the conv class step on 1x1
images) against the float64 reference at small odd shapes, fp32 rtol 1e-4; its fused optimizers against torch.optim,
with the optimizer state kept in the weight's shape; and the deferred finiteness check on float64 inputs. Under
TRITON_INTERPRET=1 on the CPU (tests/conftest.py); opcheck of the underlying ops is in test_conv_triton."""

from __future__ import annotations

import pytest
import torch
from test_conv_contract import (
    CLASS_COMBOS,
    CLASS_FIELDS,
    _magnitudes,
    _torch_optimizer,
    assert_close_fp32,
    class_id,
    linear_class_case,
)

import ff_kernels as ffk
from ff_kernels import dispatch, finite, optim
from ff_kernels._options import check_class_options

pytest.importorskip("triton")

from ff_kernels.ops.triton.conv_ops import ff_linear_class_step_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (in_features, num_classes, units per class), cycled over the option combinations: N < K and N > K, 2-5 classes
SHAPES = [(13, 3, 4), (5, 2, 3), (9, 5, 1), (7, 4, 2)]


def _on_device(values):
    return tuple(v.to(DEVICE) if isinstance(v, torch.Tensor) else v for v in values)


@pytest.mark.parametrize("combo", CLASS_COMBOS, ids=class_id)
def test_linear_class_step_matches_reference(combo) -> None:
    normalize, goodness, bias, tau = combo
    in_features, num_classes, group = SHAPES[CLASS_COMBOS.index(combo) % len(SHAPES)]
    args, kwargs = linear_class_case(11, in_features, num_classes, group, normalize=normalize, goodness=goodness,
                                     bias=bias, temperature=tau)
    ref = ffk.ff_linear_class_step(*args, **kwargs, backend="reference")
    fast = ffk.ff_linear_class_step(*_on_device(args), **kwargs, backend="triton")
    fast = fast._replace(**{k: None if v is None else v.cpu() for k, v in fast._asdict().items()})
    units = num_classes * group
    assert fast.loss.shape == () and fast.loss.dtype == torch.float32
    assert fast.goodness.shape == (11, num_classes) and fast.goodness.dtype == torch.float32
    assert fast.h.shape == (11, units) and fast.grad_weight.shape == (units, in_features)
    assert (fast.grad_bias is None) == (not bias)
    kappa = 1.0 / group if goodness == "mean" else 1.0
    coefficient = 2 * kappa / (11 * kwargs["temperature"])
    mags = _magnitudes(args[0], args[2], args[3], ref.h, kwargs, kappa=kappa, coefficient=coefficient, conv=False)
    assert_close_fp32(fast, ref, CLASS_FIELDS, mags)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-plain", "adam", "adamw"])
def test_optimizer_matches_torch_optim(optimizer) -> None:
    """Two fused steps equal the reference's gradients fed to torch.optim; the update lands in the given weight and
    bias, and the state stays the optimizer's own (N, K) tensors (viewed by the kernel, never copied)."""
    (x, labels, w, b), kwargs = linear_class_case(6, 5, 3, 2, normalize="rms")
    ours, theirs, options = _torch_optimizer(optimizer.split("-")[0], None)
    if optimizer == "sgd-plain":
        options = dict(lr=0.1)
    fused = [w.clone().to(DEVICE), b.clone().to(DEVICE)]
    pointers = [p.data_ptr() for p in fused]
    opt = ours(fused, **options)
    plain = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    torch_opt = theirs(plain, **options)
    for step in range(2):
        out = ffk.ff_linear_class_step(*_on_device((x, labels)), *fused, **kwargs, optimizer=opt, backend="triton")
        assert out.grad_weight is None and out.grad_bias is None and out.h.shape == (6, 6)
        if step == 0:
            state = {k: v for k, v in opt.state[0].items() if isinstance(v, torch.Tensor)}
        grads = ffk.ff_linear_class_step(x, labels, plain[0].detach(), plain[1].detach(), **kwargs,
                                         backend="reference")
        plain[0].grad, plain[1].grad = grads.grad_weight, grads.grad_bias
        torch_opt.step()
    assert [p.data_ptr() for p in fused] == pointers
    for key, tensor in state.items():
        assert opt.state[0][key] is tensor and tensor.shape == w.shape, key
    for mine, reference in zip(fused, plain):
        torch.testing.assert_close(mine.cpu(), reference.detach(), rtol=1e-5, atol=1e-6)


def test_dispatch_has_the_triton_linear_class_step() -> None:
    assert "triton" in dispatch.backends_for("linear_class_step")
    assert not any(backend == "triton" for _, backend in dispatch.MISSING)


def test_float64_is_an_error_naming_the_weight() -> None:
    (x, labels, w, b), kwargs = linear_class_case(3, 4, 2, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="weight is torch.float64"):
        ffk.ff_linear_class_step(*_on_device((x, labels, w, b)), **kwargs, backend="triton", check_finite=False)


def test_torch_compile_fullgraph_with_fused_adam() -> None:
    """The views of the weight and of its Adam state pass through the in-place custom op under
    torch.compile(fullgraph=True): two compiled steps equal two eager ones."""
    torch._dynamo.reset()
    (x, labels, w, b), kwargs = linear_class_case(5, 7, 2, 2, normalize="l2")
    x, labels, w, b = _on_device((x, labels, w, b))
    opts = check_class_options(**kwargs, channels=4, positions=1)
    params, eager_params = [w, b], [w.clone(), b.clone()]
    opt, eager_opt = optim.Adam(params, lr=1e-2), optim.Adam(eager_params, lr=1e-2)

    def step(x, w, b, adam):
        out = ff_linear_class_step_triton(x, labels, w, b, opts, optimizer=adam)
        return out.loss, out.goodness, out.h

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        got, want = compiled(x, *params, opt), step(x, *eager_params, eager_opt)
        for a, e in zip((*got, *params), (*want, *eager_params)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# ff_kernels.finite: the deferred check on float64 inputs (queued by the GPU paths' torch backend)


@pytest.fixture
def every_step():
    """The deferred check read at every step; the interval restored after."""
    saved = finite.interval()
    finite.check_now()
    finite.set_interval(1)
    yield
    finite.set_interval(saved)
    finite._pending.clear()


def _float64_batches(rows: int = 4):
    gen = torch.Generator().manual_seed(7)
    return tuple(torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((rows, 5), (rows, 5), (6, 5)))


def test_float64_is_refused_by_the_triton_layer_step() -> None:
    """The Triton layer kernels accumulate in fp32, so they do not keep the float64 contract: refused by name."""
    x_pos, x_neg, w = _on_device(_float64_batches())
    with pytest.raises(TypeError, match="weight is torch.float64; backend='triton' takes"):
        ffk.ff_linear_step(x_pos, x_neg, w, backend="triton")


def test_float64_deferred_check_does_not_crash(every_step) -> None:
    x_pos, x_neg, _ = _float64_batches()
    finite.defer_step(x_pos.device, x_pos, x_neg)
    x_pos[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x_pos contains NaN or inf"):
        finite.defer_step(x_pos.device, x_pos, x_neg)


def test_mixed_dtype_results_read_together() -> None:
    """float64 and float32 checks queued on one device are read in one pass."""
    x_pos, x_neg, _ = _float64_batches()
    finite.check_now()
    try:
        finite.defer_step(x_pos.device, x_pos, x_neg)
        finite.defer_step(x_pos.device, x_pos.float(), x_neg.bfloat16())
        finite.check_now()
    finally:
        finite._pending.clear()


def test_auto_keeps_the_torch_backend_for_the_slow_triton_linear_class_step(monkeypatch):
    """``auto`` on a device where Triton would be chosen still routes this op to torch; by name it is Triton."""
    from ff_kernels import dispatch, functional

    def triton_on_auto(backend: str, device: torch.device) -> str:
        return "triton" if backend == "auto" else backend

    monkeypatch.setattr(functional, "resolve_backend", triton_on_auto)
    device = torch.device("cpu")
    auto = functional._resolve("linear_class_step", "auto", torch.float32, torch.float32, device)
    assert auto.entry is dispatch.TABLE[("linear_class_step", "torch")]
    named = functional._resolve("linear_class_step", "triton", torch.float32, torch.float32, device)
    assert named.entry is dispatch.TABLE[("linear_class_step", "triton")]
    step = functional._resolve("linear_step", "auto", torch.float32, torch.float32, device)
    assert step.entry is dispatch.TABLE[("linear_step", "triton")]
