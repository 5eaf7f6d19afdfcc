"""BlockwiseFF and BackpropBaseline on a small hand-built CNN (no torchvision): they learn digits, no gradient crosses
a block boundary, the options do what they say, and the block-wise memory report runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

import ff_kernels as ffk
from ff_kernels import memory_blockwise
from ff_kernels.blockwise import build_blocks, crop_flip, lr_factor, small_cnn_blocks
from ff_kernels.cli import main
from ff_kernels.data import load_digits

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def one_thread():
    """These steps are small: one thread avoids waiting on cores that other processes hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_digits(images=True)


def _model(**kwargs) -> ffk.BlockwiseFF:
    kwargs = {"optimizer": "adam", "seed": 0, **kwargs}
    return ffk.BlockwiseFF(build_blocks("small_cnn", in_channels=1, seed=0), 10, sample_shape=SHAPE, **kwargs)


def _batch(n=16):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_blockwise_and_backprop_learn_digits(digits) -> None:
    model = _model()
    history = model.fit(digits.x_train, digits.y_train, epochs=3, batch_size=64)
    assert [len(h) for h in history] == [3, 3, 3] and history[-1][-1] < history[-1][0]
    assert model.accuracy(digits.x_test, digits.y_test) > 0.85  # chance is 0.1
    baseline = ffk.BackpropBaseline(build_blocks("small_cnn", in_channels=1, seed=0), 10, sample_shape=SHAPE,
                                    optimizer="adam", seed=0)
    assert len(baseline.fit(digits.x_train, digits.y_train, epochs=3, batch_size=64)) == 3
    assert baseline.accuracy(digits.x_test, digits.y_test) > 0.85


def test_greedy_schedule_trains_one_block_at_a_time(digits) -> None:
    model = _model(predict="last")
    history = model.fit(digits.x_train[:256], digits.y_train[:256], epochs=2, batch_size=64, schedule="greedy")
    assert [len(h) for h in history] == [2, 2, 2]
    assert model.training and all(block.training for block in model.blocks)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_a_later_blocks_loss_leaves_earlier_blocks_untouched() -> None:
    model = _model()
    x, y = _batch()
    first, second = _state(model.blocks[0]), _state(model.blocks[1])
    model.step_batch(x, y, only=1)
    for name, value in model.blocks[0].state_dict().items():  # parameters and BatchNorm statistics alike
        assert torch.equal(value, first[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(v, second[k]) for k, v in model.blocks[1].state_dict().items())


def test_each_parameter_gets_the_gradient_of_its_own_blocks_loss_alone() -> None:
    """In a simultaneous step every gradient hook fires once, and block 0 ends exactly where training it alone
    takes it: nothing of block 1's or 2's loss reaches it."""
    x, y = _batch()
    together, alone = _model(), _model()
    calls: dict[int, int] = {}
    for i, p in enumerate(together.parameters()):
        p.register_hook(lambda grad, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    losses = together.step_batch(x, y)
    assert len(losses) == 3 and calls == {i: 1 for i in range(len(list(together.parameters())))}
    alone.step_batch(x, y, only=0)
    for a, b in zip(together.blocks[0].parameters(), alone.blocks[0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pass_on_detaches_and_optionally_layer_normalises() -> None:
    out = torch.randn(4, 3, 5, 5, requires_grad=True) * 3 + 1
    assert not _model().pass_on(out).requires_grad
    normed = _model(normalize=True).pass_on(out)
    torch.testing.assert_close(normed.flatten(1).mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.flatten(1).var(1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_prediction_averages_block_softmaxes_or_takes_the_last() -> None:
    x, _ = _batch()
    mean, last = _model(), _model(predict="last", temperature=0.5)
    for model in (mean, last):
        scores = model.class_scores(x)
        torch.testing.assert_close(scores.sum(1), torch.ones(len(x)))
        assert torch.equal(model.predict(x), scores.argmax(1))
    with torch.no_grad():
        last.eval()
        h = x.contiguous(memory_format=torch.channels_last)
        for block in last.blocks:
            h = block(h)
        head = last.heads[-1]
        expected = torch.softmax(ffk.class_goodness(h, head.weight, head.bias) / 0.5, dim=1)
    torch.testing.assert_close(last.class_scores(x), expected)


def test_bf16_autocast_keeps_fp32_parameters_and_loss() -> None:
    model = _model(autocast_dtype=torch.bfloat16)
    losses = model.step_batch(*_batch())
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("optimizer,kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                            ("adamw", torch.optim.AdamW)])
def test_one_optimizer_per_block_and_head(optimizer, kind) -> None:
    model = _model(optimizer=optimizer, optimizer_options={"weight_decay": 0.0})
    assert len(model.optimizers) == len(model.blocks) == len(model.heads) == 3
    for opt, block, head in zip(model.optimizers, model.blocks, model.heads):
        assert isinstance(opt, kind)
        assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in [*block.parameters(),
                                                                                   *head.parameters()]}
    assert model.optimizers[0].defaults["lr"] == {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}[optimizer]


def test_lr_schedules() -> None:
    cosine = lr_factor("cosine", 10, warmup_steps=2)
    assert [cosine(0), cosine(1), cosine(2)] == [0.5, 1.0, 1.0] and cosine(10) == pytest.approx(0.0)
    step = lr_factor("step", 8)
    assert [step(0), step(4), step(6)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]
    assert lr_factor("constant", 5)(4) == 1.0
    model = _model(optimizer="sgd", lr=0.1, lr_schedule="cosine")
    x, y = _batch(32)
    model.fit(x, y, epochs=2, batch_size=16)
    assert model.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_state_dict_round_trip() -> None:
    x, y = _batch()
    model = _model()
    model.step_batch(x, y)
    copy = _model()
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.class_scores(x), model.class_scores(x))


def test_crop_flip_keeps_shapes_and_pixels() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = crop_flip(x, padding=0)
    for original, augmented in zip(x, out):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(-1))
    assert crop_flip(x).shape == x.shape


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: ffk.BlockwiseFF([], 10, sample_shape=SHAPE), TypeError, "blocks must be"),
        (lambda: _model_with(num_classes=1), ValueError, "num_classes"),
        (lambda: _model(predict="vote"), ValueError, "predict must be one of"),
        (lambda: _model(temperature=0.0), ValueError, "temperature"),
        (lambda: _model(optimizer="lamb"), ValueError, "optimizer must be one of"),
        (lambda: _model(lr_schedule="linear"), ValueError, "lr_schedule must be one of"),
        (lambda: _model().fit(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), ValueError, "x must be"),
        (lambda: _model().fit(torch.rand(4, *SHAPE), torch.full((4,), 10)), ValueError, r"labels in \[0, 10\)"),
        (lambda: _model().fit(*_batch(), schedule="layerwise"), ValueError, "schedule must be one of"),
    ],
)
def test_bad_arguments_are_clear_errors(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def _model_with(num_classes: int) -> ffk.BlockwiseFF:
    return ffk.BlockwiseFF(small_cnn_blocks(), num_classes, sample_shape=SHAPE)


def test_from_torchvision_without_torchvision_says_how_to_get_it() -> None:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        with pytest.raises(ImportError, match=r"ff-kernels\[vision\]|does not load beside torch"):
            ffk.BlockwiseFF.from_torchvision("resnet18", 10)
    else:
        pytest.skip("torchvision is importable here (tests/test_blockwise_torchvision.py covers it)")
    with pytest.raises(ValueError, match="name must be one of"):
        ffk.BlockwiseFF.from_torchvision("vgg16", 10)


def test_memory_measurement_and_model_in_process() -> None:
    cfg = memory_blockwise.BlockwiseMemoryConfig(method="blockwise", model="small_cnn", batch=16, image_size=8,
                                                 in_channels=3, steps=1)
    row = memory_blockwise.measure(cfg)
    assert row["blocks"] == 3 and row["peak_bytes"] > 0 and len(row["profile"]) == 3
    blockwise = memory_blockwise.model_working_bytes("blockwise", row["profile"], 512)
    backprop = memory_blockwise.model_working_bytes("backprop", row["profile"], 512)
    assert 0 < blockwise < backprop


def test_memory_command_writes_the_report(tmp_path, capsys, monkeypatch) -> None:
    """The command's plumbing, table and files; each configuration measured in this process instead of a fresh
    one (``measure_subprocess`` itself is the MLP report's, tested there)."""
    monkeypatch.setattr(memory_blockwise, "measure_subprocess", lambda cfg, *args: memory_blockwise.measure(cfg))
    argv = ["memory", "--model", "small_cnn", "--image-size", "8", "--batch", "8", "--depths", "3", "--steps", "1",
            "--jobs", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "block-wise peak is" in out and "blockwise" in out and "backprop" in out
    rows = json.loads((tmp_path / "memory_blockwise.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"blockwise", "backprop"} and (tmp_path / "memory_blockwise.csv").exists()


def test_train_command_block_wise_and_baseline(capsys) -> None:
    argv = ["train", "--model", "small_cnn", "--epochs", "1", "--optimizer", "adam", "--baseline", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "small_cnn, simultaneous, 1 epochs, batch 128" in out
    assert "block-wise: train accuracy" in out and "backprop: train accuracy" in out


def test_train_command_rejects_a_missing_head_backend(capsys) -> None:
    assert main(["train", "--model", "small_cnn", "--backend", "cuda"]) == 2
    assert "class-goodness kernels" in capsys.readouterr().err
