"""``ff-kernels bench --op conv``: the class-goodness conv step (CwComp; DESIGN 7) timed beside its baselines.

DESIGN 4's conv target: the closed-form class-goodness conv step at least 1.2x faster than its eager autograd twin
on the CPU, and no slower than ``torch.compile`` of it. Every configuration times, side by side, on the same
shapes, dtype, initial weights and memory layout (channels-last, the torch backend's: oneDNN and cuDNN convolve it
without reordering, so the eager twin and the floor get it too and the ratios measure the closed form alone):

- ``eager``: the step written with autograd: the input scale, ``nn.Conv2d``, ReLU, the class goodness,
  ``F.cross_entropy`` over g / tau, ``backward()``, ``torch.optim.Adam``;
- ``auto``, ``reference``, ``torch``, ``triton`` (CUDA tensors, or the interpreter), ``cuda`` (CPU tensors: the
  closed form with the extension's fused goodness pass): ``ff_conv2d_class_step`` with that backend and
  ``ff_kernels.optim.Adam`` (``check_finite=False``); ``torch_mixed`` (non-fp32 rows only)
  keeps fp32 weights and runs the convolutions in the row's dtype;
- ``compile``: ``torch.compile`` of the ``torch`` step with the same Adam update inside the graph;
- ``gemm_floor``: the step's two implicit GEMMs alone: the convolution (``F.conv2d``) and its weight and bias
  gradient (``aten.convolution_backward``).

TFLOP/s counts those two convolutions, 4 B H' W' C C_in kh kw flops per step, for every variant.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import ff_kernels as ffk
from ff_kernels import bench
from ff_kernels.backends import resolve_backend
from ff_kernels.dispatch import spec

LR, TEMPERATURE, NORMALIZE, EPS, NUM_CLASSES = 1e-3, 1.0, "rms", 1e-4, 10


class ConvShape(NamedTuple):
    """A batch of B images of C_in x S x S through a k x k convolution ('same' padding) to C channels."""

    batch: int
    in_channels: int
    size: int
    out_channels: int
    kernel: int = 3

    @property
    def flops(self) -> int:
        """The forward convolution and the weight gradient, 2 B S^2 C C_in k^2 flops each."""
        return 4 * self.batch * self.size**2 * self.out_channels * self.in_channels * self.kernel**2

    def label(self) -> str:
        s, c, k = self.size, self.out_channels, self.kernel
        return f"B={self.batch} {self.in_channels}x{s}x{s} -> {c}x{s}x{s} k={k}"


# The layers of a CwComp-style CIFAR-10 network (60, 120, 240 channels; a 2x2 max-pool between layers).
CIFAR_LAYERS = ((3, 32, 60), (60, 16, 120), (120, 8, 240))


def default_shapes(device: torch.device, quick: bool) -> list[ConvShape]:
    """Those layers at batch 128 on the CPU (the first two with ``quick``), batch 512 on CUDA."""
    batch = 512 if device.type == "cuda" else 128
    layers = CIFAR_LAYERS[:2] if quick else CIFAR_LAYERS
    return [ConvShape(batch, c_in, size, c_out) for c_in, size, c_out in layers]


class Problem(NamedTuple):
    """Inputs and initial parameters shared by every variant of one configuration."""

    shape: ConvShape
    dtype: torch.dtype
    x: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def make_problem(shape: ConvShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Image-like inputs in [0, 1], channels-last, and ``nn.Conv2d``-initialised parameters."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel)
    x = torch.rand(shape.batch, shape.in_channels, shape.size, shape.size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (shape.batch,), generator=gen)
    cast = {"device": device, "dtype": dtype}
    x = x.to(**cast, memory_format=torch.channels_last)
    return Problem(shape, dtype, x, labels.to(device), layer.weight.detach().to(**cast), layer.bias.detach().to(**cast))


def _step_kwargs(shape: ConvShape) -> dict[str, Any]:
    return dict(num_classes=NUM_CLASSES, padding=shape.kernel // 2, temperature=TEMPERATURE, normalize=NORMALIZE,
                eps=EPS)


class EagerClassConv(nn.Conv2d):
    """The class-goodness conv layer written with autograd: the eager twin of ``ff_conv2d_class_step``."""

    def __init__(self, problem: Problem) -> None:
        shape = problem.shape
        super().__init__(shape.in_channels, shape.out_channels, shape.kernel, padding=shape.kernel // 2,
                         device=problem.weight.device, dtype=problem.dtype)
        with torch.no_grad():
            self.weight.copy_(problem.weight)
            self.bias.copy_(problem.bias)
        self.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.parameters(), lr=LR)

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rms = x.flatten(1).pow(2).mean(dim=1).sqrt()
        h = torch.relu(self(x / (rms + EPS)[:, None, None, None]))
        g = h.pow(2).reshape(h.shape[0], NUM_CLASSES, -1).mean(dim=2)
        loss = F.cross_entropy(g.float() / TEMPERATURE, labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach(), h.detach()


def _fused_step(problem: Problem, backend: str, mixed: bool) -> Callable[[], Any]:
    master = torch.float32 if mixed else problem.dtype
    w, b = problem.weight.to(master, copy=True), problem.bias.to(master, copy=True)
    opt = ffk.optim.Adam([w, b], lr=LR)
    kwargs = dict(_step_kwargs(problem.shape), optimizer=opt, backend=backend, check_finite=False,
                  compute_dtype=problem.dtype if mixed else None)
    return lambda: ffk.ff_conv2d_class_step(problem.x, problem.labels, w, b, **kwargs)


def _compiled_step(problem: Problem, mode: str | None) -> Callable[[], Any]:
    """torch.compile of the closed-form step plus its Adam update; the first call compiles."""
    w, b = problem.weight.clone(), problem.bias.clone()
    spec_opt = ffk.optim.Adam([w, b], lr=LR)
    state = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in (w, w, b, b)]
    step_size = torch.zeros((), dtype=torch.float32, device=w.device)
    bc2_sqrt = torch.ones((), dtype=torch.float32, device=w.device)
    kwargs = _step_kwargs(problem.shape)

    def step(x, labels, w, b, m_w, v_w, m_b, v_b, step_size, bc2_sqrt):
        out = ffk.ff_conv2d_class_step(x, labels, w, b, **kwargs, backend="torch", check_finite=False)
        bench._adam_in_graph((w, b), (out.grad_weight, out.grad_bias), (m_w, m_b), (v_w, v_b), step_size, bc2_sqrt,
                             spec_opt.betas, spec_opt.eps)
        return out.loss, out.h

    torch._dynamo.reset()
    compiled = torch.compile(step, mode=mode, dynamic=False)
    count = [0]

    def call() -> Any:
        count[0] += 1
        size, corr = spec_opt.bias_corrections(count[0])
        step_size.fill_(size)
        bc2_sqrt.fill_(corr)
        return compiled(problem.x, problem.labels, w, b, *state, step_size, bc2_sqrt)

    return call


def _floor(problem: Problem) -> Callable[[], Any]:
    """The convolution and its weight and bias gradient, for an output gradient of h's shape and layout."""
    shape, w = problem.shape, problem.weight
    pad = shape.kernel // 2
    grad_out = torch.rand(shape.batch, shape.out_channels, shape.size, shape.size, dtype=problem.dtype,
                          device=w.device).to(memory_format=torch.channels_last)

    def call() -> Any:
        h = F.conv2d(problem.x, w, problem.bias, padding=pad)
        grads = torch.ops.aten.convolution_backward(grad_out, problem.x, w, [w.shape[0]], [1, 1], [pad, pad], [1, 1],
                                                    False, [0, 0], 1, [False, True, True])
        return h, grads

    return call


def build_variant(name: str, problem: Problem, device: torch.device, compile_mode: str | None) -> Callable | str:
    """The timed callable for ``name``, or a string saying why it does not run here (the table shows it)."""
    if name == "eager":
        layer = EagerClassConv(problem)
        return lambda: layer.step(problem.x, problem.labels)
    if name == "gemm_floor":
        return _floor(problem)
    if name == "compile":
        return _compiled_step(problem, compile_mode)
    if name == "torch_mixed":
        if problem.dtype == torch.float32:
            return "fp32 rows: identical to torch"
        return _fused_step(problem, "torch", mixed=True)
    if name == "auto":
        return _fused_step(problem, "auto", mixed=False)
    try:
        spec("conv2d_class_step", name)
        backend = resolve_backend(name, device)
    except (NotImplementedError, RuntimeError) as err:
        return f"unavailable: {err}"
    return _fused_step(problem, backend, mixed=False)


@dataclass
class Row:
    """One variant at one configuration; times in milliseconds, ratios from the same run."""

    variant: str
    device: str
    dtype: str
    batch: int
    in_channels: int
    size: int
    out_channels: int
    kernel: int
    status: str = "ok"
    median_ms: float = math.nan
    p25_ms: float = math.nan
    p75_ms: float = math.nan
    min_ms: float = math.nan
    max_ms: float = math.nan
    samples: int = 0
    tflops: float = math.nan
    vs_eager: float = math.nan
    vs_compile: float = math.nan
    over_floor: float = math.nan
    peak_mib: float = math.nan
    first_loss: float = math.nan

    @property
    def shape(self) -> ConvShape:
        return ConvShape(self.batch, self.in_channels, self.size, self.out_channels, self.kernel)


def bench_config(problem: Problem, device: torch.device, variants: Sequence[str], repeats: int,
                 compile_mode: str | None) -> list[Row]:
    """Time every variant on one (shape, dtype); failures become rows with a status instead of an exception."""
    base = {"device": device.type, "dtype": str(problem.dtype).removeprefix("torch."), **problem.shape._asdict()}
    rows: dict[str, Row] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name in variants:
        rows[name] = Row(variant=name, **base)
        try:
            built = build_variant(name, problem, device, compile_mode)
            if not isinstance(built, str):
                rows[name].first_loss = bench.first_loss(built()) or math.nan
                fns[name] = built
        except Exception as err:  # a baseline that fails (torch.compile on some platform) is reported, not fatal
            built = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        if isinstance(built, str):
            rows[name].status = built
    if device.type == "cuda":
        samples = {name: bench.time_cuda(fn) for name, fn in fns.items()}
        for name, fn in fns.items():
            rows[name].peak_mib = bench.peak_cuda_bytes(fn, device) / 2**20
    else:
        samples = bench.time_cpu(fns, repeats)
    for name, times in samples.items():
        row = rows[name]
        row.median_ms = 1e3 * statistics.median(times)
        row.p25_ms, row.p75_ms = (1e3 * float(torch.tensor(times).quantile(q)) for q in (0.25, 0.75))
        row.min_ms, row.max_ms, row.samples = 1e3 * min(times), 1e3 * max(times), len(times)
        row.tflops = problem.shape.flops / (row.median_ms * 1e-3) / 1e12
    for row in rows.values():
        for ref, attr, invert in (("eager", "vs_eager", False), ("compile", "vs_compile", False),
                                  ("gemm_floor", "over_floor", True)):
            if ref in samples and row.variant in samples:
                ratio = rows[ref].median_ms / row.median_ms
                setattr(row, attr, 1 / ratio if invert else ratio)
    return list(rows.values())


def format_table(rows: Sequence[Row]) -> str:
    header = (f"{'variant':<12}{'median ms':>11}{'IQR %':>8}{'min ms':>9}{'max ms':>9}{'TFLOP/s':>9}{'x eager':>9}"
              f"{'x compile':>10}{'/ floor':>9}{'peak MiB':>10}")
    lines, key = [], None
    for row in rows:
        if (row.shape, row.dtype) != key:
            key = (row.shape, row.dtype)
            lines += ["", f"{row.device} {row.dtype} {row.shape.label()}", header]
        if row.status != "ok":
            lines.append(f"{row.variant:<12}  {row.status[:100]}")
            continue
        iqr = 100 * (row.p75_ms - row.p25_ms) / row.median_ms
        lines.append(
            f"{row.variant:<12}{bench._fmt(row.median_ms, 11, '.3f')}{bench._fmt(iqr, 8, '.1f')}"
            f"{bench._fmt(row.min_ms, 9, '.3f')}{bench._fmt(row.max_ms, 9, '.3f')}{bench._fmt(row.tflops, 9, '.3f')}"
            f"{bench._fmt(row.vs_eager, 9, '.2f', 'x')}{bench._fmt(row.vs_compile, 10, '.2f', 'x')}"
            f"{bench._fmt(row.over_floor, 9, '.2f', 'x')}{bench._fmt(row.peak_mib, 10, '.1f')}"
        )
    return "\n".join(lines).lstrip("\n")


LEGEND = (
    "x eager / x compile: speed-up over the eager autograd class-goodness conv step and over torch.compile of the "
    "torch step (>1 is faster); / floor: time over the convolution and its weight gradient alone (1.0 is the floor); "
    "IQR %: interquartile range over the median; min/max: the fastest and slowest sample; peak MiB: CUDA peak above "
    "the inputs."
)


def run(args: argparse.Namespace, device: torch.device) -> int:
    """``ff-kernels bench --op conv`` (the device, threads and TF32 switch already set by ``bench.run``)."""
    if args.kn:
        raise ValueError("--kn sets linear shapes; --op conv times the CIFAR-10 layers of a CwComp-style network")
    shapes = default_shapes(device, args.quick)
    if args.rows:
        shapes = [s._replace(batch=b) for b in args.rows for s in shapes]
    repeats = args.repeats or (7 if args.quick else 15)
    mode = args.compile_mode or bench.default_compile_mode(device)
    out = Path(args.out or Path("benchmarks") / "results" / bench.device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    env = bench.environment(device, op="conv", quick=args.quick, compile_mode=mode or "default", repeats=repeats,
                            normalize=NORMALIZE, temperature=TEMPERATURE, num_classes=NUM_CLASSES,
                            timer="triton.testing.do_bench" if device.type == "cuda" else "perf_counter, interleaved")
    print(f"ff-kernels bench --op conv on {env['device_name']} ({device.type}, {env['threads']} threads), torch "
          f"{env['torch']}, compile mode {env['compile_mode']}, {len(shapes)} shapes x {len(args.dtype)} dtypes",
          flush=True)
    start = time.perf_counter()
    rows: list[Row] = []
    for shape in shapes:
        for dtype in args.dtype:
            print(f"  {device.type} {dtype} {shape.label()} ...", file=sys.stderr, flush=True)
            rows += bench_config(make_problem(shape, bench.DTYPES[dtype], device), device, args.variants, repeats,
                                 mode)
    env["wall_s"] = round(time.perf_counter() - start, 1)
    env["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(format_table(rows))
    print(f"\n{LEGEND}")
    busy = max(env["load_avg_1m_start"] or 0, env["load_avg_1m_end"] or 0)
    if device.type == "cpu" and busy > 0.5 * (os.cpu_count() or 1) + torch.get_num_threads():
        print(f"warning: load average {busy:.1f} on {os.cpu_count()} CPUs: other processes shared the cores, so these "
              "CPU timings are not trustworthy")
    write_tables(rows, env, out)
    print(f"\nwall time {env['wall_s']:.0f} s; wrote {out / 'bench_conv.csv'}, {out / 'bench_conv.json'}")
    return 0


def write_tables(rows: Sequence[Row], env: dict[str, Any], out: Path) -> None:
    """The raw results: bench_conv.csv (one row per variant and configuration) and bench_conv.json (with the
    environment)."""
    with open(out / "bench_conv.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    payload = {"environment": env, "legend": LEGEND,
               "rows": [{k: bench._json_safe(v) for k, v in asdict(r).items()} for r in rows]}
    (out / "bench_conv.json").write_text(json.dumps(payload, indent=2) + "\n")
