"""The per-SM limits of the archs compiled for and the occupancy they allow: the one place that knows the hardware,
so the records, the gates and the summary judge every binary against the same numbers."""

from __future__ import annotations

from dataclasses import dataclass

H100_SMS = 132


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA C++ Programming Guide, "Technical Specifications per Compute
    Capability"; NVIDIA A100 and H100 tuning guides): 64K registers, 2048 threads and 32 blocks per SM on both;
    shared memory 164 KB per SM / 163 KB opt-in per block on sm_80, 228 KB / 227 KB on sm_90; 1 KB of each
    block's shared memory reserved by the system (cudaDevAttrReservedSharedMemoryPerBlock)."""

    capability: int
    shared_per_block: int
    shared_per_sm: int
    reserved_shared: int = 1024
    registers: int = 65536
    threads: int = 2048
    blocks: int = 32


ARCHS = {
    "sm_80": Arch(80, shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    "sm_90": Arch(90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}


def occupancy(arch: str, registers: int, shared: int, warps: int) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them, by the rules of the toolkit's cuda_occupancy.h:
    registers go to warps in units of 256 and are split over the SM's 4 sub-partitions, shared memory goes to
    blocks in units of 128 bytes (plus the reserved 1 KB), the largest carveout is assumed."""
    limits = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_per_partition = limits.registers // 4 // regs_per_warp
    by_registers = 0 if regs_per_warp * -(-warps // 4) * 4 > limits.registers else warps_per_partition * 4 // warps
    shared_per_block = -(-(shared + limits.reserved_shared) // 128) * 128
    by_shared = limits.shared_per_sm // shared_per_block if shared <= limits.shared_per_block else 0
    candidates = {
        "blocks": limits.blocks,
        "threads": limits.threads // (32 * warps),
        "registers": by_registers,
        "shared": by_shared,
    }
    limiter = min(candidates, key=lambda name: candidates[name])
    return candidates[limiter], limiter
