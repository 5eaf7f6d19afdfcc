"""The Triton conv backend (``ff_kernels.ops.triton.conv_ops``) against the float64 reference (DESIGN 7): every
option combination at small odd shapes (each geometry in turn), fp32 rtol 1e-4, bf16/fp16 by FlashAttention's rule,
the fused optimizers against torch.optim, the split weight-gradient GEMM, opcheck of every custom op and
torch.compile(fullgraph=True) of a training step. Under TRITON_INTERPRET=1 on the CPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from test_conv_contract import (
    CLASS_COMBOS,
    CLASS_FIELDS,
    GEOMETRIES,
    HEIGHT,
    KERNEL,
    LOW,
    STEP_COMBOS,
    STEP_FIELDS,
    WIDTH,
    _assert_flash_attention_rule,
    _geometry_kwargs,
    _low_baseline,
    _magnitudes,
    _pixels,
    _torch_optimizer,
    assert_close_fp32,
    class_id,
    conv_case,
    conv_class_case,
    step_id,
)

import ff_kernels as ffk
from ff_kernels import dispatch, optim
from ff_kernels._options import check_class_options, check_conv_geometry, check_step_options

pytest.importorskip("triton")

from ff_kernels.ops.triton import conv_gemm  # noqa: E402
from ff_kernels.ops.triton.conv_ops import (  # noqa: E402
    ff_conv2d_class_step_triton,
    ff_conv2d_forward_triton,
    ff_conv2d_step_triton,
)
from ff_kernels.ops.triton.grad_update_gemm import Update  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(values):
    return tuple(v.to(DEVICE) if isinstance(v, torch.Tensor) else v for v in values)


def _kwargs_on_device(kwargs: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _cpu(out):
    return out._replace(**{k: None if v is None else v.cpu() for k, v in out._asdict().items()})


# ---------------------------------------------------------------------------------------------------------------
# fp32 contract: every option combination, the geometries in turn


@pytest.mark.parametrize("combo", STEP_COMBOS, ids=step_id)
def test_conv_step_matches_reference(combo) -> None:
    normalize, goodness, loss, offsets, bias = combo
    geometry = GEOMETRIES[STEP_COMBOS.index(combo) % len(GEOMETRIES)]
    p, q = (7, 7) if loss == "symba" else (7, 4)
    args, kwargs = conv_case(p, q, 5, geometry, normalize=normalize, goodness=goodness, loss=loss, offsets=offsets,
                             bias=bias)
    ref = ffk.ff_conv2d_step(*args, **kwargs, backend="reference")
    fast = _cpu(ffk.ff_conv2d_step(*_on_device(args), **_kwargs_on_device(kwargs), backend="triton"))
    out_h, out_w = check_conv_geometry(*geometry).output_size((HEIGHT, WIDTH), KERNEL)
    assert fast.loss.shape == () and fast.loss.dtype == torch.float32
    assert fast.goodness_pos.shape == (p,) and fast.goodness_neg.shape == (q,)
    assert fast.h_pos.shape == (p, 5, out_h, out_w) and fast.h_neg.shape == (q, 5, out_h, out_w)
    kappa = 1.0 / (5 * out_h * out_w) if goodness == "mean" else 1.0
    coefficient = 2 * kappa * (abs(kwargs["alpha"]) / p if loss == "symba" else 1.0 / (p + q))
    x = torch.cat([args[0], args[1]])
    h = torch.cat([ref.h_pos, ref.h_neg])
    mags = _magnitudes(x, args[2], args[3], h, kwargs, kappa=kappa, coefficient=coefficient, conv=True)
    assert_close_fp32(fast, ref, STEP_FIELDS, mags)


@pytest.mark.parametrize("combo", CLASS_COMBOS, ids=class_id)
def test_conv_class_step_matches_reference(combo) -> None:
    normalize, goodness, bias, tau = combo
    geometry = GEOMETRIES[CLASS_COMBOS.index(combo) % len(GEOMETRIES)]
    args, kwargs = conv_class_case(9, 3, 2, geometry, normalize=normalize, goodness=goodness, bias=bias,
                                   temperature=tau)
    ref = ffk.ff_conv2d_class_step(*args, **kwargs, backend="reference")
    fast = _cpu(ffk.ff_conv2d_class_step(*_on_device(args), **kwargs, backend="triton"))
    out_h, out_w = check_conv_geometry(*geometry).output_size((HEIGHT, WIDTH), KERNEL)
    assert fast.goodness.shape == (9, 3) and fast.goodness.dtype == torch.float32
    assert fast.h.shape == (9, 6, out_h, out_w)
    kappa = 1.0 / (2 * out_h * out_w) if goodness == "mean" else 1.0
    coefficient = 2 * kappa / (9 * kwargs["temperature"])
    mags = _magnitudes(args[0], args[2], args[3], ref.h, kwargs, kappa=kappa, coefficient=coefficient, conv=True)
    assert_close_fp32(fast, ref, CLASS_FIELDS, mags)


@pytest.mark.parametrize("goodness", ["mean", "sum"])
def test_forward_matches_reference(goodness) -> None:
    args, kwargs = conv_case(7, 4, 4, GEOMETRIES[1], normalize="rms", goodness=goodness)
    x_pos, _, w, b = args
    forward_kwargs = dict(**_geometry_kwargs(kwargs), goodness=goodness, normalize="rms")
    for num_classes in (None, 2):
        ref = ffk.ff_conv2d_forward(x_pos, w, b, **forward_kwargs, num_classes=num_classes, backend="reference")
        h, g = ffk.ff_conv2d_forward(*_on_device((x_pos, w, b)), **forward_kwargs, num_classes=num_classes,
                                     backend="triton")
        assert g.dtype == torch.float32 and g.shape == ((7,) if num_classes is None else (7, 2))
        torch.testing.assert_close(h.cpu(), ref[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g.cpu(), ref[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("empty", ["pos", "neg"])
def test_empty_batch_logistic(empty) -> None:
    p, q = (0, 5) if empty == "pos" else (5, 0)
    args, kwargs = conv_case(p, q, 3, GEOMETRIES[1], normalize="l2", offsets=True)
    ref = ffk.ff_conv2d_step(*args, **kwargs, backend="reference")
    fast = _cpu(ffk.ff_conv2d_step(*_on_device(args), **_kwargs_on_device(kwargs), backend="triton"))
    for name in STEP_FIELDS:
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_and_strided_inputs() -> None:
    """x is read through its strides: channels-last, sliced and transposed batches give the contiguous result."""
    args, kwargs = conv_class_case(6, 3, 1, GEOMETRIES[1], normalize="l2")
    x, labels, w, b = _on_device(args)
    expected = ffk.ff_conv2d_class_step(x, labels, w, b, **kwargs, backend="triton")
    wide = torch.cat([x, x], dim=3)[..., : x.shape[3]]
    for layout in (x.to(memory_format=torch.channels_last), wide, x.transpose(2, 3).contiguous().transpose(2, 3)):
        out = ffk.ff_conv2d_class_step(layout, labels.int(), w, b, **kwargs, backend="triton")
        for name in CLASS_FIELDS:
            torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# fused optimizers; the split weight-gradient GEMM


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-plain", "adam", "adamw"])
@pytest.mark.parametrize("op", ["conv2d_step", "conv2d_class_step"])
def test_optimizer_matches_torch_optim(op, optimizer) -> None:
    """Two fused steps equal the reference's gradients fed to torch.optim (state, bias and weight decay included)."""
    if op == "conv2d_step":
        (a, bb, w, b), kwargs = conv_case(5, 4, 3, GEOMETRIES[1], normalize="l2")
        step = ffk.ff_conv2d_step
    else:
        (a, bb, w, b), kwargs = conv_class_case(6, 3, 1, GEOMETRIES[3], normalize="rms")
        step = ffk.ff_conv2d_class_step
    ours, theirs, options = _torch_optimizer(optimizer.split("-")[0], None)
    if optimizer == "sgd-plain":
        options = dict(lr=0.1)
    fused = [w.clone().to(DEVICE), b.clone().to(DEVICE)]
    opt = ours(fused, **options)
    plain = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    torch_opt = theirs(plain, **options)
    for _ in range(2):
        out = step(*_on_device((a, bb)), *fused, **kwargs, optimizer=opt, backend="triton")
        assert out.grad_weight is None and out.grad_bias is None
        grads = step(a, bb, plain[0].detach(), plain[1].detach(), **kwargs, backend="reference")
        plain[0].grad, plain[1].grad = grads.grad_weight, grads.grad_bias
        torch_opt.step()
    for mine, reference in zip(fused, plain):
        torch.testing.assert_close(mine.cpu(), reference.detach(), rtol=1e-5, atol=1e-6)


def test_split_weight_gradient_matches_unsplit() -> None:
    """GEMM 2 with its samples split over 3 programs per tile (the last to arrive sums the partials) equals one
    program per tile, with and without a fused update."""
    (x_pos, x_neg, w, b), kwargs = conv_case(7, 6, 5, GEOMETRIES[2], normalize="rms")
    x_pos, x_neg, w, b = _on_device((x_pos, x_neg, w, b))
    geometry = check_conv_geometry(*GEOMETRIES[2])
    r = conv_gemm.launch_conv_scale(x_pos, x_neg, "rms", 1e-4)
    h, _, _ = conv_gemm.launch_conv_forward(x_pos, x_neg, w, b, geometry, r)
    c = torch.randn(13, 1, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 1e-3
    whole = conv_gemm.launch_conv_grad_update(x_pos, x_neg, h, c, r, w, b, geometry, 2.0**-9, Update(0))
    split = conv_gemm.launch_conv_grad_update(x_pos, x_neg, h, c, r, w, b, geometry, 2.0**-9, Update(0), splits=3)
    for a, e in zip(split, whole):  # the same sums in another order: fp32 rounding apart
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * float(e.abs().max()))
    updated = [w.clone(), b.clone()]
    sgd = Update(1, lr=0.5)
    for splits in (None, 3):
        params = [w.clone(), b.clone()]
        conv_gemm.launch_conv_grad_update(x_pos, x_neg, h, c, r, *params, geometry, 2.0**-9, sgd, splits=splits)
        updated.append(params)
    for a, e in zip(updated[2], [w - 0.5 * whole[0], b - 0.5 * whole[1]]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    for a, e in zip(updated[3], updated[2]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_split_policy_fills_a_wave_within_its_cap() -> None:
    """A 3 -> 64 layer's single weight tile splits 32 ways at batch 128 (131072 positions), a 36-tile layer 4 ways;
    a weight that fills the SMs, or a batch of under 2 x 1024 positions, does not split."""
    assert conv_gemm.conv_split_count(1, 128 * 32 * 32, 132) == conv_gemm.MAX_CONV_SPLITS == 32
    assert conv_gemm.conv_split_count(36, 128 * 16 * 16, 132) == 4
    assert conv_gemm.conv_split_count(132, 10**6, 132) == 1
    assert conv_gemm.conv_split_count(4, 2047, 132) == 1


# ---------------------------------------------------------------------------------------------------------------
# low precision: FlashAttention's rule against the torch backend's precision (the reference at that dtype)


def _low_conv_case(op: str):
    """Small image batches (interpreter-sized) with the goodness near the threshold, losses unsaturated."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(20, 3, 3, 3, generator=gen) * 27**-0.5 * 2.0
    bias = 0.3 * torch.randn(20, generator=gen)
    if op == "conv2d_class_step":
        labels = torch.randint(0, 10, (40,), generator=gen)
        kwargs = dict(num_classes=10, padding=1, stride=2, normalize="rms", temperature=0.5)
        return (_pixels(40, 3, 9, gen) * 3.0, labels, weight, bias), kwargs
    kwargs = dict(padding=1, stride=2, normalize="rms", threshold=2.0)
    return (_pixels(20, 3, 9, gen) * 3.0, _pixels(20, 3, 9, gen) * 3.0, weight, bias), kwargs


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", ["conv2d_step", "conv2d_class_step"])
def test_low_precision_flash_attention_rule(op, dtype) -> None:
    args32, kwargs = _low_conv_case(op)
    given = tuple(t.to(dtype) if t.is_floating_point() else t for t in args32)
    step = ffk.ff_conv2d_step if op == "conv2d_step" else ffk.ff_conv2d_class_step
    fields = STEP_FIELDS if op == "conv2d_step" else CLASS_FIELDS
    truth = step(*(t.double() if t.is_floating_point() else t for t in given), **kwargs, backend="reference")
    baseline = _low_baseline(op, given, kwargs, dtype)
    out = _cpu(step(*_on_device(given), **kwargs, backend="triton"))
    assert out.loss.dtype == torch.float32 and out.grad_weight.dtype == dtype
    _assert_flash_attention_rule(out, truth, baseline, dtype, fields)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", ["conv2d_step", "conv2d_class_step"])
def test_compute_dtype_flash_attention_rule(op, dtype) -> None:
    """fp32 images and weights with ``compute_dtype``: both GEMMs in ``dtype`` (h in it), the gradients fp32; every
    output within FlashAttention's rule of the float64 truth, against the torch backend's ``compute_dtype`` step."""
    args32, kwargs = _low_conv_case(op)
    step = ffk.ff_conv2d_step if op == "conv2d_step" else ffk.ff_conv2d_class_step
    fields = STEP_FIELDS if op == "conv2d_step" else CLASS_FIELDS
    truth = step(*(t.double() if t.is_floating_point() else t for t in args32), **kwargs, backend="reference")
    baseline = step(*args32, **kwargs, backend="torch", compute_dtype=dtype)
    out = _cpu(step(*_on_device(args32), **kwargs, backend="triton", compute_dtype=dtype))
    h = out.h_pos if op == "conv2d_step" else out.h
    assert h.dtype == dtype and out.grad_weight.dtype == torch.float32
    _assert_flash_attention_rule(out, truth, baseline, dtype, fields)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_compute_dtype_fused_update_writes_the_fp32_master_weight(optimizer) -> None:
    """bf16 compute over fp32 weights: GEMM 2's epilogue updates the fp32 weight and state as optimizer.update
    does with the same step's fp32 gradients (two steps, on a clone)."""
    (x, labels, w, b), kwargs = _low_conv_case("conv2d_class_step")
    x, labels, w, b = _on_device((x, labels, w, b))
    w_ref, b_ref = w.clone(), b.clone()
    make = {"sgd": lambda p: optim.SGD(p, lr=0.05, momentum=0.9), "adam": lambda p: optim.Adam(p, lr=1e-2)}[optimizer]
    opt, opt_ref = make([w, b]), make([w_ref, b_ref])
    for _ in range(2):
        grads = ffk.ff_conv2d_class_step(x, labels, w_ref, b_ref, **kwargs, backend="triton",
                                         compute_dtype=torch.bfloat16)
        ffk.ff_conv2d_class_step(x, labels, w, b, **kwargs, optimizer=opt, backend="triton",
                                 compute_dtype=torch.bfloat16)
        opt_ref.update([w_ref, b_ref], [grads.grad_weight, grads.grad_bias])
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the boundary, custom ops, torch.compile


def test_dispatch_lists_triton_for_the_conv_ops() -> None:
    for op in ("conv2d_step", "conv2d_class_step", "conv2d_forward", "linear_class_step"):
        assert "triton" in dispatch.backends_for(op) and (op, "triton") not in dispatch.MISSING
        assert dispatch.spec(op, "triton").compute_dtype


def test_float64_is_an_error_naming_the_weight() -> None:
    (x_pos, x_neg, w, b), kwargs = conv_case(3, 3, 4, GEOMETRIES[0], dtype=torch.float64)
    with pytest.raises(TypeError, match="weight is torch.float64"):
        ffk.ff_conv2d_step(*_on_device((x_pos, x_neg, w, b)), **kwargs, backend="triton", check_finite=False)


def _op_inputs(bias: bool = True):
    (x_pos, x_neg, w, b), _ = conv_case(3, 2, 4, GEOMETRIES[3], bias=bias)
    return _on_device((x_pos, x_neg, w, b))


GEOMETRY_ARGS = ([2, 1], [1, 0], [1, 2])
HYPER = [0.1, 0.01, 0.9, 0.0, 0.9, 0.999, 1e-8, 0.1, 0.0316, 0.1, 0.0316]


def test_opcheck_forward() -> None:
    x, _, w, b = _op_inputs()
    for num_classes in (0, 2):
        torch.library.opcheck(torch.ops.ff_kernels.triton_conv_forward.default,
                              (x, w, b, *GEOMETRY_ARGS, 0.25, "rms", 1e-4, num_classes))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_step(bias) -> None:
    x_pos, x_neg, w, b = _op_inputs(bias)
    offsets = torch.randn(3).to(DEVICE), None
    torch.library.opcheck(torch.ops.ff_kernels.triton_conv_step.default,
                          (x_pos, x_neg, w, b, None, *GEOMETRY_ARGS, *offsets, 0.5, 0.1, "logistic", "l2", 1e-4,
                           4.0))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_opcheck_step_update(opt) -> None:
    x_pos, x_neg, w, b = _op_inputs()
    step_args = (None, *GEOMETRY_ARGS, None, None, 0.5, 0.1, "logistic", "rms", 1e-4, 4.0)
    if opt == "sgd":
        update = (1, torch.zeros_like(w), None, torch.zeros_like(b), None, HYPER, [True, False, False, False])
    else:
        update = (2, torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(b), HYPER,
                  [False, False, False, True])
    torch.library.opcheck(torch.ops.ff_kernels.triton_conv_step_update_.default,
                          (x_pos, x_neg, w, b, *step_args, *update))


def test_opcheck_class_steps() -> None:
    x, _, w, b = _op_inputs()
    labels = torch.tensor([0, 1, 1]).to(DEVICE)
    class_args = (None, *GEOMETRY_ARGS, 2, 0.1, 0.5, "l2", 1e-4)
    torch.library.opcheck(torch.ops.ff_kernels.triton_conv_class_step.default, (x, labels, w, b, *class_args))
    update = (2, torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(b), HYPER,
              [False, False, False, False])
    torch.library.opcheck(torch.ops.ff_kernels.triton_conv_class_step_update_.default,
                          (x, labels, w, b, *class_args, *update))


def test_torch_compile_fullgraph() -> None:
    """The conv ops are opaque to torch.compile: a training step of two layers (a pos/neg step with fused SGD, a
    class step with fused Adam on its output, then inference) compiles without graph breaks and equals eager."""
    torch._dynamo.reset()
    (x_pos, x_neg, w, b), kwargs = conv_case(4, 3, 4, GEOMETRIES[1], normalize="l2")
    x_pos, x_neg, w, b = _on_device((x_pos, x_neg, w, b))
    geometry = check_conv_geometry(*GEOMETRIES[1])
    out_h, out_w = geometry.output_size((HEIGHT, WIDTH), KERNEL)
    opts = check_step_options(threshold=0.5, goodness="mean", loss="logistic", normalize="l2", eps=1e-4, alpha=4.0,
                              out_features=4 * out_h * out_w)
    gen = torch.Generator().manual_seed(5)
    w2 = (torch.randn(4, 4, 2, 2, generator=gen) * 0.5).to(DEVICE)
    second = check_conv_geometry(1, 0, 1)
    class_opts = check_class_options(num_classes=2, goodness="mean", temperature=1.0, normalize="rms", eps=1e-4,
                                     channels=4, positions=(out_h - 1) * (out_w - 1))
    labels = torch.tensor([0, 1, 1, 0]).to(DEVICE)
    params = [w, b, w2]
    eager_params = [p.clone() for p in params]

    def make_optimizers(ps):
        return optim.SGD(ps[:2], lr=0.1, momentum=0.9), optim.Adam(ps[2:], lr=1e-2)

    opts_compiled, opts_eager = make_optimizers(params), make_optimizers(eager_params)

    def step(x_pos, x_neg, w, b, w2, sgd, adam):
        out = ff_conv2d_step_triton(x_pos, x_neg, w, b, opts, geometry, optimizer=sgd)
        second_out = ff_conv2d_class_step_triton(out.h_pos, labels, w2, None, class_opts, second, optimizer=adam)
        h, g = ff_conv2d_forward_triton(out.h_neg, w2, None, second, kappa=0.1, normalize="rms", eps=1e-4,
                                        num_classes=2)
        return out.loss, out.goodness_neg, second_out.loss, second_out.goodness, h, g

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        got = compiled(x_pos, x_neg, *params, *opts_compiled)
        want = step(x_pos, x_neg, *eager_params, *opts_eager)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
        for a, e in zip(params, eager_params):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_interpreter_uses_single_config() -> None:
    if DEVICE == "cuda":
        pytest.skip("only meaningful under the interpreter")
    assert len(conv_gemm.CONV_FORWARD_CONFIGS) == 1 and len(conv_gemm.CONV_GRAD_CONFIGS) == 1


def test_inspect_captures_the_conv_layers() -> None:
    """``ff-kernels inspect`` plans the conv steps of ``CONV_SHAPES`` for every precision and optimizer (the CI
    subset the first, in bf16 with Adam); GEMM K is C_in kh kw and N the channels."""
    from ff_kernels import inspect

    specs = [s for s in inspect._step_specs(inspect.Selection()) if isinstance(s, inspect.ConvSpec)]
    assert len(specs) == len(inspect.PRECISIONS) * len(inspect.OPTIMIZERS) * len(inspect.CONV_SHAPES)
    assert {(s.in_features, s.out_features) for s in specs} == {(27, 64), (576, 128)}
    ci = [s for s in inspect._step_specs(inspect.SUBSETS["ci"]) if isinstance(s, inspect.ConvSpec)]
    assert [(s.precision, s.optimizer, s.in_features, s.out_features) for s in ci] == [("bf16", "adam", 27, 64)]
