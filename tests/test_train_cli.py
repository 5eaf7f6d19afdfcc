"""``ff-kernels train``'s option checks: each runs before the first line is printed and names the flag."""

from __future__ import annotations

import pytest
import torch

from ff_kernels.cli import main


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--channels", "30"], "--channels applies to --model conv only"),
        (["--baseline"], "--baseline applies to block-wise training"),
        (["--alpha", "7"], "--alpha applies to --loss symba only"),
        (["--timeout", "5"], "--timeout applies to --distributed only"),
        (["--data-dir", "."], "--data-dir applies to --dataset mnist or cifar10 only"),
        (["--lr-schedule", "step"], "--lr-schedule applies to --model conv or small_cnn"),
        (["--loss", "class"], "--loss class applies to --model conv only"),
        (["--model", "conv", "--dims", "100"], "--dims applies to --model mlp only"),
        (["--model", "conv", "--overlay", "replace"], "--overlay applies to --model mlp only"),
        (["--model", "conv", "--negatives", "shuffle"], "--negatives applies to --model mlp or conv with"),
        (["--model", "conv", "--loss", "logistic", "--temperature", "3"], "--temperature applies to the class"),
        (["--model", "conv", "--image-size", "32"], "--image-size applies to block-wise training"),
        (["--model", "small_cnn", "--compare-reference"], "--compare-reference applies to --model mlp or conv only"),
        (["--model", "small_cnn", "--micro-batches", "3"], "--micro-batches applies to --distributed pipeline only"),
        (["--model", "small_cnn", "--loss", "symba"], "--loss applies to --model mlp or conv only"),
        (["--model", "small_cnn", "--compute-dtype", "bfloat16"], "--compute-dtype applies to --model mlp or conv"),
        (["--model", "small_cnn", "--no-pool"], "--no-pool applies to --model conv only"),
        (["--model", "small_cnn", "--batch-size", "0"], "--batch-size must be positive (0, full batch, is for"),
    ],
)
def test_an_option_that_does_not_apply_is_an_error(argv, message, capsys) -> None:
    assert main(["train", "--epochs", "1", "--no-progress", *argv]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("model", ["mlp", "conv", "small_cnn"])
def test_device_cuda_without_cuda_is_an_error(model, capsys) -> None:
    assert main(["train", "--model", model, "--device", "cuda", "--epochs", "1", "--no-progress"]) == 2
    assert "--device cuda but torch.cuda.is_available() is False" in capsys.readouterr().err


def test_distributed_options_are_checked_before_torchrun_is_needed(capsys, monkeypatch) -> None:
    """What --distributed cannot do is refused before anything asks for torchrun's environment; what it can do
    without it says how to launch it."""
    for variable in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["train", "--distributed", "pipeline", "--model", "conv", "--schedule", "greedy", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "--distributed pipeline runs the simultaneous schedule" in err and out == ""
    assert main(["train", "--distributed", "data", "--model", "small_cnn", "--no-progress"]) == 2
    assert "--distributed applies to --model mlp or conv only" in capsys.readouterr().err
    assert main(["train", "--distributed", "data", "--model", "conv", "--no-progress"]) == 2
    assert "launch with e.g. torchrun" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs must be positive; got 0"),
        (["--batch-size", "-5"], "--batch-size must be positive or 0 (full batch); got -5"),
        (["--lr", "-1"], "lr must be a non-negative number"),
        (["--model", "conv", "--channels", "7"], "dividing out_channels=7"),
        (["--model", "small_cnn", "--temperature", "0"], "temperature must be a positive number"),
    ],
)
def test_no_first_line_before_an_option_error(argv, message, capsys) -> None:
    assert main(["train", "--no-progress", *argv]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""


def test_data_dir_that_is_a_file_is_not_a_folder(tmp_path, capsys) -> None:
    path = tmp_path / "afile"
    path.write_text("")
    assert main(["train", "--dataset", "mnist", "--data-dir", str(path), "--no-progress"]) == 2
    assert f"--data-dir {path} is not a folder" in capsys.readouterr().err


def test_kernel_size_error_gives_a_kernel_size_example(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "conv", "--kernel-size", "0"])
    assert exit_info.value.code == 2 and "e.g. 3, or 5,3" in capsys.readouterr().err
