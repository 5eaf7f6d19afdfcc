"""Images for conv layers: digits as 1x8x8, MNIST as 1x28x28, and CIFAR-10 from the standard python batches
(tiny batches written here in that format: pickled dicts of b'data' (n, 3072) uint8 and b'labels')."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ff_kernels.data import load_cifar10, load_dataset, load_digits, load_mnist, write_idx

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(folder: Path, rows: int = 3, seed: int = 0, str_keys: bool = False) -> dict[str, tuple]:
    """The six batches of the python version, ``rows`` images each; returns what was written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in BATCHES:
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, rows)]
        keys = ("data", "labels", "batch_label") if str_keys else (b"data", b"labels", b"batch_label")
        batch = dict(zip(keys, (data, labels, f"{name} of 6".encode())))
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    return written


def test_digits_as_images() -> None:
    flat, images = load_digits(), load_digits(images=True)
    assert images.x_train.shape == (1348, 1, 8, 8) and images.sample_shape == (1, 8, 8)
    assert torch.equal(images.x_train.flatten(1), flat.x_train) and torch.equal(images.y_test, flat.y_test)
    assert images.num_features == 64 and flat.sample_shape == (64,)


def test_mnist_as_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 4), ("t10k", 3)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    images = load_mnist(tmp_path, images=True)
    assert images.x_train.shape == (4, 1, 28, 28) and images.x_test.shape == (3, 1, 28, 28)
    assert torch.equal(images.x_train.flatten(1), load_mnist(tmp_path).x_train)
    assert load_dataset("mnist", tmp_path, images=True).sample_shape == (1, 28, 28)


@pytest.mark.parametrize("layout", ["extracted", "folder-itself", "archive"])
def test_cifar10_layouts(tmp_path: Path, layout: str) -> None:
    if layout == "folder-itself":
        written = write_cifar(tmp_path)
        data_dir = tmp_path
    else:
        written = write_cifar(tmp_path / "cifar-10-batches-py", str_keys=True)
        data_dir = tmp_path
        if layout == "archive":
            data_dir = tmp_path / "downloads"
            data_dir.mkdir()
            with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
                tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_cifar10(data_dir, images=True)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # batches in order, channel-major rows (the first 1024 values are the red plane), scaled to [0, 1]
    first, labels = written["data_batch_1"]
    np.testing.assert_allclose(ds.x_train[0].numpy(), first[0].reshape(3, 32, 32) / 255.0, rtol=1e-6)
    assert ds.y_train[:3].tolist() == labels and ds.y_test.tolist() == written["test_batch"][1]
    flat = load_dataset("cifar10", data_dir)
    assert flat.x_train.shape == (15, 3072) and torch.equal(flat.x_train, ds.x_train.flatten(1))


def test_cifar10_missing_names_the_folder_and_files(tmp_path: Path) -> None:
    expected = "cifar-10-python.tar.gz.*cifar-10-batches-py.*data_batch_1.*test_batch"
    with pytest.raises(FileNotFoundError, match=expected):
        load_cifar10(tmp_path)
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("cifar10")


def test_cifar10_archive_without_a_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in BATCHES[1:]:
            tar.add(tmp_path / "src" / name, arcname=f"cifar-10-batches-py/{name}")
    with pytest.raises(ValueError, match="lacks data_batch_1"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    "content,message",
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"shape \(n, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels must be in 0..9"),
        ({b"images": np.zeros((2, 3072), np.uint8)}, "'data' and 'labels'"),
        ([1, 2, 3], "not a dict"),
    ],
)
def test_cifar10_bad_batch_names_the_file(tmp_path: Path, content, message: str) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(ValueError, match=message) as info:
        load_cifar10(tmp_path)
    assert "test_batch" in str(info.value)


class _Payload:
    """What a tampered batch could hold: unpickling it would call os.system."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar10_refuses_code_in_a_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}))
    with pytest.raises(ValueError, match=r"data_batch_2: not a CIFAR-10 python batch \(.*system is not part"):
        load_cifar10(tmp_path)
