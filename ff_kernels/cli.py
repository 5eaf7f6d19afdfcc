"""The ``ff-kernels`` command line (also ``python -m ff_kernels``)."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence

import torch

from ff_kernels import bench, memory
from ff_kernels.bench import positive_int_list

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on the CPU (includes torch itself)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--data-dir", default=None, help="folder with the four MNIST IDX files (plain or .gz)")
    parser.add_argument("--dims", type=positive_int_list, default=[500, 500], help="hidden widths, e.g. 500,500")
    parser.add_argument("--epochs", type=int, default=1000, help="epochs per layer (greedy) or in all (simultaneous)")
    parser.add_argument("--batch-size", type=int, default=0, help="0 for full batch (mohammadpz)")
    parser.add_argument("--schedule", default="greedy", choices=("greedy", "simultaneous"))
    parser.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"))
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--threshold", type=float, default=2.0)
    parser.add_argument("--goodness", default="mean", choices=("mean", "sum"))
    parser.add_argument("--loss", default="logistic", choices=("logistic", "symba"))
    parser.add_argument("--alpha", type=float, default=4.0, help="SymBa's scale")
    parser.add_argument("--collab", default="none", choices=("none", "all", "previous"),
                        help="Layer Collaboration: offset each layer's goodness by the other layers' (detached)")
    parser.add_argument("--normalize", default="l2", choices=("l2", "rms", "none"))
    parser.add_argument("--overlay", default="auto", choices=("auto", "replace", "append"),
                        help="auto: append the label for inputs under 100 features, else replace the first pixels")
    parser.add_argument("--negatives", default="wrong", choices=("wrong", "shuffle"))
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "torch", "triton", "cuda"))
    parser.add_argument("--compute-dtype", default=None, choices=tuple(DTYPES), help="dtype of the GEMMs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-reference", action="store_true",
                        help="also train with backend=reference and print the speed-up and accuracy difference")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def train_once(args: argparse.Namespace, dataset, backend: str) -> dict[str, float]:
    """Train one FFNet as the arguments say; returns accuracies, wall time and peak memory."""
    from ff_kernels.net import FFNet

    device = torch.device(args.device)
    overlay = args.overlay
    if overlay == "auto":
        overlay = "append" if dataset.num_features < 100 else "replace"
    net = FFNet(
        [dataset.num_features, *args.dims],
        num_classes=dataset.num_classes,
        overlay=overlay,
        negatives=args.negatives,
        threshold=args.threshold,
        goodness=args.goodness,
        loss=args.loss,
        alpha=args.alpha,
        collab=None if args.collab == "none" else args.collab,
        normalize=args.normalize,
        optimizer=args.optimizer,
        lr=args.lr,
        backend=backend,
        compute_dtype=DTYPES[args.compute_dtype] if args.compute_dtype else None,
        seed=args.seed,
        device=device,
    )
    x_train, y_train = dataset.x_train.to(device), dataset.y_train.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    net.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size or None,
        schedule=args.schedule,
        progress=not args.no_progress,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "train_acc": net.accuracy(x_train, y_train),
        "test_acc": net.accuracy(dataset.x_test.to(device), dataset.y_test.to(device)),
        "seconds": seconds,
        "peak_mib": peak_memory_mib(device),
    }


def run_train(args: argparse.Namespace) -> int:
    from ff_kernels.data import load_dataset

    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    print(
        f"{dataset.name}: {dataset.x_train.shape[0]} train / {dataset.x_test.shape[0]} test samples, "
        f"{dataset.num_features} features; dims {[dataset.num_features, *args.dims]}, {args.schedule}, "
        f"{args.epochs} epochs, batch {args.batch_size or 'full'}, loss {args.loss}, collab {args.collab}, "
        f"backend {args.backend}, device {args.device}"
    )
    result = train_once(args, dataset, args.backend)
    memory_kind = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak resident memory"
    print(
        f"train accuracy {result['train_acc']:.2%} (error {1 - result['train_acc']:.2%}), "
        f"test accuracy {result['test_acc']:.2%} (error {1 - result['test_acc']:.2%})"
    )
    print(f"wall time {result['seconds']:.1f} s, {memory_kind} {result['peak_mib']:.0f} MiB")
    if args.compare_reference:
        reference = train_once(args, dataset, "reference")
        print(
            f"reference backend: test accuracy {reference['test_acc']:.2%}, wall time {reference['seconds']:.1f} s; "
            f"speed-up {reference['seconds'] / result['seconds']:.2f}x, "
            f"test accuracy difference {100 * (result['test_acc'] - reference['test_acc']):+.2f} points"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ff-kernels", description="Fused kernels for Forward-Forward training")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train an FFNet (scikit-learn digits by default) and report accuracy")
    add_train_arguments(train)
    train.set_defaults(run=run_train)
    bench.add_parser(commands)
    memory.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError, ImportError) as err:
        print(f"ff-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2
