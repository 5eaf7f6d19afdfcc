"""BlockwiseFF.from_torchvision on unmodified torchvision models: how they are cut, and that ResNet-18 learns digits
block-wise and end to end. Needs torchvision (``.venv-vision``, made by scripts/setup-vision-env.sh; scripts/test.sh
runs this file there); skipped with the reason where torchvision does not load."""

from __future__ import annotations

import pytest
import torch

try:
    import torchvision
except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
    pytest.skip(f"torchvision does not load here ({err}); run scripts/setup-vision-env.sh", allow_module_level=True)

import ff_kernels as ffk
from ff_kernels import memory_blockwise
from ff_kernels.blockwise import torchvision_blocks
from ff_kernels.data import load_digits


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_resnet18_is_its_stem_and_eight_residual_blocks() -> None:
    model = ffk.BlockwiseFF.from_torchvision("resnet18", 10, seed=0, backend="torch")
    assert len(model.blocks) == 9
    assert model.output_shapes() == [(64, 32, 32)] * 3 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 2 + [(512, 4, 4)] * 2
    reference = torchvision.models.resnet18()
    # everything of torchvision's ResNet-18 but its classifier, with the 7x7 stem convolution made 3x3
    expected = _count([reference]) - _count([reference.fc]) - reference.conv1.weight.numel() + 64 * 3 * 3 * 3
    assert _count(model.blocks) == expected
    assert all(isinstance(head, torch.nn.Conv2d) and head.kernel_size == (1, 1) for head in model.heads)
    full = torchvision_blocks("resnet18", small_input=False)
    assert isinstance(full[0][-1], torch.nn.MaxPool2d) and full[0][0].stride == (2, 2)


def test_mobilenet_v3_small_is_grouped_at_each_downsampling() -> None:
    model = ffk.BlockwiseFF.from_torchvision("mobilenet_v3_small", 10, seed=0, backend="torch")
    assert model.output_shapes() == [(16, 32, 32), (16, 16, 16), (24, 8, 8), (48, 4, 4), (576, 2, 2)]
    reference = torchvision.models.mobilenet_v3_small()
    assert _count(model.blocks) == _count([reference.features]) - reference.features[0][0].weight.numel() + 16 * 27


def test_resnet18_learns_digits_block_wise_and_end_to_end() -> None:
    data = load_digits(images=True)
    x, y = data.x_train[:512], data.y_train[:512]
    options = dict(in_channels=1, image_size=8, optimizer="adam", seed=0)
    blockwise = ffk.BlockwiseFF.from_torchvision("resnet18", 10, backend="torch", **options)
    blockwise.fit(x, y, epochs=2, batch_size=64)
    baseline = ffk.BackpropBaseline.from_torchvision("resnet18", 10, **options)
    baseline.fit(x, y, epochs=2, batch_size=64)
    for model in (blockwise, baseline):
        # chance is 0.1; after 16 steps BatchNorm's running statistics (which eval mode reads) lag the weights, so
        # both stay far from what longer training reaches (README: block-wise vs backprop on digits)
        assert model.accuracy(data.x_test, data.y_test) > 0.35


def _resnet(recompute: bool, **kwargs) -> ffk.BlockwiseFF:
    options = dict(in_channels=1, image_size=8, optimizer="sgd", seed=0, backend="torch", **kwargs)
    return ffk.BlockwiseFF.from_torchvision("resnet18", 10, recompute=recompute, **options)


def _digits_batches(n: int = 2):
    data = load_digits(images=True)
    return [(data.x_train[i * 32:(i + 1) * 32], data.y_train[i * 32:(i + 1) * 32]) for i in range(n)]


def _assert_same_training(a: ffk.BlockwiseFF, b: ffk.BlockwiseFF) -> None:
    for (name, value), other in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(value, other), name  # parameters, running statistics and batch counts alike
    for opt_a, opt_b in zip(a.optimizers, b.optimizers):
        for state_a, state_b in zip(opt_a.state.values(), opt_b.state.values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a if torch.is_tensor(state_a[k]))


@pytest.mark.parametrize("schedule", ["simultaneous", "greedy"])
def test_recomputing_basic_blocks_train_bitwise_as_autograd_does(schedule) -> None:
    """The first stage's residual blocks (the largest outputs) are trained op by op with recomputation: the same
    losses, gradients (hooks fire once each), updates, BatchNorm running statistics and momentum, bit for bit."""
    lean, plain = _resnet(True), _resnet(False)
    assert lean.recompute_blocks == [1, 2] and plain.recompute_blocks == []
    calls: dict[int, int] = {}
    for i, p in enumerate(lean.blocks[1].parameters()):
        p.register_hook(lambda grad, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    for x, y in _digits_batches():
        x = lean.prepare(x)
        only = None if schedule == "simultaneous" else 2
        losses = lean.step_batch(x, y, only=only)
        assert [torch.equal(a, b) for a, b in zip(losses, plain.step_batch(x, y, only=only))] == [True] * len(losses)
        _assert_same_training(lean, plain)
    assert lean.recomputes(2, torch.zeros(2, 64, 8, 8))
    assert calls == ({i: 2 for i in range(6)} if schedule == "simultaneous" else {})
    assert all(p.grad is None for p in lean.parameters())


def test_recomputation_gives_way_to_hooks_autocast_and_frozen_parameters() -> None:
    """Where the op-by-op step would skip what the block's own forward and autograd do, the block runs as usual."""
    h = torch.zeros(2, 64, 8, 8)
    model = _resnet(True)
    assert model.recomputes(1, h) and not model.recomputes(0, h) and not model.recomputes(3, h)
    handle = model.blocks[1].bn2.register_forward_hook(lambda *args: None)
    assert not model.recomputes(1, h)
    handle.remove()
    model.blocks[2].bn1.eval()
    assert not model.recomputes(2, h)
    model.blocks[2].bn1.train()
    model.blocks[1].conv1.weight.requires_grad_(False)
    assert not model.recomputes(1, h) and model.recomputes(2, h)
    assert not _resnet(True, autocast_dtype=torch.bfloat16).recomputes(1, h)
    assert not model.recomputes(2, h.requires_grad_())


def test_recomputing_blocks_keep_three_outputs_for_the_backward_instead_of_five() -> None:
    """What the memory report's model reads: a first-stage block's saved bytes per sample, its head's included."""
    cfg = memory_blockwise.BlockwiseMemoryConfig(method="blockwise", model="resnet18", batch=8, image_size=8,
                                                 in_channels=3, steps=1)
    saved = {}
    for recompute in (True, False):
        trainer = ffk.BlockwiseFF.from_torchvision("resnet18", 10, image_size=8, seed=0, backend="torch",
                                                   recompute=recompute)
        saved[recompute] = memory_blockwise.block_profile(trainer, cfg)[1]["saved_per_sample"]
    output = 64 * 8 * 8 * 4  # fp32 bytes of one sample's output (and input)
    assert saved[False] - saved[True] == 2 * output  # neither convolution's output nor the first ReLU's ...
    assert 3 * output < saved[True] < 3.2 * output  # ... but x, the second convolution's output, the output, the head
