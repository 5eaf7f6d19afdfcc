"""Optimizers for the fused layer step: SGD, Adam and AdamW that hold their own state.

They are specifications as much as optimizers: ``ff_linear_step(..., optimizer=opt)`` applies the update inside
the step (the fused backends in a GEMM epilogue, the torch backend with ``torch._foreach_*`` ops), and the result
matches ``torch.optim``'s single-tensor implementation step for step. State is float32 whatever the parameter
dtype; a low-precision parameter is updated in float32 and rounded once when stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
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


class FusedOptimizer:
    """Common bookkeeping: the parameter list, per-parameter state, and the checks of ``ff_linear_step``."""

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any]) -> None:
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
        lr = defaults["lr"]
        if not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"lr must be a non-negative number; got {lr!r}")
        if defaults.get("weight_decay", 0.0) < 0:
            raise ValueError(f"weight_decay must be non-negative; got {defaults['weight_decay']!r}")
        self.defaults = dict(defaults)
        for key, value in defaults.items():
            setattr(self, key, value)
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

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
        return {"defaults": dict(self.defaults), "state": [dict(s) for s in self.state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["state"]) != len(self.params):
            raise ValueError(
                f"state_dict holds state for {len(state_dict['state'])} parameters; "
                f"this optimizer has {len(self.params)}"
            )
        self.defaults = dict(state_dict["defaults"])
        for key, value in self.defaults.items():
            setattr(self, key, value)
        self.state = [
            {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for s, p in zip(state_dict["state"], self.params)
        ]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({len(self.params)} tensors, {options})"


class SGD(FusedOptimizer):
    """``torch.optim.SGD``: lr, momentum, dampening, nesterov, weight_decay."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if momentum < 0:
            raise ValueError(f"momentum must be non-negative; got {momentum!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
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

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1); got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative; got {eps!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

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
