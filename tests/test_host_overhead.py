"""What ``ff-kernels bench --host-overhead`` and the host-cost work rely on, without timing anything: the stubbed
Triton launches, the benchmark's record, the eager Triton call that skips torch.library's wrapper, and
``check_finite`` without a host synchronisation on the GPU paths (ff_kernels.finite)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import ff_kernels as ffk
from ff_kernels import bench_host, finite, functional
from ff_kernels.backends import triton_unavailable_reason

needs_triton = pytest.mark.skipif(
    triton_unavailable_reason(torch.device("cpu")) is not None,
    reason=f"Triton unavailable: {triton_unavailable_reason(torch.device('cpu'))}",
)


@needs_triton
def test_stubbed_launches_run_the_triton_path_without_kernels_and_restore_them() -> None:
    modules = bench_host.kernel_modules()
    before = {(m.__name__, n): v for m in modules for n, v in vars(m).items() if bench_host.is_triton_kernel(v)}
    assert any(name.endswith("_kernel") for _, name in before), "found no Triton kernels to stub"
    with bench_host.stubbed_triton_launches() as stubs:
        step = bench_host.tiny_step("triton")
        out = step()
        launched = {name: s.launches for name, s in stubs.items() if s.launches}
    # one step is three launches: GEMM 1, the row kernel, GEMM 2 with the Adam update
    assert sum(launched.values()) == 3, launched
    assert out.h_pos.shape == (bench_host.ROWS, bench_host.FEATURES)
    after = {(m.__name__, n): v for m in modules for n, v in vars(m).items() if bench_host.is_triton_kernel(v)}
    assert after == before


def test_measure_reports_units_of_the_tiny_mm() -> None:
    record = bench_host.measure(lambda: None, bench_host.tiny_mm(), samples=5, block_s=0.001)
    assert record["samples"] == 5
    assert record["units_min"] <= record["units_p25"] <= record["units"] <= record["units_p75"] <= record["units_max"]
    assert record["mm_us"] > 0 and record["units"] < 1  # doing nothing costs less than a matrix product


def test_bench_host_overhead_writes_its_record(tmp_path, capsys) -> None:
    args = argparse.Namespace(threads=None, repeats=3, out=str(tmp_path))
    assert bench_host.run(args) == 0
    payload = json.loads((tmp_path / "host_overhead.json").read_text())
    env = payload["environment"]
    for key in ("cpu_model", "cpu_capability", "cpu_bf16_matmul", "torch", "date", "threads"):
        assert key in env, key
    assert payload["shape"] == {"P": 4, "Q": 4, "K": 8, "N": 8} and payload["target_units"] == 25
    assert [r["path"] for r in payload["rows"]] == list(bench_host.PATHS)
    for row in payload["rows"]:
        assert "status" in row or row["units"] > 0, row
    assert "units of one 8x8 torch.mm" in capsys.readouterr().out


def test_cli_flag_runs_it(tmp_path, monkeypatch) -> None:
    from ff_kernels import bench, cli

    calls = []
    monkeypatch.setattr(bench_host, "run", lambda args: calls.append(args) or 0)
    assert cli.main(["bench", "--host-overhead", "--out", str(tmp_path)]) == 0
    assert calls and calls[0].host_overhead
    assert bench.VARIANTS[:2] == ("eager", "auto")


@needs_triton
def test_eager_triton_step_skips_the_custom_op_wrapper(monkeypatch) -> None:
    """Outside torch.compile the Triton path calls its implementation, not the registered op (torch.library's
    Python wrapper costs more host time than a small step's kernels). The parameters' version counters still
    move, as the custom op's ADInplaceOrView kernel would move them."""
    from ff_kernels.ops.triton import ops

    def refuse(*args, **kwargs):
        raise AssertionError("the eager step went through the registered custom op")

    monkeypatch.setattr(torch.ops.ff_kernels, "triton_step_adam_", refuse, raising=False)
    with bench_host.stubbed_triton_launches():
        x_pos, x_neg = torch.rand(4, 8), torch.rand(4, 8)
        w, b = torch.randn(8, 8), torch.randn(8)
        opt = ffk.optim.Adam([w, b], lr=1e-3)
        versions = w._version, b._version
        opts = functional.opt_checks.check_step_options(
            threshold=2.0, goodness="mean", loss="logistic", normalize="l2", eps=1e-4, alpha=4.0, out_features=8
        )
        ops.ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=opt)
    assert w._version > versions[0] and b._version > versions[1]


# ---------------------------------------------------------------------------------------------------------------
# check_finite on the GPU paths (ff_kernels.finite)


@pytest.fixture
def interval():
    saved = finite.interval()
    finite.check_now()
    yield finite.set_interval
    finite.set_interval(saved)
    finite._pending.clear()


def test_routes_check_where_no_sync_is_needed() -> None:
    weight = torch.zeros(3, 4)
    assert functional.route_for("linear_step", "torch", torch.float32, weight).finite == functional.FINITE_SCAN
    assert functional.route_for("linear_step", "reference", torch.float32, weight).finite == functional.FINITE_SCAN


@needs_triton
def test_triton_route_defers_the_check() -> None:
    weight = torch.zeros(3, 4)
    assert functional.route_for("linear_step", "triton", torch.float32, weight).finite == functional.FINITE_DEFERRED


def test_deferred_check_reads_every_interval(interval) -> None:
    interval(3)
    device = torch.device("cpu")
    good, bad = torch.ones(5), torch.tensor([1.0, math.nan])
    finite.defer(device, [("x_pos", good), ("x_neg", bad), ("offset_pos", None)])
    finite.defer(device, [("x_pos", good), ("x_neg", good)])
    with pytest.raises(ValueError, match=r"x_neg contains NaN or inf in one of the last 3 steps"):
        finite.defer(device, [("x_pos", good), ("x_neg", good)])
    # read and cleared: the next steps start afresh
    for _ in range(3):
        finite.defer(device, [("x_pos", good), ("x_neg", torch.empty(0))])


def test_check_now_reads_pending_values(interval) -> None:
    interval(100)
    finite.defer(torch.device("cpu"), [("x", torch.tensor([-math.inf, 0.0], dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        finite.check_now()
    finite.check_now()  # nothing pending


def test_interval_must_be_positive() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            finite.set_interval(bad)


@needs_triton
def test_triton_step_defers_its_check(interval) -> None:
    """The GPU path never reads a flag back inside a step: a NaN input is reported by the read every interval."""
    interval(2)
    with bench_host.stubbed_triton_launches():
        x_pos, x_neg = torch.rand(4, 8), torch.rand(4, 8)
        w, b = torch.randn(8, 8), torch.randn(8)
        x_neg[1, 1] = math.nan
        ffk.ff_linear_step(x_pos, x_neg, w, b, backend="triton")
        with pytest.raises(ValueError, match="x_neg contains NaN or inf"):
            ffk.ff_linear_step(x_pos, x_pos, w, b, backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# The Triton step's host path: plans cached per shape, one workspace allocation, no synchronisation, and still one
# custom op under torch.compile


def _triton_layer(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_pos, x_neg = torch.rand(4, 8, generator=gen), torch.rand(4, 8, generator=gen)
    w, b = torch.randn(8, 8, generator=gen), torch.randn(8, generator=gen)
    return x_pos, x_neg, w, b, ffk.optim.Adam([w, b], lr=1e-3)


@needs_triton
def test_triton_step_plan_is_built_once_per_shape(monkeypatch) -> None:
    from ff_kernels.ops.triton import ops

    built = []
    real = ops._build_plan
    monkeypatch.setattr(ops, "_build_plan", lambda *args: built.append(args[:2]) or real(*args))
    ops._plans.clear()
    with bench_host.stubbed_triton_launches():
        x_pos, x_neg, w, b, opt = _triton_layer()
        for _ in range(3):
            ffk.ff_linear_step(x_pos, x_neg, w, b, optimizer=opt, backend="triton")
        assert built == [(4, 4)]
        ffk.ff_linear_step(x_pos[:3], x_neg, w, b, optimizer=opt, backend="triton")
        ffk.ff_linear_step(x_pos, x_neg, w, b, optimizer=opt, backend="triton", loss="symba")
    assert built == [(4, 4), (3, 4), (4, 4)]


@needs_triton
@pytest.mark.parametrize("api", ["fp32_precision", "allow_tf32"])
def test_triton_step_follows_a_tf32_switch_toggled_between_steps(api) -> None:
    """The plans are cached, but PyTorch's TF32 switch is read at every fp32 step: toggling it between two steps
    changes the precision the next step's GEMMs are launched with, either way."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    precisions: list[str] = []

    def record(*args, **kwargs) -> None:
        precisions.append(kwargs["INPUT_PRECISION"])

    def set_tf32(on: bool) -> None:
        if api == "allow_tf32":
            matmul.allow_tf32 = on
        else:
            matmul.fp32_precision = "tf32" if on else "ieee"

    try:
        with bench_host.stubbed_triton_launches() as stubs:
            for name, stub in stubs.items():
                if name.endswith(("forward_gemm.ff_forward_kernel", "grad_update_gemm.ff_grad_update_kernel")):
                    stub._launch = record
            x_pos, x_neg, w, b, opt = _triton_layer()
            for on in (False, True, True, False, True):
                set_tf32(on)
                precisions.clear()
                ffk.ff_linear_step(x_pos, x_neg, w, b, optimizer=opt, backend="triton")
                assert precisions == ["tf32" if on else "ieee"] * 2, (on, precisions)
    finally:
        matmul.allow_tf32 = saved == "tf32"  # the legacy setter leaves both APIs readable for later tests


@needs_triton
def test_eager_triton_step_allocates_once_for_its_scratch_and_never_syncs() -> None:
    """A step's device work outside the kernels: h, g and the loss (its outputs), one workspace for its scratch,
    the deferred finiteness check, the views of its outputs; no copy to the host (item, tolist) and no memset."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with bench_host.stubbed_triton_launches():
        x_pos, x_neg, w, b, opt = _triton_layer()
        ffk.ff_linear_step(x_pos, x_neg, w, b, optimizer=opt, backend="triton")
        finite.check_now()  # the counted step must not be the one that reads the queue
        with Count() as counted:
            ffk.ff_linear_step(x_pos, x_neg, w, b, optimizer=opt, backend="triton")
    allocations = [op for op in counted.ops if op.startswith(("empty", "zeros", "full", "new_"))]
    # from the plan's empty tensors: the workspace and g (new_empty), h and the 0-dim loss (new_empty_strided)
    assert sorted(allocations) == ["new_empty", "new_empty", "new_empty_strided", "new_empty_strided"], counted.ops
    assert counted.ops.count("_foreach_norm") == 1, counted.ops
    assert not {"_local_scalar_dense", "zero_", "fill_", "sum", "copy_", "clone"} & set(counted.ops), counted.ops


@needs_triton
def test_compiled_triton_step_is_still_one_custom_op() -> None:
    """torch.compile traces the step the public functions dispatch to into the registered op (with its fake), not
    into the eager implementation."""
    from ff_kernels.ops.triton import ops

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with bench_host.stubbed_triton_launches():
            x_pos, x_neg, w, b, opt = _triton_layer()
            opts = functional.opt_checks.check_step_options(
                threshold=2.0, goodness="mean", loss="logistic", normalize="l2", eps=1e-4, alpha=4.0, out_features=8
            )

            def step(x_pos, x_neg, w, b):
                return ops.ff_linear_step_triton_checked(x_pos, x_neg, w, b, opts, None, None, opt).loss

            torch.compile(step, backend=backend, fullgraph=True)(x_pos, x_neg, w, b)
    finally:
        torch._dynamo.reset()
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert any("triton_step_adam_" in t for t in targets), targets
