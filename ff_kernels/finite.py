"""``check_finite`` on the GPU paths: the scan stays on the device and the host reads it every few steps.

Where the check happens (``ff_kernels.functional`` decides, per backend and device):

- the C++ CPU operator (``backend="cuda"`` on CPU tensors, what ``auto`` picks on the CPU): fused into its first
  pass over x, free, and raised before the step writes anything;
- the torch and reference backends on CPU tensors: a scan of each input on the host, raised at once (no device
  to wait for);
- the GPU paths (any backend on CUDA tensors, and the Triton kernels wherever they run): deferred, here. Reading a
  result back would stall the host until the device caught up, at every step. Instead each step launches one
  ``torch._foreach_norm(..., inf)`` over its checked arguments (their largest magnitudes, which NaN and infinity
  propagate through) and keeps the 0-dim results on the device; the host reads a device's pending results every
  :func:`interval` steps (one synchronisation for all of them), raising ``ValueError("<name> contains NaN or inf
  ...")`` then. By that time the steps in between have run, so the parameters may already hold NaN;
  :func:`check_now` reads the pending results at once (at the end of an epoch, say) and ``set_interval(1)``
  restores a check at every step.

The class steps' labels ride on the same read on the GPU paths: their range [0, num_classes) is checked whatever
``check_finite`` says (on the CPU at once, by ``_options.check_labels``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

_interval = 64


@dataclass
class _Pending:
    """One device's unread results: per step, the names checked and their largest magnitudes (0-dim, in
    each input's dtype: a largest magnitude is one of the values, exact and finite where they all are; the read
    stacks them in the widest)."""

    names: list[str] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0


_pending: dict[torch.device, _Pending] = {}

# The problem a labels entry names (the finiteness entries name their argument).
_LABELS_PREFIX = "labels must lie in [0, "


def interval() -> int:
    """Steps between two reads of a device's results."""
    return _interval


def set_interval(steps: int) -> None:
    """Read the results every ``steps`` steps (1: at every step, with one host synchronisation each)."""
    global _interval
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    _interval = steps


def defer(device: torch.device, named: Iterable[tuple[str, torch.Tensor | None]],
          labels: torch.Tensor | None = None, num_classes: int = 0) -> None:
    """Queue this step's check of its arguments on ``device``; every :func:`interval` steps, read the queue.

    ``labels``: a class step's labels, whose range [0, num_classes) is checked with the rest (a value that is
    infinite exactly where one lies outside), whatever ``check_finite`` says: a wrong label is no matter of
    finiteness, and the kernels would match it to no class."""
    pending = _pending.get(device)
    if pending is None:
        pending = _pending[device] = _Pending()
    names, tensors = [], []
    for name, t in named:
        if t is not None and t.numel():  # the inf-norm of an empty tensor is an error, and there is nothing to see
            names.append(name)
            tensors.append(t)
    if tensors:
        pending.names += names
        pending.norms += torch._foreach_norm(tensors, math.inf)
    if labels is not None and labels.numel():
        pending.names.append(f"{_LABELS_PREFIX}{num_classes})")
        pending.norms.append(torch.where(((labels < 0) | (labels >= num_classes)).any(), math.inf, 0.0))
    pending.steps += 1
    if pending.steps >= _interval:
        check_now(device)


def defer_step(
    device: torch.device,
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
) -> None:
    """:func:`defer` for a layer step's arguments under their names, with the common case (two non-empty batches,
    no offsets) queued directly: at a small shape this check is one of the largest parts of a step's host time."""
    if offset_pos is not None or offset_neg is not None or not x_pos.numel() or not x_neg.numel():
        defer(device, (("x_pos", x_pos), ("x_neg", x_neg), ("offset_pos", offset_pos), ("offset_neg", offset_neg)))
        return
    pending = _pending.get(device)
    if pending is None:
        pending = _pending[device] = _Pending()
    pending.names += _BATCH_NAMES
    pending.norms += torch._foreach_norm((x_pos, x_neg), math.inf)
    pending.steps += 1
    if pending.steps >= _interval:
        check_now(device)


_BATCH_NAMES = ("x_pos", "x_neg")


def check_now(device: torch.device | None = None) -> None:
    """Read the pending results of ``device`` (every device if None) and raise ValueError for a non-finite one."""
    for dev in [d for d in _pending if device is None or d == device]:
        pending = _pending.pop(dev)
        if not pending.norms:
            continue
        values = torch.stack(pending.norms).tolist()  # the one host synchronisation
        bad = next((name for name, value in zip(pending.names, values) if not math.isfinite(value)), None)
        if bad is None:
            continue
        where = (f"in one of the last {pending.steps} steps on {dev} (checked on the device and read every "
                 f"{_interval} steps, so the steps since may have used it; see ff_kernels.finite)")
        if bad.startswith(_LABELS_PREFIX):
            raise ValueError(f"{bad}; a label outside it was passed {where}")
        raise ValueError(f"{bad} contains NaN or inf {where}; pass check_finite=False to skip this check")
