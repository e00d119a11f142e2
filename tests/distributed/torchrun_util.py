"""Launch a tests/distributed script under torchrun (gloo ranks on CPU) from a pytest test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def torchrun(script: str, nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run tests/distributed/<script> under torchrun with `nproc` gloo ranks; fail with its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script_path = REPO / "tests" / "distributed" / script
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(script_path), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
