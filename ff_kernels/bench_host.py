"""``ff-kernels bench --host-overhead``: the host cost of one layer step where the arithmetic is nothing (DESIGN 4).

One ``ff_linear_step`` at P = Q = 4, K = N = 8 with ``ff_kernels.optim.Adam`` and every other option at its
default, in units of one ``torch.mm`` of two 8 x 8 matrices on the same machine (DESIGN 4: at most 25). Each
sample times a block of steps and a block of tiny matrix products back to back, so a load change hits both; the
figure is the median of the per-sample ratios, with their spread. Times are the calling thread's CPU time: the cost
of a step, which a busy machine's preemptions would otherwise add to at random (at this size everything runs on
the calling thread); wall-clock figures are recorded beside them.

Paths:

- ``cpu``: ``backend="auto"`` on CPU tensors: the extension's C++ operator where it is built, else the torch backend;
- ``cpu_torch``: ``backend="torch"`` on CPU tensors, for comparison;
- ``gpu_stubbed``: the GPU path's host side: ``backend="triton"`` on CPU tensors (``TRITON_INTERPRET=1``) with every
  Triton kernel launch replaced by a stub that returns at once, so what is left is what a GPU step pays on the
  host before and between its launches (Python, checks, dispatch, allocations), not the launches themselves.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import ff_kernels as ffk
from ff_kernels.backends import cpu_info

ROWS, FEATURES = 4, 8  # P = Q = 4, K = N = 8
TARGET_UNITS = 25.0
PATHS = ("cpu", "cpu_torch", "gpu_stubbed")


class NoLaunch:
    """A Triton kernel whose launch does nothing: ``kernel[grid](*args, **kwargs)`` returns at once. Keeps what the
    launchers read from a kernel after launching it (the autotuner's ``best_config``: its first config)."""

    def __init__(self, kernel: Any) -> None:
        configs = getattr(kernel, "configs", None)
        self.best_config = configs[0] if configs else None
        self.launches = 0

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self._launch

    def _launch(self, *args: Any, **kwargs: Any) -> None:
        self.launches += 1


def is_triton_kernel(value: object) -> bool:
    """A ``@triton.jit`` or ``@triton.autotune`` object (compiled, or the interpreter's)."""
    return type(value).__module__.startswith("triton.") and hasattr(type(value), "__getitem__")


def kernel_modules() -> list[ModuleType]:
    """The modules whose kernels the Triton path launches."""
    from ff_kernels.ops.triton import forward_gemm, grad_update_gemm, row_loss

    return [forward_gemm, row_loss, grad_update_gemm]


@contextlib.contextmanager
def stubbed_triton_launches() -> Iterator[dict[str, NoLaunch]]:
    """Every Triton kernel of the launch modules replaced by a :class:`NoLaunch` (by qualified name), and
    ``TRITON_INTERPRET=1`` so that the Triton backend accepts CPU tensors; both restored on exit."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    originals = [(m, name, v) for m in kernel_modules() for name, v in vars(m).items() if is_triton_kernel(v)]
    stubs = {f"{m.__name__}.{name}": NoLaunch(v) for m, name, v in originals}
    try:
        for m, name, _ in originals:
            setattr(m, name, stubs[f"{m.__name__}.{name}"])
        yield stubs
    finally:
        for m, name, v in originals:
            setattr(m, name, v)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def tiny_step(backend: str, seed: int = 0) -> Callable[[], Any]:
    """One tiny step with Adam and default options, on fresh parameters."""
    gen = torch.Generator().manual_seed(seed)
    x_pos, x_neg = torch.rand(ROWS, FEATURES, generator=gen), torch.rand(ROWS, FEATURES, generator=gen)
    weight, bias = torch.randn(FEATURES, FEATURES, generator=gen), torch.randn(FEATURES, generator=gen)
    opt = ffk.optim.Adam([weight, bias], lr=1e-3)

    def step() -> Any:
        return ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=opt, backend=backend)

    return step


def tiny_mm() -> Callable[[], Any]:
    a, b = torch.rand(FEATURES, FEATURES), torch.rand(FEATURES, FEATURES)
    return lambda: torch.mm(a, b)


def block_seconds(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Per-call (thread CPU, wall) seconds over ``calls`` calls."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.thread_time() - cpu) / calls, (time.perf_counter() - wall) / calls


def measure(step: Callable[[], Any], mm: Callable[[], Any], samples: int, block_s: float = 0.02) -> dict[str, Any]:
    """Per-call times of ``step`` and ``mm``, ``samples`` interleaved blocks of about ``block_s`` each, and the
    ratios sample by sample (thread CPU time; wall-clock medians beside)."""
    for fn in (step, mm):
        block_seconds(fn, 50)  # warm-up: first-call imports, allocator, dispatch caches
    calls = {id(fn): max(10, int(block_s / max(block_seconds(fn, 20)[1], 1e-9))) for fn in (step, mm)}
    step_t, mm_t = [], []
    for _ in range(samples):
        step_t.append(block_seconds(step, calls[id(step)]))
        mm_t.append(block_seconds(mm, calls[id(mm)]))
    units = sorted(s[0] / m[0] for s, m in zip(step_t, mm_t))
    wall_units = statistics.median(s[1] / m[1] for s, m in zip(step_t, mm_t))
    return {
        "step_us": 1e6 * statistics.median(s[0] for s in step_t),
        "mm_us": 1e6 * statistics.median(m[0] for m in mm_t),
        "units": statistics.median(units),
        "units_min": units[0],
        "units_max": units[-1],
        "units_p25": units[len(units) // 4],
        "units_p75": units[(3 * len(units)) // 4],
        "wall_step_us": 1e6 * statistics.median(s[1] for s in step_t),
        "wall_units": wall_units,
        "samples": samples,
    }


def measure_path(path: str, samples: int) -> dict[str, Any]:
    """One path's record; a path that cannot run here is a record with the reason."""
    mm = tiny_mm()
    if path == "cpu":
        from ff_kernels.backends import resolve_backend

        return {"path": path, "backend": resolve_backend("auto", torch.device("cpu")),
                **measure(tiny_step("auto"), mm, samples)}
    if path == "cpu_torch":
        return {"path": path, "backend": "torch", **measure(tiny_step("torch"), mm, samples)}
    try:
        with stubbed_triton_launches() as stubs:
            step = tiny_step("triton")
            step()
            launches = sum(s.launches for s in stubs.values())
            record = measure(step, mm, samples)
    except (ImportError, RuntimeError) as err:  # no Triton, or its backend unavailable here
        return {"path": path, "backend": "triton", "status": f"unavailable: {err}"}
    return {"path": path, "backend": "triton (launches stubbed)", "launches_per_step": launches, **record}


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'path':<13}{'backend':<28}{'step us':>9}{'mm us':>8}{'units':>8}{'p25-p75':>14}{'min-max':>14}"
             f"{'wall units':>12}"]
    for r in rows:
        if "status" in r:
            lines.append(f"{r['path']:<13}{r['backend']:<28}  {r['status'][:80]}")
            continue
        lines.append(
            f"{r['path']:<13}{r['backend']:<28}{r['step_us']:>9.1f}{r['mm_us']:>8.2f}{r['units']:>8.1f}"
            f"{r['units_p25']:>7.1f}-{r['units_p75']:<6.1f}{r['units_min']:>7.1f}-{r['units_max']:<6.1f}"
            f"{r['wall_units']:>12.1f}"
        )
    return "\n".join(lines)


def run(args: Any) -> int:
    """``ff-kernels bench --host-overhead``: measure, print, and write host_overhead.json under ``--out``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = args.repeats or 31
    out = Path(args.out or Path("benchmarks") / "results" / "cpu")
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = [measure_path(path, samples) for path in PATHS]
    env = {
        **cpu_info(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["ff-kernels", *sys.argv[1:]]),
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"host cost of one step, P=Q={ROWS} K=N={FEATURES}, Adam, default options, in units of one "
          f"{FEATURES}x{FEATURES} torch.mm ({env['cpu_model']}, {env['cpu_capability']}, {env['threads']} threads, "
          f"torch {env['torch']}); thread CPU time, median of {samples} interleaved samples; DESIGN 4: at most "
          f"{TARGET_UNITS:g} units")
    print(format_rows(rows))
    payload = {"environment": env, "shape": {"P": ROWS, "Q": ROWS, "K": FEATURES, "N": FEATURES},
               "target_units": TARGET_UNITS, "rows": rows}
    (out / "host_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out / 'host_overhead.json'}")
    return 0
