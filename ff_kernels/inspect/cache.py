"""The compile cache: the keys a binary's metrics are stored under (Triton's own key of the binary, the hash of the
CUDA sources and nvcc for a .cu file) and the folder of JSON files. Kept apart so that what makes a cached result
stale is decided in one place."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ff_kernels.inspect.cuda import CSRC, NVCC_FLAGS, _nvcc_version

RECORD_VERSION = 1  # bump when the cached metrics change shape


def _cache_key(source: Any, backend: Any, options: Any) -> str:
    """Triton's key of the binary (source and dependencies, specialisation, options, compiler versions)."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import get_cache_key

    key = get_cache_key(source, backend, options, get_cache_invalidating_env_vars())
    return hashlib.sha256(f"inspect-v{RECORD_VERSION}-{key}".encode()).hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ff_kernels" / "inspect"


class Cache:
    """Compile results as JSON files named by their key; ``None`` disables it."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Any:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: Any) -> None:
        if self.directory is not None:
            path = self.directory / f"{key}.json"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(value))
            tmp.replace(path)


def _cuda_cache_key(path: Path, arch: str) -> str:
    """nvcc's version, the flags, the arch and the sources it may include: the CUDA files and headers of its folder
    and the headers at the top of csrc/."""
    digest = hashlib.sha256(f"inspect-v{RECORD_VERSION}|{arch}|{' '.join(NVCC_FLAGS)}|{path.name}".encode())
    digest.update(_nvcc_version().encode())
    folder = [p for p in path.parent.rglob("*") if p.suffix in (".cu", ".cuh", ".h")]
    for source in sorted({*folder, *CSRC.glob("*.h")}):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()
