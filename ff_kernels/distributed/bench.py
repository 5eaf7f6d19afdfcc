"""``ff-kernels bench --distributed``: traffic and speed of distributed FF training against a backprop pipeline.

One MLP, one batch size, gloo on local processes (``ff_kernels.distributed.launch``), 1 and 2 ranks:

- ``ff``: ``FFNet.fit`` (simultaneous schedule) in one process; ``ff_data`` and ``ff_pipeline``:
  ``ff_kernels.distributed.fit`` over 2 ranks (the pipeline with one micro-batch per batch, its default, and with
  ``--micro-batches`` as the backprop pipeline uses);
- ``bp``: the same layers as ``nn.Linear`` + ReLU trained end to end by backprop in one process, with the FF goodness
  loss on the last layer (as ``ff-kernels memory``'s baseline) and ``torch.optim.Adam``; ``bp_pipeline``: the same
  network cut at the same layer over 2 ranks, GPipe style (all micro-batches forward, activations sent on; all
  backward, gradients sent back; one Adam step per batch).

A step is one update of every layer on one batch (B positive + B negative rows). Traffic per step and rank is
measured twice: the payload each rank hands to sends and collectives, and what the process wrote to its sockets
(``/proc/self/io`` wchar, Linux). Beside them, ``model_bytes`` gives the payload a pipeline or a ring all-reduce
must move, computed from the layer sizes: a model, printed beside the measurement to check it, never instead.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ff_kernels.distributed.comm import Comm, written_bytes
from ff_kernels.distributed.launch import results, run_local
from ff_kernels.distributed.pipeline import layer_costs, plan_stages

THRESHOLD, LR = 2.0, 1e-3


@dataclass
class Config:
    """The benchmarked network and schedule."""

    dims: list[int] = field(default_factory=lambda: [784, 1000, 1000, 1000, 1000])
    batch: int = 256
    batches: int = 4
    epochs: int = 5
    micro_batches: int = 4
    repeats: int = 3
    num_classes: int = 10
    warmup: bool = True

    @property
    def steps(self) -> int:
        return self.batches * self.epochs


@dataclass
class Row:
    method: str
    ranks: int
    threads: int
    micro_batches: int
    steps_per_s: float
    steps_per_s_runs: list[float]
    sent_per_step: list[float]
    written_per_step: list[float | None]
    model_per_step: list[float]
    speedup_vs_1rank_1thread: float = math.nan
    speedup_vs_1rank_2threads: float = math.nan


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = cfg.batch * cfg.batches
    return torch.rand(rows, cfg.dims[0], generator=gen), torch.randint(0, cfg.num_classes, (rows,), generator=gen)


def _net(cfg: Config) -> Any:
    import ff_kernels as ffk

    return ffk.FFNet(cfg.dims, num_classes=cfg.num_classes, optimizer="adam", lr=LR, threshold=THRESHOLD, seed=0)


def _bp_layers(cfg: Config, layers: range) -> nn.Sequential:
    torch.manual_seed(0)
    dims = cfg.dims
    return nn.Sequential(*[m for i in layers for m in (nn.Linear(dims[i], dims[i + 1]), nn.ReLU())])


def _bp_inputs(net: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The FF inputs (positives with their label, negatives with a wrong one) stacked, as backprop sees them."""
    return torch.cat([net.overlay_labels(x, y), net.overlay_labels(x, net.negative_labels(y))])


def _goodness_loss(h: torch.Tensor, rows_pos: int) -> torch.Tensor:
    sign = torch.ones(h.shape[0], device=h.device)
    sign[rows_pos:] = -1
    return torch.nn.functional.softplus(-sign * (h.pow(2).mean(1) - THRESHOLD)).mean()


def _time_bp_single(cfg: Config) -> float:
    """Seconds of ``cfg.steps`` backprop steps in this process."""
    x, y = _data(cfg)
    net = _net(cfg)
    net.overlay_value.fill_(float(x.max()))
    model = _bp_layers(cfg, range(len(cfg.dims) - 1))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    chunks = [(_bp_inputs(net, xb, yb), xb.shape[0]) for xb, yb in zip(x.split(cfg.batch), y.split(cfg.batch))]
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        for inputs, rows_pos in chunks:
            opt.zero_grad()
            _goodness_loss(model(inputs), rows_pos).backward()
            opt.step()
    return time.perf_counter() - start


def _time_ff_single(cfg: Config) -> float:
    x, y = _data(cfg)
    net = _net(cfg)
    start = time.perf_counter()
    net.fit(x, y, epochs=cfg.epochs, batch_size=cfg.batch, schedule="simultaneous")
    return time.perf_counter() - start


def one_rank(rank: int, world: int, cfg: Config) -> dict[str, dict[int, list[float]]]:
    """Seconds per run of the single-process methods with 1 and 2 threads, interleaved so that load drifts hit every
    variant alike (a warm-up run of each first)."""
    out: dict[str, dict[int, list[float]]] = {"ff": {1: [], 2: []}, "bp": {1: [], 2: []}}
    timers = (("ff", _time_ff_single), ("bp", _time_bp_single))
    for run in range(0 if cfg.warmup else 1, cfg.repeats + 1):
        _log(f"  1 rank: run {run} of {cfg.repeats} (0 is the warm-up)")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for method, timer in timers:
                seconds = timer(cfg if run else Config(**{**asdict(cfg), "epochs": 1}))
                if run:
                    out[method][threads].append(seconds)
    return out


def _bp_pipeline(cfg: Config, comm: Comm, stages: list[range]) -> dict[str, Any]:
    """GPipe over the ranks: per batch, every micro-batch forward (activations sent on), then every micro-batch
    backward in reverse (gradients sent back), then one Adam step on each rank."""
    rank, world = comm.rank, comm.world
    x, y = _data(cfg)
    net = _net(cfg)
    net.overlay_value.fill_(float(x.max()))
    mine = stages[rank]
    model = _bp_layers(cfg, mine)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    d_in, d_out = cfg.dims[mine.start], cfg.dims[mine.stop]
    batches = [(_bp_inputs(net, xb, yb), xb.shape[0]) for xb, yb in zip(x.split(cfg.batch), y.split(cfg.batch))]
    sent_before, written_before, start = comm.bytes_sent, written_bytes(), time.perf_counter()
    for _ in range(cfg.epochs):
        for inputs, rows_pos in batches:
            micro = rows_pos // cfg.micro_batches
            saved, sends = [], []
            for k in range(cfg.micro_batches):
                if rank == 0:
                    pos = inputs[k * micro : (k + 1) * micro]
                    neg = inputs[rows_pos + k * micro : rows_pos + (k + 1) * micro]
                    inp = torch.cat([pos, neg])
                else:
                    inp = torch.empty(2 * micro, d_in)
                    comm.wait(comm.recv(inp, rank - 1, f"activations of micro-batch {k}", tag=0))
                    inp.requires_grad_()
                out = model(inp)
                if rank + 1 < world:
                    sends.append(comm.send(out.detach(), rank + 1, f"activations of micro-batch {k}", tag=0))
                    saved.append((inp, out))
                else:
                    saved.append((inp, _goodness_loss(out, micro) / cfg.micro_batches))
            for k in reversed(range(cfg.micro_batches)):
                inp, out = saved[k]
                if rank + 1 < world:
                    grad = torch.empty(2 * micro, d_out)
                    comm.wait(comm.recv(grad, rank + 1, f"gradient of micro-batch {k}", tag=1))
                    out.backward(grad)
                else:
                    out.backward()
                if rank > 0:
                    sends.append(comm.send(inp.grad, rank - 1, f"gradient of micro-batch {k}", tag=1))
            for op in sends:
                comm.wait(op)
            opt.step()
            opt.zero_grad()
    seconds, written = time.perf_counter() - start, written_bytes()
    return {"seconds": seconds, "steps": cfg.steps, "bytes_sent": comm.bytes_sent - sent_before,
            "bytes_written": None if written is None else written - written_before}


def two_ranks(rank: int, world: int, cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """This rank's stats for every distributed method, runs interleaved (a warm-up run of each first)."""
    from ff_kernels.distributed.training import fit

    x, y = _data(cfg)
    warm = Config(**{**asdict(cfg), "epochs": 1})
    stages = plan_stages(layer_costs(_net(cfg)), world)
    methods = [("ff_data", "data", 1), ("ff_pipeline", "pipeline", 1),
               (f"ff_pipeline_m{cfg.micro_batches}", "pipeline", cfg.micro_batches)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in methods}
    runs["bp_pipeline"] = []
    comm = Comm(120, torch.device("cpu"))
    for run in range(0 if cfg.warmup else 1, cfg.repeats + 1):
        if rank == 0:
            _log(f"  2 ranks: run {run} of {cfg.repeats} (0 is the warm-up)")
        for name, mode, micro in methods:
            stats: dict[str, Any] = {}
            fit(_net(cfg), x, y, mode=mode, epochs=cfg.epochs if run else 1, batch_size=cfg.batch,
                schedule="simultaneous", micro_batches=micro if mode == "pipeline" else None, timeout=120,
                stats=stats)
            if run:
                runs[name].append(stats)
        stats = _bp_pipeline(cfg if run else warm, comm, stages)
        if run:
            runs["bp_pipeline"].append(stats)
    return runs


def model_bytes(cfg: Config, method: str, ranks: int, elem: int = 4) -> list[float]:
    """Payload per step and rank that the method must move, from the layer sizes (a model, not a measurement)."""
    rows = 2 * cfg.batch
    if ranks == 1 or method in ("ff", "bp"):
        return [0.0] * ranks
    if method == "ff_data":
        params = sum(a * b + b + 1 for a, b in zip(cfg.dims, cfg.dims[1:]))
        return [float(params * elem)] * ranks
    stages = plan_stages([float(a * b) for a, b in zip(cfg.dims, cfg.dims[1:])], ranks)
    out = []
    for r, stage in enumerate(stages):
        forward = rows * cfg.dims[stage.stop] * elem if r + 1 < ranks else 0
        backward = rows * cfg.dims[stage.start] * elem if method == "bp_pipeline" and r > 0 else 0
        out.append(float(forward + backward))
    return out


def measure_pairs(cfg: Config, threads_per_rank: int = 1) -> list[Row]:
    """The 2-rank methods (one group of processes)."""
    pairs = results(run_local(two_ranks, 2, (cfg,), threads=threads_per_rank, timeout=300, deadline=1800))
    rows = []
    for method in pairs[0]:
        per_run = list(zip(*(p[method] for p in pairs)))
        rates = [cfg.steps / max(s["seconds"] for s in run) for run in per_run]
        sent = [statistics.median(run[r]["bytes_sent"] for run in per_run) / cfg.steps for r in range(2)]
        written = [None if per_run[0][r]["bytes_written"] is None else
                   statistics.median(run[r]["bytes_written"] for run in per_run) / cfg.steps for r in range(2)]
        base = method.split("_m")[0]
        micro = int(method.split("_m")[1]) if "_m" in method else (cfg.micro_batches if base == "bp_pipeline" else 1)
        rows.append(Row(base, 2, threads_per_rank, micro, statistics.median(rates), rates, sent, written,
                        model_bytes(cfg, base, 2)))
    return rows


def measure(cfg: Config, threads_per_rank: int = 1) -> list[Row]:
    """Both groups of runs, one after the other (never side by side: they share the cores)."""
    single = results(run_local(one_rank, 1, (cfg,), threads=1, timeout=300, deadline=1800))[0]
    rows: list[Row] = []
    for method in ("ff", "bp"):
        for threads, seconds in single[method].items():
            rates = [cfg.steps / s for s in seconds]
            rows.append(Row(method, 1, threads, 1, statistics.median(rates), rates, [0.0], [0.0],
                            model_bytes(cfg, method, 1)))
    rows += measure_pairs(cfg, threads_per_rank)
    single_rate = {(r.method, r.threads): r.steps_per_s for r in rows if r.ranks == 1}
    for row in rows:
        family = "ff" if row.method.startswith("ff") else "bp"
        row.speedup_vs_1rank_1thread = row.steps_per_s / single_rate[(family, 1)]
        row.speedup_vs_1rank_2threads = row.steps_per_s / single_rate[(family, 2)]
    return rows


def _mb(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v / 1e6:.2f}" for v in values)


def format_table(rows: list[Row]) -> str:
    lines = ["| method | ranks x threads | micro-batches | steps/s | x 1 rank, 1 thread | x 1 rank, 2 threads | "
             "payload MB/step per rank | written MB/step per rank | model MB/step per rank |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.ranks} x {r.threads} | {r.micro_batches} | {r.steps_per_s:.2f} | "
                     f"{r.speedup_vs_1rank_1thread:.2f}x | {r.speedup_vs_1rank_2threads:.2f}x | {_mb(r.sent_per_step)} "
                     f"| {_mb(r.written_per_step)} | {_mb(r.model_per_step)} |")
    return "\n".join(lines)


def plot(rows: list[Row], title: str, path: Path) -> str | None:
    """Steps per second and bytes sent per step, side by side; returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ff-kernels[bench]')"
    labels = [f"{r.method}\n{r.ranks}x{r.threads}" + (f" m{r.micro_batches}" if r.ranks > 1 else "") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.bar(range(len(rows)), [r.steps_per_s for r in rows],
             color=["tab:blue" if r.method.startswith("ff") else "tab:red" for r in rows])
    left.set_ylabel("steps per second")
    for ax in (left, right):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    two = [r for r in rows if r.ranks == 2]
    width = 0.4
    for k in range(2):
        right.bar([i + (k - 0.5) * width for i in range(len(two))], [r.sent_per_step[k] / 1e6 for r in two], width,
                  label=f"rank {k}")
    right.set_xticks(range(len(two)))
    right.set_xticklabels([f"{r.method}\nm{r.micro_batches}" for r in two], fontsize=7)
    right.set_ylabel("MB sent per step (payload)")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run(args: argparse.Namespace) -> int:
    """``ff-kernels bench --distributed`` (``--quick``: a smaller network; ``--out``: the results folder)."""
    from ff_kernels.bench import environment, report_written

    cfg = Config(repeats=args.repeats or 3)
    if args.quick:
        cfg = Config(dims=[784, 500, 500, 500, 500], batch=256, batches=4, epochs=3, repeats=args.repeats or 2)
    out = Path(args.out or Path("benchmarks") / "results" / "cpu")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"), backend="gloo", config=asdict(cfg), launcher="torch.multiprocessing "
                      "spawn, localhost", threads_per_rank=1)
    print(f"ff-kernels bench --distributed on {env['device_name']}, {os.cpu_count()} CPUs, torch {env['torch']}, "
          f"gloo: dims {cfg.dims}, {cfg.batch}+{cfg.batch} rows per step, {cfg.steps} steps per run, "
          f"{cfg.repeats} runs", flush=True)
    start = time.perf_counter()
    rows = measure(cfg)
    env["wall_s"] = round(time.perf_counter() - start, 1)
    env["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(format_table(rows))
    with open(out / "distributed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    (out / "distributed.json").write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]},
                                                     indent=2) + "\n")
    title = (f"distributed FF vs backprop, gloo, {env['device_name']}, torch {env['torch']}, {env['date'][:10]}; "
             f"dims {cfg.dims}, batch {cfg.batch}+{cfg.batch}")
    skipped = plot(rows, title, out / "distributed.png")
    report_written(out, ["distributed.csv", "distributed.json"], "distributed.png", skipped, env["wall_s"])
    return 0
