"""The gates (DESIGN 10): what every binary and launch must satisfy, and the failures of a set of records. Pure
functions of the records, so they can be checked on synthetic ones."""

from __future__ import annotations

from collections.abc import Iterable

GATES = {
    "compiles": "every binary compiles",
    "spills": "0 spill bytes (stores and loads) in every kernel",
    "shared": "shared memory within the arch's opt-in limit per block",
    "tensor cores": "bf16/fp16/tf32 GEMMs on tensor cores: wgmma on sm_90 (Triton), mma.sync on sm_80",
    "async copies": "cp.async or TMA in the 500-wide GEMM variants (K or N not a multiple of 16)",
    "waves": "at least one wave on 132 SMs for both GEMMs at every shape with P = Q >= 4096",
    "planner": "GEMM 2's row split plans its wave with at least the resident blocks per SM measured on sm_90",
}
TENSOR_CORE_DTYPES = ("bf16", "fp16", "tf32")


def _subject(record: dict) -> str:
    where = ""
    if record.get("layers"):
        where = f" [{','.join(record['layers'])}; P=Q {','.join(map(str, record['rows']))}]"
    elif record.get("file"):
        where = f" [{record['file']}]"
    return (f"{record['source']} {record['kernel']} {record['optimizer']} {record['dtype']} {record['arch']} "
            f"{record['config']}{where}")


def gate_failures(kernels: Iterable[dict], launches: Iterable[dict]) -> list[str]:
    """``"gate: subject: detail"`` for every failed gate. A GEMM is a kernel with an MMA instruction in any of its
    binaries (so the per-row kernels and reductions are exempt from the tensor-core and wave gates)."""
    kernels, launches = list(kernels), list(launches)
    gemms = {(r["source"], r["kernel"]) for r in kernels if r.get("mma", "none") != "none"}
    failures = []
    for r in kernels:
        subject = _subject(r)
        if r.get("error"):
            failures.append(f"compiles: {subject}: {r['error']}")
            continue
        if r["spill_bytes"] or r["spill_loads"]:
            failures.append(f"spills: {subject}: {r['spill_bytes']} B stores, {r['spill_loads']} B loads "
                            f"({r['registers']} registers)")
        if r["shared_bytes"] > r["shared_limit"]:
            failures.append(f"shared: {subject}: {r['shared_bytes']} B > {r['shared_limit']} B")
        if (r["source"], r["kernel"]) not in gemms or r["dtype"] not in TENSOR_CORE_DTYPES:
            continue
        wanted = "wgmma" if r["arch"] == "sm_90" and r["source"] == "triton" else None
        if (wanted and r["mma"] != wanted) or r["mma"] == "none":
            failures.append(f"tensor cores: {subject}: {r['mma']}, wanted {wanted or 'mma.sync or wgmma'}")
        narrow = [layer for layer in r.get("layers", ()) if any(int(d) % 16 for d in layer.split("x"))]
        if narrow and r["source"] == "triton" and not (r["async_copies"] or r["tma"]):
            failures.append(f"async copies: {subject}: no cp.async or TMA ({','.join(narrow)})")
    gemm_names = {name for source, name in gemms if source == "triton"}
    for launch in launches:
        if launch["kernel"] in gemm_names and launch["P"] >= 4096 and (launch["waves"] or 0) < 1:
            failures.append(f"waves: {launch['kernel']} {launch['optimizer']} {launch['dtype']} {launch['config']} "
                            f"{launch['shape']}: {launch['programs']} programs, {launch['blocks_per_sm']} per SM, "
                            f"{launch['waves']} waves")
        planned = launch.get("planned_blocks_per_sm")
        if planned is not None and (launch["blocks_per_sm"] or 0) > planned:
            failures.append(f"planner: {launch['kernel']} {launch['optimizer']} {launch['dtype']} {launch['config']} "
                            f"{launch['shape']}: {launch['blocks_per_sm']} blocks per SM measured, {planned} planned")
    return failures
