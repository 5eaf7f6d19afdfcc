"""``ff-kernels bench``: one FF layer step timed for every backend beside the baselines, in one run.

DESIGN section 4 states its targets as ratios measured side by side on the same device, shapes and dtype, so
every configuration times all variants together:

- ``eager``: the autograd step written the mohammadpz way (two forward passes, ``log(1 + exp(.))``, backward,
  ``torch.optim.Adam``);
- ``auto``: ``ff_linear_step`` as a user calls it, every option at its default (the backend ``auto`` picks for the
  device, the finiteness check on) with ``ff_kernels.optim.Adam``: on the CPU the extension's fused operator;
- ``reference``, ``torch``, ``triton``, ``cuda``: ``ff_linear_step`` with each backend and ``ff_kernels.optim.Adam``
  (``check_finite=False``: the kernels are timed, not the input scan). ``torch_mixed`` (non-fp32 rows only) keeps
  fp32 weights and runs the GEMMs in the row's dtype (``compute_dtype``), as the CPU bf16 target asks;
- ``compile``: ``torch.compile`` of the closed-form step (``backend="torch"``) with the same Adam update inside the
  compiled graph (the bias corrections enter as device tensors, so the step count never forces a recompile);
- ``gemm_floor``: the step's two GEMMs alone via ``torch.mm``, (M,K)x(K,N) and (N,M)x(M,K), M = P+Q (DESIGN 4's
  floor);
- ``gemm_floor_ext`` (CPU, with the extension): the same two GEMMs through the fused CPU step's own GEMM
  (``cpu_mm``: oneDNN's matmul for fp32 on x86 CPUs other than Intel's, where it beats ATen's MKL; ATen's mm
  elsewhere), so that the step's cost above its own GEMMs shows beside its cost above ``torch.mm``.

Effective TFLOP/s counts those two GEMMs, 4*M*K*N flops per step, for every variant. On CUDA each variant is
timed with ``triton.testing.do_bench`` (CUDA events when Triton is missing) and its peak memory above its inputs
is measured; on the CPU the variants are timed interleaved, each sample a median-friendly block of calls.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import ff_kernels as ffk
from ff_kernels import roofline
from ff_kernels.backends import cpu_info, resolve_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DESIGN_ROWS = (512, 4096, 25000)
DESIGN_KN = ((784, 500), (500, 500), (2000, 2000), (4096, 4096))
VARIANTS = ("eager", "auto", "reference", "torch", "torch_mixed", "triton", "cuda", "compile", "gemm_floor",
            "gemm_floor_ext")
STEP_VARIANTS = frozenset(VARIANTS) - {"gemm_floor", "gemm_floor_ext"}
THRESHOLD, LR = 2.0, 1e-3


class Shape(NamedTuple):
    """P positive rows, Q negative rows, K inputs, N outputs."""

    rows_pos: int
    rows_neg: int
    in_features: int
    out_features: int

    @property
    def rows(self) -> int:
        return self.rows_pos + self.rows_neg

    @property
    def flops(self) -> int:
        """The two GEMMs of a step, 2*M*K*N flops each."""
        return 4 * self.rows * self.in_features * self.out_features

    def label(self) -> str:
        return f"P=Q={self.rows_pos} K={self.in_features} N={self.out_features}"


def shapes_for(rows: Sequence[int], kn: Sequence[tuple[int, int]]) -> list[Shape]:
    return [Shape(p, p, k, n) for p in rows for k, n in kn]


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    """DESIGN section 4's shapes on CUDA; on the CPU a subset a 2-core machine can time in minutes."""
    if device.type == "cuda":
        return shapes_for((4096,), ((784, 500), (2000, 2000))) if quick else shapes_for(DESIGN_ROWS, DESIGN_KN)
    if quick:
        return shapes_for((512,), DESIGN_KN[:2])
    return shapes_for(DESIGN_ROWS[:2], DESIGN_KN[:3])


class EagerFFLayer(nn.Linear):
    """The mohammadpz layer, our code in its style: normalise, linear, ReLU, trained by autograd; the eager baseline
    of the benchmarks, the memory report and benchmarks/port_mohammadpz.py."""

    def __init__(self, in_features: int, out_features: int, *, threshold: float = THRESHOLD, lr: float = LR,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        self.relu = nn.ReLU()
        self.threshold = threshold
        self.opt = torch.optim.Adam(self.parameters(), lr=lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_direction = x / (x.norm(2, 1, keepdim=True) + 1e-4)
        return self.relu(torch.mm(x_direction, self.weight.T) + self.bias.unsqueeze(0))

    def step(self, x_pos: torch.Tensor, x_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training step; returns the loss and the detached activations (the next layer's input)."""
        h_pos, h_neg = self.forward(x_pos), self.forward(x_neg)
        g_pos, g_neg = h_pos.pow(2).mean(1), h_neg.pow(2).mean(1)
        loss = torch.log(1 + torch.exp(torch.cat([-g_pos + self.threshold, g_neg - self.threshold]))).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach(), h_pos.detach(), h_neg.detach()


class Problem(NamedTuple):
    """Inputs and initial parameters shared by every variant of one configuration."""

    shape: Shape
    dtype: torch.dtype
    x_pos: torch.Tensor
    x_neg: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Random inputs and ``nn.Linear``-initialised parameters, so activations and goodness are realistic."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(shape.in_features, shape.out_features)
    x_pos = torch.randn(shape.rows_pos, shape.in_features, generator=gen) + 0.5
    x_neg = torch.randn(shape.rows_neg, shape.in_features, generator=gen)
    cast = {"device": device, "dtype": dtype}
    return Problem(shape, dtype, x_pos.to(**cast), x_neg.to(**cast), layer.weight.detach().to(**cast),
                   layer.bias.detach().to(**cast))


def _adam_in_graph(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], ms: Sequence[torch.Tensor],
                   vs: Sequence[torch.Tensor], step_size: torch.Tensor, bc2_sqrt: torch.Tensor,
                   betas: tuple[float, float], eps: float) -> None:
    """``ff_kernels.optim.Adam``'s update written with tensor bias corrections, for the compiled baseline."""
    for p, g, m, v in zip(params, grads, ms, vs):
        g = g.float()
        m.lerp_(g, 1.0 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1.0 - betas[1])
        p.copy_(p.float() - step_size * m / (v.sqrt() / bc2_sqrt + eps))


def _compiled_step(problem: Problem, mode: str | None) -> Callable[[], Any]:
    """torch.compile of the closed-form step plus its Adam update; the first call compiles."""
    w, b = problem.weight.clone(), problem.bias.clone()
    spec = ffk.optim.Adam([w, b], lr=LR)
    state = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in (w, w, b, b)]
    step_size = torch.zeros((), dtype=torch.float32, device=w.device)
    bc2_sqrt = torch.ones((), dtype=torch.float32, device=w.device)

    def step(x_pos, x_neg, w, b, m_w, v_w, m_b, v_b, step_size, bc2_sqrt):
        out = ffk.ff_linear_step(x_pos, x_neg, w, b, threshold=THRESHOLD, backend="torch", check_finite=False)
        _adam_in_graph((w, b), (out.grad_weight, out.grad_bias), (m_w, m_b), (v_w, v_b), step_size, bc2_sqrt,
                       spec.betas, spec.eps)
        return out.loss, out.h_pos, out.h_neg

    torch._dynamo.reset()
    compiled = torch.compile(step, mode=mode, dynamic=False)
    count = [0]

    def call() -> Any:
        count[0] += 1
        size, corr = spec.bias_corrections(count[0])
        step_size.fill_(size)
        bc2_sqrt.fill_(corr)
        return compiled(problem.x_pos, problem.x_neg, w, b, state[0], state[1], state[2], state[3], step_size,
                        bc2_sqrt)

    return call


def _fused_step(problem: Problem, backend: str, mixed: bool, check_finite: bool = False) -> Callable[[], Any]:
    """``ff_linear_step`` with ``backend`` and an ``ff_kernels.optim.Adam`` update."""
    master = torch.float32 if mixed else problem.dtype
    w, b = problem.weight.to(master, copy=True), problem.bias.to(master, copy=True)
    opt = ffk.optim.Adam([w, b], lr=LR)
    compute = problem.dtype if mixed else None

    def call() -> Any:
        return ffk.ff_linear_step(problem.x_pos, problem.x_neg, w, b, threshold=THRESHOLD, optimizer=opt,
                                  backend=backend, compute_dtype=compute, check_finite=check_finite)

    return call


def _eager_step(problem: Problem) -> Callable[[], Any]:
    shape = problem.shape
    layer = EagerFFLayer(shape.in_features, shape.out_features, device=problem.weight.device, dtype=problem.dtype)
    with torch.no_grad():
        layer.weight.copy_(problem.weight)
        layer.bias.copy_(problem.bias)
    return lambda: layer.step(problem.x_pos, problem.x_neg)


def _gemm_floor(problem: Problem, mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.mm
                ) -> Callable[[], Any]:
    x = torch.cat([problem.x_pos, problem.x_neg])
    w = problem.weight

    def call() -> Any:
        h = mm(x, w.t())
        return mm(h.t(), x)

    return call


def _ext_gemm_floor(problem: Problem, device: torch.device) -> Callable[[], Any] | str:
    """The two GEMMs through the fused CPU step's GEMM, or why that does not run here."""
    if device.type != "cpu":
        return "CPU only: the fused CPU step's own GEMMs"
    from ff_kernels.ops import cuda_step

    reason = cuda_step.extension_unavailable_reason(device)
    if reason is not None:
        return f"unavailable: {reason}"
    return _gemm_floor(problem, cuda_step.cpu_mm)


def default_compile_mode(device: torch.device) -> str | None:
    """DESIGN's compile baseline on CUDA; inductor's default mode on the CPU (where autotuning buys nothing)."""
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else None


def build_variant(name: str, problem: Problem, device: torch.device, compile_mode: str | None = None,
                  include_interpreted: bool = False) -> Callable[[], Any] | str:
    """The timed callable for ``name``, or a string saying why it does not run here (the table shows it)."""
    if name == "eager":
        return _eager_step(problem)
    if name == "gemm_floor":
        return _gemm_floor(problem)
    if name == "gemm_floor_ext":
        return _ext_gemm_floor(problem, device)
    if name == "compile":
        return _compiled_step(problem, compile_mode)
    if name == "auto":
        return _fused_step(problem, "auto", mixed=False, check_finite=True)
    if name == "torch_mixed":
        if problem.dtype == torch.float32:
            return "fp32 rows: identical to torch"
        return _fused_step(problem, "torch", mixed=True)
    try:
        backend = resolve_backend(name, device)
    except RuntimeError as err:
        return f"unavailable: {str(err).split(' is unavailable: ', 1)[-1]}"
    if name == "triton" and device.type == "cpu" and not include_interpreted:
        return "skipped: the Triton interpreter on the CPU is too slow to time"
    return _fused_step(problem, backend, mixed=False)


def first_loss(result: Any) -> float | None:
    """The loss a step returned (variants share initial weights, so first-call losses should agree)."""
    if isinstance(result, ffk.FFStepOutput):
        return float(result.loss)
    if isinstance(result, tuple) and result and result[0].dim() == 0:
        return float(result[0])
    return None


def time_cpu(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
             min_sample_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call, ``repeats`` samples per variant, interleaved so that load drifts hit all variants alike."""
    numbers = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        numbers[name] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / numbers[name])
    return samples


def time_cuda(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> list[float]:
    """Seconds per call on CUDA: ``triton.testing.do_bench`` (L2 flushed between calls), else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return [t / 1e3 for t in times]
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples


def peak_cuda_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call above what was allocated before it (inputs, parameters, state)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - base


@dataclass
class Row:
    """One variant at one configuration; times in milliseconds, ratios from the same run."""

    variant: str
    device: str
    dtype: str
    P: int
    Q: int
    K: int
    N: int
    status: str = "ok"
    median_ms: float = math.nan
    p25_ms: float = math.nan
    p75_ms: float = math.nan
    min_ms: float = math.nan
    samples: int = 0
    tflops: float = math.nan
    vs_eager: float = math.nan
    vs_compile: float = math.nan
    over_floor: float = math.nan
    vs_compile_p25: float = math.nan
    vs_compile_p75: float = math.nan
    over_floor_p25: float = math.nan
    over_floor_p75: float = math.nan
    over_ext_floor: float = math.nan
    over_ext_floor_p25: float = math.nan
    over_ext_floor_p75: float = math.nan
    vs_eager_fp32: float = math.nan
    peak_mib: float = math.nan
    extra_pct_h: float = math.nan
    first_loss: float = math.nan
    model_floor_ms: float = math.nan
    model_split_pct_h: float = math.nan

    @property
    def shape(self) -> Shape:
        return Shape(self.P, self.Q, self.K, self.N)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def paired_ratio(reference: Sequence[float], times: Sequence[float], invert: bool = False) -> tuple[float, ...]:
    """Median and quartiles of the per-round ratios reference / time (time / reference if ``invert``).

    A round times every variant once, side by side, so a load spike slows both members of a pair: the ratio of the
    medians can pair one variant's fast round with the other's slow one, the median of the ratios cannot.
    """
    ratios = [t / r if invert else r / t for r, t in zip(reference, times, strict=True)]
    return statistics.median(ratios), _quantile(ratios, 0.25), _quantile(ratios, 0.75)


def bench_config(problem: Problem, device: torch.device, variants: Sequence[str], repeats: int,
                 compile_mode: str | None) -> list[Row]:
    """Time every variant on one (shape, dtype); failures become rows with a status instead of an exception."""
    shape, dtype_name = problem.shape, str(problem.dtype).removeprefix("torch.")
    base = {"device": device.type, "dtype": dtype_name, "P": shape.rows_pos, "Q": shape.rows_neg,
            "K": shape.in_features, "N": shape.out_features}
    rows: dict[str, Row] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name in variants:
        rows[name] = Row(variant=name, **base)
        try:
            built = build_variant(name, problem, device, compile_mode)
        except Exception as err:  # a baseline that cannot be built is reported, not fatal
            built = f"failed: {type(err).__name__}: {err}"
        if isinstance(built, str):
            rows[name].status = built
            continue
        try:
            rows[name].first_loss = first_loss(built()) or math.nan
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as err:  # torch.compile can fail on a platform: record it in the table
            rows[name].status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            continue
        fns[name] = built
    if device.type == "cuda":
        samples = {name: time_cuda(fn) for name, fn in fns.items()}
        h_bytes = shape.rows * shape.out_features * problem.dtype.itemsize
        for name, fn in fns.items():
            peak = peak_cuda_bytes(fn, device)
            rows[name].peak_mib = peak / 2**20
            if name in STEP_VARIANTS:
                outputs = h_bytes + shape.rows * 4
                rows[name].extra_pct_h = 100 * (peak - outputs) / h_bytes
    else:
        samples = time_cpu(fns, repeats)
    for name, times in samples.items():
        row = rows[name]
        row.median_ms = 1e3 * statistics.median(times)
        row.p25_ms, row.p75_ms = 1e3 * _quantile(times, 0.25), 1e3 * _quantile(times, 0.75)
        row.min_ms, row.samples = 1e3 * min(times), len(times)
        row.tflops = shape.flops / (row.median_ms * 1e-3) / 1e12
    paired = device.type != "cuda"  # time_cpu's samples are rounds: the i-th of each variant ran side by side
    for name, row in rows.items():
        for ref, attr, invert in (("eager", "vs_eager", False), ("compile", "vs_compile", False),
                                  ("gemm_floor", "over_floor", True),
                                  ("gemm_floor_ext", "over_ext_floor", True)):
            if ref not in samples or name not in samples:
                continue
            if paired:
                median, p25, p75 = paired_ratio(samples[ref], samples[name], invert)
                setattr(row, attr, median)
                if attr != "vs_eager":
                    setattr(row, f"{attr}_p25", p25)
                    setattr(row, f"{attr}_p75", p75)
            else:
                ratio = rows[ref].median_ms / row.median_ms
                setattr(row, attr, 1 / ratio if invert else ratio)
    if device.type == "cuda":
        precision = roofline.precision_of(problem.dtype, torch.backends.cuda.matmul.allow_tf32)
        add_model_floor(rows.values(), precision)
        add_model_split(rows.values(), precision, device)
    return list(rows.values())


def add_model_floor(rows: Iterable[Row], precision: str) -> None:
    """The roofline model's floor on an H100 SXM (``ff_kernels.roofline``) beside each GPU figure: the Adam step
    for the step variants, the two GEMMs alone for the GEMM floors. A model, not a measurement."""
    for row in rows:
        if row.variant.startswith("gemm_floor"):
            row.model_floor_ms = roofline.gemm_floor_ms(row.P + row.Q, row.K, row.N, precision)
        else:
            row.model_floor_ms = roofline.step_floor_ms(row.P, row.Q, row.K, row.N, precision, "adam")


def add_model_split(rows: Iterable[Row], precision: str, device: torch.device) -> None:
    """The Triton step's GEMM 2 row-split workspace as a percentage of h, beside the measured extra peak: a model
    (``grad_update_gemm.workspace_bytes``: one fp32 copy of the weight per split, independent of the batch)."""
    try:
        from ff_kernels.ops.triton.common import sm_count
        from ff_kernels.ops.triton.grad_update_gemm import workspace_bytes
    except ImportError:  # no Triton: no Triton step either
        return
    for row in rows:
        if row.variant == "triton":
            h_bytes = (row.P + row.Q) * row.N * _h_element_bytes(precision)
            workspace = workspace_bytes(precision, row.N, row.K, row.P + row.Q, sm_count(device))
            row.model_split_pct_h = 100 * workspace / h_bytes


def _h_element_bytes(precision: str) -> int:
    """Bytes per element of h at a model precision."""
    return 2 if precision in ("bf16", "fp16") else 4


def name_timed(row: Row) -> bool:
    return not math.isnan(row.median_ms)


def add_fp32_ratios(rows: list[Row]) -> None:
    """For reduced-precision rows, the speed-up over the fp32 eager step of the same shape (DESIGN 4, CPU bf16)."""
    eager32 = {(r.shape, r.device): r.median_ms for r in rows if r.variant == "eager" and r.dtype == "float32"}
    for row in rows:
        ref = eager32.get((row.shape, row.device))
        if ref is not None and row.dtype != "float32" and name_timed(row):
            row.vs_eager_fp32 = ref / row.median_ms


def run_benchmarks(shapes: Sequence[Shape], dtypes: Sequence[str], device: torch.device,
                   variants: Sequence[str] = VARIANTS, repeats: int = 7, compile_mode: str | None = None,
                   log: Callable[[str], None] | None = None) -> list[Row]:
    """All configurations, one after another; within each, the variants side by side."""
    rows: list[Row] = []
    for shape in shapes:
        for dtype in dtypes:
            if log:
                log(f"  {device.type} {dtype} {shape.label()} ...")
            start = time.perf_counter()
            problem = make_problem(shape, DTYPES[dtype], device)
            rows += bench_config(problem, device, variants, repeats, compile_mode)
            del problem
            if log:
                log(f"    done in {time.perf_counter() - start:.1f} s")
    add_fp32_ratios(rows)
    return rows


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (lscpu's model name; platform.processor() where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    """A folder name for a device's results: ``cpu`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device, **extra: Any) -> dict[str, Any]:
    """Where and with what the numbers were taken, stored beside them."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["ff-kernels", *sys.argv[1:]]) if sys.argv else "",
    }
    if device.type == "cuda":
        env["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cpu":
        env.update(cpu_info())
    env.update(extra)
    return env


def _fmt(value: float, width: int, spec: str, suffix: str = "") -> str:
    text = "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"
    return text.rjust(width)


def format_table(rows: Sequence[Row]) -> str:
    """The printed table: one block per (shape, dtype); a non-ok status replaces the numbers."""
    header = (f"{'variant':<15}{'median ms':>11}{'IQR %':>8}{'TFLOP/s':>9}{'x eager':>9}{'x compile':>10}"
              f"{'/ floor':>9}{'/ ext floor':>12}{'x eager32':>10}{'peak MiB':>10}")
    gpu_header = f"{'extra %h':>9}{'model floor (H100)':>20}{'split %h (model)':>18}"
    lines = []
    key = None
    for row in rows:
        if (row.shape, row.dtype) != key:
            key = (row.shape, row.dtype)
            model = gpu_header if row.device == "cuda" else ""
            lines += ["", f"{row.device} {row.dtype} {row.shape.label()} (M={row.shape.rows})", header + model]
        if row.status != "ok":
            lines.append(f"{row.variant:<15}  {row.status[:100]}")
            continue
        iqr = 100 * (row.p75_ms - row.p25_ms) / row.median_ms
        lines.append(
            f"{row.variant:<15}{_fmt(row.median_ms, 11, '.3f')}{_fmt(iqr, 8, '.1f')}{_fmt(row.tflops, 9, '.3f')}"
            f"{_fmt(row.vs_eager, 9, '.2f', 'x')}{_fmt(row.vs_compile, 10, '.2f', 'x')}"
            f"{_fmt(row.over_floor, 9, '.2f', 'x')}{_fmt(row.over_ext_floor, 12, '.2f', 'x')}"
            f"{_fmt(row.vs_eager_fp32, 10, '.2f', 'x')}"
            f"{_fmt(row.peak_mib, 10, '.1f')}"
            + (_fmt(row.extra_pct_h, 9, '.1f') + _fmt(row.model_floor_ms, 20, '.3f', ' ms')
               + _fmt(row.model_split_pct_h, 18, '.1f') if row.device == "cuda" else "")
        )
    return "\n".join(lines).lstrip("\n")


LEGEND = (
    "x eager / x compile: speed-up over the eager (mohammadpz) step and over torch.compile of the torch step "
    "(>1 is faster); / floor: time over the two bare GEMMs through torch.mm (1.0 is the floor, DESIGN 4's); / ext "
    "floor (CPU): time over the same GEMMs through the fused CPU step's own GEMM (oneDNN on non-Intel x86, where it "
    "beats torch.mm's MKL; ATen's mm elsewhere); on the CPU these four are medians "
    "of the per-round ratios (each round times every variant once, side by side; the JSON has their quartiles), on "
    "CUDA ratios of the medians; x eager32: speed-up over the fp32 "
    "eager step of the same shape; IQR %: interquartile range over the median; peak MiB: CUDA peak above inputs; "
    "model floor (H100), GPU rows only: the roofline model's floor of that work on an H100 SXM (ff_kernels.roofline: "
    "FLOPs and minimal bytes against its peaks), a model, not a measurement. GPU rows also give extra %h, the "
    "measured peak above inputs and outputs as a percentage of h (DESIGN 4: at most 5), and split %h (model), the "
    "Triton step's GEMM 2 row-split workspace (one fp32 weight per split, at most 8) over h, a model."
)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(rows: Sequence[Row], env: dict[str, Any], path: Path) -> None:
    payload = {"environment": env, "legend": LEGEND,
               "rows": [{k: _json_safe(v) for k, v in asdict(r).items()} for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot(rows: Sequence[Row], env: dict[str, Any], path: Path) -> str | None:
    """Effective TFLOP/s per variant, one panel per dtype; returns why it was skipped, or None."""
    timed = {r.variant for r in rows if name_timed(r)}
    variants = [v for v in VARIANTS if v in timed]
    if not variants:
        return "no variant was timed (see the table's status column)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ff-kernels[bench]')"
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    shapes = list(dict.fromkeys(r.shape for r in rows))
    panel = max(5.0, 0.3 * len(shapes) * len(variants) + 1.5)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(panel * len(dtypes), 4.5), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, dtype in zip(axes[0], dtypes):
        for i, variant in enumerate(variants):
            values = []
            for shape in shapes:
                match = [r for r in rows if r.dtype == dtype and r.shape == shape and r.variant == variant]
                values.append(match[0].tflops if match and name_timed(match[0]) else 0.0)
            ax.bar([s + (i - (len(variants) - 1) / 2) * width for s in range(len(shapes))], values, width,
                   label=variant)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"M={s.rows}\n{s.in_features}x{s.out_features}" for s in shapes], fontsize=8)
        ax.set_ylabel("effective TFLOP/s (4MKN / time)")
        ax.set_title(f"{dtype}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(variants), fontsize=8)
    fig.suptitle(f"FF layer step, {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
                 f"{env['date'][:10]}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def positive_int_list(text: str) -> list[int]:
    """argparse type for comma-separated positive integers (widths, depths), shared by the subcommands."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 500,500; got {text!r}") from err
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, e.g. 500,500; got {text!r}")
    return values


def report_written(out: Path, tables: list[str], plot_name: str, plot_skipped: str | None, wall_s: float) -> None:
    """The closing lines of a report command: the files written, and why the plot was skipped if it was."""
    written = tables + ([] if plot_skipped else [plot_name])
    print(f"\nwall time {wall_s:.0f} s; wrote {', '.join(str(out / w) for w in written)}")
    if plot_skipped:
        print(f"plot skipped: {plot_skipped}")


def _csv_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except (ValueError, KeyError) as err:
            raise argparse.ArgumentTypeError(f"could not parse {text!r}: {err}") from err

    return parse


def positive_int(text: str) -> int:
    """argparse type for a count (repeats, threads, jobs): 0 is no way to ask for the default."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def kn_pair(text: str) -> tuple[int, int]:
    """A K x N layer shape such as 784x500, both positive."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected KxN with positive K and N, e.g. 784x500; got {text!r}")
    return int(parts[0]), int(parts[1])


def _dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return text


def _variant_name(text: str) -> str:
    if text not in VARIANTS:
        raise ValueError(f"unknown variant {text!r}; choose from {', '.join(VARIANTS)}")
    return text


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    """Register ``ff-kernels bench``."""
    parser = subcommands.add_parser(
        "bench", help="time one FF layer step per backend against eager, torch.compile and the GEMM floor",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="a small set: P=Q=512, K x N in 784x500, 500x500 on the CPU (4096 rows on CUDA)")
    parser.add_argument("--op", default="linear", choices=("linear", "conv"),
                        help="linear: the FF layer step (default); conv: the class-goodness conv step against its "
                             "eager twin, torch.compile and the convolution floor (ff_kernels.bench_conv; --rows "
                             "sets its batch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=_csv_list(_dtype_name), default=["float32", "bfloat16"],
                        help="comma-separated: float32, bfloat16, float16 (default float32,bfloat16)")
    parser.add_argument("--rows", type=positive_int_list, default=None, help="P = Q values, e.g. 512,4096")
    parser.add_argument("--kn", type=_csv_list(kn_pair), default=None, help="K x N pairs, e.g. 784x500,2000x2000")
    parser.add_argument("--variants", type=_csv_list(_variant_name), default=list(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="CPU samples per variant (default 15, quick 7)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: max-autotune-no-cudagraphs on CUDA, default on the CPU)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tf32", action="store_true", help="let fp32 GEMMs use TF32 on CUDA (off by default)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    parser.add_argument("--host-overhead", action="store_true",
                        help="instead: the host cost of one tiny step (P=Q=4, K=N=8, Adam) in units of one tiny "
                             "torch.mm, on the CPU path and on the GPU path with its launches stubbed "
                             "(ff_kernels.bench_host; --repeats samples, default 31)")
    parser.add_argument("--distributed", action="store_true",
                        help="instead: distributed FF training (data parallel, pipeline) against a backprop pipeline "
                             "on 1 and 2 local gloo ranks, traffic and steps/s (ff_kernels.distributed.bench)")
    parser.add_argument("--roofline", action="store_true",
                        help="instead: the roofline model (no GPU needed) of an Adam step and of its two GEMMs on an "
                             "H100 and an H200 at DESIGN 4's shapes (or --rows, --kn); writes roofline.txt and "
                             "roofline.json (default --out benchmarks/results/roofline)")
    parser.set_defaults(run=run)
    _DEFAULTS.update(vars(parser.parse_args([])))


# The parser's defaults (filled by add_parser): an option that differs from its default was given.
_DEFAULTS: dict[str, Any] = {}
# What the two "instead" modes read; any other option given with them would be silently ignored.
_MODE_OPTIONS = {
    "host_overhead": ("repeats", "threads", "out"),
    "distributed": ("quick", "repeats", "out"),
    "roofline": ("rows", "kn", "out"),
}


def options_given(args: argparse.Namespace, defaults: dict[str, Any], names: Iterable[str]) -> list[str]:
    """The flags among ``names`` whose value differs from the parser's default (so the user gave them)."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) != defaults.get(name)]


def check_mode_options(args: argparse.Namespace) -> None:
    """--host-overhead, --distributed and --roofline run their own fixed work: refuse the options they would ignore
    (and more than one of them)."""
    modes = [mode for mode in _MODE_OPTIONS if getattr(args, mode)]
    if len(modes) > 1:
        raise ValueError(f"choose one of {', '.join('--' + m.replace('_', '-') for m in modes)}")
    for mode, used in _MODE_OPTIONS.items():
        if not getattr(args, mode):
            continue
        ignored = options_given(args, _DEFAULTS, (n for n in _DEFAULTS if n not in (*used, mode, "run")))
        if ignored:
            raise ValueError(
                f"--{mode.replace('_', '-')} runs its own fixed work and takes only "
                f"{', '.join('--' + u for u in used)}; got {', '.join(ignored)}"
            )


def run(args: argparse.Namespace) -> int:
    check_mode_options(args)
    if args.host_overhead:
        from ff_kernels import bench_host

        return bench_host.run(args)
    if args.distributed:
        from ff_kernels.distributed import bench as distributed_bench

        return distributed_bench.run(args)
    if args.roofline:
        print(roofline.write_floor_report(args.rows or DESIGN_ROWS, args.kn or DESIGN_KN,
                                          Path(args.out or Path("benchmarks") / "results" / "roofline")))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.op == "conv":
        from ff_kernels import bench_conv

        return bench_conv.run(args, device)
    shapes = default_shapes(device, args.quick)
    if args.rows or args.kn:
        rows = args.rows or sorted({s.rows_pos for s in shapes})
        kn = args.kn or list(dict.fromkeys((s.in_features, s.out_features) for s in shapes))
        shapes = shapes_for(rows, kn)
    repeats = args.repeats or (7 if args.quick else 15)
    mode = args.compile_mode or default_compile_mode(device)
    out = Path(args.out or Path("benchmarks") / "results" / device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, quick=args.quick, compile_mode=mode or "default", repeats=repeats,
                      timer="triton.testing.do_bench" if device.type == "cuda" else "perf_counter, interleaved")
    print(f"ff-kernels bench on {env['device_name']} ({device.type}, {env['threads']} threads), torch {env['torch']}, "
          f"triton {env['triton']}, compile mode {env['compile_mode']}, {len(shapes)} shapes x {len(args.dtype)} "
          f"dtypes", flush=True)
    start = time.perf_counter()
    rows = run_benchmarks(shapes, args.dtype, device, args.variants, repeats, mode,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    env["wall_s"] = round(time.perf_counter() - start, 1)
    env["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(format_table(rows))
    print(f"\n{LEGEND}")
    busy = max(env["load_avg_1m_start"] or 0, env["load_avg_1m_end"] or 0)
    if device.type == "cpu" and busy > 0.5 * (os.cpu_count() or 1) + torch.get_num_threads():
        print(f"warning: load average {busy:.1f} on {os.cpu_count()} CPUs: other processes shared the cores, so these "
              "CPU timings are not trustworthy")
    write_csv(rows, out / "bench.csv")
    write_json(rows, env, out / "bench.json")
    skipped = plot(rows, env, out / "bench.png")
    report_written(out, ["bench.csv", "bench.json"], "bench.png", skipped, env["wall_s"])
    return 0
