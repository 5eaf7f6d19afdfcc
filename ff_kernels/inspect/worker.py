"""What the pool's fresh processes run: their initialiser, the plan and one Triton compile. Module-level functions,
so the spawned workers find them by their module path when they unpickle a task."""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ff_kernels.inspect.capture import _capture_step, _compile_inputs, _configs, _plan
from ff_kernels.inspect.ptx import parse_ptxas, ptx_instructions
from ff_kernels.inspect.targets import Selection, StepSpec, TritonJob


def _worker_init(triton_cache: str) -> None:
    """Compile for real (no interpreter), into a throw-away Triton cache, one CPU thread each."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    torch.set_num_threads(1)


def _plan_job(specs: Sequence[StepSpec], selection: Selection) -> tuple[dict[str, dict], list[dict]]:
    """``_plan`` in a worker, which then frees the captured steps' tensors before it compiles."""
    try:
        return _plan(specs, selection)
    finally:
        _capture_step.cache_clear()


def _compile_triton(job: TritonJob) -> dict[str, Any]:
    """Compile one binary; its ptxas report and PTX give the metrics. A failure is reported, not raised."""
    import triton
    from triton import knobs

    launch = _capture_step(job.spec)[job.launch]
    config = _configs(launch)[job.config]
    source, target, _, options = _compile_inputs(launch, config, job.arch)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    except Exception as err:  # ptxas or lowering failures become a failed gate with the message
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
    entries = parse_ptxas(log.getvalue())
    if len(entries) != 1:
        return {"error": f"expected one ptxas report, found {len(entries)}"}
    metrics = next(iter(entries.values()))
    metrics.pop("static_shared")  # Triton sizes all its shared memory dynamically: metadata.shared below
    return {
        **metrics, "shared_bytes": compiled.metadata.shared, **ptx_instructions(compiled.asm["ptx"]),
        "compile_s": round(time.perf_counter() - start, 1), "error": None,
    }
