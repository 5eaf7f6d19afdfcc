"""Data parallel FF training: every rank steps every layer on its shard of each batch, gradients summed by all-reduce.

Every rank draws the same global permutation and negative labels (the same generator state, broadcast at the start)
and takes its contiguous part of each batch, so the run equals one process training on the whole batches. A part's
gradient and loss enter weighted by its share of the batch's rows (the FF loss is a mean over rows), which makes
unequal parts exact too; a rank whose part is empty contributes zeros.

Layers are independent in FF, which lets communication overlap computation: in the simultaneous schedule layer i's
gradients are all-reduced while layer i+1 steps (its input was computed with layer i's weights from before the
update), and layer i's update is applied lazily, just before its next step, so the all-reduce of the last layers
overlaps the next batch's first layers as well. Consecutive small layers share one buffer (a bucket) to save
messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ff_kernels.distributed.comm import Comm
from ff_kernels.net import FFNet
from ff_kernels.optim import master_dtype

if TYPE_CHECKING:
    from ff_kernels.conv_net import FFConvNet


def layer_params(net: FFNet | FFConvNet, i: int) -> list[torch.Tensor]:
    layer = net.layers[i]
    return [layer.weight] if layer.bias is None else [layer.weight, layer.bias]


class _Bucket:
    """One in-flight all-reduce: the flat buffer and, per layer, where its gradients and loss lie in it."""

    def __init__(self, work: Any, flat: torch.Tensor, layers: list[int]) -> None:
        self.work, self.flat, self.layers = work, flat, layers


class GradReducer:
    """Sums the layers' weighted gradients and losses over ranks in buckets, and applies each layer's update from
    the summed gradients before that layer next steps (``apply``) or at the end of an epoch (``apply_all``)."""

    def __init__(self, comm: Comm, net: FFNet | FFConvNet, bucket_cap_bytes: int) -> None:
        self.comm, self.net, self.cap = comm, net, bucket_cap_bytes
        params = [p for i in range(len(net.layers)) for p in layer_params(net, i)]
        self.dtype = torch.float64 if any(master_dtype(p) == torch.float64 for p in params) else torch.float32
        self.open: list[tuple[int, list[torch.Tensor], float]] = []
        self.open_bytes = 0
        self.pending: dict[int, _Bucket] = {}
        self.loss_sums = [torch.zeros((), dtype=self.dtype, device=net.device) for _ in net.layers]
        self.buckets = 0

    def add(self, i: int, grads: list[torch.Tensor] | None, loss: torch.Tensor | None, weight: float) -> None:
        """Queue layer i's gradients and loss from this rank's part (None: an empty part), scaled by ``weight``.

        Buckets close on size alone, so every rank cuts the same buckets whatever its part's weight."""
        params = layer_params(self.net, i)
        if grads is None:
            grads = [torch.zeros(p.shape, dtype=self.dtype, device=p.device) for p in params]
            loss = torch.zeros((), dtype=self.dtype, device=self.net.device)
        pieces = [g.reshape(-1) for g in grads] + [loss.reshape(1)]
        self.open.append((i, pieces, weight))
        self.open_bytes += sum(p.numel() for p in pieces) * self.dtype.itemsize
        if self.open_bytes >= self.cap:
            self.launch()

    def launch(self) -> None:
        """Start the all-reduce of the open bucket."""
        if not self.open:
            return
        flat = torch.cat([p.to(self.dtype) for _, pieces, _ in self.open for p in pieces])
        offset = 0
        for _, pieces, weight in self.open:
            size = sum(p.numel() for p in pieces)
            if weight != 1.0:
                flat[offset : offset + size].mul_(weight)
            offset += size
        layers = [i for i, _, _ in self.open]
        work = None
        if self.comm.world > 1:
            flat = flat.to(self.comm.device)
            what = f"all-reduce of layer {layers[0]}" + (f"-{layers[-1]}" if len(layers) > 1 else "") + " gradients"
            work = self.comm.all_reduce(flat, what, wait=False)
        bucket = _Bucket(work, flat, layers)
        for i in layers:
            self.pending[i] = bucket
        self.open, self.open_bytes = [], 0
        self.buckets += 1

    def apply(self, i: int) -> None:
        """Apply layer i's pending update (and those of the other layers in its bucket)."""
        if any(j == i for j, _, _ in self.open):
            self.launch()
        bucket = self.pending.get(i)
        if bucket is None:
            return
        if bucket.work is not None:
            self.comm.wait(bucket.work)
        flat = bucket.flat.to(self.net.device)
        offset = 0
        for j in bucket.layers:
            params = layer_params(self.net, j)
            grads = []
            for p in params:
                grads.append(flat[offset : offset + p.numel()].view(p.shape))
                offset += p.numel()
            self.net.optimizers[j].update(params, grads, grads_are_scratch=True)
            self.loss_sums[j] += flat[offset]
            offset += 1
            del self.pending[j]

    def apply_all(self) -> None:
        self.launch()
        for i in sorted(self.pending):
            self.apply(i)

    def take_losses(self) -> list[float]:
        """The summed batch losses of every layer since the last call (one host sync)."""
        values = torch.stack(self.loss_sums).tolist()
        for s in self.loss_sums:
            s.zero_()
        return values


def _part(rows: torch.Tensor, comm: Comm) -> tuple[torch.Tensor, float]:
    """This rank's contiguous part of a batch's row indices and its share of the rows."""
    mine = rows.tensor_split(comm.world)[comm.rank]
    return mine, mine.numel() / rows.numel()


def _step(net: FFNet, i: int, h_pos: torch.Tensor, h_neg: torch.Tensor, offset_pos: Any, offset_neg: Any) -> Any:
    return net.layers[i].train_step(h_pos, h_neg, None, offset_pos=offset_pos, offset_neg=offset_neg)


def _grads(out: Any, net: FFNet, i: int) -> list[torch.Tensor]:
    return [out.grad_weight] if net.layers[i].bias is None else [out.grad_weight, out.grad_bias]


def train_greedy(net: FFNet, x: torch.Tensor, y: torch.Tensor, comm: Comm, reducer: GradReducer, *, epochs: int,
                 batch_size: int | None, tick: Callable[[int, float], None]) -> list[list[float]]:
    """``FFNet.fit(schedule="greedy")`` with each batch split over the ranks (same generator calls, same order).

    With full batches every rank only ever needs its own rows, so it forwards only those to the next layer.
    """
    rows_total = x.shape[0]
    full = batch_size is None or batch_size >= rows_total
    h_pos = net.overlay_labels(x, y)
    h_neg = net.overlay_labels(x, net.negative_labels(y))
    if full:
        mine, weight = _part(torch.arange(rows_total, device=net.device), comm)
        h_pos, h_neg = h_pos[mine], h_neg[mine]
    prior_pos = prior_neg = None
    history: list[list[float]] = [[] for _ in net.layers]
    for i, layer in enumerate(net.layers):
        for _ in range(epochs):
            batches = net._batches(rows_total, batch_size)
            for rows in batches:
                if full:
                    hp, hn, pp, pn = h_pos, h_neg, prior_pos, prior_neg
                else:
                    mine, weight = _part(rows, comm)
                    hp, hn = h_pos[mine], h_neg[mine]
                    pp, pn = (None, None) if prior_pos is None else (prior_pos[mine], prior_neg[mine])
                if hp.shape[0] == 0:
                    reducer.add(i, None, None, weight)
                else:
                    offset_pos, offset_neg = pp, pn
                    if net.collab == "all" and i + 1 < len(net.layers):
                        later_pos = torch.stack(net.layer_goodness(hp, i)[1:]).sum(0)
                        later_neg = torch.stack(net.layer_goodness(hn, i)[1:]).sum(0)
                        offset_pos = later_pos if offset_pos is None else offset_pos + later_pos
                        offset_neg = later_neg if offset_neg is None else offset_neg + later_neg
                    out = _step(net, i, hp, hn, offset_pos, offset_neg)
                    reducer.add(i, _grads(out, net, i), out.loss, weight)
                reducer.apply(i)
            history[i].append(reducer.take_losses()[i] / len(batches))
            tick(1, history[i][-1])
        if i + 1 < len(net.layers):
            h_pos, g_pos = layer.forward_with_goodness(h_pos)
            h_neg, g_neg = layer.forward_with_goodness(h_neg)
            if net.collab is not None:
                prior_pos = g_pos if prior_pos is None else prior_pos + g_pos
                prior_neg = g_neg if prior_neg is None else prior_neg + g_neg
    return history


def step_all_part(net: FFNet, reducer: GradReducer, x_pos: torch.Tensor, x_neg: torch.Tensor, weight: float) -> None:
    """``FFNet.step_all`` on this rank's part of a batch, gradients queued for all-reduce as each layer finishes."""
    layers = range(len(net.layers))
    if x_pos.shape[0] == 0:
        for i in layers:
            reducer.apply(i)
            reducer.add(i, None, None, weight)
        reducer.launch()
        return
    if net.collab == "all":
        reducer.apply_all()
        goodness_pos, goodness_neg = net.layer_goodness(x_pos), net.layer_goodness(x_neg)
        total_pos, total_neg = torch.stack(goodness_pos).sum(0), torch.stack(goodness_neg).sum(0)
    prior_pos = prior_neg = None
    h_pos, h_neg = x_pos, x_neg
    for i in layers:
        reducer.apply(i)
        offset_pos, offset_neg = prior_pos, prior_neg
        if net.collab == "all":
            offset_pos, offset_neg = total_pos - goodness_pos[i], total_neg - goodness_neg[i]
        out = _step(net, i, h_pos, h_neg, offset_pos, offset_neg)
        reducer.add(i, _grads(out, net, i), out.loss, weight)
        if net.collab == "previous":
            prior_pos = out.goodness_pos if prior_pos is None else prior_pos + out.goodness_pos
            prior_neg = out.goodness_neg if prior_neg is None else prior_neg + out.goodness_neg
        h_pos, h_neg = out.h_pos, out.h_neg
    reducer.launch()


def train_simultaneous(net: FFNet, x: torch.Tensor, y: torch.Tensor, comm: Comm, reducer: GradReducer, *,
                       epochs: int, batch_size: int | None, tick: Callable[[int, float], None]) -> list[list[float]]:
    """``FFNet.fit(schedule="simultaneous")`` with each batch split over the ranks."""
    rows_total = x.shape[0]
    history: list[list[float]] = [[] for _ in net.layers]
    for _ in range(epochs):
        x_pos = net.overlay_labels(x, y)
        x_neg = net.overlay_labels(x, net.negative_labels(y))
        batches = net._batches(rows_total, batch_size)
        for rows in batches:
            if isinstance(rows, slice):
                rows = torch.arange(rows_total, device=net.device)
            mine, weight = _part(rows, comm)
            step_all_part(net, reducer, x_pos[mine], x_neg[mine], weight)
        reducer.apply_all()
        for i, total in enumerate(reducer.take_losses()):
            history[i].append(total / len(batches))
        tick(1, history[-1][-1])
    return history
