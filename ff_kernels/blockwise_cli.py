"""``ff-kernels train --model small_cnn|resnet18|mobilenet_v3_small``: block-wise training (``BlockwiseFF``) of a conv
net on digits, MNIST or CIFAR-10, and with ``--baseline`` the same network trained end to end by backprop at the same
epochs, for the accuracy comparison."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ff_kernels import dispatch
from ff_kernels.blockwise import LR_SCHEDULES, MODELS, PREDICT, BackpropBaseline, BlockwiseFF, build_blocks, crop_flip

# Defaults of the options block-wise training shares with --model conv (the parser leaves them None).
SHARED_DEFAULTS = {"temperature": 1.0, "lr_schedule": "cosine"}
# The train command's defaults for these models (its parser leaves them None; FFNet has its own). The loss is always
# the class-goodness one; it is filled in so that the options tied to it apply.
DEFAULTS = {"epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": None, "schedule": "simultaneous",
            "loss": "class", "warmup_epochs": 0.0, "predict": "mean", **SHARED_DEFAULTS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's block-wise options."""
    group = parser.add_argument_group(f"block-wise training (--model {', '.join(MODELS)})")
    group.add_argument("--image-size", type=int, default=None,
                       help="resize the images (bilinear) to this height and width, e.g. 32 to run digits through "
                            "a CIFAR-sized network")
    group.add_argument("--temperature", type=float, default=None, help="tau of the class-goodness loss (default 1)")
    group.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES, help="default cosine")
    group.add_argument("--warmup-epochs", type=float, default=None, help="linear learning-rate warm-up (default 0)")
    group.add_argument("--layer-norm", action="store_true", help="layer-normalise each block's detached output")
    group.add_argument("--predict", default=None, choices=PREDICT,
                       help="mean of softmax(g / tau) over the blocks (default), or the last block's")
    group.add_argument("--bf16", action="store_true", help="forward passes under bf16 autocast")
    group.add_argument("--augment", action="store_true", help="random crops (padding 4) and horizontal flips")
    group.add_argument("--full-size-stem", action="store_true",
                       help="keep torchvision's 7x7 stride-2 stem and max-pool (for 224-pixel images)")
    group.add_argument("--baseline", action="store_true",
                       help="also train the same network end to end by backprop (a linear classifier on the last "
                            "block) and print both")


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def check_arguments(args: argparse.Namespace) -> None:
    """The block-wise options' values that the parser cannot check alone (the train command checks which options
    apply)."""
    if args.backend != "auto":
        dispatch.spec("class_goodness_loss", args.backend)
    if args.image_size is not None and args.image_size < 4:
        raise ValueError(f"--image-size must be at least 4; got {args.image_size}")


def run_train(args: argparse.Namespace) -> int:
    """Train with the arguments that ``resolve_train_arguments`` filled in and checked."""
    from ff_kernels.cli import peak_memory_mib
    from ff_kernels.data import load_dataset

    dataset = load_dataset(args.dataset, data_dir=args.data_dir, images=True)
    x_train, x_test = _resize(dataset.x_train, args.image_size), _resize(dataset.x_test, args.image_size)
    device = torch.device(args.device)
    sample_shape = tuple(x_train.shape[1:])
    common = dict(
        sample_shape=sample_shape,
        optimizer=args.optimizer,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        warmup_epochs=args.warmup_epochs,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        seed=args.seed,
        device=device,
    )
    def blocks() -> list:
        return build_blocks(args.model, in_channels=sample_shape[0], small_input=not args.full_size_stem,
                            seed=args.seed)

    trainers = {
        "block-wise": lambda: BlockwiseFF(
            blocks(), dataset.num_classes, temperature=args.temperature, normalize=args.layer_norm,
            predict=args.predict, backend=args.backend, **common
        ),
    }
    if args.baseline:
        trainers["backprop"] = lambda: BackpropBaseline(blocks(), dataset.num_classes, **common)
    # Built before the first line, so that its errors (its options include the baseline's) come first; the baseline is
    # built once this one has trained, so that each peak memory is its method's own.
    first = trainers["block-wise"]()
    print(
        f"{dataset.name}: {x_train.shape[0]} train / {x_test.shape[0]} test images {'x'.join(map(str, sample_shape))}; "
        f"{args.model}, {args.schedule}, {args.epochs} epochs, batch {args.batch_size}, {args.optimizer} "
        f"(lr {args.lr or 'default'}, {args.lr_schedule}), {'bf16 autocast, ' if args.bf16 else ''}device {device}"
    )
    for name, make in trainers.items():
        model = first if name == "block-wise" else make()
        first = None  # not held while the baseline trains
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fit = dict(epochs=args.epochs, batch_size=args.batch_size, transform=crop_flip if args.augment else None,
                   progress=not args.no_progress)
        if isinstance(model, BlockwiseFF):
            fit["schedule"] = args.schedule
        model.fit(x_train, dataset.y_train, **fit)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        train_acc, test_acc = model.accuracy(x_train, dataset.y_train), model.accuracy(x_test, dataset.y_test)
        memory = f", peak CUDA memory {peak_memory_mib(device):.0f} MiB" if device.type == "cuda" else ""
        print(f"{name}: train accuracy {train_acc:.2%}, test accuracy {test_acc:.2%} (error {1 - test_acc:.2%}), "
              f"wall time {seconds:.1f} s{memory}")
    if device.type != "cuda":
        print(f"peak resident memory of the process {peak_memory_mib(device):.0f} MiB (ff-kernels memory --model "
              f"{args.model} measures each method alone)")
    return 0
