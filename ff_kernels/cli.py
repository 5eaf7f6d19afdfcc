"""The ``ff-kernels`` command line (also ``python -m ff_kernels``)."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ff_kernels import bench, blockwise_cli, conv_cli, inspect, memory
from ff_kernels.bench import positive_int_list
from ff_kernels.distributed import cli as distributed_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Defaults of the options FFNet and FFConvNet share.
FF_DEFAULTS = {"threshold": 2.0, "goodness": "mean", "alpha": 4.0, "negatives": "wrong"}
# Train options whose default depends on --model (None in the parser, so that an option given can be told from one
# left out): FFNet's is mohammadpz's recipe.
MODEL_DEFAULTS = {
    "mlp": {**FF_DEFAULTS, **distributed_cli.DEFAULTS, "dims": [500, 500], "epochs": 1000, "batch_size": 0,
            "optimizer": "adam", "lr": 0.03, "schedule": "greedy", "loss": "logistic", "normalize": "l2",
            "collab": "none", "overlay": "auto"},
    "conv": {**FF_DEFAULTS, **distributed_cli.DEFAULTS, **blockwise_cli.SHARED_DEFAULTS, **conv_cli.DEFAULTS},
    **{model: blockwise_cli.DEFAULTS for model in blockwise_cli.MODELS},
}
FF_MODELS = ("mlp", "conv")
# Where the options that only some models, losses or modes have apply: in words for the error, and as a test of the
# arguments with their defaults filled in. An option given anywhere else is an error naming it.
APPLIES = {
    name: (where, test)
    for where, test, names in (
        ("--model mlp", lambda a: a.model == "mlp", ("dims", "overlay", "collab")),
        ("--model mlp or conv", lambda a: a.model in FF_MODELS,
         ("goodness", "loss", "normalize", "compute_dtype", "compare_reference", "distributed")),
        ("--model mlp or conv with --loss logistic or symba", lambda a: a.model in FF_MODELS and a.loss != "class",
         ("threshold", "negatives")),
        ("--loss symba", lambda a: a.loss == "symba", ("alpha",)),
        ("--model conv", lambda a: a.model == "conv", ("channels", "kernel_size", "no_pool", "predict_skip_first")),
        (f"--model conv or {', '.join(blockwise_cli.MODELS)}", lambda a: a.model != "mlp", ("lr_schedule",)),
        (f"the class-goodness loss (--model conv with --loss class, or {', '.join(blockwise_cli.MODELS)})",
         lambda a: a.loss == "class", ("temperature",)),
        (f"block-wise training (--model {', '.join(blockwise_cli.MODELS)})", lambda a: a.model in blockwise_cli.MODELS,
         ("image_size", "warmup_epochs", "layer_norm", "predict", "bf16", "augment", "full_size_stem", "baseline")),
        ("--distributed", lambda a: a.distributed is not None, ("timeout",)),
        ("--distributed pipeline", lambda a: a.distributed == "pipeline", ("micro_batches",)),
        ("--dataset mnist or cifar10", lambda a: a.dataset != "digits", ("data_dir",)),
    )
    for name in names
}


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on the CPU (includes torch itself)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mlp", choices=tuple(MODEL_DEFAULTS),
                        help="mlp: an FFNet (default); conv: an FFConvNet (class goodness, CwComp); small_cnn, "
                             "resnet18, mobilenet_v3_small: block-wise training (BlockwiseFF; resnet18 and "
                             "mobilenet_v3_small need torchvision)")
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist", "cifar10"))
    parser.add_argument("--data-dir", default=None,
                        help="folder with the four MNIST IDX files (plain or .gz), or with cifar-10-python.tar.gz or "
                             "its extracted cifar-10-batches-py/")
    parser.add_argument("--dims", type=positive_int_list, default=None, help="hidden widths (default 500,500)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per layer (greedy) or in all (simultaneous); default 1000 (mlp), 20 (conv), "
                             "10 (block-wise)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default full batch (mlp, as mohammadpz), 32 (conv), 128 (block-wise); 0 for full batch "
                             "(mlp, conv)")
    parser.add_argument("--schedule", default=None, choices=("greedy", "simultaneous"),
                        help="default greedy (mlp), simultaneous (conv, block-wise)")
    parser.add_argument("--optimizer", default=None, choices=("adam", "adamw", "sgd"),
                        help="default adam (mlp, conv), sgd with momentum 0.9 (block-wise)")
    parser.add_argument("--lr", type=float, default=None,
                        help="default 0.03 (mlp), 1e-3 (conv); block-wise: 0.05 (sgd), 1e-3 (adam, adamw)")
    parser.add_argument("--threshold", type=float, default=None, help="goodness threshold (default 2)")
    parser.add_argument("--goodness", default=None, choices=("mean", "sum"), help="default mean")
    parser.add_argument("--loss", default=None, choices=("logistic", "symba", "class"),
                        help="default logistic (mlp), class (conv: class goodness, no negatives)")
    parser.add_argument("--alpha", type=float, default=None, help="SymBa's scale (default 4)")
    parser.add_argument("--collab", default=None, choices=("none", "all", "previous"),
                        help="Layer Collaboration: offset each layer's goodness by the other layers' (detached); "
                             "default none")
    parser.add_argument("--normalize", default=None, choices=("l2", "rms", "none"),
                        help="each layer's input scale; default l2 (mlp), rms (conv)")
    parser.add_argument("--overlay", default=None, choices=("auto", "replace", "append"),
                        help="auto (default): append the label for inputs under 100 features, else replace the first "
                             "pixels")
    parser.add_argument("--negatives", default=None, choices=("wrong", "shuffle"), help="default wrong")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "torch", "triton", "cuda"))
    parser.add_argument("--compute-dtype", default=None, choices=tuple(DTYPES), help="dtype of the GEMMs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-reference", action="store_true",
                        help="also train with backend=reference and print the speed-up and accuracy difference")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    distributed_cli.add_arguments(parser)  # --distributed data|pipeline, --micro-batches, --timeout
    blockwise_cli.add_arguments(parser)  # --image-size, --lr-schedule, --baseline, ...
    conv_cli.add_arguments(parser)  # --channels, --kernel-size, --no-pool, --predict-skip-first


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Fill the train options left unset with --model's defaults (idempotent)."""
    for name, value in MODEL_DEFAULTS[getattr(args, "model", "mlp")].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def resolve_train_arguments(args: argparse.Namespace) -> None:
    """Fill in --model's defaults and reject, before anything is printed, options that do not apply to the run (see
    APPLIES) and values the run cannot use, with messages that name the flag. Once, on freshly parsed arguments: an
    option left out is told from one given by its None."""
    given = [name for name, value in vars(args).items() if name in APPLIES and value is not None and value is not False]
    apply_model_defaults(args)
    for name in given:
        where, applies = APPLIES[name]
        if not applies(args):
            raise ValueError(f"--{name.replace('_', '-')} applies to {where} only")
    if args.model == "mlp" and args.loss == "class":
        raise ValueError("--loss class applies to --model conv only; --model mlp has logistic and symba")
    if args.epochs <= 0:
        raise ValueError(f"--epochs must be positive; got {args.epochs}")
    if args.batch_size < 0 or (args.batch_size == 0 and args.model not in FF_MODELS):
        full = " (0, full batch, is for --model mlp and conv)" if args.model not in FF_MODELS else " or 0 (full batch)"
        raise ValueError(f"--batch-size must be positive{full}; got {args.batch_size}")
    if args.dataset != "digits":
        if args.data_dir is None:
            raise ValueError(f"--dataset {args.dataset} needs --data-dir, the folder that holds its files")
        if not Path(args.data_dir).is_dir():
            state = "is not a folder" if Path(args.data_dir).exists() else "does not exist"
            raise ValueError(f"--data-dir {args.data_dir} {state}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    if args.model == "conv":
        conv_cli.check_arguments(args)
    elif args.model in blockwise_cli.MODELS:
        blockwise_cli.check_arguments(args)
    distributed_cli.check_arguments(args)


def build_net(args: argparse.Namespace, dataset, backend: str, device: torch.device):
    """The FFNet the train arguments describe (also built on every rank by ``--distributed``)."""
    from ff_kernels.net import FFNet

    if args.model == "conv":
        return conv_cli.build_net(args, dataset, backend, device, DTYPES.get(args.compute_dtype))
    overlay = args.overlay
    if overlay == "auto":
        overlay = "append" if dataset.num_features < 100 else "replace"
    return FFNet(
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


def describe_run(args: argparse.Namespace, dataset, device: torch.device) -> str:
    """A run's first line, for FFNet and FFConvNet in one process or on every rank: the data, the network, the
    schedule and the options (a distributed run adds its ranks)."""
    layers = (conv_cli.describe(args, dataset) if args.model == "conv"
              else f"{dataset.num_features} features; dims {[dataset.num_features, *args.dims]}")
    collab = f"collab {args.collab}, " if args.model == "mlp" else ""
    return (
        f"{dataset.name}: {dataset.x_train.shape[0]} train / {dataset.x_test.shape[0]} test samples, {layers}, "
        f"{args.schedule}, {args.epochs} epochs, batch {args.batch_size or 'full'}, loss {args.loss}, {collab}"
        f"backend {args.backend}, device {device}"
    )


def train_once(args: argparse.Namespace, dataset, net) -> dict[str, float]:
    """Train a net from ``build_net`` as the (resolved) arguments say; returns accuracies, wall time and peak
    memory."""
    device = torch.device(args.device)
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

    resolve_train_arguments(args)
    if args.model in blockwise_cli.MODELS:
        return blockwise_cli.run_train(args)
    if args.distributed:
        return distributed_cli.run_train(args)

    dataset = load_dataset(args.dataset, data_dir=args.data_dir, images=args.model == "conv")
    device = torch.device(args.device)
    net = build_net(args, dataset, args.backend, device)  # before the first line, so its errors come first
    print(describe_run(args, dataset, device))
    result = train_once(args, dataset, net)
    memory_kind = "peak CUDA memory allocated" if device.type == "cuda" else "peak resident memory"
    print(
        f"train accuracy {result['train_acc']:.2%} (error {1 - result['train_acc']:.2%}), "
        f"test accuracy {result['test_acc']:.2%} (error {1 - result['test_acc']:.2%})"
    )
    print(f"wall time {result['seconds']:.1f} s, {memory_kind} {result['peak_mib']:.0f} MiB")
    if args.compare_reference:
        reference = train_once(args, dataset, build_net(args, dataset, "reference", device))
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
    inspect.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError, ImportError) as err:  # OSError: an output path it cannot write
        print(f"ff-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ff-kernels {args.command}: interrupted", file=sys.stderr)
        return 130
