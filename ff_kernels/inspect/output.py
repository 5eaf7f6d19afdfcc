"""A report as text (the summary table, every record) and as the JSON file with the environment it was made in:
presentation only, nothing here changes a record."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ff_kernels.inspect.arch import ARCHS, H100_SMS
from ff_kernels.inspect.cuda import _nvcc_version
from ff_kernels.inspect.gates import GATES
from ff_kernels.inspect.report import Report


def _span(values: Sequence[Any], fmt: str = "{}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def _groups(records: Iterable[dict], *fields: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[f] for f in fields), []).append(record)
    return groups


def format_summary(report: Report) -> str:
    """Worst case per kernel, optimizer, precision and arch over configs and shapes; waves per kernel and shape;
    gate failures counted per gate."""
    lines = ["Binaries: worst over configs and shapes (spill = bytes stored per thread; smem KB of the limit; "
             "cp.async and TMA: fewest per binary; blocks/SM: lowest theoretical occupancy)",
             f"{'source':<7}{'kernel':<24}{'opt':<6}{'dtype':<6}{'arch':<7}{'bins':>5}{'regs':>6}{'spill':>7}"
             f"{'smem KB':>14}{'mma':>10}{'cp.async':>9}{'tma':>5}{'blk/SM':>7}{'errors':>7}"]
    for (source, kernel, opt, dtype, arch), group in _groups(
            report.kernels, "source", "kernel", "optimizer", "dtype", "arch").items():
        ok = [r for r in group if not r.get("error")]
        shared = f"{max((r['shared_bytes'] for r in ok), default=0) / 1024:.1f}/{ARCHS[arch].shared_per_block // 1024}"
        mmas = "/".join(sorted({r["mma"] for r in ok})) or "-"
        blocks = [r["blocks_per_sm"] for r in ok if r["blocks_per_sm"] is not None]
        lines.append(
            f"{source:<7}{kernel[:23]:<24}{opt:<6}{dtype:<6}{arch:<7}{len(group):>5}"
            f"{max((r['registers'] for r in ok), default=0):>6}{max((r['spill_bytes'] for r in ok), default=0):>7}"
            f"{shared:>14}{mmas:>10}{min((r['async_copies'] for r in ok), default=0):>9}"
            f"{max((r['tma'] for r in ok), default=0):>5}{min(blocks) if blocks else '-':>7}{len(group) - len(ok):>7}"
        )
    if report.launches:
        lines += ["", f"Waves = programs / ({H100_SMS} SMs x resident blocks per SM of the sm_90 binary), H100; "
                  "range over configs, precisions and optimizers",
                  f"{'kernel':<24}{'shape':<28}{'programs':>14}{'waves':>16}"]
        for (kernel, shape), group in _groups(report.launches, "kernel", "shape").items():
            lines.append(f"{kernel[:23]:<24}{shape:<28}{_span([r['programs'] for r in group]):>14}"
                         f"{_span([r['waves'] for r in group], '{:.2f}'):>16}")
    lines += ["", "Gates (DESIGN 10, issue 10):"]
    for gate, description in GATES.items():
        count = sum(f.startswith(f"{gate}:") for f in report.failures)
        lines.append(f"  {'PASS' if count == 0 else 'FAIL':<5}{gate:<14}{description}"
                     + (f": {count} failing" if count else ""))
    cuda = [] if all(r["source"] != "cuda" for r in report.kernels) else [
        "CUDA: shared memory is the static part (the kernels size the rest at launch, unseen by ptxas), so no "
        "occupancy or waves are claimed for them"]
    lines += [f"note: {note}" for note in [*cuda, *report.notes]]
    return "\n".join(lines)


def format_records(report: Report) -> str:
    """Every binary on one line, then every failed gate."""
    lines = [f"{'source':<7}{'kernel':<24}{'opt':<6}{'dtype':<6}{'arch':<7}{'regs':>5}{'spill st/ld':>13}"
             f"{'smem':>8}{'mma':>10}{'cp.async':>9}{'tma':>5}{'blk/SM':>7}  {'limiter':<10}config [shapes]"]
    for r in report.kernels:
        if r.get("error"):
            lines.append(f"{r['source']:<7}{r['kernel'][:23]:<24}{r['optimizer']:<6}{r['dtype']:<6}{r['arch']:<7}"
                         f"  error: {r['error'][:200]}")
            continue
        where = f"[{','.join(r['layers'])}; P=Q {','.join(map(str, r['rows']))}]" if r.get("layers") else r["file"]
        blocks = "-" if r["blocks_per_sm"] is None else r["blocks_per_sm"]
        spills = f"{r['spill_bytes']}/{r['spill_loads']}"
        lines.append(
            f"{r['source']:<7}{r['kernel'][:23]:<24}{r['optimizer']:<6}{r['dtype']:<6}{r['arch']:<7}"
            f"{r['registers']:>5}{spills:>13}{r['shared_bytes']:>8}{r['mma']:>10}"
            f"{r['async_copies']:>9}{r['tma']:>5}{blocks:>7}  {r['occupancy_limiter'] or '-':<10}{r['config']} {where}"
        )
    lines += ["", f"Failed gates ({len(report.failures)}):", *(f"  {f}" for f in report.failures)]
    return "\n".join(lines)


def write_json(report: Report, path: Path) -> None:
    kernels = [{k: v for k, v in r.items() if k != "key"} for r in report.kernels]
    payload = {"kernels": kernels, "launches": report.launches, "failures": report.failures, "notes": report.notes,
               "gates": GATES, "environment": _environment()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _environment() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    nvcc = _nvcc_version().splitlines()
    return {"triton": triton_version, "torch": torch.__version__, "nvcc": nvcc[-1] if nvcc else None,
            "command": " ".join(["ff-kernels", *sys.argv[1:]]) if sys.argv else "",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
