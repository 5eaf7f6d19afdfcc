"""The set-up scripts' disk-space guard: a clear message before a large install, instead of pip failing halfway with
"No space left on device" and leaving a half-installed environment for the next run to reuse."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "require-space.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("df") is None, reason="needs bash and df")


def _require(gib: int, tmp_path: Path) -> subprocess.CompletedProcess:
    command = f'. "{SCRIPT}"; require_space {gib} "a test install"; echo reached'
    return subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30)


def test_enough_space_goes_on(tmp_path: Path) -> None:
    proc = _require(0, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "reached" and proc.stderr == ""


def test_too_little_space_stops_with_what_and_where(tmp_path: Path) -> None:
    proc = _require(1 << 30, tmp_path)
    assert proc.returncode == 1 and "reached" not in proc.stdout
    assert f"a test install needs about {1 << 30} GiB free under {tmp_path}" in proc.stderr
    assert "MiB are free" in proc.stderr
