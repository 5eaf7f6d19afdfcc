"""Run a function on N local processes joined by gloo, without torchrun: for tests and benchmarks.

The parent hosts the group's store, so it outlives any rank and a failing rank's report can always be read. Every
process runs under a deadline: one still running then is killed and reported as such, so a caller never hangs.
"""

from __future__ import annotations

import datetime
import io
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class Outcome:
    """What one rank ended with: its function's result, or the error it raised (type and message), or neither
    when it was killed at the deadline or died; ``seconds`` is how long its function ran."""

    rank: int
    result: Any = None
    error: str | None = None
    exitcode: int | None = None
    seconds: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.error is None


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any, threads: int,
            timeout: float) -> None:
    """Join the group, run ``fn`` and report before tearing the group down: after a failure the teardown can wait
    for a hung peer (bounded by the group's timeout), which must not delay the report."""
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    start = time.perf_counter()
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        start = time.perf_counter()
        buffer = io.BytesIO()
        torch.save(fn(rank, world, *args), buffer)
        queue.put((rank, buffer.getvalue(), None, time.perf_counter() - start))
    except BaseException as err:  # every failure goes back to the parent, which decides what it means
        detail = f"{type(err).__name__}: {err}"
        if not isinstance(err, (RuntimeError, ValueError)):
            detail += "\n" + traceback.format_exc()
        queue.put((rank, None, detail, time.perf_counter() - start))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, args: tuple = (), *, threads: int = 1,
              timeout: float = 60.0, deadline: float = 120.0) -> list[Outcome]:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes joined by a gloo process group.

    ``fn`` must be importable by name (a module-level function); its result travels back through ``torch.save``.
    ``timeout`` is the process group's, ``deadline`` the wall-clock limit of the whole run, after which every
    process still running is killed. Returns one Outcome per rank; nothing here raises for a failing rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1; got {world_size}")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    processes = [
        ctx.Process(target=_worker, args=(rank, world_size, store.port, fn, args, queue, threads, timeout),
                    daemon=True)
        for rank in range(world_size)
    ]
    for p in processes:
        p.start()
    outcomes = {rank: Outcome(rank) for rank in range(world_size)}
    reported: set[int] = set()
    end = time.monotonic() + deadline
    while len(reported) < world_size and time.monotonic() < end:
        try:
            rank, payload, error, seconds = queue.get(timeout=0.2)
        except Exception:  # queue.Empty: check whether a process died without reporting
            if all(not p.is_alive() for p in processes) and queue.empty():
                break
            continue
        reported.add(rank)
        outcome = outcomes[rank]
        outcome.error, outcome.seconds = error, seconds
        if payload is not None:
            outcome.result = torch.load(io.BytesIO(payload), weights_only=False)
    for rank, p in enumerate(processes):
        p.join(timeout=max(0.0, min(5.0, end - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join()
            if rank not in reported:
                outcomes[rank].error = f"killed: still running after the {deadline:g} s deadline"
        elif rank not in reported:
            outcomes[rank].error = f"died without reporting (exit code {p.exitcode})"
        outcomes[rank].exitcode = p.exitcode
    del store
    return [outcomes[r] for r in range(world_size)]


def results(outcomes: list[Outcome]) -> list[Any]:
    """The ranks' results, or a RuntimeError quoting every rank that failed."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("; ".join(f"rank {o.rank}: {o.error}" for o in failed))
    return [o.result for o in outcomes]
