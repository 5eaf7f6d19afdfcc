"""``ff-kernels train --model conv``: an ``FFConvNet`` on digits (1x8x8), MNIST (1x28x28) or CIFAR-10 (3x32x32)
images, with CwComp's class-goodness loss by default or Trifecta's label channels (``--loss logistic|symba``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ff_kernels.bench import positive_int_list
from ff_kernels.conv_net import FFConvNet

# The train command's defaults for --model conv (its parser leaves them None): the digits recipe of the README.
DEFAULTS = {
    "epochs": 20,
    "batch_size": 32,
    "optimizer": "adam",
    "lr": 1e-3,
    "schedule": "simultaneous",
    "loss": "class",
    "normalize": "rms",
    "channels": [60, 120],
    "kernel_size": [3],
}


def _int_list(example: str) -> Callable[[str], list[int]]:
    """argparse type: positive_int_list, whose example (500,500) fits widths, with one that fits the option."""

    def parse(text: str) -> list[int]:
        try:
            return positive_int_list(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected positive integers, e.g. {example}; got {text!r}") from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's conv options (``--temperature`` and ``--lr-schedule`` are shared with block-wise
    training)."""
    group = parser.add_argument_group("conv FF network (--model conv)")
    group.add_argument("--channels", type=_int_list("60,120"), default=None,
                       help="output channels per conv layer, multiples of the class count for --loss class "
                            "(default 60,120)")
    group.add_argument("--kernel-size", type=_int_list("3, or 5,3 (one per layer)"), default=None,
                       help="one kernel size for every layer, or one per layer (default 3; 'same' padding)")
    group.add_argument("--no-pool", action="store_true", help="no 2x2 max-pool between the layers")
    group.add_argument("--predict-skip-first", action="store_true",
                       help="predict from the summed class goodness of every layer but the first")


def check_arguments(args: argparse.Namespace) -> None:
    """The conv options' values that the parser cannot check alone (the train command checks which options apply)."""
    if len(args.kernel_size) not in (1, len(args.channels)):
        raise ValueError(f"--kernel-size gives {len(args.kernel_size)} sizes for {len(args.channels)} layers")


def describe(args: argparse.Namespace, dataset) -> str:
    """The network's shape for the run's first line."""
    return f"{'x'.join(map(str, dataset.sample_shape))} images; channels {args.channels}"


def build_net(
    args: argparse.Namespace, dataset, backend: str, device: torch.device, compute_dtype: torch.dtype | None
) -> FFConvNet:
    """The FFConvNet the train arguments describe."""
    return FFConvNet(
        dataset.sample_shape[0],
        args.channels,
        num_classes=dataset.num_classes,
        loss=args.loss,
        kernel_size=args.kernel_size if len(args.kernel_size) > 1 else args.kernel_size[0],
        pool=not args.no_pool,
        threshold=args.threshold,
        goodness=args.goodness,
        temperature=args.temperature,
        normalize=args.normalize,
        alpha=args.alpha,
        negatives=args.negatives,
        optimizer=args.optimizer,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        predict_skip_first=args.predict_skip_first,
        backend=backend,
        compute_dtype=compute_dtype,
        seed=args.seed,
        device=device,
    )
