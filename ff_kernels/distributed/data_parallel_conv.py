"""Data parallel training of an FFConvNet: ``FFConvNet.fit``'s batches split over the ranks, gradients all-reduced.

The same rules as for FFNet (``data_parallel``): every rank draws the same permutation and negative labels from the
broadcast generator and steps every layer on its contiguous part of each batch; the parts' gradients and losses
enter weighted by their share of the batch's rows (both loss families are means over the batch's samples), so the
run equals one process. Layer i's all-reduce overlaps layer i+1's step; the updates are applied at the end of each
batch, because the learning-rate schedule changes the rate from batch to batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ff_kernels.conv_net import FFConvNet
from ff_kernels.distributed.comm import Comm
from ff_kernels.distributed.data_parallel import GradReducer


def step_part(net: FFConvNet, reducer: GradReducer, x: torch.Tensor, y: torch.Tensor, y_neg: torch.Tensor | None,
              weight: float, only: int | None) -> None:
    """``FFConvNet.step_batch`` on this rank's part of a batch (``y_neg``: the part of the batch's negative labels),
    each layer's gradients queued for all-reduce as soon as it has stepped; an empty part contributes zeros."""
    count = len(net.layers) if only is None else only + 1
    trained = range(count) if only is None else [only]
    if x.shape[0] == 0:
        for i in trained:
            reducer.add(i, None, None, weight)
        reducer.launch()
        return
    inputs = (x,) if y_neg is None else (net.with_labels(x, y), net.with_labels(x, y_neg))
    for i, layer in enumerate(net.layers[:count]):
        if i not in trained:
            inputs = tuple(net.next_input(i, layer(t)) for t in inputs)
            continue
        out = layer.train_step(inputs[0], y if y_neg is None else inputs[1], None)
        grads = [out.grad_weight] if layer.bias is None else [out.grad_weight, out.grad_bias]
        reducer.add(i, grads, out.loss, weight)
        if i + 1 < count:
            h = (out.h,) if y_neg is None else (out.h_pos, out.h_neg)
            inputs = tuple(net.next_input(i, t) for t in h)
    reducer.launch()


def train(net: FFConvNet, x: torch.Tensor, y: torch.Tensor, comm: Comm, reducer: GradReducer, *, epochs: int,
          batch_size: int | None, schedule: str, tick: Callable[[int, float], None]) -> list[list[float]]:
    """``FFConvNet.fit(x, y, ...)`` (either schedule, the network's learning-rate schedule) over the ranks."""
    rows_total = x.shape[0]
    x, y = x.to(net.device, net.layers[0].weight.dtype), y.to(net.device, torch.int64)
    stages = [None] if schedule == "simultaneous" else range(len(net.layers))
    rate = net.learning_rates(rows_total, epochs, batch_size)
    history: list[list[float]] = [[] for _ in net.layers]
    for stage in stages:
        for epoch in range(epochs):
            batches = net._batches(rows_total, batch_size)
            for k, rows in enumerate(batches):
                net.set_learning_rate(rate(epoch, k))
                x_batch, y_batch = x[rows], y[rows]
                y_neg = None if net.loss == "class" else net.negative_labels(y_batch)
                mine = torch.arange(y_batch.shape[0], device=net.device).tensor_split(comm.world)[comm.rank]
                weight = mine.numel() / y_batch.shape[0]
                step_part(net, reducer, x_batch[mine], y_batch[mine], None if y_neg is None else y_neg[mine], weight,
                          stage)
                reducer.apply_all()
            trained = range(len(net.layers)) if stage is None else [stage]
            losses = reducer.take_losses()
            for i in trained:
                history[i].append(losses[i] / len(batches))
            tick(1, history[trained[-1]][-1])
    net.set_learning_rate()  # as FFConvNet.fit: the schedule belongs to this call
    return history
