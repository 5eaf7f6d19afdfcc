"""The parent side of a run: plan in a worker, take what the cache has, compile the rest in a pool of fresh
processes, and assemble the kernel and launch records (occupancy, waves) and their failed gates into a ``Report``."""

from __future__ import annotations

import multiprocessing
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from ff_kernels.inspect.arch import ARCHS, H100_SMS, occupancy
from ff_kernels.inspect.cache import Cache, _cuda_cache_key
from ff_kernels.inspect.cuda import CSRC, _nvcc, compile_cuda_file
from ff_kernels.inspect.gates import gate_failures
from ff_kernels.inspect.targets import Selection, _step_specs
from ff_kernels.inspect.worker import _compile_triton, _plan_job, _worker_init


@dataclass
class Report:
    """The kernel records, the launch records, the failed gates and notes (what was skipped and why)."""

    kernels: list[dict] = field(default_factory=list)
    launches: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _joined(values: Sequence[str], everything: Sequence[str]) -> str:
    """One value, ``any`` when a binary serves every selected one (and more than one), else ``a+b``."""
    if len(values) > 1 and set(values) >= set(everything):
        return "any"
    return "+".join(values)


def _with_occupancy(record: dict, arch: str) -> dict:
    """The arch's shared-memory limit and, for Triton binaries, the theoretical occupancy. CUDA kernels size their
    dynamic shared memory at launch, which ptxas cannot see, so none is claimed for them."""
    limits = ARCHS[arch]
    record["shared_limit"] = limits.shared_per_block
    if record.get("error") or record["source"] == "cuda":
        record.update(blocks_per_sm=None, occupancy=None, occupancy_limiter=None)
        return record
    warps = record["num_warps"]
    blocks, limiter = occupancy(arch, record["registers"], record["shared_bytes"], warps)
    record.update(blocks_per_sm=blocks, occupancy=round(blocks * warps * 32 / limits.threads, 3),
                  occupancy_limiter=limiter)
    return record


def run_inspect(selection: Selection = Selection(),  # noqa: B008 (frozen, so one shared default is safe)
                *, jobs: int = 2, cache_dir: Path | None = None, progress: bool = True) -> Report:
    """Plan, compile what the cache lacks in a pool of ``jobs`` fresh processes, assemble the report."""
    from tqdm import tqdm

    report = Report()
    cache = Cache(cache_dir)
    cuda_files: dict[tuple[str, str], list[dict]] = {}
    metrics: dict[str, dict] = {}
    binaries: dict[str, dict] = {}
    launches: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ff-kernels-triton-") as triton_cache, ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
        initargs=(triton_cache,),
    ) as pool:
        pending: dict[Future, tuple[dict, Any, str]] = {}  # future -> (where its result goes, key, cache key)
        if "cuda" in selection.sources:
            sources = sorted(CSRC.rglob("*.cu"))
            if not sources:
                report.notes.append(f"CUDA kernels skipped: no .cu files under {CSRC} (a source checkout has them)")
            elif _nvcc() is None:
                report.notes.append("CUDA kernels skipped: nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
            for path, arch in product(sources if _nvcc() else (), selection.archs):
                key = _cuda_cache_key(path, arch)
                if (cached := cache.get(key)) is not None:
                    cuda_files[(str(path), arch)] = cached
                else:
                    pending[pool.submit(compile_cuda_file, str(path), arch)] = (cuda_files, (str(path), arch), key)
        if "triton" in selection.sources:
            binaries, launches = pool.submit(_plan_job, _step_specs(selection), selection).result()
        for key, entry in binaries.items():
            if (cached := cache.get(key)) is not None:
                metrics[key] = cached
            else:
                pending[pool.submit(_compile_triton, entry["job"])] = (metrics, key, key)
        with tqdm(total=len(pending), desc="compiling", unit="binary", disable=not progress or not pending) as bar:
            for future in as_completed(pending):
                results, key, cache_key = pending[future]
                results[key] = future.result()
                if _succeeded(results[key]):
                    cache.put(cache_key, results[key])
                bar.update()

    report.kernels = _triton_records(binaries, metrics, selection) + _cuda_records(cuda_files, selection)
    by_key = {r["key"]: r for r in report.kernels if "key" in r}
    report.launches = _launch_records(launches, by_key, selection)
    report.failures = gate_failures(report.kernels, report.launches)
    return report


def _succeeded(result: dict | list[dict]) -> bool:
    """Only successes are cached: a transient failure (a killed compiler) must not stick."""
    return not any(r["error"] for r in (result if isinstance(result, list) else [result]))


def _triton_records(binaries: dict[str, dict], metrics: dict[str, dict], selection: Selection) -> list[dict]:
    records = []
    for key, entry in binaries.items():
        record = {
            "source": "triton", "kernel": entry["kernel"], "config": entry["config"],
            "dtype": _joined(entry["dtypes"], selection.precisions), "dtypes": entry["dtypes"],
            "optimizer": _joined(entry["optimizers"], selection.optimizers), "optimizers": entry["optimizers"],
            "layers": entry["layers"], "rows": entry["rows"], "arch": entry["arch"],
            "num_warps": entry["num_warps"], "num_stages": entry["num_stages"],
            "threads": 32 * entry["num_warps"], **metrics[key], "key": key,
        }
        records.append(_with_occupancy(record, entry["arch"]))
    return records


def _cuda_records(files: dict[tuple[str, str], list[dict]], selection: Selection) -> list[dict]:
    return [
        _with_occupancy({"source": "cuda", "arch": arch, "optimizer": "any", **record}, arch)
        for (_, arch), records in sorted(files.items())
        for record in records
        if selection.wants_kernel(record["kernel"])
    ]


def _launch_records(launches: list[dict], by_key: dict[str, dict], selection: Selection) -> list[dict]:
    """Launches at each shape with their waves on an H100 (132 SMs at the sm_90 binary's occupancy); launches
    that differ only in precision or optimizer but share binary and programs are merged."""
    merged: dict[tuple, dict] = {}
    for launch in launches:
        key = launch["binaries"].get("sm_90")
        binary = by_key.get(key) if key else None
        blocks = binary["blocks_per_sm"] if binary else None
        group = (launch["kernel"], launch["P"], launch["K"], launch["N"], launch["config"], key, launch["programs"])
        record = merged.setdefault(group, {
            "kernel": launch["kernel"], "shape": f"P=Q={launch['P']} K={launch['K']} N={launch['N']}",
            "P": launch["P"], "Q": launch["Q"], "K": launch["K"], "N": launch["N"], "config": launch["config"],
            "dtypes": [], "optimizers": [], "programs": launch["programs"], "sms": H100_SMS,
            "blocks_per_sm": blocks, "waves": round(launch["programs"] / (H100_SMS * blocks), 3) if blocks else None,
            "planned_blocks_per_sm": launch.get("planned_blocks_per_sm"),
        })
        for name, value in (("dtypes", launch["dtype"]), ("optimizers", launch["optimizer"])):
            if value not in record[name]:
                record[name].append(value)
    records = list(merged.values())
    for record in records:
        record["dtype"] = _joined(record["dtypes"], selection.precisions)
        record["optimizer"] = _joined(record["optimizers"], selection.optimizers)
    return records
