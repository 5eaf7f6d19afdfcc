"""FFConv2d and FFConvNet: the module is the step functions with its options, the network trains layer-locally in
both schedules and both loss families, saves and resumes; on digits it reaches 97% test accuracy; and
``ff-kernels train --model conv``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import ff_kernels as ffk
from ff_kernels.cli import main
from ff_kernels.ops import cuda_step


def images(rows: int, channels: int = 1, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(rows, channels, size, size, generator=gen), torch.randint(0, 10, (rows,), generator=gen)


# ---------------------------------------------------------------------------------------------------------------
# FFConv2d


def test_layer_class_step_is_the_function() -> None:
    torch.manual_seed(0)
    layer = ffk.FFConv2d(3, 20, 3, padding=1, stride=(1, 2), loss="class", num_classes=10, temperature=0.5)
    assert layer.normalize == "none" and layer.kernel_size == (3, 3) and layer.stride == (1, 2)
    x, y = images(6, channels=3, size=9)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    out = layer.train_step(x, y)
    expected = ffk.ff_conv2d_class_step(x, y, w, b, num_classes=10, padding=1, stride=(1, 2), temperature=0.5)
    assert isinstance(out, ffk.FFClassStepOutput)
    for name in ("loss", "goodness", "h", "grad_weight", "grad_bias"):
        assert torch.equal(getattr(out, name), getattr(expected, name)), name
    h, g = layer.forward_with_goodness(x)
    assert torch.equal(h, out.h) and torch.equal(g, out.goodness) and torch.equal(layer(x), h)
    assert layer.goodness(x).shape == (6, 10)


def test_layer_pos_neg_step_and_update() -> None:
    torch.manual_seed(1)
    layer = ffk.FFConv2d(2, 6, (3, 2), loss="symba", alpha=2.0)
    assert layer.normalize == "l2" and layer.num_classes is None
    x_pos, _ = images(5, channels=2, seed=1)
    x_neg, _ = images(5, channels=2, seed=2)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = ffk.optim.SGD(layer.parameters(), lr=0.5)
    offsets = torch.rand(5), torch.rand(5)
    out = layer.train_step(x_pos, x_neg, opt, offset_pos=offsets[0], offset_neg=offsets[1])
    grads = ffk.ff_conv2d_step(x_pos, x_neg, w, b, loss="symba", alpha=2.0, offset_pos=offsets[0],
                               offset_neg=offsets[1])
    assert out.grad_weight is None and torch.equal(out.loss, grads.loss)
    torch.testing.assert_close(layer.weight.detach(), w - 0.5 * grads.grad_weight)
    assert layer.goodness(x_pos).shape == (5,)
    assert "loss='symba'" in repr(layer)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(loss="class"), "num_classes >= 2 dividing out_channels=20"),
        (dict(loss="class", num_classes=3), "dividing out_channels=20"),
        (dict(loss="hinge"), "loss must be one of"),
        (dict(kernel_size=0), "kernel_size must be"),
        (dict(stride=(1, 2, 3)), "stride must be"),
        (dict(normalize="batch"), "normalize must be one of"),
    ],
)
def test_layer_rejects_bad_options(kwargs, message) -> None:
    args = dict(in_channels=1, out_channels=20, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ffk.FFConv2d(**args)


def test_layer_class_step_takes_no_offsets() -> None:
    layer = ffk.FFConv2d(1, 10, 3, loss="class", num_classes=10)
    x, y = images(4)
    with pytest.raises(ValueError, match="offsets belong to the positive/negative losses"):
        layer.train_step(x, y, offset_pos=torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------------
# FFConvNet


@pytest.mark.parametrize("schedule", ["simultaneous", "greedy"])
@pytest.mark.parametrize("loss", ["class", "logistic", "symba"])
def test_net_trains_in_every_mode(loss, schedule) -> None:
    x, y = images(40)
    channels = [20, 10] if loss == "class" else [8, 6]
    net = ffk.FFConvNet(1, channels, loss=loss, kernel_size=[3, 1], seed=0)
    assert net.layers[0].weight.shape == (channels[0], 1 if loss == "class" else 11, 3, 3)
    assert net.layers[1].weight.shape[2:] == (1, 1)
    before = [layer.weight.detach().clone() for layer in net.layers]
    history = net.fit(x, y, epochs=2, batch_size=16, schedule=schedule)
    assert [len(h) for h in history] == [2, 2] and all(np.isfinite(v) for h in history for v in h)
    assert all(not torch.equal(b, layer.weight) for b, layer in zip(before, net.layers))
    scores = net.class_scores(x, batch_size=7)
    assert scores.shape == (40, 10) and bool(torch.isfinite(scores).all())
    assert net.predict(x).shape == (40,) and 0.0 <= net.accuracy(x, y) <= 1.0


def test_greedy_leaves_earlier_layers_alone() -> None:
    x, y = images(32)
    net = ffk.FFConvNet(1, [20, 20], seed=1)
    net.step_batch(x, y, only=0)
    first = net.layers[0].weight.detach().clone()
    second = net.layers[1].weight.detach().clone()
    outs = net.step_batch(x, y, only=1)
    assert [i for i, _ in outs] == [1]
    assert torch.equal(net.layers[0].weight, first) and not torch.equal(net.layers[1].weight, second)


def test_simultaneous_feeds_each_layer_the_pooled_step_output() -> None:
    """Layer 2 is fed layer 1's h from its step (pre-update weights), max-pooled and instance-normalised."""
    x, y = images(16)
    net = ffk.FFConvNet(1, [20, 10], seed=2)
    twin = ffk.FFConvNet(1, [20, 10], seed=2)
    outs = net.step_batch(x, y)
    first = twin.layers[0].train_step(x, y, twin.optimizers[0])
    passed_on = torch.nn.functional.instance_norm(torch.nn.functional.max_pool2d(first.h, 2), eps=1e-4)
    second = twin.layers[1].train_step(passed_on, y, twin.optimizers[1])
    assert torch.equal(outs[0][1].h, first.h) and torch.equal(outs[1][1].loss, second.loss)
    assert outs[1][1].h.shape == (16, 10, 4, 4)


def test_predict_skip_first_and_label_channels() -> None:
    x, y = images(12)
    net = ffk.FFConvNet(1, [20, 20], seed=3)
    net.fit(x, y, epochs=1, batch_size=6)
    with torch.no_grad():
        h, g1 = net.layers[0].forward_with_goodness(x)
        _, g2 = net.layers[1].forward_with_goodness(net.next_input(0, h))
    torch.testing.assert_close(net.class_scores(x), g1 + g2)
    net.predict_skip_first = True
    torch.testing.assert_close(net.class_scores(x), g2)
    pos_neg = ffk.FFConvNet(1, [8], loss="logistic", seed=3)
    pos_neg.label_value.fill_(0.7)
    with_labels = pos_neg.with_labels(x, 4)
    assert with_labels.shape == (12, 11, 8, 8) and torch.equal(with_labels[:, :1], x)
    assert torch.all(with_labels[:, 5] == 0.7) and float(with_labels[:, 1:].sum()) == pytest.approx(0.7 * 12 * 64)


@pytest.mark.parametrize("next_norm", ["instance", "layer", "none"])
def test_next_input_normalisation(next_norm) -> None:
    net = ffk.FFConvNet(1, [20, 20], next_norm=next_norm)
    h = torch.rand(3, 20, 6, 6) * torch.arange(1, 21).view(1, 20, 1, 1)
    out = net.next_input(0, h)
    assert out.shape == (3, 20, 3, 3)
    pooled = torch.nn.functional.max_pool2d(h, 2)
    if next_norm == "none":
        assert torch.equal(out, pooled)
        return
    dims = (2, 3) if next_norm == "instance" else (1, 2, 3)
    variance = pooled.var(dims, unbiased=False)
    torch.testing.assert_close(out.mean(dims), torch.zeros_like(variance), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dims, unbiased=False), variance / (variance + net.eps), atol=1e-5, rtol=1e-4)


def test_instance_norm_refuses_a_single_position() -> None:
    net = ffk.FFConvNet(1, [20, 20])
    with pytest.raises(ValueError, match="layer 1's output has one position"):
        net.next_input(0, torch.rand(3, 20, 2, 2))
    assert ffk.FFConvNet(1, [20, 20], next_norm="layer").next_input(0, torch.rand(3, 20, 2, 2)).shape == (3, 20, 1, 1)


def test_negative_labels_are_wrong() -> None:
    net = ffk.FFConvNet(1, [8], loss="logistic", seed=4)
    labels = torch.arange(10).repeat(20)
    assert bool((net.negative_labels(labels) != labels).all())


def test_save_load_resumes(tmp_path: Path) -> None:
    x, y = images(24)
    net = ffk.FFConvNet(1, [20, 10], optimizer="sgd", lr=0.05, optimizer_options={"momentum": 0.9}, seed=5)
    net.fit(x, y, epochs=1, batch_size=8)
    net.save(tmp_path / "net.pt")
    loaded = ffk.FFConvNet.load(tmp_path / "net.pt")
    assert torch.equal(loaded.class_scores(x), net.class_scores(x))
    batch = (x[:8], y[:8])
    net.step_batch(*batch)
    loaded.step_batch(*batch)
    for a, b in zip(net.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(channels=[]), "at least one layer"),
        (dict(channels=[15]), "dividing out_channels=15"),
        (dict(channels=[20], num_classes=1), "num_classes must be at least 2"),
        (dict(channels=[20, 20], pool=[True]), "pool lists 1 layers"),
        (dict(channels=[20, 20], kernel_size=[3]), "kernel_size lists 1 layers"),
        (dict(channels=[20], predict_skip_first=True), "at least two layers"),
        (dict(channels=[20], optimizer="lbfgs"), "optimizer must be one of"),
    ],
)
def test_net_rejects_bad_options(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ffk.FFConvNet(1, **kwargs)


def test_net_checks_its_data() -> None:
    net = ffk.FFConvNet(1, [20])
    x, y = images(4)
    with pytest.raises(ValueError, match=r"\(samples, 1, height, width\)"):
        net.fit(x.flatten(1), y)
    with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
        net.fit(x, y + 10)
    with pytest.raises(ValueError, match="epochs must be positive"):
        net.fit(x, y, epochs=0)


@pytest.mark.slow
def test_digits_reach_97_percent() -> None:
    """The README's recipe (``ff-kernels train --model conv``'s defaults) on digits, 1x8x8 images."""
    data = ffk.data.load_digits(images=True)
    net = ffk.FFConvNet(1, [60, 120], seed=0)
    net.fit(data.x_train, data.y_train, epochs=20, batch_size=32)
    assert net.accuracy(data.x_test, data.y_test) >= 0.97


# ---------------------------------------------------------------------------------------------------------------
# ff-kernels train --model conv


def test_train_conv_prints_accuracy_time_and_memory(capsys) -> None:
    argv = ["train", "--model", "conv", "--channels", "20", "--epochs", "1", "--no-progress", "--compare-reference"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "digits: 1348 train / 449 test samples, 1x8x8 images; channels [20], simultaneous" in out
    assert "loss class" in out and "test accuracy" in out and "wall time" in out and "peak resident memory" in out
    assert "speed-up" in out


def test_train_conv_cifar10_from_python_batches(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, rows in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 6)]:
        batch = {b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, rows)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    argv = ["train", "--model", "conv", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--channels", "10",
            "--loss", "logistic", "--epochs", "1", "--no-progress"]
    assert main(argv) == 0
    assert "cifar10: 20 train / 6 test samples, 3x32x32 images; channels [10]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--collab", "all"], "--collab applies to --model mlp only"),
        (["--kernel-size", "3,3,3"], "--kernel-size gives 3 sizes for 2 layers"),
        (["--channels", "25"], "dividing out_channels=25"),
    ],
)
def test_train_conv_errors(argv, message, capsys) -> None:
    assert main(["train", "--model", "conv", "--epochs", "1", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_conv_writes_its_tables(tmp_path: Path, capsys) -> None:
    argv = ["bench", "--op", "conv", "--quick", "--rows", "2", "--repeats", "1", "--dtype", "float32",
            "--variants", "eager,torch,cuda,gemm_floor", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cpu float32 B=2 3x32x32 -> 60x32x32 k=3" in out and "x eager" in out
    # backend='cuda' on CPU tensors: the extension's conv path (torch's closed form with its fused goodness pass)
    built = cuda_step.extension_unavailable_reason() is None
    assert built or "cuda          unavailable: backend='cuda' is unavailable" in out
    rows = json.loads((tmp_path / "bench_conv.json").read_text())["rows"]
    timed = {(r["variant"], r["in_channels"]) for r in rows if r["status"] == "ok"}
    variants = ("eager", "torch", "cuda", "gemm_floor") if built else ("eager", "torch", "gemm_floor")
    assert timed == {(v, c) for v in variants for c in (3, 60)}
    assert (tmp_path / "bench_conv.csv").read_text().startswith("variant,device,dtype,batch")
    with pytest.raises(SystemExit):
        main(["bench", "--op", "conv", "--variants", "floor"])
