"""The public model classes check their arguments at the boundary: a bad one is a clear error naming it, at the
constructor or at the start of the call, never a silent wrong answer or a raw error from deep inside."""

from __future__ import annotations

import pytest
import torch

import ff_kernels as ffk
from ff_kernels.blockwise import small_cnn_blocks
from ff_kernels.data import load_dataset, load_digits, load_mnist


def flat(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(rows, 12, generator=gen), torch.randint(0, 4, (rows,), generator=gen)


def images(rows: int = 6, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(rows, 1, size, size, generator=gen), torch.randint(0, 4, (rows,), generator=gen)


def ffnet() -> ffk.FFNet:
    return ffk.FFNet([12, 6], num_classes=4, seed=0)


def convnet(**kwargs) -> ffk.FFConvNet:
    return ffk.FFConvNet(1, [4], num_classes=4, seed=0, **kwargs)


def blockwise(**kwargs) -> ffk.BlockwiseFF:
    return ffk.BlockwiseFF(small_cnn_blocks(1, (4,)), 4, sample_shape=(1, 4, 4), optimizer="adam", seed=0, **kwargs)


MODELS = {"FFNet": (ffnet, flat), "FFConvNet": (convnet, images), "BlockwiseFF": (blockwise, images)}


# 1. accuracy checks y
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("bad_y", ["short", "column", "float", "list"])
def test_accuracy_checks_y(model, bad_y) -> None:
    make, data = MODELS[model]
    x, y = data()
    y = {"short": y[:1], "column": y[:, None], "float": y.float(), "list": y.tolist()}[bad_y]
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(6,\)"):
        make().accuracy(x, y)


# 2. batch_size is a positive integer everywhere
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["predict", "accuracy", "fit"])
@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "4", True])
def test_batch_size_must_be_a_positive_integer(model, method, batch_size) -> None:
    make, data = MODELS[model]
    x, y = data()
    args = (x,) if method == "predict" else (x, y)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        getattr(make(), method)(*args, batch_size=batch_size)


# 3. fit scans x for NaN and inf once
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_rejects_non_finite_x(model, bad) -> None:
    make, data = MODELS[model]
    x, y = data()
    x[2, 0] = bad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        make().fit(x, y, epochs=1, batch_size=3)


# 4. BlockwiseFF takes float64 (and float16) data, cast to its parameters' dtype
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_blockwise_casts_float_x(dtype) -> None:
    x, y = images()
    model = blockwise()
    model.fit(x.to(dtype), y, epochs=1, batch_size=3)
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in model.parameters())
    assert model.predict(x.to(dtype)).shape == (6,)


# 5. constructors validate their options with the step functions' messages
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: ffk.FFLinear(8, 4, threshold=float("nan")), ValueError, "threshold must be a finite number"),
        (lambda: ffk.FFLinear(8, 4, eps=-1), ValueError, "eps must be positive"),
        (lambda: ffk.FFLinear(8, 4, alpha="4"), ValueError, "alpha must be a finite number"),
        (lambda: ffk.FFLinear(8, 4, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: ffk.FFLinear(8, 4, compute_dtype=torch.int32), TypeError, "compute_dtype must be a floating"),
        (lambda: ffk.FFLinear(3.5, 4), ValueError, "in_features and out_features must be positive integers"),
        (lambda: ffk.FFLinear("8", 4), ValueError, "in_features and out_features"),
        (lambda: ffk.FFLinear(8, True), ValueError, "in_features and out_features"),
        (lambda: ffk.FFNet([12, 6], threshold="x"), ValueError, "threshold must be a finite number"),
        (lambda: ffk.FFNet([12.5, 6]), ValueError, "dims must list"),
        (lambda: ffk.FFConvNet(1, [4], num_classes=4, temperature=0), ValueError, "temperature must be positive"),
        (lambda: ffk.FFConvNet(1, [4], num_classes=4, kernel_size=2.5), ValueError, "kernel_size must be"),
        (lambda: ffk.FFConv2d(1, 4, 3, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: ffk.FFConv2d(1, 4, 3, threshold=float("inf")), ValueError, "threshold must be a finite number"),
        (lambda: ffk.FFConv2d(1, 4, 3, compute_dtype=torch.int8), TypeError, "compute_dtype must be a floating"),
        (lambda: ffk.FFConv2d(2.0, 4, 3), ValueError, "in_channels and out_channels must be positive integers"),
        (lambda: ffk.FFConv2d(1, "4", 3), ValueError, "in_channels and out_channels"),
        (lambda: ffk.FFConv2d(1, 4, 3.5), ValueError, "kernel_size must be"),
        (lambda: blockwise(backend="gpu"), ValueError, "backend must be one of"),
        (lambda: blockwise(backend="cuda"), NotImplementedError, "no backend='cuda' implementation"),
        (lambda: blockwise(temperature="1"), ValueError, "temperature must be a finite number"),
    ],
)
def test_constructors_check_options(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


# 6. num_classes belongs to the class-goodness loss
@pytest.mark.parametrize("loss", ["logistic", "symba"])
def test_conv_layer_num_classes_needs_class_loss(loss) -> None:
    with pytest.raises(ValueError, match="num_classes applies to the class-goodness loss"):
        ffk.FFConv2d(2, 6, 3, num_classes=3, loss=loss)
    assert ffk.FFConv2d(2, 6, 3, num_classes=3, loss="class").num_classes == 3


# 7. every integer label dtype is accepted, bool is not
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.bool])
def test_fit_takes_integer_labels(model, dtype) -> None:
    make, data = MODELS[model]
    x, y = data()
    if dtype == torch.bool:
        with pytest.raises(ValueError, match="y must be an integer tensor"):
            make().fit(x, y.to(dtype), epochs=1, batch_size=3)
        return
    net = make()
    net.fit(x, y.to(dtype), epochs=1, batch_size=3)
    assert 0.0 <= net.accuracy(x, y.to(dtype)) <= 1.0


# 8. image sizes and channels are checked against the network at the boundary
@pytest.mark.parametrize(
    "make,size,match",
    [
        (lambda: ffk.FFConvNet(1, [4, 4], num_classes=4), 1, r"layer 1's 1x1 output .*2x2 max-pool.* at least 4x4"),
        (lambda: ffk.FFConvNet(1, [4, 4], num_classes=4), 2, r"layer 1's output has one position.* at least 4x4"),
        (lambda: ffk.FFConvNet(1, [4, 4], num_classes=4, padding=0), 2, r"layer 1's 3x3 kernel.* at least 8x8"),
        (lambda: ffk.FFConvNet(1, [4, 4], num_classes=4, padding=0), 6, r"layer 2's 3x3 kernel.* at least 8x8"),
    ],
)
def test_conv_net_checks_image_size(make, size, match) -> None:
    x, y = images(size=size)
    with pytest.raises(ValueError, match=match):
        make().fit(x, y, epochs=1)


def test_conv_net_last_layer_needs_no_pool() -> None:
    x, y = images(size=1)
    net = convnet()
    net.fit(x, y, epochs=1, batch_size=3)
    assert net.predict(x).shape == (6,)


def test_blockwise_checks_sample_shape() -> None:
    with pytest.raises(ValueError, match=r"sample_shape=\(3, 4, 4\) does not fit the blocks: block 0"):
        ffk.BlockwiseFF(small_cnn_blocks(1, (4,)), 4, sample_shape=(3, 4, 4))


# 9. the data loaders check their argument types
@pytest.mark.parametrize(
    "load,match",
    [
        (lambda: load_dataset(None), "name must be a dataset name"),
        (lambda: load_digits(test_fraction="0.2"), "test_fraction must be a number"),
        (lambda: load_digits(seed=1.5), "seed must be an integer"),
        (lambda: load_mnist(None), "data_dir must be a folder path"),
        (lambda: load_dataset("cifar10", data_dir=3), "data_dir must be a folder path"),
    ],
)
def test_data_loaders_check_types(load, match) -> None:
    with pytest.raises(TypeError, match=match):
        load()
