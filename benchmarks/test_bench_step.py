"""pytest-benchmark microbenchmarks of one FF layer step: every backend beside the eager, torch.compile and
GEMM-floor baselines (the variants of ``ff_kernels.bench``).

    python -m pytest benchmarks/ --benchmark-only                       # CPU: a small set; CUDA: DESIGN section 4
    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Not part of the test suite (``testpaths = ["tests"]``). On the CPU pytest-benchmark's own timer measures each
call. On CUDA pytest-benchmark times synchronised calls (host wall clock) and ``extra_info`` carries the device
time from ``triton.testing.do_bench`` (or CUDA events), which is the number to quote; ``extra_info`` also holds
the effective TFLOP/s and, on CUDA, the peak memory above the inputs. A variant that cannot run here (Triton on
the CPU, the unbuilt CUDA extension, a torch.compile failure) is skipped with the reason.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from ff_kernels import bench

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPES = bench.default_shapes(DEVICE, quick=not CUDA)
DTYPES = ["float32", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s.rows}-K{s.in_features}-N{s.out_features}")
@pytest.mark.parametrize("variant", bench.VARIANTS)
def test_step(benchmark, variant: str, shape: bench.Shape, dtype: str) -> None:
    problem = bench.make_problem(shape, bench.DTYPES[dtype], DEVICE)
    fn = bench.build_variant(variant, problem, DEVICE, bench.default_compile_mode(DEVICE))
    if isinstance(fn, str):
        pytest.skip(fn)
    try:
        fn()
    except Exception as err:  # e.g. torch.compile without a working compiler on this platform
        pytest.skip(f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    benchmark.group = f"{DEVICE.type} {dtype} {shape.label()}"
    benchmark.extra_info.update(device=bench.device_name(DEVICE), dtype=dtype, variant=variant, **shape._asdict())
    if CUDA:
        seconds = statistics.median(bench.time_cuda(fn))
        benchmark.extra_info.update(
            device_median_ms=1e3 * seconds,
            tflops=shape.flops / seconds / 1e12,
            peak_mib_above_inputs=bench.peak_cuda_bytes(fn, DEVICE) / 2**20,
        )

        def synced() -> None:
            fn()
            torch.cuda.synchronize(DEVICE)

        benchmark.pedantic(synced, warmup_rounds=5, rounds=30, iterations=1)
    else:
        benchmark.pedantic(fn, warmup_rounds=2, rounds=10, iterations=1)
        if benchmark.stats:
            benchmark.extra_info["tflops"] = shape.flops / benchmark.stats.stats.median / 1e12
