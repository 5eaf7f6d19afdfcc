"""A mohammadpz-style FF training loop against the same loop ported to ``ff_kernels``, side by side in one run.

The eager loop is written the way mohammadpz/pytorch_forward_forward writes it (our own code in that style,
``ff_kernels.bench.EagerFFLayer``): an ``nn.Linear`` subclass that normalises its input, two forward passes,
``log(1 + exp(.))`` loss, ``loss.backward()`` and ``torch.optim.Adam``, full-batch steps, greedy layer by layer.
The port replaces the layer with ``ff_kernels.FFLinear`` (every option at its default: the backend ``auto`` picks,
the finiteness check on) and the step with ``train_step`` (the README shows the diff); a third loop adds
``compute_dtype=torch.bfloat16`` (bf16 GEMMs, fp32 weights). All three start from the same weights and see the same
positives and negatives.

Two parts, one run:

- errors: scikit-learn's digits with the label appended (74-500-500), ``--steps`` steps per layer, train and test
  error by mohammadpz's prediction (summed goodness over a label sweep), and the time;
- speed at MNIST's layer shapes: 784-500-500 on ``--mnist-rows`` synthetic 28 x 28 inputs (a fifth of the pixels lit,
  the label overlaid on the first ten pixels at the batch maximum as mohammadpz does, negatives with a wrong label),
  ``--mnist-steps`` steps per layer.

Each part runs every loop ``--repeats`` times (the errors part ``--digits-repeats`` times, if given: its errors do
not change from one run to the next), interleaved, and reports the median time.

    python benchmarks/port_mohammadpz.py --json benchmarks/results/cpu/port_mohammadpz.json
    python benchmarks/port_mohammadpz.py --quick    # 100 digits steps and 10 MNIST-shape steps per layer, once
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import ff_kernels as ffk
from ff_kernels.backends import cpu_info, resolve_backend
from ff_kernels.bench import EagerFFLayer

Inits = list[tuple[torch.Tensor, torch.Tensor]]
VARIANTS = {"eager (mohammadpz)": None, "ff_kernels fp32": torch.float32, "ff_kernels bf16 compute": torch.bfloat16}


def overlay(x: torch.Tensor, labels: torch.Tensor | int, num_classes: int, value: float) -> torch.Tensor:
    """Append a one-hot label block scaled to ``value`` (digits' 64 inputs are too few to overwrite 10)."""
    one_hot = torch.zeros(x.shape[0], num_classes)
    one_hot[torch.arange(x.shape[0]), labels] = value
    return torch.cat([x, one_hot], dim=1)


def overlay_replace(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mohammadpz's overlay: the first ``num_classes`` pixels become a one-hot label at the batch maximum."""
    out = x.clone()
    out[:, :num_classes] = 0.0
    out[torch.arange(x.shape[0]), labels] = x.max()
    return out


def error_rate(layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor, num_classes: int, value: float) -> float:
    """mohammadpz's predict: the label whose overlay gives the largest goodness summed over all layers."""
    with torch.no_grad():
        scores = []
        for label in range(num_classes):
            h = overlay(x, label, num_classes, value)
            total = torch.zeros(x.shape[0])
            for layer in layers:
                h = layer(h)
                total += h.float().pow(2).mean(1)
            scores.append(total)
        return float((torch.stack(scores, 1).argmax(1) != y).float().mean())


def train_eager(inits: Inits, x_pos: torch.Tensor, x_neg: torch.Tensor, steps: int) -> list[nn.Module]:
    layers = []
    for weight, bias in inits:
        layer = EagerFFLayer(weight.shape[1], weight.shape[0], threshold=2.0, lr=0.03)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        for _ in range(steps):
            layer.step(x_pos, x_neg)
        with torch.no_grad():
            x_pos, x_neg = layer(x_pos), layer(x_neg)
        layers.append(layer)
    return layers


def train_ported(inits: Inits, x_pos: torch.Tensor, x_neg: torch.Tensor, steps: int,
                 compute_dtype: torch.dtype | None) -> list[nn.Module]:
    layers = []
    for weight, bias in inits:
        layer = ffk.FFLinear(weight.shape[1], weight.shape[0], threshold=2.0, compute_dtype=compute_dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        opt = ffk.optim.Adam(layer.parameters(), lr=0.03)
        for _ in range(steps):
            layer.train_step(x_pos, x_neg, opt)
        x_pos, x_neg = layer(x_pos), layer(x_neg)
        layers.append(layer)
    return layers


def loops(inits: Inits, x_pos: torch.Tensor, x_neg: torch.Tensor, steps: int) -> dict[str, Callable[[], list]]:
    return {
        name: (lambda: train_eager(inits, x_pos, x_neg, steps)) if compute is None
        else (lambda compute=compute: train_ported(inits, x_pos, x_neg, steps, compute))
        for name, compute in VARIANTS.items()
    }


def initial_layers(dims: list[int], seed: int) -> Inits:
    torch.manual_seed(seed)
    return [(lin.weight.detach().clone(), lin.bias.detach().clone())
            for lin in (nn.Linear(a, b) for a, b in zip(dims, dims[1:]))]


def run_interleaved(variants: dict[str, Callable[[], list]], repeats: int,
                    after: Callable[[str, list], None] | None = None) -> dict[str, list[float]]:
    """Seconds per variant, ``repeats`` rounds with every variant once per round; ``after`` sees each result."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            layers = run()
            times[name].append(time.perf_counter() - start)
            if after is not None:
                after(name, layers)
    return times


def digits_part(args: argparse.Namespace) -> dict:
    data = ffk.data.load_digits(seed=args.seed)
    num_classes, value = data.num_classes, float(data.x_train.max())
    generator = torch.Generator().manual_seed(args.seed)
    wrong = (data.y_train + torch.randint(1, num_classes, data.y_train.shape, generator=generator)) % num_classes
    x_pos = overlay(data.x_train, data.y_train, num_classes, value)
    x_neg = overlay(data.x_train, wrong, num_classes, value)
    dims = [x_pos.shape[1], 500, 500]
    errors: dict[str, tuple[float, float]] = {}

    def record(name: str, layers: list) -> None:
        errors[name] = (error_rate(layers, data.x_train, data.y_train, num_classes, value),
                        error_rate(layers, data.x_test, data.y_test, num_classes, value))

    times = run_interleaved(loops(initial_layers(dims, args.seed), x_pos, x_neg, args.steps), args.digits_repeats,
                            record)
    rows = rows_of(times, errors)
    return dict(data="digits (label appended)", dims=dims, rows_pos=x_pos.shape[0], steps=args.steps,
                repeats=args.digits_repeats, rows=rows)


def mnist_shapes_part(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    rows, num_classes = args.mnist_rows, 10
    pixels = torch.rand(rows, 784, generator=gen) * (torch.rand(rows, 784, generator=gen) < 0.2)
    labels = torch.randint(0, num_classes, (rows,), generator=gen)
    wrong = (labels + torch.randint(1, num_classes, (rows,), generator=gen)) % num_classes
    x_pos, x_neg = overlay_replace(pixels, labels, num_classes), overlay_replace(pixels, wrong, num_classes)
    dims = [784, 500, 500]
    times = run_interleaved(loops(initial_layers(dims, args.seed), x_pos, x_neg, args.mnist_steps), args.repeats)
    return dict(data="synthetic MNIST-like", dims=dims, rows_pos=rows, steps=args.mnist_steps, repeats=args.repeats,
                rows=rows_of(times))


def rows_of(times: dict[str, list[float]], errors: dict[str, tuple[float, float]] | None = None) -> list[dict]:
    base = statistics.median(times["eager (mohammadpz)"])
    out = []
    for name, samples in times.items():
        seconds = statistics.median(samples)
        row = dict(variant=name, seconds=seconds, all_seconds=samples, speedup=base / seconds)
        if errors is not None:
            row.update(train_error=errors[name][0], test_error=errors[name][1])
        out.append(row)
    return out


def print_part(title: str, part: dict) -> None:
    print(f"\n{title}: {part['data']}, dims {part['dims']}, P = Q = {part['rows_pos']}, {part['steps']} full-batch "
          f"Adam steps per layer, median of {part['repeats']}")
    errors = "train_error" in part["rows"][0]
    print(f"{'variant':<26}{'seconds':>9}{'speed-up':>10}{'min-max s':>16}" + (f"{'train err':>11}{'test err':>10}"
                                                                             if errors else ""))
    for row in part["rows"]:
        spread = f"{min(row['all_seconds']):.2f}-{max(row['all_seconds']):.2f}"
        line = f"{row['variant']:<26}{row['seconds']:>9.2f}{row['speedup']:>9.2f}x{spread:>16}"
        if errors:
            line += f"{row['train_error']:>11.2%}{row['test_error']:>10.2%}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="steps per layer on digits (errors)")
    parser.add_argument("--mnist-rows", type=int, default=4000, help="synthetic inputs at MNIST's shapes (P = Q)")
    parser.add_argument("--mnist-steps", type=int, default=100, help="steps per layer at MNIST's shapes (speed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digits-repeats", type=int, default=None, help="repeats of the errors part (default: same)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="100 digits steps and 10 MNIST-shape steps, one repeat")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.mnist_steps, args.repeats = 100, 10, 1
    if args.digits_repeats is None or args.quick:
        args.digits_repeats = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    env = dict(**cpu_info(), threads=torch.get_num_threads(), torch=torch.__version__,
               backend=resolve_backend("auto", torch.device("cpu")), load_avg_1m_start=load_start,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print(f"{env['cpu_model']} ({env['cpu_capability']}, bf16 matmul in hardware: {env['cpu_bf16_matmul']}), "
          f"{env['threads']} threads, torch {env['torch']}, ff_kernels backend auto = {env['backend']!r}")
    digits = digits_part(args)
    print_part("errors", digits)
    mnist = mnist_shapes_part(args)
    print_part("speed at MNIST's layer shapes", mnist)
    env["load_avg_1m_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, digits=digits, mnist_shapes=mnist), f, indent=2)


if __name__ == "__main__":
    main()
