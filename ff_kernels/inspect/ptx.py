"""Reading compiler output: ptxas's ``-v`` resource report and the instructions in PTX text. Pure text parsing,
shared by the Triton and the nvcc compiles, and testable without any compiler."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas ``-v`` output (as printed by nvcc --resource-usage or Triton's TRITON_DUMP_PTXAS_LOG) per entry
    function: registers, spill store and load bytes, stack frame and static shared memory."""
    entries: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if match := PTXAS_ENTRY.search(line):
            current = entries.setdefault(match.group(1), {
                "registers": 0, "spill_bytes": 0, "spill_loads": 0, "stack_bytes": 0, "static_shared": 0,
            })
        elif current is not None and (match := PTXAS_FRAME.search(line)):
            current["stack_bytes"], current["spill_bytes"], current["spill_loads"] = map(int, match.groups())
        elif current is not None and (match := PTXAS_USED.search(line)):
            current["registers"] = int(match.group(1))
            current["static_shared"] = int(match.group(2) or 0)
    return entries


ASYNC_COPY = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.c[ag]\.", re.MULTILINE)
TMA_COPY = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.bulk\.tensor\.", re.MULTILINE)


def ptx_instructions(ptx: str) -> dict[str, Any]:
    """The MMA instruction (wgmma, mma.sync, which WMMA also lowers to, or none) and the static counts of
    cp.async (LDGSTS) and TMA (cp.async.bulk.tensor) copies in one function's PTX."""
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "none"
    return {"mma": mma, "async_copies": len(ASYNC_COPY.findall(ptx)), "tma": len(TMA_COPY.findall(ptx))}


def _ptx_entries(ptx: str) -> Iterator[tuple[str, str]]:
    """(name, text) of each ``.entry`` in a PTX module, its text running to the next entry."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx)]
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(ptx), "")]):
        yield name, ptx[start:end]
