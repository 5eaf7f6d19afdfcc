"""The ``ff-kernels`` command line: the main job end to end at a tiny size, and its error paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ff_kernels.cli import main
from ff_kernels.data import write_idx


def test_train_digits_prints_accuracy_time_and_memory(capsys):
    assert main(["train", "--dims", "40", "--epochs", "30", "--no-progress", "--compare-reference"]) == 0
    out = capsys.readouterr().out
    assert "digits: 1348 train / 449 test samples, 64 features" in out
    assert "test accuracy" in out and "wall time" in out and "peak resident memory" in out
    assert "speed-up" in out and "test accuracy difference" in out


def test_train_simultaneous_collab_symba(capsys):
    argv = ["train", "--dims", "30,20", "--epochs", "2", "--batch-size", "256", "--schedule", "simultaneous",
            "--collab", "all", "--no-progress"]
    assert main(argv) == 0
    assert main(["train", "--dims", "30", "--epochs", "3", "--loss", "symba", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("test accuracy") == 2


def test_train_mnist_from_idx_files(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--dims", "16", "--epochs", "2",
            "--no-progress"]
    assert main(argv) == 0
    assert "mnist: 30 train / 12 test samples, 784 features" in capsys.readouterr().out


def test_mnist_without_files_names_the_folder(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "train-images-idx3-ubyte" in err


def test_mnist_without_data_dir_is_an_error(capsys):
    assert main(["train", "--dataset", "mnist", "--no-progress"]) == 2
    assert "needs --data-dir" in capsys.readouterr().err


def test_bad_dims_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dims", "500,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "ff_kernels", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout
