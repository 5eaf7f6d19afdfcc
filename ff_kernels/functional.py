"""The public functions: ``ff_linear_step`` and ``ff_linear_forward``.

This is the boundary: arguments are checked here once, the backend is resolved, and the backend function runs
on trusted inputs. Everything runs under ``torch.no_grad``: parameters may be ``nn.Parameter``s and are updated
in place, and no autograd graph is recorded. Backends return gradients; where they cannot fuse the update, it is
applied here.

``check_finite`` is honoured where it costs no host synchronisation per step (``ff_kernels.finite``): inside the
C++ CPU operator's first pass, by a host scan for the other backends on CPU tensors, and on the device, read every
few steps, on the GPU paths.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

from ff_kernels import _options as opt_checks
from ff_kernels import dispatch, finite
from ff_kernels._options import BACKENDS, check_choice
from ff_kernels.backends import resolve_backend, warn_if_slow_bf16
from ff_kernels.optim import FusedOptimizer
from ff_kernels.types import FFStepOutput, StepOutput

# How check_finite is honoured on a route (ff_kernels.finite); meta tensors have no values to check.
FINITE_IN_OP, FINITE_SCAN, FINITE_DEFERRED, FINITE_NONE = "in_op", "scan", "deferred", "none"


class Route(NamedTuple):
    """A resolved backend for one op: its table entry, its function, and where the finiteness check runs.
    ``direct``: the function fuses the update, takes no finiteness flag and needs no compute dtype (the Triton
    path computing in the weight's dtype), so a step calls it with the checked arguments and the optimizer alone."""

    entry: dispatch.Implementation
    fn: Callable
    finite: str
    direct: bool = False


_routes: dict[tuple, Route] = {}

# TRITON_INTERPRET as ``route_for`` keys on it, read at every step: ``os.environ.get`` encodes the key and decodes
# the value (about a sixth of a tiny matrix product); on POSIX, ``os.environ`` keeps the encoded pairs in a dict that
# every write through it updates, which one lookup reads (the bytes value keys the route as well as its text).
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
_INTERPRET_KEY = b"TRITON_INTERPRET"


def _interpret_setting() -> object:
    """``TRITON_INTERPRET`` as set in ``os.environ`` now (None when unset), in a form that only keys the routes."""
    if isinstance(_ENV_BYTES, dict):
        return _ENV_BYTES.get(_INTERPRET_KEY)
    return os.environ.get("TRITON_INTERPRET")

F = TypeVar("F", bound=Callable)

# The grad-mode and compile-state functions ``without_grad`` calls at every step, bound once: each ``torch.`` path is
# a chain of module attribute lookups (torch.compile recognises the functions themselves, however they are named).
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled


def without_grad(fn: F) -> F:
    """``torch.no_grad()`` as a decorator, at a fraction of its eager cost (DESIGN 4's host target: the context
    object it makes and enters per call costs about one tiny matrix product). Eagerly the grad mode is switched
    directly; torch.compile traces the plain ``torch.no_grad`` version."""
    traced = torch.no_grad()(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _grad_enabled():
            return (traced if _is_compiling() else fn)(*args, **kwargs)
        if _is_compiling():
            return traced(*args, **kwargs)
        _set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_grad_enabled(True)

    return wrapper  # type: ignore[return-value]


def route_for(op: str, backend: str, compute: torch.dtype, weight: torch.Tensor) -> Route:
    """The concrete backend for ``op`` on ``weight``'s device.

    A backend that lacks ``op`` is an error before its availability is checked; ``auto`` picks the fastest backend
    for the device among those that implement ``op``. A compute dtype other than the weight's is a feature of some
    backends only: ``auto`` keeps its pick if that is one of them and otherwise takes the first, and an explicit
    other backend is an error.

    Resolved once per (op, backend, device type, dtypes): a step at a small shape costs less than the lookups. What
    can change later is checked where it is used: the extension's functions check that it is still loaded, and the
    Triton backend on the CPU is keyed on TRITON_INTERPRET. Only a valid backend name is ever cached, so the name
    is checked on a miss."""
    device = weight.device
    device_type = device.type
    interpret = _interpret_setting() if backend == "triton" and device_type == "cpu" else None
    key = (op, backend, device_type, compute, weight.dtype, interpret)
    try:
        route = _routes.get(key)
    except TypeError:  # an unhashable backend: refused below
        route = None
    if route is None:
        check_choice("backend", backend, BACKENDS)
        route = _routes[key] = _resolve(op, backend, compute, weight.dtype, device)
    return route


def _resolve(op: str, backend: str, compute: torch.dtype, dtype: torch.dtype, device: torch.device) -> Route:
    if backend != "auto":
        dispatch.spec(op, backend)
    name = resolve_backend(backend, device)
    if (op, name) not in dispatch.TABLE or (backend == "auto" and not dispatch.TABLE[(op, name)].auto):
        name = "torch"
    if dtype == torch.float64 and not dispatch.TABLE[(op, name)].float64:
        if backend != "auto":
            raise TypeError(
                f"weight is torch.float64; backend={name!r} takes float32, bfloat16 or float16 for {op} (float64 "
                "runs on backend='torch' or 'reference')"
            )
        name = "torch"
    if compute != dtype and not dispatch.TABLE[(op, name)].compute_dtype:
        supporting = [b for b in dispatch.backends_for(op) if dispatch.spec(op, b).compute_dtype]
        if backend != "auto":
            raise ValueError(
                f"compute_dtype={compute} is supported by backend={' or '.join(map(repr, supporting))} only; "
                f"got backend={name!r}"
            )
        name = resolve_backend(supporting[0], device)
    warn_if_slow_bf16(device, compute)
    entry, fn = dispatch.implementation(op, name)
    if device.type == "meta":
        mode = FINITE_NONE
    elif device.type == "cpu" and name != "triton":
        mode = FINITE_IN_OP if entry.checks_finite else FINITE_SCAN
    else:
        mode = FINITE_DEFERRED
    direct = entry.fuses_update and not entry.checks_finite and (not entry.compute_dtype or compute == dtype)
    return Route(entry, fn, mode, direct)


def resolve_for(op: str, backend: str, compute: torch.dtype, weight: torch.Tensor) -> tuple[dispatch.Implementation,
                                                                                            Callable]:
    """:func:`route_for`'s table entry and function."""
    route = route_for(op, backend, compute, weight)
    return route.entry, route.fn


def check_optimizer(optimizer: FusedOptimizer | None, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if optimizer is None:
        return
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(
            f"optimizer must be an ff_kernels.optim optimizer (SGD, Adam, AdamW); got {type(optimizer).__name__}"
        )
    optimizer.check_holds("weight", weight)
    if bias is not None:
        optimizer.check_holds("bias", bias)


def call_step(
    route: Route,
    args: tuple,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    optimizer: FusedOptimizer | None,
    compute: torch.dtype,
    check_in_op: bool,
) -> StepOutput:
    """Call ``route``'s backend on checked ``args``; where it does not fuse the update, apply it here from the
    gradients it returned (and return the record without them, as a fused backend would). ``check_in_op`` asks the
    operator for its fused finiteness scan."""
    entry, step = route.entry, route.fn
    if entry.fuses_update and entry.compute_dtype and entry.checks_finite:  # the C++ operator: its hot path
        return step(*args, optimizer=optimizer, compute_dtype=compute, check_finite=check_in_op)
    extra = {"compute_dtype": compute} if entry.compute_dtype else {}
    if entry.checks_finite:
        extra["check_finite"] = check_in_op
    if entry.fuses_update:
        return step(*args, optimizer=optimizer, **extra)
    out = step(*args, **extra)
    if optimizer is None:
        return out
    params = [weight] if bias is None else [weight, bias]
    grads = [out.grad_weight] if bias is None else [out.grad_weight, out.grad_bias]
    optimizer.update(params, grads, grads_are_scratch=True)
    return out._replace(grad_weight=None, grad_bias=None)


@without_grad
def ff_linear_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    threshold: float = 2.0,
    goodness: str = "mean",
    loss: str = "logistic",
    normalize: str = "l2",
    eps: float = 1e-4,
    alpha: float = 4.0,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    optimizer: FusedOptimizer | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> FFStepOutput:
    """One FF layer step on a positive and a negative batch (DESIGN 1): forward, goodness, loss, gradient, update.

    Args:
        x_pos, x_neg: (P, K) and (Q, K) inputs, same dtype as ``weight``. Either batch may be empty (not both)
            for ``loss="logistic"``; ``loss="symba"`` pairs row i of each and needs P == Q > 0.
        weight, bias: (N, K) and (N,) or None; updated in place when ``optimizer`` is given.
        offset_pos, offset_neg: optional per-row goodness offsets (Layer Collaboration), treated as constants.
        optimizer: an ``ff_kernels.optim`` optimizer holding ``weight`` (and ``bias``), or None to get gradients.
        backend: "auto", "reference", "torch", "triton" or "cuda"; an unavailable one raises.
        compute_dtype: dtype of the matrix products (e.g. torch.bfloat16 with float32 weights); goodness, loss,
            gradients and optimizer state stay float32. Default: the weight dtype. Supported by the torch backend
            and by the extension's CPU operator (backend="cuda" on CPU tensors); ``auto`` picks the latter on the
            CPU where it is built, the torch backend otherwise. A CPU without bf16 instructions warns once.
        check_finite: raise ValueError if the inputs or offsets hold NaN/inf. On the CPU at once (fused into the C++
            operator's first pass, or a host scan); on the GPU paths the scan stays on the device and is read every
            ``ff_kernels.finite.interval()`` steps, so a step never waits for the device (``ff_kernels.finite``).
            With False, non-finite inputs give a NaN loss and, with an optimizer, NaN parameters.

    Returns:
        FFStepOutput; ``grad_weight``/``grad_bias`` are None when an optimizer applied the update.
    """
    opt_checks.check_weight_bias(weight, bias)
    opt_checks.check_flag("check_finite", check_finite)
    compute = weight.dtype if compute_dtype is None else opt_checks.check_compute_dtype(compute_dtype, weight)
    route = route_for("linear_step", backend, compute, weight)
    scan = check_finite and route.finite == FINITE_SCAN
    x_pos, x_neg = opt_checks.check_inputs(x_pos, x_neg, weight, scan, compute)
    rows_pos, rows_neg = x_pos.shape[0], x_neg.shape[0]
    opts = opt_checks.check_step_options(
        threshold=threshold,
        goodness=goodness,
        loss=loss,
        normalize=normalize,
        eps=eps,
        alpha=alpha,
        out_features=weight.shape[0],
    )
    opt_checks.check_pos_neg_rows(opts.loss, rows_pos, rows_neg)
    if offset_pos is not None:
        offset_pos = opt_checks.check_offset("offset_pos", offset_pos, rows_pos, weight, scan)
    if offset_neg is not None:
        offset_neg = opt_checks.check_offset("offset_neg", offset_neg, rows_neg, weight, scan)
    check_optimizer(optimizer, weight, bias)
    if check_finite and route.finite == FINITE_DEFERRED:
        finite.defer_step(weight.device, x_pos, x_neg, offset_pos, offset_neg)
    if route.direct:
        return route.fn(x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg, optimizer)
    args = (x_pos, x_neg, weight, bias, opts, offset_pos, offset_neg)
    check_in_op = check_finite and route.finite == FINITE_IN_OP
    return call_step(route, args, weight, bias, optimizer, compute, check_in_op)


@without_grad
def ff_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    goodness: str = "mean",
    normalize: str = "l2",
    eps: float = 1e-4,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference (GEMM 1 alone): h = relu(r * (x @ W^T) + b) and goodness g (float32), DESIGN 1.1-1.3; options as
    in :func:`ff_linear_step`."""
    weight, bias = opt_checks.dense_parameters(weight, bias)
    opt_checks.check_weight_bias(weight, bias)
    opt_checks.check_flag("check_finite", check_finite)
    compute = opt_checks.check_compute_dtype(compute_dtype, weight)
    route = route_for("linear_forward", backend, compute, weight)
    x = opt_checks.check_input("x", x, weight, check_finite and route.finite == FINITE_SCAN, compute)
    opt_checks.check_choice("goodness", goodness, opt_checks.GOODNESS)
    opt_checks.check_normalize(normalize, eps)
    kappa = opt_checks.goodness_scale(goodness, weight.shape[0])
    if check_finite and route.finite == FINITE_DEFERRED:
        finite.defer(weight.device, (("x", x),))
    extra = {"compute_dtype": compute} if route.entry.compute_dtype else {}
    if route.entry.checks_finite:
        extra["check_finite"] = check_finite and route.finite == FINITE_IN_OP
    h, g = route.fn(x, weight, bias, kappa=kappa, normalize=normalize, eps=eps, **extra)
    return h, g.to(torch.promote_types(g.dtype, torch.float32))
