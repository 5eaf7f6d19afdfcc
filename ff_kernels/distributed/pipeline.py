"""Layer pipeline FF training: rank r owns a contiguous range of layers and passes activations forward only.

For each micro-batch a rank receives its first layer's input from rank r-1 (rank 0 makes it from the data), steps
its layers in order as ``FFNet.step_all`` does, and sends its last layer's activations to rank r+1. No gradient
travels back and nothing waits for a backward pass: ranks never flush, so while rank 1 steps batch b, rank 0 is
already on batch b+1 and the pipeline stays full from the first micro-batch to the last.

A batch split into several micro-batches accumulates each layer's micro-batch gradients (weighted by their share of
the batch's rows) and applies one update at the batch's end. Every micro-batch of a batch then meets the same
weights, exactly as the whole batch does in ``FFNet.fit(schedule="simultaneous")``, so the pipeline equals that
single-process run; one micro-batch per batch (the default) keeps the fused update inside the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ff_kernels.distributed.comm import Comm, Pending
from ff_kernels.distributed.data_parallel import layer_params
from ff_kernels.net import FFNet
from ff_kernels.optim import master_dtype

if TYPE_CHECKING:
    from ff_kernels.conv_net import FFConvNet

MAX_SENDS_IN_FLIGHT = 4
RECEIVES_AHEAD = 2


def plan_stages(costs: Sequence[float], world: int, stages: Sequence[int] | None = None) -> list[range]:
    """Contiguous layer ranges, one per rank: ``stages`` (layers per rank) if given, else the split that minimises
    the largest stage's cost (a layer step costs about in_features * out_features per row)."""
    layers = len(costs)
    if stages is not None:
        stages = [int(s) for s in stages]
        if len(stages) != world or min(stages) < 1 or sum(stages) != layers:
            raise ValueError(
                f"stages must give each of the {world} ranks at least one layer and sum to the {layers} layers; "
                f"got {stages}"
            )
    else:
        if layers < world:
            raise ValueError(
                f"the pipeline gives every rank at least one layer, but the network has {layers} layers for {world} "
                "ranks; use fewer ranks or mode='data'"
            )
        prefix = [0.0]
        for c in costs:
            prefix.append(prefix[-1] + c)
        inf = float("inf")
        best = [[inf] * (layers + 1) for _ in range(world + 1)]
        cut = [[0] * (layers + 1) for _ in range(world + 1)]
        best[0][0] = 0.0
        for r in range(1, world + 1):
            for end in range(r, layers - (world - r) + 1):
                for start in range(r - 1, end):
                    value = max(best[r - 1][start], prefix[end] - prefix[start])
                    if value < best[r][end]:
                        best[r][end], cut[r][end] = value, start
        stages, end = [], layers
        for r in range(world, 0, -1):
            stages.append(end - cut[r][end])
            end = cut[r][end]
        stages.reverse()
    ranges, start = [], 0
    for count in stages:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def layer_costs(net: FFNet) -> list[float]:
    return [float(layer.in_features * layer.out_features) for layer in net.layers]


def micro_sizes(batch_rows: int, micro_batches: int) -> list[int]:
    """Row counts of a batch's micro-batches, as ``tensor_split`` makes them (empty ones left out)."""
    q, r = divmod(batch_rows, micro_batches)
    return [q + 1] * r + [q] * (micro_batches - r) if q else [1] * r


def batch_rows(rows_total: int, batch_size: int | None) -> list[int]:
    """Row counts of an epoch's batches, as ``FFNet._batches`` makes them."""
    if batch_size is None or batch_size >= rows_total:
        return [rows_total]
    full, rest = divmod(rows_total, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def schedule(rows_total: int, batch_size: int | None, micro_batches: int, epochs: int) -> Iterator[tuple]:
    """Every micro-batch of the run in order, the same on every rank: (epoch, batch, size, share of the batch,
    number of micro-batches in the batch, last of the batch, last of the epoch)."""
    batches = batch_rows(rows_total, batch_size)
    for epoch in range(epochs):
        for b, rows in enumerate(batches):
            sizes = micro_sizes(rows, micro_batches)
            for k, size in enumerate(sizes):
                yield epoch, b, size, size / rows, len(sizes), k == len(sizes) - 1, b == len(batches) - 1


def _source(net: FFNet, x: torch.Tensor, y: torch.Tensor, batch_size: int | None, micro_batches: int,
            epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0's micro-batches: the generator is drawn exactly as ``FFNet.fit(schedule="simultaneous")`` draws it."""
    rows_total = x.shape[0]
    for _ in range(epochs):
        x_pos = net.overlay_labels(x, y)
        x_neg = net.overlay_labels(x, net.negative_labels(y))
        for rows in net._batches(rows_total, batch_size):
            if isinstance(rows, slice) and micro_batches == 1:
                yield x_pos, x_neg
                continue
            if isinstance(rows, slice):
                rows = torch.arange(rows_total, device=net.device)
            for chunk in rows.tensor_split(micro_batches):
                if chunk.numel():
                    yield x_pos[chunk], x_neg[chunk]


def accumulate(net: FFNet | FFConvNet, acc: dict[int, list[torch.Tensor]], i: int, out: Any, share: float,
               last_of_batch: bool) -> None:
    """Add layer i's micro-batch gradients from ``out`` to ``acc[i]``, weighted by the micro-batch's ``share`` of
    its batch, and apply the summed update at the batch's last micro-batch."""
    params = layer_params(net, i)
    grads = [out.grad_weight] if len(params) == 1 else [out.grad_weight, out.grad_bias]
    if i not in acc:
        acc[i] = [g.to(master_dtype(p)) * share for g, p in zip(grads, params)]
    else:
        for a, g in zip(acc[i], grads):
            a.add_(g, alpha=share)
    if last_of_batch:
        net.optimizers[i].update(params, acc.pop(i), grads_are_scratch=True)


class _Stage:
    """This rank's layers, their gradient accumulators and loss sums."""

    def __init__(self, net: FFNet, layers: range) -> None:
        self.net, self.layers = net, layers
        self.acc: dict[int, list[torch.Tensor]] = {}
        self.batch_loss = {i: torch.zeros((), device=net.device) for i in layers}
        self.epoch_loss = {i: torch.zeros((), device=net.device) for i in layers}

    def step(self, h_pos: torch.Tensor, h_neg: torch.Tensor, prior: tuple | None, share: float, parts: int,
             last_of_batch: bool) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Step every layer of the stage on one micro-batch; returns the activations (and goodness sums) to pass on."""
        net = self.net
        for i in self.layers:
            offset = prior if net.collab == "previous" else None
            offset_pos, offset_neg = (None, None) if offset is None else offset
            optimizer = net.optimizers[i] if parts == 1 else None
            out = net.layers[i].train_step(h_pos, h_neg, optimizer, offset_pos=offset_pos, offset_neg=offset_neg)
            if parts > 1:
                accumulate(net, self.acc, i, out, share, last_of_batch)
            self.batch_loss[i] += out.loss * share if parts > 1 else out.loss
            if net.collab == "previous":
                prior = (out.goodness_pos, out.goodness_neg) if prior is None else (
                    prior[0] + out.goodness_pos, prior[1] + out.goodness_neg)
            h_pos, h_neg = out.h_pos, out.h_neg
        if last_of_batch:
            for i in self.layers:
                self.epoch_loss[i] += self.batch_loss[i]
                self.batch_loss[i].zero_()
        return h_pos, h_neg, prior


def train_pipeline(net: FFNet, x: torch.Tensor, y: torch.Tensor, comm: Comm, stages: list[range], *, epochs: int,
                   batch_size: int | None, micro_batches: int,
                   tick: Callable[[int, float], None]) -> list[list[float]]:
    """Run this rank's stage over the whole schedule; returns the loss history of its own layers (zeros elsewhere)."""
    rank, world = comm.rank, comm.world
    stage = _Stage(net, stages[rank])
    rows_total = x.shape[0]
    first = net.layers[stages[rank].start]
    in_features, dtype = first.in_features, first.weight.dtype
    goodness_dtype = torch.promote_types(dtype, torch.float32)
    collab = net.collab == "previous"
    history = [[0.0] * epochs for _ in net.layers]
    batches_per_epoch = len(batch_rows(rows_total, batch_size))
    plan = list(schedule(rows_total, batch_size, micro_batches, epochs))
    source = _source(net, x, y, batch_size, micro_batches, epochs) if rank == 0 else None
    receives: deque = deque()
    sends: deque = deque()

    def post_receive(k: int) -> None:
        size = plan[k][2]
        h = torch.empty(2 * size, in_features, dtype=dtype, device=comm.device)
        what = f"receive of micro-batch {k} from rank {rank - 1}"
        works = [comm.recv(h, rank - 1, what, tag=0)]
        g = None
        if collab:
            g = torch.empty(2 * size, dtype=goodness_dtype, device=comm.device)
            works.append(comm.recv(g, rank - 1, what, tag=1))
        receives.append((k, h, g, works))

    if rank > 0:
        for k in range(min(RECEIVES_AHEAD, len(plan))):
            post_receive(k)
    for k, (epoch, _, size, share, parts, last_of_batch, last_of_epoch) in enumerate(plan):
        if rank == 0:
            h_pos, h_neg = next(source)
            prior = None
        else:
            _, h, g, works = receives.popleft()
            for work in works:
                comm.wait(work)
            if k + RECEIVES_AHEAD < len(plan):
                post_receive(k + RECEIVES_AHEAD)
            h = h.to(net.device)
            h_pos, h_neg = h[:size], h[size:]
            prior = None if g is None else (g[:size].to(net.device), g[size:].to(net.device))
        h_pos, h_neg, prior = stage.step(h_pos, h_neg, prior, share, parts, last_of_batch)
        if rank + 1 < world:
            outgoing = [torch.cat([h_pos, h_neg])]
            if collab:
                outgoing.append(torch.cat(prior).to(goodness_dtype))
            what = f"send of micro-batch {k} to rank {rank + 1}"
            works = [comm.send(t, rank + 1, what, tag=tag) for tag, t in enumerate(outgoing)]
            sends.append((k, works, outgoing))
            while len(sends) > MAX_SENDS_IN_FLIGHT:
                wait_send(comm, sends.popleft())
        if last_of_batch and last_of_epoch:
            close_epoch(stage.layers, stage.epoch_loss, history, epoch, batches_per_epoch, tick)
    while sends:
        wait_send(comm, sends.popleft())
    return history


def close_epoch(layers: range, epoch_loss: dict[int, torch.Tensor], history: list[list[float]], epoch: int,
                batches: int, tick: Callable[[int, float], None]) -> None:
    """Record the stage's mean batch losses of ``epoch`` (one host sync per epoch) and start the next epoch's sums."""
    for i in layers:
        history[i][epoch] = float(epoch_loss[i]) / batches
        epoch_loss[i].zero_()
    tick(1, history[layers[-1]][epoch])


def wait_send(comm: Comm, entry: tuple[int, list[Pending], list[torch.Tensor]]) -> None:
    """Wait for one micro-batch's sends (the entry keeps its tensors alive until they are sent)."""
    for work in entry[1]:
        comm.wait(work)
