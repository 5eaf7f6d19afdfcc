"""The bench and memory reports on tiny configurations: tables, CSV, JSON and plots are written, the analytic
memory model has the promised shape, and the CPU memory measurement returns real numbers."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math

import pytest
import torch

from ff_kernels import bench, memory

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ff-kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(commands)
    memory.add_parser(commands)
    return parser.parse_args(argv)


def test_bench_rows_and_ratios():
    shape = bench.Shape(16, 16, 24, 8)
    rows = bench.run_benchmarks([shape], ["float32", "bfloat16"], torch.device("cpu"),
                                ["eager", "torch", "torch_mixed", "reference", "gemm_floor"], repeats=3)
    by = {(r.variant, r.dtype): r for r in rows}
    for dtype in ("float32", "bfloat16"):
        for variant in ("eager", "torch", "reference", "gemm_floor"):
            row = by[(variant, dtype)]
            assert row.status == "ok" and row.median_ms > 0 and row.tflops > 0
            assert row.p25_ms <= row.median_ms <= row.p75_ms
        assert by[("eager", dtype)].vs_eager == pytest.approx(1.0)
        assert by[("gemm_floor", dtype)].over_floor == pytest.approx(1.0)
    assert by[("torch_mixed", "float32")].status.startswith("fp32 rows")
    assert by[("torch_mixed", "bfloat16")].status == "ok"
    assert not math.isnan(by[("torch", "bfloat16")].vs_eager_fp32)
    # the variants start from the same weights and inputs: their first losses agree
    losses = [by[(v, "float32")].first_loss for v in ("eager", "torch", "reference")]
    assert max(losses) - min(losses) < 1e-4
    table = bench.format_table(rows)
    assert "gemm_floor" in table and "bfloat16" in table


def test_bench_ext_floor_is_the_fused_steps_own_gemms():
    """gemm_floor_ext times the two GEMMs through the fused CPU step's GEMM: a row of its own and, for every step
    variant, the time over it (paired quartiles included); without the extension the row says why."""
    from ff_kernels.ops import cuda_step

    rows = bench.run_benchmarks([bench.Shape(16, 16, 24, 8)], ["float32"], torch.device("cpu"),
                                ["torch", "gemm_floor", "gemm_floor_ext"], repeats=3)
    by = {r.variant: r for r in rows}
    reason = cuda_step.extension_unavailable_reason("cpu")
    if reason is not None:
        assert by["gemm_floor_ext"].status == f"unavailable: {reason}"
        return
    assert by["gemm_floor_ext"].status == "ok" and by["gemm_floor_ext"].over_ext_floor == pytest.approx(1.0)
    torch_row = by["torch"]
    assert torch_row.over_ext_floor_p25 <= torch_row.over_ext_floor <= torch_row.over_ext_floor_p75
    assert "/ ext floor" in bench.format_table(rows)
    problem = bench.make_problem(bench.Shape(5, 4, 9, 6), torch.float32, torch.device("cpu"))
    x = torch.cat([problem.x_pos, problem.x_neg])
    floor = bench.build_variant("gemm_floor_ext", problem, torch.device("cpu"))()
    torch.testing.assert_close(floor, (x @ problem.weight.t()).t() @ x)
    assert bench.build_variant("gemm_floor_ext", problem, torch.device("meta")).startswith("CPU only")


def test_bench_records_a_compile_failure(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    rows = bench.run_benchmarks([bench.Shape(8, 8, 16, 8)], ["float32"], torch.device("cpu"),
                                ["torch", "compile"], repeats=2)
    status = {r.variant: r.status for r in rows}
    assert status["torch"] == "ok"
    assert status["compile"].startswith("failed: RuntimeError: no compiler here")
    assert "failed" in bench.format_table(rows)


def test_bench_unavailable_backends_are_rows_not_errors(monkeypatch):
    rows = bench.run_benchmarks([bench.Shape(8, 8, 16, 8)], ["float32"], torch.device("cpu"), ["triton"], repeats=2)
    assert rows[0].status.startswith(("unavailable", "skipped"))

    def unavailable(name: str, device: torch.device) -> str:
        raise RuntimeError(f"backend={name!r} is unavailable: not built here")

    monkeypatch.setattr(bench, "resolve_backend", unavailable)
    rows = bench.run_benchmarks([bench.Shape(8, 8, 16, 8)], ["float32"], torch.device("cpu"), ["cuda"], repeats=2)
    assert rows[0].status == "unavailable: not built here"
    assert "not built here" in bench.format_table(rows)


def test_bench_command_writes_table_csv_json_plot(tmp_path, capsys):
    args = _parse(["bench", "--rows", "8", "--kn", "16x8", "--dtype", "float32", "--variants",
                   "eager,torch,gemm_floor", "--repeats", "2", "--out", str(tmp_path)])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "eager" in printed
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["eager", "torch", "gemm_floor"]
    assert float(rows[1]["vs_eager"]) > 0
    data = json.loads((tmp_path / "bench.json").read_text())
    env = data["environment"]
    for key in ("device_name", "torch", "triton", "date", "threads"):
        assert key in env
    assert len(data["rows"]) == 3
    assert (tmp_path / "bench.png").exists() == HAVE_MPL


def test_memory_model_flat_for_ff_linear_for_backprop():
    def working(method: str, depth: int) -> int:
        return memory.model_bytes(memory.MemoryConfig(method, depth, width=2000, batch=256))["working"]

    depths = range(1, 17)
    bp = [working("backprop", d) for d in depths]
    assert all(b > a for a, b in zip(bp, bp[1:]))
    assert bp[15] - bp[7] == pytest.approx(8 * (bp[15] - bp[14]), rel=1e-6)
    ff = [working("ff_fused", d) for d in depths]
    assert len(set(ff[1:])) == 1 and max(ff) == ff[1]
    assert ff[7] <= 0.25 * bp[7]
    eager = [working("ff_eager", d) for d in depths]
    assert all(b > a for a, b in zip(eager, eager[1:]))
    static = memory.model_bytes(memory.MemoryConfig("backprop", 8, width=2000, batch=256))
    assert static["params"] == (784 * 2000 + 2000 + 7 * (2000 * 2000 + 2000)) * 4
    assert static["opt_state"] == 2 * static["params"]


def test_memory_measurement_subprocess_returns_positive_numbers():
    # large enough that the step's 1 MiB stacked batch stands out of the allocator's noise (tens of KiB of RSS)
    cfg = memory.MemoryConfig("ff_fused", 2, width=512, in_features=512, batch=256, steps=1)
    result = memory.measure_subprocess(cfg)
    assert result["peak_bytes"] > 0 and result["working_bytes"] > 0
    assert result["static_exact_bytes"] == memory.model_bytes(cfg)["inputs"] + memory.model_bytes(cfg)["params"] \
        + memory.model_bytes(cfg)["opt_state"]
    assert result["static_bytes"] > 0.5 * result["static_exact_bytes"]


def test_memory_command_writes_table_csv_json_plot(tmp_path, capsys):
    args = _parse(["memory", "--depths", "2", "--width", "512", "--in-features", "256", "--batch", "64",
                   "--steps", "1", "--methods", "ff_fused,backprop", "--out", str(tmp_path)])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "working MiB" in printed and "backprop" in printed
    with open(tmp_path / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["depth"]) for r in rows} == {("ff_fused", "2"), ("backprop", "2")}
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["environment"]["measurement"].startswith("VmHWM")
    assert all(r["peak_bytes"] > 0 for r in data["rows"])
    assert (tmp_path / "memory.png").exists() == HAVE_MPL


def test_cpu_ratios_pair_the_rounds():
    # The variant's median round (4.4) is the reference's slow round's twin: the ratio of medians would say 0.23x,
    # the rounds say 0.91x twice out of three.
    reference, variant = [1.0, 1.0, 4.0], [1.1, 4.4, 4.4]
    median, p25, p75 = bench.paired_ratio(reference, variant)
    assert median == pytest.approx(1 / 1.1)
    assert p25 < median and p75 == pytest.approx(1 / 1.1)
    assert bench.paired_ratio(reference, variant, invert=True)[0] == pytest.approx(1.1)
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("argv,message", [
    (["bench", "--host-overhead", "--rows", "999", "--kn", "5x5"], "--host-overhead runs its own fixed work"),
    (["bench", "--distributed", "--op", "conv"], "--distributed runs its own fixed work"),
    (["memory", "--model", "small_cnn", "--width", "3"], "--width only applies to --model mlp"),
    (["memory", "--batches", "32"], "--batches only applies to the conv nets"),
    (["memory", "--backend", "triton"], "backend='triton' is unavailable"),
])
def test_options_a_mode_would_ignore_are_errors(argv, message, tmp_path, monkeypatch, capsys):
    from ff_kernels import cli

    if argv[-1] == "triton":
        if torch.cuda.is_available():
            pytest.skip("Triton runs on this machine")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else the interpreter makes it available
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["bench", "--repeats", "0"], ["bench", "--threads", "0"], ["bench", "--rows", "-4"], ["bench", "--kn", "0x8"],
    ["bench", "--kn", "12"], ["memory", "--batch", "0"], ["memory", "--jobs", "0"], ["memory", "--backend", "gpu"],
])
def test_counts_and_shapes_are_checked_by_the_parser(argv):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2


def test_bench_skips_the_plot_when_nothing_was_timed(tmp_path, capsys):
    args = _parse(["bench", "--rows", "4", "--kn", "8x8", "--dtype", "float32", "--variants", "triton",
                   "--repeats", "1", "--out", str(tmp_path)])
    if torch.cuda.is_available():
        pytest.skip("Triton times on this machine")
    assert args.run(args) == 0
    assert "plot skipped: no variant was timed" in capsys.readouterr().out
