"""ff_kernels.optim's input checks: hyper-parameters (constructor and load_state_dict), params, state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ff_kernels import optim

NAN, INF = float("nan"), float("inf")


def make_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)]


BAD_HYPER = [
    (optim.SGD, "lr", INF), (optim.SGD, "lr", -1.0), (optim.SGD, "lr", None), (optim.SGD, "lr", True),
    (optim.SGD, "momentum", NAN), (optim.SGD, "momentum", None), (optim.SGD, "momentum", INF),
    (optim.SGD, "dampening", NAN), (optim.SGD, "dampening", 1.5), (optim.SGD, "dampening", -0.1),
    (optim.SGD, "weight_decay", NAN), (optim.SGD, "weight_decay", "0.1"), (optim.SGD, "nesterov", "yes"),
    (optim.Adam, "weight_decay", NAN), (optim.Adam, "lr", -INF), (optim.Adam, "eps", NAN),
    (optim.Adam, "eps", None), (optim.AdamW, "weight_decay", INF), (optim.AdamW, "lr", torch.tensor(0.1)),
    (optim.Adam, "betas", (0.9,)), (optim.Adam, "betas", 0.9), (optim.Adam, "betas", (0.9, NAN)),
    (optim.Adam, "betas", (None, 0.9)), (optim.AdamW, "betas", (0.9, 0.99, 0.5)), (optim.AdamW, "betas", "ab"),
]


def bad_id(case) -> str:
    return f"{case[0].__name__}-{case[1]}={case[2]!r}"


@pytest.mark.parametrize("case", BAD_HYPER, ids=bad_id)
def test_bad_hyper_parameter_rejected_by_constructor_and_load(case) -> None:
    cls, name, value = case
    pattern = rf"^{name} must .*; got "
    with pytest.raises(ValueError, match=pattern):
        cls(make_params(), **{name: value})
    opt = cls(make_params())
    state = opt.state_dict()
    before = dict(opt.defaults)
    state["defaults"][name] = value
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(state)
    assert opt.defaults == before and getattr(opt, name) == before[name]


def test_nesterov_rule_applies_to_load_state_dict() -> None:
    opt = optim.SGD(make_params(), momentum=0.9, nesterov=True)
    state = opt.state_dict()
    state["defaults"]["dampening"] = 0.5
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening = 0"):
        opt.load_state_dict(state)


@pytest.mark.parametrize(
    "params, got",
    [(torch.zeros(4, 3), r"torch\.FloatTensor"), (None, "NoneType"), (3.0, "float")],
    ids=["tensor", "None", "float"],
)
def test_params_must_be_an_iterable_of_tensors(params, got) -> None:
    with pytest.raises(TypeError, match=rf"params must be an iterable of tensors.*got {got}$"):
        optim.SGD(params)


@pytest.mark.parametrize(
    "cls, kw",
    [(optim.SGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.01)), (optim.Adam, dict(betas=(0.8, 0.99))),
     (optim.AdamW, dict(eps=1e-6))],
    ids=["SGD", "Adam", "AdamW"],
)
def test_numpy_and_int_hyper_parameters_match_floats(cls, kw) -> None:
    as_numpy = {k: tuple(np.float64(b) for b in v) if isinstance(v, tuple) else np.float64(v) for k, v in kw.items()}
    grads = [torch.full((4, 3), 0.5), torch.full((4,), -0.25)]
    results = []
    for lr, options in [(0.5, kw), (np.float32(0.5), as_numpy), (np.int64(1) / 2, as_numpy)]:
        params = make_params()
        opt = cls(params, lr=lr, **options)
        assert type(opt.lr) is float and opt.lr == 0.5
        for _ in range(3):
            opt.update(params, [g.clone() for g in grads])
        results.append(params)
    for params in results[1:]:
        for a, b in zip(params, results[0], strict=True):
            assert torch.equal(a, b)
    assert cls(make_params(), lr=1).lr == 1.0


def _stepped(cls, shapes=((4, 3), (4,)), **kw):
    params = [torch.randn(s) for s in shapes]
    opt = cls(params, **kw)
    opt.update(params, [torch.randn(s) for s in shapes])
    return opt


@pytest.mark.parametrize(
    "source, target, match",
    [
        (lambda: _stepped(optim.Adam), lambda: optim.SGD(make_params()), r"another optimizer \(Adam.*this is SGD"),
        (lambda: _stepped(optim.Adam), lambda: optim.AdamW(make_params()), r"another optimizer \(Adam.*this is AdamW"),
        (lambda: _stepped(optim.SGD, momentum=0.9), lambda: optim.Adam(make_params()), "another optimizer"),
        (lambda: _stepped(optim.SGD, ((4, 2), (4,)), momentum=0.9), lambda: optim.SGD(make_params(), momentum=0.9),
         r"\['state'\]\[0\]\['momentum_buffer'\] must be a floating tensor of shape \(4, 3\).*got shape \(4, 2\)"),
        (lambda: _stepped(optim.Adam, ((4, 3),)), lambda: optim.Adam(make_params()), "state for 1 parameters"),
    ],
    ids=["adam-into-sgd", "adam-into-adamw", "sgd-into-adam", "wrong-shape", "wrong-count"],
)
def test_load_state_dict_rejects_mismatched_state(source, target, match) -> None:
    opt = target()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(source().state_dict())
    assert opt.defaults == before["defaults"] and opt.state == before["state"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s["state"][0].pop("exp_avg"), r"\['state'\]\[0\] must be empty or hold \['step', 'exp_avg'"),
        (lambda s: s["state"][1].update(step=-1), r"\['state'\]\[1\]\['step'\] must be a non-negative int"),
        (lambda s: s["state"][1].update(exp_avg=torch.zeros(4, dtype=torch.int32)), "must be a floating tensor"),
        (lambda s: s["state"][0].update(exp_avg_sq=None), r"\['exp_avg_sq'\] must be a floating tensor.*got None"),
        (lambda s: s.pop("state"), r"state_dict must come from Adam.state_dict\(\)"),
    ],
    ids=["missing-key", "negative-step", "int-tensor", "not-a-tensor", "no-state"],
)
def test_load_state_dict_rejects_malformed_state(edit, match) -> None:
    state = _stepped(optim.Adam).state_dict()
    edit(state)
    with pytest.raises(ValueError, match=match):
        optim.Adam(make_params()).load_state_dict(state)
