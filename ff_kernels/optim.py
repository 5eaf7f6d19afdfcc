"""Optimizers for the fused layer step: SGD, Adam and AdamW that hold their own state.

They are specifications as much as optimizers: ``ff_linear_step(..., optimizer=opt)`` applies the update inside
the step (the fused backends in a GEMM epilogue, the torch backend with ``torch._foreach_*`` ops), and the result
matches ``torch.optim``'s single-tensor implementation step for step. State is float32 whatever the parameter
dtype; a low-precision parameter is updated in float32 and rounded once when stored.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def master_dtype(param: torch.Tensor) -> torch.dtype:
    """State and update arithmetic: float32, or float64 for float64 parameters."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def state_buffer(state: dict[str, Any], key: str, param: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``state[key]``, created as zeros in the master dtype when absent; returns (tensor, created)."""
    buf = state.get(key)
    if buf is not None:
        return buf, False
    state[key] = torch.zeros(param.shape, dtype=master_dtype(param), device=param.device)
    return state[key], True


def _real(value: Any, low: float, high: float, high_closed: bool = False) -> bool:
    """Whether ``value`` is a real number (not a bool) in [low, high), or [low, high] if ``high_closed``; NaN fails
    every comparison and inf the open bound, so the number is finite."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return low <= value <= high if high_closed else low <= value < high


# every hyper-parameter: what its error says it must be, and the test (torch.optim's ranges, and finite)
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "lr": ("be a non-negative number (finite)", lambda v: _real(v, 0.0, math.inf)),
    "momentum": ("be non-negative (finite)", lambda v: _real(v, 0.0, math.inf)),
    "dampening": ("be in [0, 1]", lambda v: _real(v, 0.0, 1.0, high_closed=True)),
    "weight_decay": ("be non-negative (finite)", lambda v: _real(v, 0.0, math.inf)),
    "nesterov": ("be a bool", lambda v: isinstance(v, bool)),
    "betas": (
        "lie in [0, 1) as a pair (beta1, beta2)",
        lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_real(b, 0.0, 1.0) for b in v),
    ),
    "eps": ("be non-negative (finite)", lambda v: _real(v, 0.0, math.inf)),
}


def check_hyper(name: str, value: Any) -> Any:
    """``value`` as float(s) (a bool for ``nesterov``) once it passes ``RULES[name]``; a ValueError otherwise."""
    rule, ok = RULES[name]
    if not ok(value):
        raise ValueError(f"{name} must {rule}; got {value!r}")
    if isinstance(value, bool):
        return value
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else float(value)


class FusedOptimizer:
    """Common bookkeeping: the parameter list, per-parameter state, and the checks of ``ff_linear_step``."""

    state_keys: tuple[str, ...] = ()  # a parameter's state: empty before its first step, these keys after

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any]) -> None:
        if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
            got = params.type() if isinstance(params, torch.Tensor) else type(params).__name__
            raise TypeError(f"params must be an iterable of tensors, such as [weight, bias]; got {got}")
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("params must contain at least one tensor")
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor; got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"params[{i}] must be a floating tensor; got {p.dtype}")
        self._index = {id(p): i for i, p in enumerate(self.params)}
        if len(self._index) != len(self.params):
            raise ValueError("params contains the same tensor twice")
        self._set_defaults(defaults)
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def _set_defaults(self, defaults: dict[str, Any]) -> None:
        """Check the hyper-parameters (``check_hyper``; nesterov needs momentum > 0 and dampening = 0) and cache
        them as attributes, where the steps and the fused kernels read them."""
        checked = {key: check_hyper(key, value) for key, value in defaults.items()}
        if checked.get("nesterov") and (checked["momentum"] <= 0 or checked["dampening"] != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        self.defaults = checked
        for key, value in checked.items():
            setattr(self, key, value)

    def check_holds(self, name: str, tensor: torch.Tensor) -> dict[str, Any]:
        """The state of ``tensor``; a clear error when this optimizer was not given it."""
        i = self._index.get(id(tensor))
        if i is None:
            raise ValueError(f"optimizer does not hold {name}; build it with the layer's parameters")
        return self.state[i]

    @torch.no_grad()
    def update(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, grads_are_scratch: bool = False
    ) -> None:
        """Apply one step to ``params`` (a subset of this optimizer's) with the given gradients, in place.

        ``grads_are_scratch=True`` lets the update reuse the gradient tensors as workspace (``ff_linear_step``
        does, as its gradients are its own temporaries), which saves one parameter-sized buffer.
        """
        states = [self.check_holds(f"params[{i}]", p) for i, p in enumerate(params)]
        master = [p if p.dtype == master_dtype(p) else p.to(master_dtype(p)) for p in params]
        converted = [g.to(m.dtype) for g, m in zip(grads, master)]
        scratch = grads_are_scratch or any(c is not g for c, g in zip(converted, grads))
        self._update(master, converted if scratch else [g.clone() for g in converted], states)
        for p, m in zip(params, master):
            if m is not p:
                p.copy_(m)

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        """One step in place; ``grads`` are this call's own tensors and may be overwritten."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": type(self).__name__,
            "defaults": dict(self.defaults),
            "state": [dict(s) for s in self.state],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of the same kind of optimizer over parameters of the same shapes; everything is
        checked (hyper-parameters as by the constructor) before anything changes."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("defaults"), dict) or not isinstance(
            state_dict.get("state"), (list, tuple)
        ):
            raise ValueError(f"state_dict must come from {name}.state_dict(); got {type(state_dict).__name__}")
        kind, defaults, states = state_dict.get("optimizer", name), state_dict["defaults"], state_dict["state"]
        if kind != name or defaults.keys() != self.defaults.keys():
            raise ValueError(
                f"state_dict is from another optimizer ({kind}, options {sorted(defaults)}); this is {name}"
            )
        if len(states) != len(self.params):
            raise ValueError(
                f"state_dict holds state for {len(states)} parameters; this optimizer has {len(self.params)}"
            )
        loaded = [self._loaded_state(i, s, p) for i, (s, p) in enumerate(zip(states, self.params))]
        self._set_defaults(defaults)
        self.state = loaded

    def _loaded_state(self, i: int, state: Any, param: torch.Tensor) -> dict[str, Any]:
        """``state`` (of ``params[i]``) checked and moved to its device, in its master dtype."""
        where = f"state_dict['state'][{i}]"
        if not isinstance(state, dict) or (state and state.keys() != set(self.state_keys)):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{where} must be empty or hold {list(self.state_keys)}; got {keys}")
        loaded: dict[str, Any] = {}
        for key, value in state.items():
            if key == "step":
                if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{where}['step'] must be a non-negative int; got {value!r}")
                loaded[key] = int(value)
            elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape:
                loaded[key] = value.to(param.device, master_dtype(param))
            else:
                got = f"shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, torch.Tensor) else repr(value)
                raise ValueError(
                    f"{where}[{key!r}] must be a floating tensor of shape {tuple(param.shape)} (params[{i}]'s); "
                    f"got {got}"
                )
        return loaded

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({len(self.params)} tensors, {options})"


class SGD(FusedOptimizer):
    """``torch.optim.SGD``: lr, momentum, dampening, nesterov, weight_decay."""

    state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov),
        )

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            fresh = [s.get("momentum_buffer") is None for s in states]
            for s, g, new in zip(states, grads, fresh):
                if new:
                    s["momentum_buffer"] = g.detach().clone()
            old = [s["momentum_buffer"] for s, new in zip(states, fresh) if not new]
            if old:
                old_grads = [g for g, new in zip(grads, fresh) if not new]
                torch._foreach_mul_(old, self.momentum)
                torch._foreach_add_(old, old_grads, alpha=1.0 - self.dampening)
            buffers = [s["momentum_buffer"] for s in states]
            grads = torch._foreach_add(grads, buffers, alpha=self.momentum) if self.nesterov else buffers
        torch._foreach_add_(params, grads, alpha=-self.lr)

    def fused_state(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[list, list[bool]]:
        """For kernels that fuse this update: the momentum buffers of (weight, bias) (None without momentum or
        bias) and whether each is new; a new buffer takes the gradient itself, as torch.optim's first step."""
        buffers: list[torch.Tensor | None] = [None, None]
        first = [False, False]
        if self.momentum:
            for i, (name, p) in enumerate((("weight", weight), ("bias", bias))):
                if p is not None:
                    buffers[i], first[i] = state_buffer(self.check_holds(name, p), "momentum_buffer", p)
        return buffers, first


class Adam(FusedOptimizer):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient) with bias correction."""

    decoupled_weight_decay = False
    state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        beta1, beta2 = self.betas
        for s, p in zip(states, params):
            if not s:
                s.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            s["step"] += 1
        if self.weight_decay:
            if self.decoupled_weight_decay:
                torch._foreach_mul_(params, 1.0 - self.lr * self.weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        for s, p, g, m, v in zip(states, params, grads, exp_avgs, exp_avg_sqs):
            step_size, bias_correction2_sqrt = self.bias_corrections(s["step"])
            denom = torch.sqrt(v, out=g).div_(bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)

    def fused_state(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[list, list[float]]:
        """For kernels that fuse this update: advances the step count of (weight, bias) and returns their moments
        [exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b] (None for a missing bias) and bias corrections
        [step_size_w, bc2_sqrt_w, step_size_b, bc2_sqrt_b]."""
        # Called at every fused step, where its host time is a noticeable part of a small step's: both parameters
        # are looked up before either's state changes (``check_holds`` runs only to raise), a state that exists is
        # read without the helpers, and equal step counts share one computation of the bias corrections.
        index = self._index
        i_w = index.get(id(weight))
        i_b = None if bias is None else index.get(id(bias))
        if i_w is None or (i_b is None and bias is not None):
            self.check_holds("weight", weight)
            self.check_holds("bias", bias)
        state_w = self.state[i_w]
        exp_avg_w, exp_avg_sq_w = state_w.get("exp_avg"), state_w.get("exp_avg_sq")
        if exp_avg_w is None or exp_avg_sq_w is None:
            exp_avg_w, exp_avg_sq_w = self._moments(state_w, weight)
        step_w = state_w["step"] = state_w.get("step", 0) + 1
        corrections_w = self.bias_corrections(step_w)
        if bias is None:
            return [exp_avg_w, exp_avg_sq_w, None, None], [*corrections_w, 0.0, 1.0]
        state_b = self.state[i_b]
        exp_avg_b, exp_avg_sq_b = state_b.get("exp_avg"), state_b.get("exp_avg_sq")
        if exp_avg_b is None or exp_avg_sq_b is None:
            exp_avg_b, exp_avg_sq_b = self._moments(state_b, bias)
        step_b = state_b["step"] = state_b.get("step", 0) + 1
        corrections_b = corrections_w if step_b == step_w else self.bias_corrections(step_b)
        return [exp_avg_w, exp_avg_sq_w, exp_avg_b, exp_avg_sq_b], [*corrections_w, *corrections_b]

    @staticmethod
    def _moments(state: dict[str, Any], param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``state``'s exp_avg and exp_avg_sq, created as zeros where absent."""
        return state_buffer(state, "exp_avg", param)[0], state_buffer(state, "exp_avg_sq", param)[0]

    def bias_corrections(self, step: int) -> tuple[float, float]:
        """lr / (1 - beta1^t) and sqrt(1 - beta2^t), computed on the host as torch.optim does."""
        beta1, beta2 = self.betas
        return self.lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2, as torch)."""

    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
