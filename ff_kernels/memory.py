"""``ff-kernels memory``: measured peak memory of training an L-layer MLP by FF and by backprop, against depth.

Three ways to train the same widths on the same M-row batch, each with Adam (state counted on every side):

- ``ff_fused``: per training step, each layer in turn takes one ``ff_linear_step`` on (h_pos, h_neg) with an
  ``ff_kernels.optim.Adam`` and passes its h on; the previous layer's activations are then dropped, so only one
  layer's activations and gradient are alive at a time (``backend="auto"``: Triton on CUDA; on the CPU the C++
  operator where it is built, else torch);
- ``ff_eager``: the same schedule written the mohammadpz way (autograd per layer, ``torch.optim.Adam``); each
  layer's ``.grad`` lives on until that layer's next ``zero_grad``, as in mohammadpz's loop;
- ``backprop``: ``nn.Sequential`` of Linear+ReLU of the same widths, the same logistic goodness loss on the last
  layer's output (M rows with their signs), ``loss.backward()``, ``torch.optim.Adam`` (default settings).

Two numbers per configuration, both measured, never estimated:

- ``peak``: the peak of everything the configuration allocated (inputs, parameters, optimizer state,
  activations, gradients, temporaries). On CUDA ``max_memory_allocated`` minus what was allocated before; on the
  CPU the peak resident set (VmHWM) of a fresh subprocess minus its resident set after importing torch and
  running a tiny warm-up of the same code (so library initialisation is not counted).
- ``working``: the peak above inputs, parameters, optimizer state and outputs (DESIGN 4's fair FF metric): the
  peak minus the memory measured after allocating inputs, parameters and pre-initialised Adam state, minus the
  bytes of the output activations (M x width).

On the CPU each configuration runs in its own ``python -m ff_kernels.memory --worker`` process, at most ``--jobs``
at a time, with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the
resident set, and VmHWM reset (``/proc/self/clear_refs``) after the static allocation. Before the measured steps
one untimed step at full size runs (Triton autotuning, cuBLAS and MKL workspaces, lazy library state), and the
gradients it leaves are dropped, so the measured steps start from the state a fresh run starts from.
``model_bytes`` is the analytic model of the same quantities, printed beside the measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ff_kernels._options import BACKENDS
from ff_kernels.backends import resolve_backend
from ff_kernels.bench import EagerFFLayer, options_given, positive_int, positive_int_list, report_written
from ff_kernels.blockwise import MODELS as BLOCKWISE_MODELS

METHODS = ("ff_fused", "ff_eager", "backprop")
THRESHOLD, LR = 2.0, 1e-3
MIB = 2**20


@dataclass(frozen=True)
class MemoryConfig:
    """One measured configuration: ``batch`` = M rows in all (FF: M/2 positives and M/2 negatives)."""

    method: str
    depth: int
    width: int = 2000
    in_features: int = 784
    batch: int = 256
    steps: int = 3
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    seed: int = 0


def _elem(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def model_bytes(cfg: MemoryConfig, foreach: bool | None = None) -> dict[str, int]:
    """Analytic bytes: the static parts exactly; the working peak as the largest live set of any phase, less the
    outputs (the metric subtracts them whether or not they exist yet at the peak).

    a = M*width activations, G_i = layer i's parameters (its gradient has the same size), x_i = M*fan_in_i.
    backprop: the largest of L a saved activations plus four (M, width) temporaries of the loss backward (the
    mean's gradient, 2h, their product, the ReLU gradient), sum G + 2a at the bottom of backward, and sum G plus
    Adam temporaries at the step. ff_fused, torch backend: per layer the input h, then the larger of
    h + the row-scaled operand of GEMM 2 + G_i (positives and negatives are adjacent rows of one tensor here, the
    input batch as every layer's h, so the stacked batch is a view, not a copy) and h + G_i (the Adam update
    reuses the step's gradient as its workspace); on CUDA the fused
    update never materialises G_i, leaving the input, h and the per-tile goodness partials. ff_eager: the stale
    gradients of all layers (sum G) plus one layer's input, normalised input, h and two (M, width) gradient
    temporaries, or its Adam temporaries. Adam temporaries: two parameter-sized tensors (sqrt, divide), or with
    ``foreach`` (torch.optim's default on CUDA) one per parameter, for all parameters at once.
    """
    b, state = _elem(cfg.dtype), 4
    m, w, depth = cfg.batch, cfg.width, cfg.depth
    fan_in = [cfg.in_features] + [w] * (depth - 1)
    grads = [(k * w + w) * b for k in fan_in]
    act = m * w * b
    cuda = cfg.device.startswith("cuda")
    if foreach is None:
        foreach = cuda
    static = {
        "inputs": m * cfg.in_features * b,
        "params": sum(grads),
        "opt_state": 2 * state * sum(k * w + w for k in fan_in),
        "outputs": act,
    }
    live = 0
    for i, (k, g) in enumerate(zip(fan_in, grads)):
        h_in, x_i = (0 if i == 0 else act), m * k * b
        if cfg.method == "ff_fused" and cuda and cfg.backend in ("auto", "triton", "cuda"):
            live = max(live, h_in + act + m * math.ceil(w / 64) * 4)
        elif cfg.method == "ff_fused":
            scaled = act if w <= k else x_i
            live = max(live, h_in + act + scaled + g)
        elif cfg.method == "ff_eager":
            temps = g if foreach else 2 * g
            live = max(live, sum(grads) - g + h_in + act + max(x_i + 2 * act + g, g + temps))
    if cfg.method == "backprop":
        temps = sum(grads) if foreach else 2 * max(grads)
        live = act + max((depth + 3) * act, sum(grads) + 2 * act, sum(grads) + temps)
    elif cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    return {**static, "working": live - act}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Probe:
    """The memory counters of one device: CUDA's allocator, or the process's resident set on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.hwm_reset = True

    def current(self) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return 1024 * _status_kib("VmRSS")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.hwm_reset = _reset_hwm()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return 1024 * _status_kib("VmHWM")


def _fill_adam_state(opt: Any, params: Sequence[torch.Tensor]) -> None:
    """Allocate Adam's state now, so that it is part of the static memory on both sides."""
    import ff_kernels as ffk

    if isinstance(opt, ffk.optim.FusedOptimizer):
        for p in params:
            opt.check_holds("param", p).update(
                step=0,
                exp_avg=torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                exp_avg_sq=torch.zeros(p.shape, dtype=torch.float32, device=p.device),
            )
        return
    for p in params:
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _build(cfg: MemoryConfig, device: torch.device) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """The training step of ``cfg`` and every tensor of its static state (inputs, parameters, Adam state)."""
    import ff_kernels as ffk

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    rows_pos = cfg.batch // 2
    x = torch.randn(cfg.batch, cfg.in_features, device=device, dtype=dtype)
    dims = [cfg.in_features] + [cfg.width] * cfg.depth
    static: list[torch.Tensor] = []
    kind = {"device": device, "dtype": dtype}
    if cfg.method == "backprop":
        sign = torch.ones(cfg.batch, device=device)
        sign[rows_pos:] = -1
        model = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b, **kind), nn.ReLU())])
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=LR)
        _fill_adam_state(opt, params)
        static += [x, sign, *params, *[t for s in opt.state.values() for t in s.values()]]

        def step() -> Any:
            opt.zero_grad()
            h = model(x)
            loss = torch.nn.functional.softplus(-sign * (h.pow(2).mean(1) - THRESHOLD)).mean()
            loss.backward()
            opt.step()
            return h

        return step, static
    x_pos, x_neg = x[:rows_pos], x[rows_pos:]
    static.append(x)
    if cfg.method == "ff_fused":
        layers = [ffk.FFLinear(a, b, threshold=THRESHOLD, backend=cfg.backend, check_finite=False, **kind)
                  for a, b in zip(dims, dims[1:])]
        opts = [ffk.optim.Adam(layer.parameters(), lr=LR) for layer in layers]
        for layer, opt in zip(layers, opts):
            _fill_adam_state(opt, list(layer.parameters()))
            static += [*layer.parameters(), *[t for s in opt.state for t in s.values() if torch.is_tensor(t)]]

        def step() -> Any:
            h_pos, h_neg = x_pos, x_neg
            for layer, opt in zip(layers, opts):
                out = layer.train_step(h_pos, h_neg, opt)
                h_pos, h_neg = out.h_pos, out.h_neg
                del out
            return h_pos, h_neg

        return step, static
    if cfg.method == "ff_eager":
        layers = [EagerFFLayer(a, b, threshold=THRESHOLD, lr=LR, **kind) for a, b in zip(dims, dims[1:])]
        for layer in layers:
            _fill_adam_state(layer.opt, list(layer.parameters()))
            static += [*layer.parameters(), *[t for s in layer.opt.state.values() for t in s.values()]]

        def step() -> Any:
            h_pos, h_neg = x_pos, x_neg
            for layer in layers:
                _, h_pos, h_neg = layer.step(h_pos, h_neg)
            return h_pos, h_neg

        return step, static
    raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")


def measure(cfg: MemoryConfig) -> dict[str, Any]:
    """Run ``cfg`` in this process and measure it (see the module docstring for what each number means)."""
    device = torch.device(cfg.device)
    probe = Probe(device)
    tiny = MemoryConfig(cfg.method, 1, width=16, in_features=16, batch=8, steps=1, dtype=cfg.dtype,
                        device=cfg.device, backend=cfg.backend)
    warm, _ = _build(tiny, device)
    warm()
    del warm
    base = probe.current()
    step, static = _build(cfg, device)
    static_exact = sum(t.numel() * t.element_size() for t in {id(t): t for t in static}.values())
    step()
    for t in static:
        t.grad = None
    del static
    after_static = probe.current()
    probe.reset_peak()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        outputs = None
        outputs = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / cfg.steps
    peak = probe.peak()
    out_tensors = outputs if isinstance(outputs, tuple) else (outputs,)
    output_bytes = sum(t.numel() * t.element_size() for t in out_tensors)
    return {
        **asdict(cfg),
        "resolved_backend": resolve_backend(cfg.backend, device) if cfg.method == "ff_fused" else "autograd",
        "base_bytes": base,
        "static_bytes": after_static - base,
        "static_exact_bytes": static_exact,
        "output_bytes": output_bytes,
        "peak_bytes": peak - base,
        "working_bytes": peak - after_static - output_bytes,
        "hwm_reset": probe.hwm_reset,
        "step_seconds": seconds,
    }


def measure_subprocess(cfg: Any, threads: int = 1, timeout: float = 900, module: str = "ff_kernels.memory"
                       ) -> dict[str, Any]:
    """``measure(cfg)`` of ``module`` in a fresh interpreter, so that no earlier configuration's memory is in its
    numbers (``cfg`` a dataclass that its ``--worker`` reads as JSON)."""
    env = dict(os.environ)
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(asdict(cfg))],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory worker for {cfg} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(configs: Sequence[MemoryConfig], jobs: int = 2,
               log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every configuration: subprocesses on the CPU (``jobs`` at a time), in this process on CUDA."""
    results: dict[MemoryConfig, dict[str, Any]] = {}
    cpu = [c for c in configs if not c.device.startswith("cuda")]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(measure_subprocess, c, threads): c for c in cpu}
        for future in concurrent.futures.as_completed(futures):
            cfg = futures[future]
            results[cfg] = future.result()
            if log:
                log(f"  {cfg.method} L={cfg.depth}: working {results[cfg]['working_bytes'] / MIB:.1f} MiB")
    for cfg in configs:
        if cfg.device.startswith("cuda"):
            results[cfg] = measure(cfg)
            gc.collect()
            torch.cuda.empty_cache()
            if log:
                log(f"  {cfg.method} L={cfg.depth}: working {results[cfg]['working_bytes'] / MIB:.1f} MiB")
    rows = []
    for cfg in configs:
        row = dict(results[cfg])
        model = model_bytes(cfg)
        row["model_working_bytes"] = model["working"]
        row["model_static_bytes"] = model["inputs"] + model["params"] + model["opt_state"]
        rows.append(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's peak and working memory over backprop's at the same depth, width and batch."""
    key = ("depth", "width", "batch", "in_features", "dtype", "device")
    bp = {tuple(r[k] for k in key): r for r in rows if r["method"] == "backprop"}
    for row in rows:
        ref = bp.get(tuple(row[k] for k in key))
        row["working_vs_backprop"] = row["working_bytes"] / ref["working_bytes"] if ref else None
        row["peak_vs_backprop"] = row["peak_bytes"] / ref["peak_bytes"] if ref else None


def slopes(rows: Sequence[dict[str, Any]], field: str = "working_bytes", min_depth: int = 2) -> dict[str, float]:
    """Least-squares MiB per layer of ``field`` against depth, per method, over depths >= ``min_depth`` (a lone
    layer reads the inputs and writes the outputs, which the working metric leaves out, so L = 1 is lower)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["depth"], r[field] / MIB) for r in rows if r["method"] == method and r["depth"] >= min_depth]
        if len(pts) < 2:
            continue
        mx = sum(d for d, _ in pts) / len(pts)
        my = sum(v for _, v in pts) / len(pts)
        var = sum((d - mx) ** 2 for d, _ in pts)
        out[method] = sum((d - mx) * (v - my) for d, v in pts) / var if var else 0.0
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (f"{'method':<10}{'L':>4}{'width':>7}{'M':>6}{'peak MiB':>10}{'working MiB':>13}{'model MiB':>11}"
              f"{'static MiB':>12}{'work/bp':>9}{'peak/bp':>9}{'s/step':>8}")
    lines = [header]
    for r in rows:
        wr, pr = r.get("working_vs_backprop"), r.get("peak_vs_backprop")
        lines.append(
            f"{r['method']:<10}{r['depth']:>4}{r['width']:>7}{r['batch']:>6}{r['peak_bytes'] / MIB:>10.1f}"
            f"{r['working_bytes'] / MIB:>13.1f}{r['model_working_bytes'] / MIB:>11.1f}{r['static_bytes'] / MIB:>12.1f}"
            f"{'-' if wr is None else f'{wr:.3f}':>9}{'-' if pr is None else f'{pr:.3f}':>9}"
            f"{r['step_seconds']:>8.2f}"
        )
    return "\n".join(lines)


LEGEND = (
    "peak: everything the configuration allocated; working: peak above inputs, parameters, Adam state and outputs "
    "(measured); model: the analytic working bytes; static: inputs + parameters + Adam state as measured; "
    "work/bp, peak/bp: over backprop at the same depth."
)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: Sequence[dict[str, Any]], env: dict[str, Any], path: Path) -> str | None:
    """Peak and working memory against depth, measured (solid) and modelled (dotted); None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ff-kernels[bench]')"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["depth"])
        depths = [r["depth"] for r in mine]
        line = axes[0].plot(depths, [r["peak_bytes"] / MIB for r in mine], "o-", label=method)[0]
        axes[1].plot(depths, [r["working_bytes"] / MIB for r in mine], "o-", color=line.get_color(), label=method)
        axes[1].plot(depths, [r["model_working_bytes"] / MIB for r in mine], ":", color=line.get_color(),
                     label=f"{method} (model)")
    r0 = rows[0]
    titles = ("peak (all tensors)", "peak above inputs, parameters, Adam state, outputs")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("depth L (layers)")
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"training memory, width {r0['width']}, batch {r0['batch']}, {r0['dtype']}, {env['device_name']} "
                 f"({r0['device']}), torch {env['torch']}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in METHODS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"methods are {', '.join(METHODS)}; got {text!r}")
    return values


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    """Register ``ff-kernels memory``."""
    parser = subcommands.add_parser(
        "memory", help="peak training memory of an L-layer MLP: FF (fused, eager) against backprop, L = 1..16",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mlp", choices=("mlp", *BLOCKWISE_MODELS),
                        help="mlp (default): FF layers against backprop; a conv net: block-wise training against "
                             "backprop of the same network, per batch and depth (ff_kernels.memory_blockwise)")
    parser.add_argument("--quick", action="store_true", help="depths 1,2,4,8 (default 1..16); conv nets: 3 batches")
    parser.add_argument("--depths", type=positive_int_list, default=None,
                        help="comma-separated depths (conv nets: numbers of blocks)")
    parser.add_argument("--width", type=positive_int, default=2000, help="mlp: units per layer")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="M rows in all (FF: M/2 positive, M/2 negative; default 256); conv nets: the one batch")
    parser.add_argument("--batches", type=positive_int_list, default=None,
                        help="conv nets: the batch sweep (default 32,64,128,256,512)")
    parser.add_argument("--image-size", type=positive_int, default=32, help="conv nets: input height and width")
    parser.add_argument("--in-features", type=positive_int, default=784, help="mlp: input features")
    parser.add_argument("--steps", type=positive_int, default=3, help="training steps per configuration")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--methods", type=_methods, default=list(METHODS), help="mlp: the methods measured")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="mlp: ff_fused's backend (default auto)")
    parser.add_argument("--jobs", type=positive_int, default=2,
                        help="CPU configurations measured in parallel (default 2)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    parser.set_defaults(run=run)
    _DEFAULTS.update(vars(parser.parse_args([])))


_DEFAULTS: dict[str, object] = {}
# The options one model family alone reads (given for the other, they would be silently ignored), and its name.
_ONLY_FOR = {
    "mlp": (("width", "in_features", "methods", "backend"), "--model mlp"),
    "conv": (("batches", "image_size"), f"the conv nets (--model {', '.join(BLOCKWISE_MODELS)})"),
}


def check_model_options(args: argparse.Namespace) -> None:
    """Refuse the options the chosen --model does not read."""
    names, family = _ONLY_FOR["conv" if args.model == "mlp" else "mlp"]
    given = options_given(args, _DEFAULTS, names)
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise ValueError(f"{', '.join(given)} only {verb} to {family}; got --model {args.model}")


def configs_from_args(args: argparse.Namespace) -> list[MemoryConfig]:
    depths = args.depths or ([1, 2, 4, 8] if args.quick else list(range(1, 17)))
    return [MemoryConfig(method=m, depth=d, width=args.width, in_features=args.in_features, batch=args.batch,
                         steps=args.steps, dtype=args.dtype, device=args.device, backend=args.backend)
            for m in args.methods for d in depths]


def run(args: argparse.Namespace) -> int:
    from ff_kernels.bench import device_slug, environment

    check_model_options(args)
    if args.model != "mlp":
        from ff_kernels import memory_blockwise

        return memory_blockwise.run(args)
    args.batch = args.batch or 256
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    resolve_backend(args.backend, device)  # an unavailable backend fails here, not in every worker
    if args.batch < 2:
        raise ValueError(f"--batch must be at least 2 (M/2 positive and M/2 negative rows); got {args.batch}")
    configs = configs_from_args(args)
    out = Path(args.out or Path("benchmarks") / "results" / device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, quick=args.quick, jobs=args.jobs,
                      measurement="max_memory_allocated" if device.type == "cuda"
                      else "VmHWM of a fresh subprocess per configuration")
    print(f"ff-kernels memory on {env['device_name']} ({device.type}), torch {env['torch']}: {len(configs)} "
          f"configurations, width {args.width}, batch {args.batch}, {args.steps} Adam steps each", flush=True)
    start = time.perf_counter()
    rows = run_memory(configs, args.jobs, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    env["wall_s"] = round(time.perf_counter() - start, 1)
    print(format_table(rows))
    print(f"\n{LEGEND}")
    fused = sorted({r["resolved_backend"] for r in rows if r["method"] == "ff_fused"})
    if fused:
        print(f"ff_fused ran backend={','.join(fused)}; optimizer state counted on every side (Adam, fp32)")
    for method, slope in slopes(rows).items():
        print(f"{method}: working memory grows {slope:+.2f} MiB per layer (least squares over depths >= 2)")
    for r in rows:
        if r["method"] != "backprop" and r["depth"] == 8 and r["working_vs_backprop"] is not None:
            print(f"depth 8, width {r['width']}, batch {r['batch']}: {r['method']} working memory is "
                  f"{r['working_vs_backprop']:.3f} of backprop's (DESIGN 4 target <= 0.25), "
                  f"peak {r['peak_vs_backprop']:.3f}")
    if not all(r["hwm_reset"] for r in rows):
        print("note: /proc/self/clear_refs was not writable; CPU peaks include the set-up's own peak")
    write_csv(rows, out / "memory.csv")
    (out / "memory.json").write_text(json.dumps({"environment": env, "legend": LEGEND, "rows": rows}, indent=2) + "\n")
    skipped = plot(rows, env, out / "memory.png")
    report_written(out, ["memory.csv", "memory.json"], "memory.png", skipped, env["wall_s"])
    return 0


def _worker(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="measure one configuration (used by ff-kernels memory)")
    parser.add_argument("--worker", required=True, help="a MemoryConfig as JSON")
    args = parser.parse_args(argv)
    cfg = MemoryConfig(**json.loads(args.worker))
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    print(json.dumps(measure(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
