"""ff_kernels.optim: step-for-step parity with torch.optim's single-tensor implementations (DESIGN 1.7)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import ff_kernels as ffk
from ff_kernels import backends, optim

STEPS = 5

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.8, weight_decay=0.1, nesterov=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.85, 0.95), weight_decay=0.3)),
]


def config_id(config) -> str:
    name, kw = config
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def make_params(dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=gen).to(dtype), torch.randn(7, generator=gen).to(dtype)]


def make_grads(seed=1, steps=STEPS) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(7, 5, generator=gen), torch.randn(7, generator=gen)] for _ in range(steps)]


def torch_optimizer(name: str, params, kw):
    return getattr(torch.optim, name)(params, **kw, foreach=False)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_update_matches_torch_optim(config) -> None:
    name, kw = config
    ours = make_params()
    theirs = [p.clone() for p in ours]
    opt = getattr(optim, name)(ours, **kw)
    ref = torch_optimizer(name, theirs, kw)
    for step, grads in enumerate(make_grads()):
        opt.update(ours, [g.clone() for g in grads])
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, step=step: f"step {step}: {m}")
    # the parameters really moved, and state exists in float32
    assert not torch.equal(ours[0], make_params()[0])


def test_update_does_not_modify_gradients() -> None:
    for name, kw in CONFIGS:
        params = make_params()
        opt = getattr(optim, name)(params, **kw)
        for grads in make_grads(steps=2):
            saved = [g.clone() for g in grads]
            opt.update(params, grads)
            for g, s in zip(grads, saved, strict=True):
                assert torch.equal(g, s), name


def test_update_subset_of_params() -> None:
    """update() on one tensor advances only that tensor's state (the step of a layer without bias)."""
    ours = make_params()
    theirs = [ours[0].clone()]
    opt = optim.Adam(ours, lr=0.01)
    ref = torch.optim.Adam(theirs, lr=0.01, foreach=False)
    bias_before = ours[1].clone()
    for grads in make_grads():
        opt.update(ours[:1], grads[:1])
        theirs[0].grad = grads[0].clone()
        ref.step()
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], bias_before)
    assert opt.state[1] == {}
    assert opt.state[0]["step"] == STEPS


# ---------------------------------------------------------------------------------------------------------------
# through ff_linear_step


def _step_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.randn(21, 13, generator=gen)
    x_neg = torch.randn(17, 13, generator=gen)
    weight = torch.randn(9, 13, generator=gen)
    bias = 0.3 * torch.randn(9, generator=gen)
    return x_pos, x_neg, weight, bias


# the fused CPU operator (what backend="auto" runs on CPU tensors) where the extension is built
FUSED_CPU = pytest.param("cuda", marks=pytest.mark.skipif(
    backends.cuda_unavailable_reason(torch.device("cpu")) is not None, reason="the C++ extension is not built"))


@pytest.mark.parametrize("backend", ["reference", "torch", FUSED_CPU])
@pytest.mark.parametrize(
    "config", [("Adam", dict(lr=0.02)), ("SGD", dict(lr=0.1, momentum=0.9)), ("AdamW", dict(lr=0.02))], ids=config_id
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_step_with_optimizer_matches_reference_plus_torch_optim(backend, config, with_bias) -> None:
    name, kw = config
    x_pos, x_neg, weight, bias = _step_data()
    if not with_bias:
        bias = None
    ref_w = weight.clone()
    ref_b = None if bias is None else bias.clone()
    ref_params = [ref_w] if ref_b is None else [ref_w, ref_b]
    ref_opt = torch_optimizer(name, ref_params, kw)
    params = [weight] if bias is None else [weight, bias]
    opt = getattr(optim, name)(params, **kw)
    options = dict(threshold=0.5, normalize="l2")
    for step in range(STEPS):
        expected = ffk.ff_linear_step(x_pos, x_neg, ref_w, ref_b, **options, backend="reference")
        out = ffk.ff_linear_step(x_pos, x_neg, weight, bias, **options, optimizer=opt, backend=backend)
        # the update replaces the gradients in the record; h and goodness come from the weights before the update
        assert out.grad_weight is None and out.grad_bias is None
        rtol, atol = (0, 0) if backend == "reference" else (1e-4, 1e-5)
        torch.testing.assert_close(out.loss, expected.loss, rtol=rtol, atol=atol)
        torch.testing.assert_close(out.h_pos, expected.h_pos, rtol=rtol, atol=atol)
        torch.testing.assert_close(out.goodness_neg, expected.goodness_neg, rtol=rtol, atol=atol)
        ref_w.grad = expected.grad_weight
        if ref_b is not None:
            ref_b.grad = expected.grad_bias
        ref_opt.step()
        torch.testing.assert_close(weight, ref_w, rtol=rtol, atol=atol, msg=lambda m, step=step: f"step {step}: {m}")
        if bias is not None:
            torch.testing.assert_close(bias, ref_b, rtol=rtol, atol=atol)
    assert not torch.equal(weight, _step_data()[2])


def test_step_updates_nn_parameters_in_place() -> None:
    x_pos, x_neg, weight, bias = _step_data()
    w, b = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())
    opt = optim.SGD([w, b], lr=0.1)
    w_id, b_id = w.data_ptr(), b.data_ptr()
    expected = ffk.ff_linear_step(x_pos, x_neg, weight, bias, backend="torch")
    ffk.ff_linear_step(x_pos, x_neg, w, b, optimizer=opt, backend="torch")
    assert w.data_ptr() == w_id and b.data_ptr() == b_id
    assert w.grad is None and b.grad is None
    torch.testing.assert_close(w.detach(), weight - 0.1 * expected.grad_weight)
    torch.testing.assert_close(b.detach(), bias - 0.1 * expected.grad_bias)


# ---------------------------------------------------------------------------------------------------------------
# low-precision parameters: float32 state, float32 master update rounded once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "config",
    [("Adam", dict(lr=0.01)), ("AdamW", dict(lr=0.01, weight_decay=0.1)), ("SGD", dict(lr=0.05, momentum=0.9))],
    ids=config_id,
)
def test_low_precision_param_fp32_state_and_rounded_master(dtype, config) -> None:
    name, kw = config
    params = make_params(dtype)
    opt = getattr(optim, name)(params, **kw)
    master = [p.float() for p in params]
    ref = torch_optimizer(name, master, kw)
    for grads in make_grads():
        with torch.no_grad():
            for m, p in zip(master, params, strict=True):
                m.copy_(p.float())  # the parameter is stored low precision: the next step starts from it
        opt.update(params, [g.clone() for g in grads])
        for m, g in zip(master, grads, strict=True):
            m.grad = g.clone()
        ref.step()
        for p, m in zip(params, master, strict=True):
            assert p.dtype == dtype
            assert torch.equal(p, m.to(dtype))
    for s in opt.state:
        tensors = [v for v in s.values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.dtype == torch.float32 for t in tensors)
    # the float32 state is not the rounded state: it equals torch.optim's float32 state exactly
    ref_state = ref.state[master[0]]
    ours_state = opt.state[0]
    key = "momentum_buffer" if name == "SGD" else "exp_avg_sq"
    assert torch.equal(ours_state[key], ref_state[key])


def test_low_precision_gradients_are_upcast() -> None:
    params = make_params(torch.bfloat16)
    opt = optim.Adam(params, lr=0.01)
    grads = [g.to(torch.bfloat16) for g in make_grads(steps=1)[0]]
    opt.update(params, grads)
    assert opt.state[0]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(opt.state[0]["exp_avg"], 0.1 * grads[0].float(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("via", ["torch.save", "deepcopy"])
def test_state_dict_round_trip_continues_identically(config, via) -> None:
    name, kw = config
    grads = make_grads(steps=STEPS)
    a_params = make_params()
    a = getattr(optim, name)(a_params, **kw)
    for g in grads[:2]:
        a.update(a_params, g)
    state = a.state_dict()
    if via == "torch.save":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
    else:
        state = copy.deepcopy(state)
    b_params = [p.clone() for p in a_params]
    b = getattr(optim, name)(b_params, lr=123.0)  # options come from the state dict
    b.load_state_dict(state)
    assert b.defaults == a.defaults
    assert b.lr == a.lr
    for g in grads[2:]:
        a.update(a_params, g)
        b.update(b_params, g)
    for pa, pb in zip(a_params, b_params, strict=True):
        assert torch.equal(pa, pb)
    assert "state" in a.state_dict() and "defaults" in a.state_dict()


def test_load_state_dict_wrong_length() -> None:
    a = optim.Adam(make_params(), lr=0.1)
    b = optim.Adam(make_params()[:1], lr=0.1)
    with pytest.raises(ValueError, match="state for 2 parameters"):
        b.load_state_dict(a.state_dict())


def test_repr_names_class_and_options() -> None:
    text = repr(optim.SGD(make_params(), lr=0.5, momentum=0.9))
    assert text.startswith("SGD(2 tensors") and "lr=0.5" in text and "momentum=0.9" in text


def test_adamw_default_weight_decay_matches_torch() -> None:
    assert optim.AdamW(make_params()).weight_decay == torch.optim.AdamW(make_params()).defaults["weight_decay"]
    assert optim.Adam(make_params()).lr == torch.optim.Adam(make_params()).defaults["lr"]


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_empty_params() -> None:
    with pytest.raises(ValueError, match="params must contain at least one tensor"):
        optim.Adam([], lr=0.1)


def test_non_tensor_param() -> None:
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor"):
        optim.SGD([torch.zeros(2), [1.0, 2.0]], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating tensor"):
        optim.SGD([torch.zeros(2, dtype=torch.int64)], lr=0.1)


def test_duplicate_param() -> None:
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="same tensor twice"):
        optim.Adam([p, p])


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
@pytest.mark.parametrize("lr", [-0.1, float("nan"), "0.1"])
def test_bad_lr(cls, lr) -> None:
    with pytest.raises(ValueError, match="lr must be a non-negative number"):
        cls(make_params(), lr=lr)


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9, -0.5)])
@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_bad_betas(cls, betas) -> None:
    with pytest.raises(ValueError, match="betas must lie in"):
        cls(make_params(), lr=0.1, betas=betas)


def test_bad_eps_weight_decay_momentum() -> None:
    with pytest.raises(ValueError, match="eps must be non-negative"):
        optim.Adam(make_params(), eps=-1e-8)
    with pytest.raises(ValueError, match="weight_decay must be non-negative"):
        optim.Adam(make_params(), weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay must be non-negative"):
        optim.SGD(make_params(), weight_decay=-0.1)
    with pytest.raises(ValueError, match="momentum must be non-negative"):
        optim.SGD(make_params(), momentum=-0.5)


def test_nesterov_without_momentum_or_with_dampening() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(make_params(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(make_params(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)


def test_update_of_a_tensor_not_held() -> None:
    opt = optim.SGD(make_params(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold params\[0\]"):
        opt.update([torch.zeros(7, 5)], [torch.zeros(7, 5)])


def test_step_optimizer_must_hold_weight_and_bias() -> None:
    x_pos, x_neg, weight, bias = _step_data()
    other_w = weight.clone()
    opt = optim.Adam([other_w, bias], lr=0.1)
    before = bias.clone()
    with pytest.raises(ValueError, match="optimizer does not hold weight"):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=opt)
    assert torch.equal(bias, before) and torch.equal(other_w, weight)  # nothing was updated
    opt = optim.Adam([weight], lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold bias"):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=opt)
    assert torch.equal(weight, _step_data()[2])
    # holding a copy with the same values is not holding the tensor
    opt = optim.Adam([weight.clone(), bias.clone()], lr=0.1)
    with pytest.raises(ValueError, match="weight"):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=opt)


def test_step_rejects_torch_optimizer() -> None:
    x_pos, x_neg, weight, bias = _step_data()
    with pytest.raises(TypeError, match="optimizer must be an ff_kernels.optim optimizer.*got Adam"):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=torch.optim.Adam([weight, bias]))


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_adam_fused_state_advances_both_steps_and_checks_both_first(cls) -> None:
    """What the fused kernels read: the moments (created as fp32 zeros on first use, the same tensors after), the
    step counts advanced by one per call and the bias corrections of the new counts; a parameter the optimizer does
    not hold is refused before any state changes."""
    weight, bias = torch.randn(3, 4), torch.randn(3)
    opt = cls([weight, bias], lr=0.05, betas=(0.8, 0.9))
    first, _ = opt.fused_state(weight, bias)
    assert [tuple(m.shape) for m in first] == [(3, 4), (3, 4), (3,), (3,)]
    assert all(m.dtype == torch.float32 and not m.any() for m in first)
    for step in (2, 3):
        moments, corrections = opt.fused_state(weight, bias)
        assert all(m is f for m, f in zip(moments, first))
        assert corrections == [*opt.bias_corrections(step), *opt.bias_corrections(step)]
        assert [s["step"] for s in opt.state] == [step, step]
    moments, corrections = opt.fused_state(weight, None)
    assert moments[2:] == [None, None] and corrections[2:] == [0.0, 1.0]
    assert [s["step"] for s in opt.state] == [4, 3]
    with pytest.raises(ValueError, match="optimizer does not hold bias"):
        opt.fused_state(weight, bias.clone())
    assert [s["step"] for s in opt.state] == [4, 3]
