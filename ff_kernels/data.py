"""Small, offline data sets for Forward-Forward training examples.

Nothing here ever touches the network: ``load_digits`` uses the copy of the UCI digits that ships inside
scikit-learn, ``load_mnist`` reads the standard IDX files and ``load_cifar10`` the standard python batches from a
folder the user has already downloaded. Every loader gives flat rows for MLPs or, with ``images=True``,
(n, channels, height, width) images for conv layers.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import numbers
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
    "write_idx",
]

PathLike = str | os.PathLike

# IDX dtype code -> big-endian numpy dtype, as in the original MNIST description.
_IDX_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_KIND_TO_CODE: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in _IDX_CODE_TO_DTYPE.items()
}
_GZIP_MAGIC = b"\x1f\x8b"

# Stem names of the four MNIST files; each may also appear with a dot before "idx" and/or a ".gz" suffix.
_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# The CIFAR-10 python version: the archive, the folder it extracts to, and the pickled batches inside.
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"

DATASETS = ("digits", "mnist", "cifar10")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split ready for FF training: ``x`` float32 in [0, 1], one sample per row (flat features, or
    (channels, height, width) images), ``y`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        # Catch mismatched splits here rather than as a confusing shape error deep inside a training loop.
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{self.name}: x_{split} has {x.shape[0]} rows but y_{split} has {y.shape[0]}")
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise ValueError(
                    f"{self.name}: expected float32 x_{split} and int64 y_{split}, got {x.dtype}/{y.dtype}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train samples have shape {tuple(self.x_train.shape[1:])} "
                f"but test samples {tuple(self.x_test.shape[1:])}"
            )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (features,) for flat rows, (channels, height, width) for images."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_features(self) -> int:
        """Number of input values per sample (784 for flattened MNIST, 64 for digits)."""
        return int(np.prod(self.x_train.shape[1:], dtype=np.int64))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"num_features={self.num_features}, num_classes={self.num_classes})"
        )


def _check_type(name: str, value: object, kind: type | tuple[type, ...], what: str) -> None:
    """Argument types at the public boundary, so a wrong one is named instead of failing deep inside (a bool is
    no number here)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {what}; got {value!r}")


def load_digits(test_fraction: float = 0.25, seed: int = 0, *, images: bool = False) -> Dataset:
    """Load scikit-learn's bundled 8x8 digits (1797 samples, 64 features, or 1x8x8 images with ``images``): a tiny
    MNIST stand-in that needs no download, so examples and smoke tests run anywhere. The split is a seeded
    permutation, identical per ``seed``."""
    _check_type("test_fraction", test_fraction, numbers.Real, "a number")
    _check_type("seed", seed, numbers.Integral, "an integer")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits needs scikit-learn: pip install scikit-learn (or install the 'ff_kernels[examples]' extra)"
        ) from exc

    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    n = x.shape[0]
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return Dataset(
        x_train=x[train_idx].contiguous(),
        y_train=y[train_idx].contiguous(),
        x_test=x[test_idx].contiguous(),
        y_test=y[test_idx].contiguous(),
        num_classes=10,
        name="digits",
    )


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:  # decide by content, not by name, so a mis-named file still reads
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an IDX file (the MNIST format), plain or gzipped, into a tensor of the stored dtype and shape.

    Raises ValueError naming the file for a bad magic number, an unknown dtype code, or a size that does not match
    the header (e.g. a truncated download)."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'}; expected 0000<type><ndim>)")
    code, ndim = raw[2], raw[3]
    dtype = _IDX_CODE_TO_DTYPE.get(code)
    if dtype is None:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_CODE_TO_DTYPE)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_len} for {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header says shape {shape} of {dtype.name} ({expected} data bytes) "
            f"but the file has {actual} data bytes" + (" (truncated?)" if actual < expected else "")
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    # Convert to native byte order (also copies, so the tensor is writable and owns its memory).
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: PathLike, array: np.ndarray | torch.Tensor) -> None:
    """Write an array in IDX format (gzipped when ``path`` ends in ``.gz``): the inverse of ``read_idx``, handy for
    tests and for converting data sets into the format ``load_mnist`` expects."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    code = _IDX_KIND_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        supported = ", ".join(dt.newbyteorder("=").name for dt in _IDX_CODE_TO_DTYPE.values())
        raise ValueError(f"IDX cannot store dtype {array.dtype}; supported: {supported}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX needs between 1 and 255 dimensions, got {array.ndim}")
    if any(d > 0xFFFFFFFF for d in array.shape):
        raise ValueError(f"IDX dimensions must fit in uint32, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_CODE_TO_DTYPE[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def _mnist_candidates(stem: str) -> list[str]:
    dotted = stem.replace("-idx", ".idx")
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _find_mnist_files(data_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, stem in _MNIST_FILES.items():
        for name in _mnist_candidates(stem):
            if (data_dir / name).is_file():
                found[key] = data_dir / name
                break
        else:
            missing.append(stem)
    if missing:
        expected = ", ".join(_MNIST_FILES.values())
        raise FileNotFoundError(
            f"MNIST files not found in {data_dir}: missing {', '.join(missing)}. "
            f"Expected the four files {expected} (each plain or .gz; 'train-images.idx3-ubyte'-style names also "
            "work). Download them yourself; ff_kernels never fetches data over the network."
        )
    return found


def _load_mnist_split(
    images_path: Path, labels_path: Path, flatten: bool, channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (n, rows, cols), got {images.dtype} {tuple(images.shape)}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a 1-D label vector, got shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST count mismatch: {images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    labels = labels.to(torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_path}: labels must be in 0..9, got range {int(labels.min())}..{int(labels.max())}")
    x = images.to(torch.float32).div_(255.0)
    if channel:
        return x.unsqueeze(1), labels
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return x, labels


def load_mnist(data_dir: PathLike, flatten: bool = True, *, images: bool = False) -> Dataset:
    """Load MNIST (or a drop-in such as Fashion-MNIST) from the four standard IDX files in ``data_dir``.

    Files may be plain or ``.gz``. Images are scaled to [0, 1] and, with ``flatten``, reshaped to 784 features;
    with ``flatten=False`` they stay (n, 28, 28); ``images=True`` gives (n, 1, 28, 28) for conv layers. Nothing is
    downloaded: missing files raise FileNotFoundError."""
    _check_type("data_dir", data_dir, (str, os.PathLike), "a folder path")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"MNIST folder {data_dir} does not exist; it should contain {', '.join(_MNIST_FILES.values())} "
            "(each plain or .gz)"
        )
    files = _find_mnist_files(data_dir)
    x_train, y_train = _load_mnist_split(files["train_images"], files["train_labels"], flatten, images)
    x_test, y_test = _load_mnist_split(files["test_images"], files["test_labels"], flatten, images)
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=10, name="mnist")


# numpy 2 moved numpy.core to numpy._core; the batches were pickled by numpy 1.
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"


class _BatchUnpickler(pickle.Unpickler):
    """Builds what the CIFAR-10 batches hold (dicts, lists, strings, numpy arrays) and nothing else, so a tampered
    file cannot run code when it is read."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        (f"{_NUMPY_CORE}.multiarray", "_reconstruct"),
        (f"{_NUMPY_CORE}.multiarray", "scalar"),
        (f"{_NUMPY_CORE}.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        for core in ("numpy.core.", "numpy._core."):
            if module.startswith(core):
                module = f"{_NUMPY_CORE}.{module.removeprefix(core)}"
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(name: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(data (n, 3072) uint8, labels (n,)) from one pickled batch; ``name`` says where it came from."""
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:
        raise ValueError(f"{name}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{name}: a CIFAR-10 batch has 'data' and 'labels'; found {sorted(batch)}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{name}: expected uint8 data of shape (n, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{name}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{name}: labels must be in 0..9, got range {labels.min()}..{labels.max()}")
    return data, labels


def _cifar_batches(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The six batches, read from the extracted folder, the folder itself, or the archive (read in place)."""
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    for folder in (data_dir / _CIFAR_FOLDER, data_dir):
        if all((folder / n).is_file() for n in names):
            return {n: _read_cifar_batch(str(folder / n), (folder / n).read_bytes()) for n in names}
    archive = data_dir / _CIFAR_ARCHIVE
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise ValueError(f"{archive}: the archive lacks {', '.join(missing)}")
                return {n: _read_cifar_batch(f"{archive}:{members[n].name}", tar.extractfile(members[n]).read())
                        for n in names}
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"{archive}: corrupt or truncated archive ({exc})") from exc
    raise FileNotFoundError(
        f"CIFAR-10 not found in {data_dir}: expected {_CIFAR_ARCHIVE}, or its extracted folder {_CIFAR_FOLDER}/ "
        f"(or that folder itself) with {', '.join(names)}. Download the python version yourself; ff_kernels never "
        "fetches data over the network."
    )


def load_cifar10(data_dir: PathLike, *, images: bool = False) -> Dataset:
    """Load CIFAR-10 from the standard python batches in ``data_dir``: ``cifar-10-python.tar.gz`` (read without
    extracting it), its extracted ``cifar-10-batches-py/``, or that folder itself.

    50000 train and 10000 test images scaled to [0, 1]: (n, 3072) rows (channel-major, as stored) or, with
    ``images``, (n, 3, 32, 32). Nothing is downloaded: missing files raise FileNotFoundError naming them."""
    _check_type("data_dir", data_dir, (str, os.PathLike), "a folder path")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 folder {data_dir} does not exist; it should contain {_CIFAR_ARCHIVE} or {_CIFAR_FOLDER}/"
        )
    batches = _cifar_batches(data_dir)

    def split(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.concatenate([batches[n][0] for n in names])
        x = torch.from_numpy(data).to(torch.float32).div_(255.0)
        y = torch.from_numpy(np.concatenate([batches[n][1] for n in names]))
        return (x.reshape(-1, 3, 32, 32) if images else x), y

    x_train, y_train = split(_CIFAR_TRAIN)
    x_test, y_test = split((_CIFAR_TEST,))
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=10, name="cifar10")


def load_dataset(name: str, data_dir: PathLike | None = None, *, images: bool = False, **kw: object) -> Dataset:
    """Load a data set by name, so example scripts can take ``--dataset`` on the command line.

    ``"digits"`` needs nothing (``kw`` go to ``load_digits``); ``"mnist"`` and ``"cifar10"`` need ``data_dir``
    (``kw`` go to their loaders). ``images=True`` gives (n, channels, height, width) samples for conv layers."""
    _check_type("name", name, str, f"a dataset name ({', '.join(DATASETS)})")
    key = name.strip().lower()
    if key == "digits":
        return load_digits(images=images, **kw)  # type: ignore[arg-type]
    if key in ("mnist", "cifar10"):
        if data_dir is None:
            folder = "the MNIST IDX files" if key == "mnist" else f"{_CIFAR_ARCHIVE} or {_CIFAR_FOLDER}/"
            raise ValueError(f"load_dataset({key!r}) needs data_dir: the folder holding {folder}")
        loader = load_mnist if key == "mnist" else load_cifar10
        return loader(data_dir, images=images, **kw)  # type: ignore[arg-type]
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
