"""``ff-kernels memory --model resnet18|mobilenet_v3_small|small_cnn``: measured peak memory of block-wise training
(``BlockwiseFF``) against end-to-end backprop (``BackpropBaseline``) of the same network, per batch size and per depth
(the network's first d blocks), with an analytic model beside every measurement and the time of one step.

Both sides train the same blocks (random initialisation, seed 0) with the same optimizer (SGD with momentum by
default, its state allocated before the measurement), on random images of ``--image-size`` with random labels. Per
configuration, as ``ff-kernels memory`` does for MLPs: on the CPU a fresh ``python -m ff_kernels.memory_blockwise
--worker`` process, glibc's mmap threshold fixed so freed tensors leave the resident set, a warm-up step of the same
network at batch 2 before the baseline is read, one untimed step at full size (optimizer state, library workspaces),
then ``--steps`` measured steps; on CUDA the same in this process with ``max_memory_allocated``.

- ``peak``: the peak above the baseline (inputs, parameters, buffers, optimizer state, activations, gradients,
  temporaries);
- ``working``: the peak above the static state (inputs, parameters, buffers, optimizer state), as measured after
  the untimed step;
- ``model``: the analytic working set. Per block i, S_i = the bytes autograd saves for its backward (counted with
  ``saved_tensors_hooks`` at two small batches and extrapolated linearly in the batch; parameters excluded; the head's
  loss included for block-wise training; for a block that ``BlockwiseFF`` trains by recomputation, what its forward
  keeps; for backprop in one graph, so a block's input, saved as its predecessor's output, counts once), O_i = its
  output's bytes, G_i = its parameters' bytes (their gradient). Block-wise: max_i (S_i + G_i + 2 O_i) (one block's
  saved activations, its gradients, and two output-sized gradients in flight). Backprop:
  max_j (sum_{i<=j} S_i + sum_{i>=j} G_i + 2 O_j) over the backward pass (the classifier's share in the last block).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ff_kernels.blockwise import BackpropBaseline, BlockwiseFF, build_blocks, recomputing_forward
from ff_kernels.heads import class_goodness_loss
from ff_kernels.memory import MIB, Probe, measure_subprocess, write_csv

METHODS = ("blockwise", "backprop")
BATCHES = (32, 64, 128, 256, 512)
DEPTH_BATCH = 128


@dataclass(frozen=True)
class BlockwiseMemoryConfig:
    """One measured configuration: ``depth`` = the network's first ``depth`` blocks (0: all of them)."""

    method: str
    model: str
    batch: int
    depth: int = 0
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    optimizer: str = "sgd"
    steps: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0


def build(cfg: BlockwiseMemoryConfig) -> BlockwiseFF | BackpropBaseline:
    blocks = build_blocks(cfg.model, in_channels=cfg.in_channels, small_input=True, seed=cfg.seed)
    trainer = BlockwiseFF if cfg.method == "blockwise" else BackpropBaseline
    options = {"backend": "torch"} if cfg.method == "blockwise" else {}  # the head loss's one compiled-free path
    return trainer(
        blocks[: cfg.depth or len(blocks)],
        cfg.num_classes,
        sample_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        optimizer=cfg.optimizer,
        lr_schedule="constant",
        autocast_dtype=None if cfg.dtype == "float32" else getattr(torch, cfg.dtype),
        seed=cfg.seed,
        device=cfg.device,
        **options,
    )


def random_batch(cfg: BlockwiseMemoryConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=generator)
    return x.to(cfg.device), y.to(cfg.device)


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def static_tensors(trainer: BlockwiseFF | BackpropBaseline) -> list[torch.Tensor]:
    optimizers = trainer.optimizers if isinstance(trainer, BlockwiseFF) else [trainer.optimizer]
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return [*trainer.parameters(), *trainer.buffers(), *state]


def measure(cfg: BlockwiseMemoryConfig) -> dict[str, Any]:
    """Run ``cfg`` in this process and measure it (see the module docstring)."""
    device = torch.device(cfg.device)
    probe = Probe(device)
    warm = build(cfg)
    x, y = random_batch(cfg, 2)
    warm.step_batch(warm.prepare(x), y)
    del warm
    base = probe.current()
    trainer = build(cfg)
    x, y = random_batch(cfg, cfg.batch)
    x = trainer.prepare(x)
    trainer.step_batch(x, y)
    after_static = probe.current()
    static_exact = _bytes(static_tensors(trainer)) + _bytes([x, y])
    probe.reset_peak()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        trainer.step_batch(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / cfg.steps
    peak = probe.peak()
    return {
        **asdict(cfg),
        "blocks": len(trainer.blocks),
        "base_bytes": base,
        "static_bytes": after_static - base,
        "static_exact_bytes": static_exact,
        "peak_bytes": peak - base,
        "working_bytes": peak - after_static,
        "hwm_reset": probe.hwm_reset,
        "step_seconds": seconds,
        "profile": block_profile(trainer, cfg),
    }


def _block_forward(trainer: BlockwiseFF | BackpropBaseline, i: int, h: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Block i's forward as a training step runs it: with its head's loss (block-wise), or with the classifier after
    the last block (backprop). Returns the output and what a recomputing block keeps for its backward outside
    autograd (``BlockwiseFF.recomputes``; else nothing)."""
    if isinstance(trainer, BlockwiseFF) and trainer.recomputes(i, h):
        out, kept = recomputing_forward(trainer.blocks[i], h)
        head = trainer.heads[i]
        class_goodness_loss(out, head.weight, head.bias, y, check_finite=False)
        return out, [h, *kept]
    with trainer.autocast():
        out = trainer.blocks[i](h)
        if isinstance(trainer, BlockwiseFF):
            head = trainer.heads[i]
            class_goodness_loss(out, head.weight, head.bias, y, check_finite=False)
        elif i == len(trainer.blocks) - 1:
            trainer.classifier(out)
    return out, []


def _saved_storages(run: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]], exclude: set[int],
                    saved: dict[int, int]) -> torch.Tensor:
    """Run ``run`` and record in ``saved`` the bytes of each storage autograd saves for the backward, and of those
    ``run`` says it keeps (once per storage, parameters' excluded); returns its output."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, kept = run()
    for t in kept:
        pack(t)
    return out


def block_profile(trainer: BlockwiseFF | BackpropBaseline, cfg: BlockwiseMemoryConfig) -> list[dict[str, float]]:
    """Per block: saved bytes per sample and fixed (S = fixed + per_sample * batch), output bytes per sample, and
    parameter bytes; the head's loss counts in its block (block-wise), the classifier in the last (backprop)."""
    exclude = {p.untyped_storage().data_ptr() for p in trainer.parameters()}
    end_to_end = isinstance(trainer, BackpropBaseline)
    small, large = 2, 4
    counts = []
    for batch in (small, large):
        x, y = random_batch(cfg, batch)
        h, per_block, saved = trainer.prepare(x), [], {}
        for i in range(len(trainer.blocks)):
            # backprop: one graph, so a block's input is the storage its predecessor saved as output (counted once)
            before = sum(saved.values()) if end_to_end else 0
            saved = saved if end_to_end else {}
            out = _saved_storages(functools.partial(_block_forward, trainer, i, h, y), exclude, saved)
            per_block.append((sum(saved.values()) - before, out.numel() * out.element_size() / batch))
            h = out if end_to_end else out.detach()
        counts.append(per_block)
    params = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in trainer.blocks]
    if isinstance(trainer, BlockwiseFF):
        params = [p + sum(q.numel() * q.element_size() for q in head.parameters())
                  for p, head in zip(params, trainer.heads)]
    else:
        params[-1] += sum(q.numel() * q.element_size() for q in trainer.classifier.parameters())
    profile = []
    for (s_small, out), (s_large, _), param_bytes in zip(counts[0], counts[1], params):
        per_sample = (s_large - s_small) / (large - small)
        profile.append({"saved_per_sample": per_sample, "saved_fixed": s_small - per_sample * small,
                        "output_per_sample": out, "param_bytes": param_bytes})
    return profile


def model_working_bytes(method: str, profile: Sequence[dict[str, float]], batch: int) -> float:
    """The analytic working set of the module docstring at ``batch``."""
    saved = [p["saved_fixed"] + p["saved_per_sample"] * batch for p in profile]
    grads = [p["param_bytes"] for p in profile]
    flight = [2 * p["output_per_sample"] * batch for p in profile]
    if method == "blockwise":
        return max(s + g + f for s, g, f in zip(saved, grads, flight))
    return max(sum(saved[: j + 1]) + sum(grads[j:]) + flight[j] for j in range(len(profile)))


def run_configs(configs: Sequence[BlockwiseMemoryConfig], jobs: int = 1,
                log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every configuration (CPU: fresh subprocesses, ``jobs`` at a time; CUDA: in this process) and add the
    model and the ratios to backprop's."""
    results: dict[BlockwiseMemoryConfig, dict[str, Any]] = {}

    def done(cfg: BlockwiseMemoryConfig, row: dict[str, Any]) -> None:
        results[cfg] = row
        if log:
            log(f"  {cfg.method} {cfg.model} depth {row['blocks']} batch {cfg.batch}: peak "
                f"{row['peak_bytes'] / MIB:.1f} MiB, {row['step_seconds']:.2f} s/step")

    cpu = [c for c in configs if not c.device.startswith("cuda")]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(measure_subprocess, c, threads, 1800, "ff_kernels.memory_blockwise"): c for c in cpu}
        for future in concurrent.futures.as_completed(futures):
            done(futures[future], future.result())
    for cfg in configs:
        if cfg.device.startswith("cuda"):
            done(cfg, measure(cfg))
            torch.cuda.empty_cache()
    rows = []
    for cfg in configs:
        row = results[cfg]
        row["model_working_bytes"] = model_working_bytes(cfg.method, row["profile"], cfg.batch)
        rows.append(row)
    key = ("model", "blocks", "batch", "image_size", "dtype", "device")
    backprop = {tuple(r[k] for k in key): r for r in rows if r["method"] == "backprop"}
    for row in rows:
        ref = backprop.get(tuple(row[k] for k in key))
        row["peak_vs_backprop"] = row["peak_bytes"] / ref["peak_bytes"] if ref else None
        row["working_vs_backprop"] = row["working_bytes"] / ref["working_bytes"] if ref else None
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (f"{'method':<10}{'blocks':>7}{'batch':>6}{'peak MiB':>10}{'working MiB':>13}{'model MiB':>11}"
              f"{'static MiB':>12}{'peak/bp':>9}{'work/bp':>9}{'s/step':>8}")
    lines = [header]
    for r in rows:
        pr, wr = r["peak_vs_backprop"], r["working_vs_backprop"]
        lines.append(
            f"{r['method']:<10}{r['blocks']:>7}{r['batch']:>6}{r['peak_bytes'] / MIB:>10.1f}"
            f"{r['working_bytes'] / MIB:>13.1f}{r['model_working_bytes'] / MIB:>11.1f}{r['static_bytes'] / MIB:>12.1f}"
            f"{'-' if pr is None else f'{pr:.3f}':>9}{'-' if wr is None else f'{wr:.3f}':>9}{r['step_seconds']:>8.2f}"
        )
    return "\n".join(lines)


LEGEND = (
    "peak: everything the step allocated above the process's baseline (inputs, parameters, optimizer state, "
    "activations, gradients, temporaries); working: the peak above inputs, parameters, buffers and optimizer state "
    "(measured); model: the analytic working set; peak/bp, work/bp: over backprop at the same blocks and batch; "
    "s/step: one training step."
)


def plot(rows: Sequence[dict[str, Any]], env: dict[str, Any], path: Path) -> str | None:
    """Peak memory against batch (all blocks) and working memory against depth; None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ff-kernels[bench]')"
    full = max(r["blocks"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (
        (axes[0], [r for r in rows if r["blocks"] == full], "batch", "peak_bytes", "batch (all blocks)"),
        (axes[1], [r for r in rows if r["batch"] == env["depth_batch"]], "blocks", "working_bytes",
         f"depth (first blocks), batch {env['depth_batch']}"),
    )
    for ax, mine, x_key, y_key, x_label in panels:
        for method in METHODS:
            points = sorted((r for r in mine if r["method"] == method), key=lambda r: r[x_key])
            if not points:
                continue
            xs = [r[x_key] for r in points]
            line = ax.plot(xs, [r[y_key] / MIB for r in points], "o-", label=method)[0]
            model = [(r["model_working_bytes"] + (r["static_bytes"] if y_key == "peak_bytes" else 0)) / MIB
                     for r in points]
            ax.plot(xs, model, ":", color=line.get_color(), label=f"{method} (model)")
        ax.set_xlabel(x_label)
        ax.set_ylabel("MiB")
        ax.set_title("peak (all tensors)" if y_key == "peak_bytes" else "peak above parameters, optimizer state, "
                     "inputs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if any(r["blocks"] == full for r in panels[0][1]):
        axes[0].set_xscale("log", base=2)
    r0 = rows[0]
    fig.suptitle(f"block-wise vs backprop training memory, {r0['model']} {r0['image_size']}x{r0['image_size']}, "
                 f"{r0['optimizer']}, {r0['dtype']}, {env['device_name']} ({r0['device']}), torch {env['torch']}, "
                 f"{env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def configs_from_args(args: argparse.Namespace, blocks: int) -> list[BlockwiseMemoryConfig]:
    """The batch sweep over all blocks, and the depth sweep at ``DEPTH_BATCH`` (or ``--batch``)."""
    batches = [args.batch] if args.batch else (args.batches or ([32, 128, 512] if args.quick else list(BATCHES)))
    depths = args.depths or sorted({1, *range(1 + (blocks - 1) % 2, blocks + 1, 2)})
    depth_batch = args.batch or DEPTH_BATCH
    common = dict(model=args.model, image_size=args.image_size, steps=args.steps, dtype=args.dtype,
                  device=args.device)
    shapes = {(b, blocks) for b in batches} | {(depth_batch, min(d, blocks)) for d in depths}
    return [BlockwiseMemoryConfig(method=m, batch=b, depth=d, **common) for b, d in sorted(shapes) for m in METHODS]


def count_blocks(model: str) -> int:
    return len(build_blocks(model, small_input=True))


def run(args: argparse.Namespace) -> int:
    """``ff-kernels memory --model ...`` (called by ``ff_kernels.memory.run``)."""
    from ff_kernels.bench import device_slug, environment, report_written

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    if args.dtype == "float16":
        raise ValueError("--model trains under autocast: --dtype float32 or bfloat16")
    if args.image_size < 4 or args.steps <= 0 or (args.batch is not None and args.batch < 2):
        raise ValueError("--image-size must be at least 4, --steps positive, --batch at least 2")
    blocks = count_blocks(args.model)
    if args.depths and max(args.depths) > blocks:
        raise ValueError(f"--depths: {args.model} has {blocks} blocks; got {max(args.depths)}")
    configs = configs_from_args(args, blocks)
    depth_batch = args.batch or DEPTH_BATCH
    out = Path(args.out or Path("benchmarks") / "results" / device_slug(device))
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, quick=args.quick, jobs=args.jobs, depth_batch=depth_batch,
                      measurement="max_memory_allocated" if device.type == "cuda"
                      else "VmHWM of a fresh subprocess per configuration")
    print(f"ff-kernels memory on {env['device_name']} ({device.type}), torch {env['torch']}: {args.model} "
          f"({blocks} blocks), {args.image_size}x{args.image_size} inputs, {len(configs)} configurations, "
          f"SGD with momentum, {args.steps} steps each", flush=True)
    start = time.perf_counter()
    rows = run_configs(configs, args.jobs, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    env["wall_s"] = round(time.perf_counter() - start, 1)
    print(format_table(rows))
    print(f"\n{LEGEND}")
    for r in rows:
        if r["method"] == "blockwise" and r["blocks"] == blocks and r["peak_vs_backprop"] is not None:
            print(f"batch {r['batch']}: block-wise peak is {r['peak_vs_backprop']:.3f} of backprop's "
                  f"({r['peak_bytes'] / MIB:.0f} MiB against {r['peak_bytes'] / r['peak_vs_backprop'] / MIB:.0f} MiB)")
    if not all(r["hwm_reset"] for r in rows):
        print("note: /proc/self/clear_refs was not writable; CPU peaks include the set-up's own peak")
    write_csv([{k: v for k, v in r.items() if k != "profile"} for r in rows], out / "memory_blockwise.csv")
    (out / "memory_blockwise.json").write_text(
        json.dumps({"environment": env, "legend": LEGEND, "rows": rows}, indent=2) + "\n"
    )
    skipped = plot(rows, env, out / "memory_blockwise.png")
    report_written(out, ["memory_blockwise.csv", "memory_blockwise.json"], "memory_blockwise.png", skipped,
                   env["wall_s"])
    return 0


def _worker(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="measure one configuration (used by ff-kernels memory --model)")
    parser.add_argument("--worker", required=True, help="a BlockwiseMemoryConfig as JSON")
    cfg = BlockwiseMemoryConfig(**json.loads(parser.parse_args(argv).worker))
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    print(json.dumps(measure(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
