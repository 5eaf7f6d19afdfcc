"""Layer Collaboration and SymBa in FFNet, checked step for step against autograd over the whole network.

The autograd side builds the collaborative objective directly: one forward pass of every layer with autograd,
layer i's loss sees the other layers' goodness (all of them, or the earlier ones) detached, and layer i's
parameters get the gradient of its own loss only, applied by ``torch.optim.Adam``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ff_kernels import FFNet
from ff_kernels.ops.cuda_step import extension_unavailable_reason
from ff_kernels.reference import ff_linear_forward_ref, ff_loss_ref

BACKENDS = ["torch"]
if importlib.util.find_spec("ff_kernels.ops.triton.ops") is not None and importlib.util.find_spec("triton"):
    BACKENDS.append("triton")
if extension_unavailable_reason("cpu") is None:
    BACKENDS.append("cuda")

NUM_CLASSES, LR, EPOCHS = 4, 0.01, 3


def make_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(15, 13, generator=gen), torch.randint(0, NUM_CLASSES, (15,), generator=gen)


def make_net(collab: str | None, backend: str, loss: str = "logistic") -> FFNet:
    return FFNet(
        [13, 11, 9, 7],
        num_classes=NUM_CLASSES,
        overlay="append",
        loss=loss,
        threshold=0.5,
        lr=LR,
        collab=collab,
        backend=backend,
        seed=1,
    )


def negatives_for(net: FFNet, y: torch.Tensor, draws: int) -> list[torch.Tensor]:
    """The negative labels ``fit`` will draw, by replaying the net's generator."""
    state = net.generator.get_state()
    labels = [net.negative_labels(y) for _ in range(draws)]
    net.generator.set_state(state)
    return labels


def autograd_collab(net: FFNet, x_pos, x_negs, *, collab, schedule, loss="logistic"):
    """The collaborative objective by autograd; returns the trained (weight, bias) pairs."""
    params = [(layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
              for layer in net.layers]
    optimizers = [torch.optim.Adam(p, lr=LR, foreach=False) for p in params]
    num_layers = len(params)

    def all_goodness(x):
        h, goodness = x, []
        for w, b in params:
            h, g = ff_linear_forward_ref(h, w, b, kappa=1.0 / w.shape[0], normalize="l2", eps=1e-4)
            goodness.append(g)
        return goodness

    def layer_loss(i, g_pos, g_neg):
        seen = [t for t in range(num_layers) if t != i and (collab == "all" or t < i)] if collab else []
        offset_pos = sum(g_pos[t].detach() for t in seen) if seen else None
        offset_neg = sum(g_neg[t].detach() for t in seen) if seen else None
        return ff_loss_ref(g_pos[i], g_neg[i], threshold=0.5, loss=loss, alpha=4.0,
                           offset_pos=offset_pos, offset_neg=offset_neg)

    def step(i, x_neg):
        g_pos, g_neg = all_goodness(x_pos), all_goodness(x_neg)
        grads = torch.autograd.grad(layer_loss(i, g_pos, g_neg), params[i])
        for p, g in zip(params[i], grads):
            p.grad = g

    if schedule == "greedy":
        for i in range(num_layers):
            for _ in range(EPOCHS):
                step(i, x_negs[0])
                optimizers[i].step()
    else:
        for epoch in range(EPOCHS):
            for i in range(num_layers):
                step(i, x_negs[epoch])
            for opt in optimizers:
                opt.step()
    return params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["greedy", "simultaneous"])
@pytest.mark.parametrize("collab", ["all", "previous", None])
def test_collab_matches_autograd_objective(collab, schedule, backend):
    x, y = make_problem()
    net = make_net(collab, backend)
    net.overlay_value.fill_(float(x.max()))
    y_negs = negatives_for(net, y, 1 if schedule == "greedy" else EPOCHS)
    x_pos = net.overlay_labels(x, y)
    x_negs = [net.overlay_labels(x, y_neg) for y_neg in y_negs]
    expected = autograd_collab(net, x_pos, x_negs, collab=collab, schedule=schedule)

    net.fit(x, y, epochs=EPOCHS, schedule=schedule)
    for layer, (w, b) in zip(net.layers, expected):
        torch.testing.assert_close(layer.weight, w.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.bias, b.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["greedy", "simultaneous"])
def test_collab_changes_training(schedule):
    """The offsets must reach the steps: with collaboration the weights differ from plain FF."""
    x, y = make_problem()
    plain, collab = make_net(None, "torch"), make_net("all", "torch")
    plain.fit(x, y, epochs=EPOCHS, schedule=schedule)
    collab.fit(x, y, epochs=EPOCHS, schedule=schedule)
    assert not torch.allclose(plain.layers[0].weight, collab.layers[0].weight)


@pytest.mark.parametrize("schedule", ["greedy", "simultaneous"])
def test_symba_matches_autograd_objective(schedule):
    x, y = make_problem()
    net = make_net(None, "torch", loss="symba")
    net.overlay_value.fill_(float(x.max()))
    y_negs = negatives_for(net, y, 1 if schedule == "greedy" else EPOCHS)
    x_pos = net.overlay_labels(x, y)
    x_negs = [net.overlay_labels(x, y_neg) for y_neg in y_negs]
    expected = autograd_collab(net, x_pos, x_negs, collab=None, schedule=schedule, loss="symba")
    net.fit(x, y, epochs=EPOCHS, schedule=schedule)
    for layer, (w, b) in zip(net.layers, expected):
        torch.testing.assert_close(layer.weight, w.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.bias, b.detach(), rtol=1e-4, atol=1e-6)


def test_unknown_collab_is_rejected():
    with pytest.raises(ValueError, match="collab must be one of"):
        FFNet([13, 11], num_classes=NUM_CLASSES, overlay="append", collab="everything")
