"""``fit``: train an FFNet or an FFConvNet over all ranks of a torch.distributed process group, data parallel or as
a layer pipeline."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

import ff_kernels
from ff_kernels._options import check_choice
from ff_kernels.conv_net import FFConvNet
from ff_kernels.distributed import data_parallel, data_parallel_conv, pipeline, pipeline_conv
from ff_kernels.distributed.comm import Comm, DistributedError, digest, written_bytes
from ff_kernels.net import FFNet

MODES = ("data", "pipeline")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init(device: torch.device | str | None = None, *, backend: str | None = None,
         timeout: float = 300.0) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

    gloo for CPUs and NCCL for GPUs unless ``backend`` says otherwise; ``timeout`` (seconds) bounds every operation
    of the group, the backstop behind ``fit``'s own waits. Returns this rank's device: ``cuda:LOCAL_RANK`` for
    "cuda" (the default when a GPU is present), else the CPU.
    """
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ValueError(
            f"distributed training needs torchrun's environment ({', '.join(missing)} unset): launch with e.g. "
            "torchrun --standalone --nproc-per-node 2 -m ff_kernels train --distributed data"
        )
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return device


def save(net: FFNet | FFConvNet, path: str, *, rank: int = 0, timeout: float = 300.0) -> None:
    """``net.save(path)`` on one rank (every rank holds the same network after ``fit``); the others wait for it."""
    comm = Comm(timeout, net.device)
    error = None
    if comm.rank == rank:
        try:
            net.save(path)
        except Exception as err:  # the other ranks learn of it below; this rank re-raises it
            error = err
    flag = torch.tensor([float(error is not None)], device=comm.device)
    comm.all_reduce(flag, f"saving {path} on rank {rank}")
    if error is not None:
        raise error
    if float(flag):
        raise DistributedError(f"rank {comm.rank}: rank {rank} could not save {path}")


def _state(net: FFNet | FFConvNet, layers: Sequence[int] | None = None) -> dict[str, Any]:
    """What makes two copies of a network train alike: parameters and buffers, optimizer state, generator."""
    if layers is None:
        return {
            "module": net.state_dict(),
            "optimizers": [opt.state_dict() for opt in net.optimizers],
            "generator": net.generator.get_state(),
        }
    return {
        "layers": {i: net.layers[i].state_dict() for i in layers},
        "optimizers": {i: net.optimizers[i].state_dict() for i in layers},
    }


def _load_state(net: FFNet | FFConvNet, state: dict[str, Any]) -> None:
    """Copy ``state`` in place (the optimizers keep holding the same parameter tensors)."""
    if "module" in state:
        net.load_state_dict(state["module"])
        for opt, s in zip(net.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        net.generator.set_state(state["generator"])
        return
    for i, s in state["layers"].items():
        net.layers[i].load_state_dict(s)
        net.optimizers[i].load_state_dict(state["optimizers"][i])


def state_digest(net: FFNet | FFConvNet) -> int:
    """A fingerprint of the whole training state, to check that every rank ends with the same network."""
    parts = [digest(t) for t in net.state_dict().values()]
    for opt in net.optimizers:
        for s in opt.state:
            parts += [digest(v) for _, v in sorted(s.items())]
    parts.append(digest(net.generator.get_state()))
    return digest(parts)


def _check_arguments(net: FFNet | FFConvNet, x: torch.Tensor, y: torch.Tensor, mode: str, schedule: str, epochs: int,
                     batch_size: int | None, micro_batches: int, stages: Sequence[int] | None, world: int,
                     bucket_cap_mb: float) -> list[range] | None:
    net._check_data(x, y)
    if not isinstance(epochs, int) or epochs <= 0:
        raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer or None (full batch); got {batch_size!r}")
    if not isinstance(micro_batches, int) or micro_batches <= 0:
        raise ValueError(f"micro_batches must be a positive integer or None (one per batch); got {micro_batches!r}")
    if not bucket_cap_mb >= 0:
        raise ValueError(f"bucket_cap_mb must be a non-negative number; got {bucket_cap_mb!r}")
    if mode == "data":
        if micro_batches != 1:
            raise ValueError("micro_batches is a pipeline setting; mode='data' splits each batch over the ranks")
        if stages is not None:
            raise ValueError("stages is a pipeline setting; mode='data' runs every layer on every rank")
        return None
    if schedule != "simultaneous":
        raise ValueError(
            f"mode='pipeline' runs the simultaneous schedule (every layer steps on every batch); got "
            f"schedule={schedule!r}: the greedy schedule trains one layer at a time, which leaves all but one rank idle"
        )
    if isinstance(net, FFConvNet):
        return pipeline.plan_stages(pipeline_conv.layer_costs(net, tuple(x.shape[1:])), world, stages)
    if net.collab == "all":
        raise ValueError(
            "collab='all' offsets each layer by the later layers' goodness, which the pipeline has not computed yet "
            "when a layer steps; use mode='data' or collab='previous'"
        )
    return pipeline.plan_stages(pipeline.layer_costs(net), world, stages)


def fit(
    net: FFNet | FFConvNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str = "data",
    epochs: int = 1000,
    batch_size: int | None = None,
    schedule: str | None = None,
    micro_batches: int | None = None,
    stages: Sequence[int] | None = None,
    bucket_cap_mb: float = 1.0,
    timeout: float = 300.0,
    progress: bool = False,
    stats: dict[str, Any] | None = None,
) -> list[list[float]]:
    """Train ``net`` on (x, y) with every rank of the default process group; call it on every rank alike.

    ``net`` is an FFNet or an FFConvNet (x images; ``schedule`` defaults to its "simultaneous" and its learning-rate
    schedule applies, as in ``FFConvNet.fit``).

    Every rank passes the same network configuration, data and arguments (checked at the start: a difference is a
    ValueError on every rank, naming it); rank 0's parameters, optimizer state and generator are broadcast first.

    ``mode="data"``: each batch is split over the ranks and the layers' gradients are all-reduced before every
    update; the result equals ``net.fit(x, y, ...)`` in one process, for ``schedule`` "greedy" (the default, as
    ``FFNet.fit``) or "simultaneous". ``bucket_cap_mb``: consecutive layers' gradients are sent together until they
    reach this size.

    ``mode="pipeline"`` (simultaneous schedule only): rank r steps a contiguous range of layers (``stages`` layers
    per rank, default balanced by layer size) and sends its activations to rank r+1. ``micro_batches`` splits each
    batch (default 1: FF never flushes, so whole batches already keep every rank busy); their gradients are
    accumulated into one update per batch, so the result equals ``net.fit(x, y, schedule="simultaneous", ...)``.
    Afterwards every rank holds the whole trained network (each stage broadcasts its layers and their optimizer
    state), so ``net.save`` works on any rank.

    ``timeout`` (seconds) bounds every wait. A rank that raises ends every rank with a DistributedError naming it.
    Returns the mean loss of each layer for each epoch, as ``FFNet.fit``; ``stats``, if given, receives this rank's
    training time, steps, ``bytes_sent`` (the payload it handed to sends and collectives while training) and
    ``bytes_written`` (what the process wrote to sockets and files meanwhile, on Linux: the bytes on the wire).
    """
    if not isinstance(net, (FFNet, FFConvNet)):
        raise TypeError(f"net must be an ff_kernels.FFNet or FFConvNet; got {type(net).__name__}")
    check_choice("mode", mode, MODES)
    schedule = schedule or ("greedy" if mode == "data" and isinstance(net, FFNet) else "simultaneous")
    check_choice("schedule", schedule, ("greedy", "simultaneous"))
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")
    comm = Comm(timeout, net.device)
    micro = 1 if micro_batches is None else micro_batches
    rejected = None
    stage_plan = None
    try:
        stage_plan = _check_arguments(net, x, y, mode, schedule, epochs, batch_size, micro, stages, comm.world,
                                      bucket_cap_mb)
    except ValueError as err:
        rejected = err
    fields = {f"net.{k}": v for k, v in net.config.items()}
    fields.update(mode=mode, schedule=schedule, epochs=epochs, batch_size=batch_size, micro_batches=micro,
                  stages=None if stage_plan is None else [len(s) for s in stage_plan], bucket_cap_mb=bucket_cap_mb,
                  timeout=timeout, x=x, y=y, world_size=comm.world, device_type=net.device.type,
                  versions=(ff_kernels.__version__, torch.__version__))
    comm.start(comm.agree(fields, "ff_kernels.distributed.fit", rejected))
    try:
        return _run(net, x, y.long(), comm, mode, schedule, epochs, batch_size, micro, stage_plan, bucket_cap_mb,
                    progress, stats)
    except DistributedError as err:
        comm.report(str(err))
        raise
    except Exception as err:
        message = f"rank {comm.rank} raised {type(err).__name__}: {err}"
        comm.report(message)
        raise DistributedError(message) from err


def _run(net: FFNet | FFConvNet, x: torch.Tensor, y: torch.Tensor, comm: Comm, mode: str, schedule: str, epochs: int,
         batch_size: int | None, micro_batches: int, stage_plan: list[range] | None, bucket_cap_mb: float,
         progress: bool, stats: dict[str, Any] | None) -> list[list[float]]:
    from tqdm.auto import tqdm

    if comm.world > 1:
        _load_state(net, comm.broadcast_object(_state(net), 0, "broadcast of rank 0's network"))
    if isinstance(net, FFNet):
        net.overlay_value.fill_(float(x.max()))
    elif net.loss != "class":  # as FFConvNet.fit: the label channels' value
        net.label_value.fill_(float(x.max()))
    total = epochs * len(net.layers) if mode == "data" and schedule == "greedy" else epochs
    label = f"FF {mode} x{comm.world}" + (f" {schedule}" if mode == "data" else "")
    bar = tqdm(total=total, disable=not progress or comm.rank != 0, desc=label, unit="epoch")

    def tick(n: int, loss: float) -> None:
        bar.update(n)
        bar.set_postfix(loss=f"{loss:.4f}")

    sent_before, written_before, start = comm.bytes_sent, written_bytes(), time.perf_counter()
    if mode == "data":
        reducer = data_parallel.GradReducer(comm, net, int(bucket_cap_mb * 2**20))
        if isinstance(net, FFConvNet):
            history = data_parallel_conv.train(net, x, y, comm, reducer, epochs=epochs, batch_size=batch_size,
                                               schedule=schedule, tick=tick)
        else:
            train = data_parallel.train_greedy if schedule == "greedy" else data_parallel.train_simultaneous
            history = train(net, x, y, comm, reducer, epochs=epochs, batch_size=batch_size, tick=tick)
        steps = epochs * len(pipeline.batch_rows(x.shape[0], batch_size))
        steps *= len(net.layers) if schedule == "greedy" else 1
        buckets = reducer.buckets
    else:
        train = pipeline_conv.train if isinstance(net, FFConvNet) else pipeline.train_pipeline
        history = train(net, x, y, comm, stage_plan, epochs=epochs, batch_size=batch_size,
                        micro_batches=micro_batches, tick=tick)
        steps = epochs * len(pipeline.batch_rows(x.shape[0], batch_size))
        buckets = 0
    if net.device.type == "cuda":
        torch.cuda.synchronize(net.device)
    seconds, sent, written = time.perf_counter() - start, comm.bytes_sent - sent_before, written_bytes()
    bar.close()
    if mode == "pipeline" and comm.world > 1:
        losses = torch.tensor(history, dtype=torch.float64, device=comm.device)
        comm.all_reduce(losses, "all-reduce of the loss history")
        history = losses.cpu().tolist()
        for owner, layers in enumerate(stage_plan):
            state = comm.broadcast_object(_state(net, list(layers)), owner, f"broadcast of rank {owner}'s layers")
            if comm.rank != owner:
                _load_state(net, state)
        generator = net.generator.get_state()
        net.generator.set_state(comm.broadcast(generator.to(comm.device), 0, "broadcast of the generator").cpu())
    if comm.world > 1:
        digests = comm.all_gather(torch.tensor([state_digest(net)], device=comm.device), "final state check")
        differ = [r for r in range(comm.world) if digests[r] != digests[0]]
        if differ:
            raise DistributedError(f"rank {comm.rank}: after training rank {differ} hold(s) a network unlike rank 0's")
    if stats is not None:
        stats.update(mode=mode, schedule=schedule, rank=comm.rank, world_size=comm.world, seconds=seconds,
                     steps=steps, bytes_sent=sent, buckets=buckets,
                     bytes_written=None if written is None else written - written_before,
                     stages=None if stage_plan is None else [list(s) for s in stage_plan])
    return history
