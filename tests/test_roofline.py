"""The roofline model's arithmetic on hand-computed cases, and the bench table's model column on GPU rows only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ff_kernels import bench, roofline


def test_tiny_adam_step_by_hand():
    # P = Q = 2 rows (M = 4), K = 4, N = 8, bf16 (2 bytes), Adam, with bias: 40 parameters.
    cost = roofline.step_cost(2, 2, 4, 8, "bf16", "adam")
    assert cost.gemm_flops == 2 * (2 * 4 * 8 * 4)  # 512
    # x^2 sums 2MK = 32; r, bias, ReLU, h^2, sum 5MN = 160; r x MK = 16; c h MN = 32; grad_bias 2MN = 64;
    # Adam 12 per parameter = 480
    assert cost.elementwise_flops == 32 + 160 + 16 + 32 + 64 + 480
    # x read twice 2*4*4*2 = 64; h written and read 2*4*8*2 = 128; r, partials, g, c: 7*4*4 = 112;
    # W and b read by GEMM 1 (40*2 = 80), read and written by the update (160); Adam m, v read and written 2*2*40*4
    assert cost.bytes == 64 + 128 + 112 + 80 + 160 + 640
    assert cost.intensity == pytest.approx(512 / 1184)
    # memory-bound: the floor is the bytes at HBM bandwidth
    assert roofline.floor_seconds(cost, "bf16") == pytest.approx(1184 / 3.35e12)
    assert roofline.floor_seconds(cost, "bf16", roofline.H200_SXM) == pytest.approx(1184 / 4.8e12)


def test_optimizers_change_only_the_parameter_traffic():
    none, sgd, adam = (roofline.step_cost(2, 2, 4, 8, "bf16", opt) for opt in ("none", "sgd", "adam"))
    assert none.gemm_flops == sgd.gemm_flops == adam.gemm_flops
    # none: W, b read, gradients written (40 * 2 each); SGD: W, b three times plus momentum read and written
    assert adam.bytes - none.bytes == 80 + 640
    assert sgd.bytes - none.bytes == 80 + 2 * 40 * 4


def test_large_square_layer_is_compute_bound():
    # P = Q = 4096, K = N = 4096: 4 * 8192 * 4096^2 FLOPs at 989.4 TFLOP/s (bf16), 494.7 (TF32), 66.9 (exact fp32)
    flops = 4 * 8192 * 4096 * 4096
    for precision, tflops in (("bf16", 989.4), ("fp16", 989.4), ("tf32", 494.7), ("ieee", 66.9)):
        cost = roofline.step_cost(4096, 4096, 4096, 4096, precision)
        assert cost.gemm_flops == flops
        assert roofline.floor_seconds(cost, precision) == pytest.approx(flops / (tflops * 1e12))
    assert roofline.step_floor_ms(4096, 4096, 4096, 4096, "bf16") == pytest.approx(1e3 * flops / 989.4e12)


def test_precision_names_and_errors():
    assert roofline.precision_of(torch.bfloat16) == "bf16"
    assert roofline.precision_of("float16") == "fp16"
    assert roofline.precision_of(torch.float32, tf32=True) == "tf32"
    assert roofline.precision_of(torch.float32) == "ieee"
    with pytest.raises(ValueError, match="float64"):
        roofline.precision_of(torch.float64)
    with pytest.raises(ValueError, match="optimizer"):
        roofline.step_cost(1, 1, 1, 1, "bf16", "lamb")


def test_bench_prints_the_model_floor_beside_gpu_figures_only():
    def row(device: str, variant: str) -> bench.Row:
        return bench.Row(variant=variant, device=device, dtype="bfloat16", P=4096, Q=4096, K=4096, N=4096,
                         median_ms=1.0, p25_ms=0.9, p75_ms=1.1, tflops=1.0)

    gpu = [row("cuda", "triton"), row("cuda", "gemm_floor")]
    bench.add_model_floor(gpu, "bf16")
    assert gpu[0].model_floor_ms == pytest.approx(roofline.step_floor_ms(4096, 4096, 4096, 4096, "bf16"))
    assert gpu[1].model_floor_ms == pytest.approx(roofline.gemm_floor_ms(8192, 4096, 4096, "bf16"))
    table = bench.format_table(gpu)
    assert "model floor (H100)" in table and f"{gpu[0].model_floor_ms:.3f} ms" in table
    cpu = bench.format_table([row("cpu", "triton")])
    assert "model floor" not in cpu and math.isnan(row("cpu", "triton").model_floor_ms)


def test_two_gemms_by_hand():
    # M = 4 rows, K = 4, N = 8, bf16: GEMM 1 reads x (16) and W (32), writes h (32); GEMM 2 reads h and x, writes the
    # gradient (32): 160 elements of 2 bytes; no elementwise work.
    cost = roofline.gemm_cost(4, 4, 8, "bf16")
    assert (cost.gemm_flops, cost.elementwise_flops, cost.bytes) == (512, 0, 320)
    assert roofline.gemm_floor_ms(4, 4, 8, "bf16") == pytest.approx(1e3 * 320 / 3.35e12)
    units = roofline.unit_seconds(roofline.step_cost(2, 2, 4, 8, "bf16"), "bf16", roofline.H200_SXM)
    assert units["memory"] == pytest.approx(1184 / 4.8e12) and units["gemm"] == pytest.approx(512 / 989.4e12)


def test_floor_table_ratios():
    rows = roofline.floor_rows((512, 25000), ((784, 500), (4096, 4096)))
    assert len(rows) == 2 * 3 * 2 * 2  # devices x precisions x rows x layers
    for r in rows:
        assert r.best_over_floor >= 1.0 and r.step_floor_us >= r.gemm_floor_us > 0
        assert r.step_bound in ("gemm", "elementwise", "memory")
    by = {(r.device, r.precision, r.rows, r.in_features): r for r in rows}
    # exact fp32 runs the GEMMs on the CUDA cores: GEMM-bound everywhere, the step costs its GEMMs
    assert all(r.best_over_floor == pytest.approx(1.0) for r in rows if r.precision == "ieee")
    # a small bf16 batch on an H100 is memory-bound: Adam's state traffic puts the step well above its GEMMs
    assert by[("H100 SXM", "bf16", 512, 784)].step_bound == "memory"
    assert by[("H100 SXM", "bf16", 512, 784)].best_over_floor > 1.5
    # HBM3e moves the same bytes faster: never a worse ratio on an H200
    for (device, precision, p, k), r in by.items():
        if device == "H100 SXM":
            assert by[("H200 SXM", precision, p, k)].best_over_floor <= r.best_over_floor + 1e-12
    assert "not a measurement" in roofline.format_floor_table(rows)


def test_bench_roofline_writes_the_model_and_refuses_other_work(tmp_path, capsys):
    from ff_kernels import cli

    assert cli.main(["bench", "--roofline", "--rows", "4096", "--kn", "784x500", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "roofline.json").read_text())
    assert len(payload["rows"]) == 6 and {d["name"] for d in payload["devices"]} == {"H100 SXM", "H200 SXM"}
    assert "step/GEMMs" in (tmp_path / "roofline.txt").read_text() and "784x500" in capsys.readouterr().out
    assert cli.main(["bench", "--roofline", "--quick"]) == 2
    assert "--roofline runs its own fixed work" in capsys.readouterr().err
