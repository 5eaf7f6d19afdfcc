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
