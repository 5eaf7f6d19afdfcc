"""Layer pipeline training of an FFConvNet: ``FFConvNet.fit(schedule="simultaneous")`` with the layers split over
the ranks, as ``pipeline`` does for FFNet.

Every rank draws the run's permutations and negative labels from the broadcast generator itself (a few small draws
per batch), so each knows the rows and labels of every micro-batch and only activations travel: rank r steps its
layers, applies the pooling and normalisation that feed the next layer, and sends the result to rank r+1 (the
positive and negative images stacked, or the batch for the class loss). The learning-rate schedule sets each
batch's rate on every rank; micro-batches accumulate their gradients (weighted by their share of the batch) into
one update at the batch's end, so the pipeline equals the single-process run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch

from ff_kernels.conv_net import FFConvNet
from ff_kernels.distributed.comm import Comm
from ff_kernels.distributed.pipeline import (
    MAX_SENDS_IN_FLIGHT,
    RECEIVES_AHEAD,
    accumulate,
    batch_rows,
    close_epoch,
    schedule,
    wait_send,
)


@torch.no_grad()
def _shapes(net: FFConvNet, sample_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
    """Per layer, from one sample through the network: its input (channels, height, width), the input's dtype and
    the layer's output positions."""
    h = torch.zeros(1, *sample_shape, device=net.device, dtype=net.layers[0].weight.dtype)
    if net.loss != "class":
        h = net.with_labels(h, 0)
    shapes = []
    for i, layer in enumerate(net.layers):
        shape, dtype = tuple(h.shape[1:]), h.dtype
        h = layer(h)
        shapes.append((shape, dtype, h.shape[2] * h.shape[3]))
        if i + 1 < len(net.layers):
            h = net.next_input(i, h)
    return shapes


def layer_costs(net: FFConvNet, sample_shape: tuple[int, ...]) -> list[float]:
    """Multiply-adds of each layer's convolution per sample: the weight's size times the output positions."""
    return [float(layer.weight.numel() * positions)
            for layer, (_, _, positions) in zip(net.layers, _shapes(net, sample_shape))]


def _micro_batches(net: FFConvNet, y: torch.Tensor, batch_size: int | None, micro_batches: int,
                   epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(rows, labels, negative labels or None) of every micro-batch, drawn as ``FFConvNet.fit`` draws them."""
    rows_total = y.shape[0]
    for _ in range(epochs):
        for rows in net._batches(rows_total, batch_size):
            if isinstance(rows, slice):
                rows = torch.arange(rows_total, device=net.device)
            labels = y[rows]
            negatives = None if net.loss == "class" else net.negative_labels(labels)
            for chunk in torch.arange(rows.numel(), device=net.device).tensor_split(micro_batches):
                if chunk.numel():
                    yield rows[chunk], labels[chunk], None if negatives is None else negatives[chunk]


class _Stage:
    """This rank's layers, their gradient accumulators and loss sums."""

    def __init__(self, net: FFConvNet, layers: range) -> None:
        self.net, self.layers = net, layers
        self.acc: dict[int, list[torch.Tensor]] = {}
        self.epoch_loss = {i: torch.zeros((), device=net.device) for i in layers}

    def step(self, h: torch.Tensor, labels: torch.Tensor, share: float, parts: int,
             last_of_batch: bool) -> torch.Tensor:
        """Step every layer of the stage on one micro-batch (``h``: the batch, or positives then negatives);
        returns the next stage's input."""
        net = self.net
        for i in self.layers:
            optimizer = net.optimizers[i] if parts == 1 else None
            if net.loss == "class":
                out = net.layers[i].train_step(h, labels, optimizer)
                h = out.h
            else:
                rows = h.shape[0] // 2
                out = net.layers[i].train_step(h[:rows], h[rows:], optimizer)
                h = torch.cat([out.h_pos, out.h_neg])
            if parts > 1:
                accumulate(net, self.acc, i, out, share, last_of_batch)
            self.epoch_loss[i] += out.loss * share
            if i + 1 < len(net.layers):
                h = net.next_input(i, h)
        return h


def train(net: FFConvNet, x: torch.Tensor, y: torch.Tensor, comm: Comm, stages: list[range], *, epochs: int,
          batch_size: int | None, micro_batches: int, tick: Callable[[int, float], None]) -> list[list[float]]:
    """Run this rank's stage over the whole schedule; returns the loss history of its own layers (zeros elsewhere)."""
    rank, world = comm.rank, comm.world
    x, y = x.to(net.device, net.layers[0].weight.dtype), y.to(net.device, torch.int64)
    stage = _Stage(net, stages[rank])
    rows_total = x.shape[0]
    batches_per_epoch = len(batch_rows(rows_total, batch_size))
    rate = net.learning_rates(rows_total, epochs, batch_size)
    in_shape, in_dtype, _ = _shapes(net, tuple(x.shape[1:]))[stages[rank].start]
    pairs = 1 if net.loss == "class" else 2
    history = [[0.0] * epochs for _ in net.layers]
    plan = list(schedule(rows_total, batch_size, micro_batches, epochs))
    draws = _micro_batches(net, y, batch_size, micro_batches, epochs)
    receives: deque = deque()
    sends: deque = deque()

    def post_receive(k: int) -> None:
        h = torch.empty(pairs * plan[k][2], *in_shape, dtype=in_dtype, device=comm.device)
        receives.append((h, comm.recv(h, rank - 1, f"receive of micro-batch {k} from rank {rank - 1}")))

    if rank > 0:
        for k in range(min(RECEIVES_AHEAD, len(plan))):
            post_receive(k)
    for k, (epoch, batch, _, share, parts, last_of_batch, last_of_epoch) in enumerate(plan):
        rows, labels, negatives = next(draws)
        if k == 0 or plan[k - 1][5]:  # the first micro-batch of a batch: the batch's learning rate
            net.set_learning_rate(rate(epoch, batch), stage.layers)
        if rank == 0:
            images = x[rows]
            h = images if negatives is None else torch.cat(
                [net.with_labels(images, labels), net.with_labels(images, negatives)])
        else:
            h, work = receives.popleft()
            comm.wait(work)
            if k + RECEIVES_AHEAD < len(plan):
                post_receive(k + RECEIVES_AHEAD)
            h = h.to(net.device)
        h = stage.step(h, labels, share, parts, last_of_batch)
        if rank + 1 < world:
            outgoing = h.contiguous()
            sends.append((k, [comm.send(outgoing, rank + 1, f"send of micro-batch {k} to rank {rank + 1}")],
                          [outgoing]))
            while len(sends) > MAX_SENDS_IN_FLIGHT:
                wait_send(comm, sends.popleft())
        if last_of_batch and last_of_epoch:
            close_epoch(stage.layers, stage.epoch_loss, history, epoch, batches_per_epoch, tick)
    while sends:
        wait_send(comm, sends.popleft())
    net.set_learning_rate()  # as FFConvNet.fit: the schedule belongs to this call
    return history
