"""``ff-kernels train --distributed data|pipeline``: the train command on every rank that torchrun starts."""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from ff_kernels.distributed.comm import Comm
from ff_kernels.distributed.training import MODES, fit, init

# The train command's defaults for the distributed options (the parser leaves them None).
DEFAULTS = {"timeout": 300.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's distributed options."""
    parser.add_argument("--distributed", default=None, choices=MODES,
                        help="train over the ranks torchrun started (--model mlp or conv): data parallel, or a layer "
                             "pipeline (--schedule simultaneous); e.g. torchrun --standalone --nproc-per-node 2 -m "
                             "ff_kernels train --distributed data")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="pipeline: micro-batches per batch (default 1; their gradients make one update)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="distributed: seconds any rank waits for another before the run fails (default 300)")


def check_arguments(args: argparse.Namespace) -> None:
    """Options that contradict ``--distributed`` are errors naming the option (the train command checks which options
    apply)."""
    if args.distributed is None:
        return
    if args.compare_reference:
        raise ValueError("--compare-reference trains in one process; leave it out with --distributed")
    if args.distributed == "pipeline" and args.schedule != "simultaneous":
        raise ValueError(
            "--distributed pipeline runs the simultaneous schedule (every layer steps on every batch): add "
            "--schedule simultaneous and a --batch-size"
        )
    if args.micro_batches is not None and args.micro_batches <= 0:
        raise ValueError(f"--micro-batches must be a positive integer; got {args.micro_batches}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds; got {args.timeout}")


def run_train(args: argparse.Namespace) -> int:
    """Join torchrun's process group, train on every rank, and report on rank 0 (every rank holds the network).
    The arguments are the ones that ``resolve_train_arguments`` filled in and checked."""
    from ff_kernels.cli import build_net, describe_run, peak_memory_mib
    from ff_kernels.data import load_dataset

    device = init(args.device, timeout=args.timeout)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        layers, option = (args.channels, "--channels") if args.model == "conv" else (args.dims, "--dims")
        if args.distributed == "pipeline" and len(layers) < world:
            raise ValueError(f"--distributed pipeline gives every rank at least one layer, but {option} has "
                             f"{len(layers)} layer(s) for {world} ranks; use fewer ranks or --distributed data")
        dataset = load_dataset(args.dataset, data_dir=args.data_dir, images=args.model == "conv")
        net = build_net(args, dataset, args.backend, device)  # before the first line, so its errors come first
        if rank == 0:
            micro = f", {args.micro_batches or 1} micro-batch(es) per batch" if args.distributed == "pipeline" else ""
            print(
                f"{describe_run(args, dataset, device)}; distributed {args.distributed} over {world} ranks "
                f"({dist.get_backend()}, {torch.get_num_threads()} thread(s) each){micro}",
                flush=True,
            )
        x_train, y_train = dataset.x_train.to(device), dataset.y_train.to(device)
        stats: dict = {}
        start = time.perf_counter()
        fit(net, x_train, y_train, mode=args.distributed, epochs=args.epochs, batch_size=args.batch_size or None,
            schedule=args.schedule, micro_batches=args.micro_batches, timeout=args.timeout,
            progress=not args.no_progress, stats=stats)
        seconds = time.perf_counter() - start
        comm = Comm(args.timeout, device)
        mine = torch.tensor([stats["bytes_sent"] / max(stats["steps"], 1), peak_memory_mib(device)],
                            dtype=torch.float64, device=comm.device)
        every = comm.all_gather(mine, "gathering the ranks' traffic").cpu()
        if rank == 0:
            train_acc = net.accuracy(x_train, y_train)
            test_acc = net.accuracy(dataset.x_test.to(device), dataset.y_test.to(device))
            print(
                f"train accuracy {train_acc:.2%} (error {1 - train_acc:.2%}), "
                f"test accuracy {test_acc:.2%} (error {1 - test_acc:.2%})"
            )
            memory_kind = "peak CUDA memory allocated" if device.type == "cuda" else "peak resident memory"
            print(f"wall time {seconds:.1f} s, {memory_kind} per rank "
                  f"{', '.join(f'{m:.0f}' for m in every[:, 1].tolist())} MiB")
            traffic = ", ".join(f"rank {r} {b / 1e6:.3f} MB" for r, b in enumerate(every[:, 0].tolist()))
            print(f"sent per training step: {traffic} ({stats['steps']} steps)")
    finally:
        dist.destroy_process_group()
    return 0
