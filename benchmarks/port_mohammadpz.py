"""A mohammadpz-style FF training loop against the same loop ported to ``ff_kernels``, side by side in one run.

The eager loop is written the way mohammadpz/pytorch_forward_forward writes it (our own code in that style,
``ff_kernels.bench.EagerFFLayer``): an ``nn.Linear`` subclass that normalises its input, two forward passes,
``log(1 + exp(.))`` loss, ``loss.backward()`` and ``torch.optim.Adam``, 1000 full-batch steps per layer, greedy
layer by layer. The port
replaces the layer with ``ff_kernels.FFLinear`` and the step with ``train_step`` (the README shows the diff).
Both start from the same weights and see the same positives and negatives, so their errors are comparable;
each variant runs ``--repeats`` times interleaved with the others and the median time is reported.

    python benchmarks/port_mohammadpz.py            # digits, 784-style 500-500 net, 1000 steps per layer
    python benchmarks/port_mohammadpz.py --quick    # 100 steps per layer, one repeat
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import ff_kernels as ffk
from ff_kernels.bench import EagerFFLayer


def overlay(x: torch.Tensor, labels: torch.Tensor | int, num_classes: int, value: float) -> torch.Tensor:
    """Append a one-hot label block scaled to ``value`` (digits' 64 inputs are too few to overwrite 10)."""
    one_hot = torch.zeros(x.shape[0], num_classes)
    one_hot[torch.arange(x.shape[0]), labels] = value
    return torch.cat([x, one_hot], dim=1)


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


def train_eager(inits, x_pos, x_neg, args) -> list[nn.Module]:
    layers = []
    for weight, bias in inits:
        layer = EagerFFLayer(weight.shape[1], weight.shape[0], threshold=2.0, lr=0.03)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        for _ in range(args.steps):
            layer.step(x_pos, x_neg)
        with torch.no_grad():
            x_pos, x_neg = layer(x_pos), layer(x_neg)
        layers.append(layer)
    return layers


def train_ported(inits, x_pos, x_neg, args, compute_dtype: torch.dtype | None) -> list[nn.Module]:
    layers = []
    for weight, bias in inits:
        layer = ffk.FFLinear(weight.shape[1], weight.shape[0], threshold=2.0, compute_dtype=compute_dtype,
                             backend="torch", check_finite=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        opt = ffk.optim.Adam(layer.parameters(), lr=0.03)
        for _ in range(args.steps):
            layer.train_step(x_pos, x_neg, opt)
        x_pos, x_neg = layer(x_pos), layer(x_neg)
        layers.append(layer)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="500,500")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="100 steps per layer, one repeat")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 100, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    data = ffk.data.load_digits(seed=args.seed)
    num_classes, value = data.num_classes, float(data.x_train.max())
    generator = torch.Generator().manual_seed(args.seed)
    wrong = (data.y_train + torch.randint(1, num_classes, data.y_train.shape, generator=generator)) % num_classes
    x_pos = overlay(data.x_train, data.y_train, num_classes, value)
    x_neg = overlay(data.x_train, wrong, num_classes, value)
    dims = [x_pos.shape[1], *[int(d) for d in args.dims.split(",")]]
    torch.manual_seed(args.seed)
    inits = [(lin.weight.detach().clone(), lin.bias.detach().clone())
             for lin in (nn.Linear(a, b) for a, b in zip(dims, dims[1:]))]

    variants = {
        "eager (mohammadpz)": lambda: train_eager(inits, x_pos, x_neg, args),
        "ff_kernels fp32": lambda: train_ported(inits, x_pos, x_neg, args, None),
        "ff_kernels bf16 compute": lambda: train_ported(inits, x_pos, x_neg, args, torch.bfloat16),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    errors: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            layers = run()
            times[name].append(time.perf_counter() - start)
            errors[name] = (
                error_rate(layers, data.x_train, data.y_train, num_classes, value),
                error_rate(layers, data.x_test, data.y_test, num_classes, value),
            )

    base = statistics.median(times["eager (mohammadpz)"])
    print(f"digits, dims {dims}, {args.steps} full-batch Adam steps per layer, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print(f"{'variant':<26}{'seconds':>9}{'speed-up':>10}{'train err':>11}{'test err':>10}")
    rows = []
    for name in variants:
        seconds = statistics.median(times[name])
        train_err, test_err = errors[name]
        print(f"{name:<26}{seconds:>9.2f}{base / seconds:>9.2f}x{train_err:>11.2%}{test_err:>10.2%}")
        rows.append(dict(variant=name, seconds=seconds, all_seconds=times[name], speedup=base / seconds,
                         train_error=train_err, test_error=test_err))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(dims=dims, steps=args.steps, torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
