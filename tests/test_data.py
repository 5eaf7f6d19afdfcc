"""Tests for ff_kernels.data: offline data sets and the IDX reader/writer."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ff_kernels import data
from ff_kernels.data import Dataset, load_dataset, load_digits, load_mnist, read_idx, write_idx

MNIST_STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# ---------------------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_classes() -> None:
    ds = load_digits()
    assert isinstance(ds, Dataset)
    assert ds.name == "digits"
    assert ds.num_classes == 10
    assert ds.num_features == 64
    assert ds.x_train.shape[1] == 64
    assert ds.x_test.shape[1] == 64
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(1797 * 0.25)
    assert len(ds.y_train) == len(ds.x_train)
    assert len(ds.y_test) == len(ds.x_test)
    assert ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64
    assert ds.x_test.dtype == torch.float32
    assert ds.y_test.dtype == torch.int64
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) == 0.0
        assert float(x.max()) == 1.0  # 16/16: scaling divides by the real maximum pixel value
    assert set(ds.y_train.tolist()) == set(range(10))
    assert set(ds.y_test.tolist()) <= set(range(10))


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    return [(*r, int(c)) for r, c in zip(x.mul(16).round().to(torch.int64).tolist(), y.tolist(), strict=True)]


def test_digits_split_deterministic_and_disjoint() -> None:
    a, b = load_digits(seed=3), load_digits(seed=3)
    assert torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test)
    assert torch.equal(a.y_test, b.y_test)

    c = load_digits(seed=4)
    assert not torch.equal(a.y_test, c.y_test)

    # Disjoint and complete: train + test is exactly the full set of samples (as a multiset).
    from sklearn.datasets import load_digits as sk_load

    full = sk_load()
    pairs = zip(full.data.astype(int).tolist(), full.target.tolist(), strict=True)
    full_rows = sorted((*r, int(t)) for r, t in pairs)
    train_rows, test_rows = _rows(a.x_train, a.y_train), _rows(a.x_test, a.y_test)
    # Multiset equality: no sample is dropped or used twice, so train and test are disjoint (duplicate images
    # that exist in the raw data may of course land on both sides).
    assert sorted(train_rows + test_rows) == full_rows


def test_digits_test_fraction() -> None:
    ds = load_digits(test_fraction=0.1)
    assert len(ds.x_test) == round(1797 * 0.1)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=0.0)


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


# ---------------------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
def test_idx_round_trip(tmp_path: Path, dtype: type, code: int, suffix: str) -> None:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype)
    else:
        arr = rng.standard_normal((3, 4, 5)).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, arr)

    raw = path.read_bytes()
    if suffix == ".gz":
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    # Header: two zero bytes, dtype code, ndim, then big-endian uint32 dims; data big-endian.
    assert raw[:4] == bytes([0, 0, code, 3])
    assert raw[4:16] == (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + (5).to_bytes(4, "big")
    assert raw[16:] == arr.astype(np.dtype(dtype).newbyteorder(">")).tobytes()

    out = read_idx(path)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 4, 5)
    assert out.numpy().dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.numpy(), arr)


def test_idx_round_trip_tensor_and_1d(tmp_path: Path) -> None:
    t = torch.tensor([7, 0, 255], dtype=torch.uint8)
    write_idx(tmp_path / "labels", t)
    out = read_idx(tmp_path / "labels")
    assert out.dtype == torch.uint8
    assert torch.equal(out, t)
    out[0] = 1  # writable, owns its memory


def test_read_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    write_idx(tmp_path / "x.gz", np.arange(6, dtype=np.int32).reshape(2, 3))
    renamed = tmp_path / "x-no-suffix"
    (tmp_path / "x.gz").rename(renamed)
    assert read_idx(renamed).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_write_idx_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.uint16))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "a", np.array(5, dtype=np.uint8))


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x01\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match=r"bad-magic.*bad magic"):
        read_idx(path)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.*not an IDX file"):
        read_idx(empty)


def test_read_idx_unknown_dtype(tmp_path: Path) -> None:
    path = tmp_path / "bad-code"
    path.write_bytes(b"\x00\x00\x0a\x01" + (2).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match=r"bad-code.*unknown IDX dtype code 0x0A"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated(tmp_path: Path, suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    write_idx(full, np.arange(20, dtype=np.float32).reshape(4, 5))
    raw = full.read_bytes()
    if suffix:
        raw = gzip.decompress(raw)
    short = tmp_path / f"short{suffix}"
    short.write_bytes(gzip.compress(raw[:-3]) if suffix else raw[:-3])
    with pytest.raises(ValueError, match=r"short.*size mismatch.*truncated"):
        read_idx(short)

    # Header cut off in the middle of the dims.
    header_cut = tmp_path / "header-cut"
    header_cut.write_bytes(raw[:9])
    with pytest.raises(ValueError, match=r"header-cut.*truncated IDX header"):
        read_idx(header_cut)

    # Extra trailing bytes are a mismatch too.
    long = tmp_path / "long"
    long.write_bytes(raw + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match=r"long.*size mismatch"):
        read_idx(long)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    write_idx(path, np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(path)


# ---------------------------------------------------------------------------------------------------------------
# MNIST


def _write_mnist(folder: Path, n_train: int = 7, n_test: int = 5, gz: bool = False, dotted: bool = False) -> dict:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, 0] = 255  # make sure max scaling is observable
    arrays["train-images-idx3-ubyte"][0, 0, 1] = 0
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_load_mnist(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = _write_mnist(tmp_path / "mnist", gz=gz, dotted=dotted)
    ds = load_mnist(tmp_path / "mnist")
    assert ds.name == "mnist"
    assert ds.num_classes == 10
    assert ds.x_train.shape == (7, 784)
    assert ds.x_test.shape == (5, 784)
    assert ds.num_features == 784
    assert ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) == 0.0
    assert float(ds.x_train.max()) == 1.0
    assert float(ds.x_test.min()) >= 0.0
    assert float(ds.x_test.max()) <= 1.0
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].reshape(7, 784).astype(np.float32) / 255.0)
    torch.testing.assert_close(ds.x_train, expected)
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_load_mnist_mixed_plain_and_gz_str_path(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)
    # Replace one file with a plain version; the loader should pick up whichever exists.
    gz_file = tmp_path / "t10k-labels-idx1-ubyte.gz"
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(gz_file.read_bytes()))
    gz_file.unlink()
    ds = load_mnist(str(tmp_path))
    assert len(ds.y_test) == 5


def test_load_mnist_unflattened(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    ds = load_mnist(tmp_path, flatten=False)
    assert ds.x_train.shape == (7, 28, 28)
    assert ds.x_test.shape == (5, 28, 28)
    assert ds.num_features == 784


def test_load_mnist_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "where-mnist-lives"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(folder)
    msg = str(info.value)
    assert str(folder) in msg
    for stem in MNIST_STEMS:
        assert stem in msg

    # Only some missing: the message says which.
    _write_mnist(folder)
    (folder / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-images-idx3-ubyte\. Expected") as info:
        load_mnist(folder)
    assert "where-mnist-lives" in str(info.value)


def test_load_mnist_folder_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*train-images-idx3-ubyte"):
        load_mnist(tmp_path / "nope")


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte has 7 images.*train-labels-idx1-ubyte has 6"):
        load_mnist(tmp_path)


def test_load_mnist_bad_label_values(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*0\.\.9"):
        load_mnist(tmp_path)


def test_load_mnist_wrong_image_shape(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((7, 784), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*expected uint8 images"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# load_dataset / Dataset


def test_load_dataset_digits_passes_kwargs() -> None:
    ds = load_dataset("digits", seed=5, test_fraction=0.5)
    ref = load_digits(seed=5, test_fraction=0.5)
    assert torch.equal(ds.y_test, ref.y_test)
    assert len(ds.y_test) == round(1797 * 0.5)


def test_load_dataset_mnist(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)
    ds = load_dataset("MNIST", data_dir=tmp_path, flatten=False)
    assert ds.x_train.shape == (7, 28, 28)


def test_load_dataset_mnist_needs_data_dir() -> None:
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist")


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'.*digits.*mnist"):
        load_dataset("cifar")


def test_dataset_validates_and_is_frozen() -> None:
    x = torch.zeros(4, 3)
    y = torch.zeros(4, dtype=torch.int64)
    ds = Dataset(x, y, x[:2], y[:2], num_classes=2, name="toy")
    assert ds.num_features == 3
    assert "toy" in repr(ds)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="x_train has 4 rows but y_train has 3"):
        Dataset(x, y[:3], x, y, num_classes=2, name="toy")
    with pytest.raises(ValueError, match="int64"):
        Dataset(x, y.to(torch.int32), x, y, num_classes=2, name="toy")


def test_module_exports() -> None:
    assert set(data.__all__) >= {"Dataset", "load_dataset", "load_digits", "load_mnist", "read_idx", "write_idx"}
