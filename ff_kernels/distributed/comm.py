"""Communication with bounded waits and failure reports, so that a distributed run ends with an error, never a hang.

Every operation is started asynchronously and waited on with ``timeout``. A rank that fails writes one line naming
itself into the process group's store and aborts its process group: that closes its connections, so every peer
blocked on it fails at once instead of waiting for the timeout; the peers read the line from the store and raise an
error that names the failing rank. The failure spreads along the chain of waits (rank 2 waiting on rank 1 waiting
on rank 0) because each rank that fails aborts in turn.

A rank that hangs is named by the timeout: for a point-to-point operation the peer is known; for a collective, a rank
whose wait is slow notes its arrival in the store, so a timeout can name the ranks that never arrived. (Gloo cannot
poll a point-to-point operation, as ``is_completed`` stays False until ``wait``, and closes the connection when its
wait times out, so such a wait gets the whole ``timeout`` at once.)
"""

from __future__ import annotations

import datetime
import hashlib
import io
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A distributed run failed. The message starts with the rank that raised it and names the rank that failed."""


@dataclass
class Pending:
    """An operation in flight: its work handle, what it is (for error messages) and, for a collective, its number
    in this run's sequence of collectives (the same on every rank)."""

    work: Any
    what: str
    collective: int | None


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def default_store() -> dist.Store | None:
    """The store the default process group was created with (private in torch; None where it cannot be had)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def written_bytes() -> int | None:
    """Bytes this process has written to files and sockets so far (Linux ``/proc/self/io`` wchar, which counts what
    gloo writes to its TCP connections); None where that is not available."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def digest(value: Any) -> int:
    """A 63-bit fingerprint of ``value``: the exact bytes of a tensor (with its shape and dtype), else its repr."""
    h = hashlib.blake2b(digest_size=8)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(value).encode())
    return int.from_bytes(h.digest(), "little") >> 1


class Comm:
    """This rank's view of the default process group: bounded waits, failure reports and a count of bytes sent.

    ``bytes_sent`` counts the payload this rank hands to point-to-point sends and collectives (for an all-reduce
    the tensor's size, whatever algorithm the backend uses to move it).
    """

    def __init__(self, timeout: float, device: torch.device) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call ff_kernels.distributed.init() (or "
                "torch.distributed.init_process_group) on every rank first, e.g. under torchrun"
            )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout_s = float(timeout)
        self.timeout = datetime.timedelta(seconds=self.timeout_s)
        backend = str(dist.get_backend()).lower()
        self.device = device if device.type == "cuda" and "nccl" in backend else torch.device("cpu")
        self.retryable = "gloo" in backend
        self.poll_s = min(0.5, self.timeout_s / 4)
        self.store = default_store()
        self.key: str | None = None
        self.bytes_sent = 0
        self.collectives = 0

    # --- failures -------------------------------------------------------------------------------------------------

    def start(self, run_id: int) -> None:
        """Failure reports of this run go under a key no earlier run used (``run_id`` is agreed by all ranks)."""
        self.key = f"ff_kernels/distributed/{run_id}/failure"

    def reported_failure(self, grace_s: float = 0.2) -> str | None:
        """The first failure a rank reported in this run, if any (a report may trail the broken connection)."""
        if self.store is None or self.key is None:
            return None
        deadline = time.monotonic() + grace_s
        while True:
            try:
                if self.store.check([self.key]):
                    return self.store.get(self.key).decode(errors="replace")
            except (RuntimeError, OSError):
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def report(self, message: str) -> None:
        """Record this rank's failure for the others (the first report of a run is kept) and abort the process
        group, which makes every peer's pending operation with this rank fail at once."""
        if self.store is not None and self.key is not None:
            try:
                self.store.compare_set(self.key, "", message)
            except (RuntimeError, OSError):
                pass
        abort()

    def peer_error(self, op: Pending, err: BaseException | None) -> DistributedError:
        """The error to raise when ``op`` failed (``err``) or timed out (None): it names the rank that reported a
        failure, else the ranks that never joined a collective, else what this rank was waiting for."""
        failure = self.reported_failure()
        if failure is not None:
            return DistributedError(f"rank {self.rank}: stopped because {failure}")
        if err is not None:
            return DistributedError(
                f"rank {self.rank}: {op.what} failed ({str(err).splitlines()[0][:200]}); no rank reported an error, "
                "so a peer was killed or lost its connection"
            )
        absent = self._absent(op.collective) if op.collective is not None else []
        if absent:
            return DistributedError(
                f"rank {self.rank}: {op.what} timed out after {self.timeout_s:g} s: rank "
                f"{', '.join(map(str, absent))} never joined it (hung, or stopped without reporting an error)"
            )
        return DistributedError(
            f"rank {self.rank}: {op.what} timed out after {self.timeout_s:g} s; no rank reported an error, so the "
            "peer hung or was killed"
        )

    def _arrived_key(self, collective: int, rank: int) -> str:
        return f"{self.key}/collective/{collective}/{rank}"

    def _mark_arrived(self, collective: int) -> None:
        """Note in the store that this rank waits in collective number ``collective`` (only done for slow waits)."""
        if self.store is None or self.key is None:
            return
        try:
            self.store.set(self._arrived_key(collective, self.rank), "1")
        except (RuntimeError, OSError):
            pass

    def _absent(self, collective: int) -> list[int]:
        """The ranks that have not noted that they wait in ``collective`` (after a grace for late notes)."""
        if self.store is None or self.key is None:
            return []
        time.sleep(min(1.0, 2 * self.poll_s))
        try:
            return [r for r in range(self.world) if not self.store.check([self._arrived_key(collective, r)])]
        except (RuntimeError, OSError):
            return []

    # --- bounded operations ---------------------------------------------------------------------------------------

    def wait(self, op: Pending) -> None:
        """Wait for ``op`` at most ``timeout``; a failure or timeout becomes a DistributedError naming the cause.

        A gloo collective first gets a short wait: when it is slow, this rank notes its arrival in the store, so
        that a timeout can name the ranks that never came (a gloo point-to-point wait cannot be retried)."""
        remaining = self.timeout_s
        if op.collective is not None and self.retryable:
            try:
                op.work.wait(timeout=datetime.timedelta(seconds=self.poll_s))
                return
            except RuntimeError as err:
                if not _is_timeout(err):
                    raise self.peer_error(op, err) from err
            self._mark_arrived(op.collective)
            remaining -= self.poll_s
        try:
            op.work.wait(timeout=datetime.timedelta(seconds=max(remaining, 1e-3)))
        except RuntimeError as err:
            raise self.peer_error(op, None if _is_timeout(err) else err) from err

    def _start(self, what: str, collective: bool, launch: Any) -> Pending:
        number = None
        if collective:
            self.collectives += 1
            number = self.collectives
        op = Pending(None, what, number)
        try:
            op.work = launch()
        except RuntimeError as err:
            raise self.peer_error(op, err) from err
        return op

    def send(self, tensor: torch.Tensor, dst: int, what: str, tag: int = 0) -> Pending:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        tensor = tensor.to(self.device)
        return self._start(what, False, lambda: dist.isend(tensor, dst=dst, tag=tag))

    def recv(self, tensor: torch.Tensor, src: int, what: str, tag: int = 0) -> Pending:
        return self._start(what, False, lambda: dist.irecv(tensor, src=src, tag=tag))

    def all_reduce(self, tensor: torch.Tensor, what: str, *, wait: bool = True) -> Pending:
        """Sum ``tensor`` over ranks in place (``tensor`` must live on ``self.device``)."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        op = self._start(what, True, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True))
        if wait:
            self.wait(op)
        return op

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """(world, *tensor.shape): every rank's ``tensor``."""
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.wait(self._start(what, True, lambda: dist.all_gather(out, tensor, async_op=True)))
        return torch.stack(out)

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        if self.rank == src:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        self.wait(self._start(what, True, lambda: dist.broadcast(tensor, src=src, async_op=True)))
        return tensor

    def broadcast_object(self, obj: Any, src: int, what: str) -> Any:
        """``obj`` from rank ``src`` on every rank (tensors travel through the CPU and arrive there)."""
        if self.rank == src:
            buffer = io.BytesIO()
            torch.save(_to_cpu(obj), buffer)
            payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(size, src, f"{what} (size)")
        if self.rank != src:
            payload = torch.empty(int(size), dtype=torch.uint8)
        data = self.broadcast(payload.to(self.device), src, what)
        if self.rank == src:
            return obj
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=True)

    def agree(self, fields: dict[str, Any], what: str, rejected: BaseException | None = None) -> int:
        """Check that every rank passed the same ``fields`` (compared by fingerprint) and agree on a run id.

        Every rank raises, so a mismatched launch stops at the start on all ranks alike: a rank whose own arguments
        were ``rejected`` raises that error and the others say which ranks rejected theirs; otherwise each raises
        the same ValueError naming the fields and ranks that differ from rank 0. Returns rank 0's random run id.
        """
        names = sorted(fields)
        local = torch.tensor(
            [random.getrandbits(62), digest(names), int(rejected is not None), *(digest(fields[n]) for n in names)],
            dtype=torch.int64,
            device=self.device,
        )
        gathered = self.all_gather(local, what).cpu()
        if rejected is not None:
            raise rejected
        failed = [r for r in range(self.world) if gathered[r, 2]]
        if failed:
            raise ValueError(f"{what}: rank {', '.join(map(str, failed))} rejected its arguments (its error says why)")
        if not torch.equal(gathered[:, 1], gathered[:1, 1].expand(self.world)):
            raise ValueError(f"{what}: the ranks run different versions of ff_kernels (their settings differ in kind)")
        problems = []
        for i, name in enumerate(names):
            column = gathered[:, i + 3]
            ranks = [r for r in range(self.world) if column[r] != column[0]]
            if ranks:
                problems.append(f"{name} (rank {', '.join(map(str, ranks))})")
        if problems:
            raise ValueError(
                f"{what}: the ranks were given different settings; differing from rank 0: {'; '.join(problems)}. "
                "Call it with the same network configuration, data and arguments on every rank"
            )
        return int(gathered[0, 0])


def abort() -> None:
    """Abort the default process group (closes its connections); harmless when it is already gone."""
    try:
        group = dist.distributed_c10d._get_default_group()
    except (AttributeError, RuntimeError, ValueError):
        return
    try:
        group.abort()
    except (AttributeError, RuntimeError):
        for device in ("cpu", "cuda"):
            try:
                group._get_backend(torch.device(device)).abort()
            except (AttributeError, RuntimeError):
                pass


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
