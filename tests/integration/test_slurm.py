"""launch/slurm.sbatch on a real SLURM cluster: a job runs one RL step of a tiny model (torchrun under
srun, c10d rendezvous on the node) and checkpoints it; a second job resumes from that checkpoint.

`.ci/run` starts a one-node SLURM (Debian's slurm-wlm + munge) before the tests. Where `sbatch` is
absent, or no controller answers, the test skips with the reason; it never installs anything.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, read_metrics, train_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def slurm_ready() -> str | None:
    """None when a SLURM node is idle for our jobs, else why not."""
    if shutil.which("sbatch") is None:
        return "sbatch not found: no SLURM on this machine (.ci/run starts a one-node SLURM in CI)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo did not answer ({e})"
    if states.returncode != 0:
        return f"no SLURM controller answers: {states.stderr.strip()[:200]}"
    if not any(s.strip() in ("idle", "mixed") for s in states.stdout.split()):
        return f"no idle SLURM node (sinfo: {states.stdout.split()})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, model: Path, data: Path, out: Path, steps: int) -> Path:
    path.write_text(textwrap.dedent(f"""
        [job]
        name = "slurm"
        output_dir = "{out}"
        [model]
        path = "{model}"
        [data]
        train_files = ["{data}"]
        train_batch_size = 4
        max_prompt_length = 32
        [generator]
        n = 4
        max_tokens = 8
        kv_cache_space_gib = 0.25
        [reward]
        fn = "qs_reward:score"
        backend = "inline"
        [train]
        steps = {steps}
        val_every = 0
        [checkpoint]
        interval = 1
        [logging]
        progress_bar = false
        """))
    return path


def sbatch(config: Path, log: Path, env: dict) -> subprocess.CompletedProcess:
    """Submit launch/slurm.sbatch for one CPU node and wait for the job to end (`--wait`)."""
    cmd = ["sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=4G", "--time=20",
           "--no-requeue", f"--output={log}", f"--chdir={REPO}", str(REPO / "launch" / "slurm.sbatch"), str(config)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)


_NOT_READY = slurm_ready()  # None when a SLURM node answers (.ci/run starts one); else why not


@pytest.mark.skipif(_NOT_READY is not None, reason=str(_NOT_READY))
def test_sbatch_runs_one_step_and_resumes(tiny_model, tiny_jsonl, parity_reward_dir, tmp_path):
    env = {**train_env(parity_reward_dir), "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    model = tiny_model("qwen3")

    first = sbatch(write_config(tmp_path / "one.toml", model, tiny_jsonl, tmp_path, 1), tmp_path / "one.log", env)
    log = (tmp_path / "one.log").read_text() if (tmp_path / "one.log").exists() else ""
    assert first.returncode == 0, f"{first.stderr}\n{log[-3000:]}"
    assert "slurm.sbatch: job" in log and "Traceback" not in log
    ckpt = tmp_path / "slurm" / "checkpoints" / "step-1"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "MANIFEST.json").is_file()

    second = sbatch(write_config(tmp_path / "two.toml", model, tiny_jsonl, tmp_path, 2), tmp_path / "two.log", env)
    log = (tmp_path / "two.log").read_text() if (tmp_path / "two.log").exists() else ""
    assert second.returncode == 0, f"{second.stderr}\n{log[-3000:]}"
    assert f"resumed from {ckpt} at step 1" in log
    steps = sorted({r["step"] for r in read_metrics(tmp_path / "slurm")})
    assert steps == [1, 2], json.dumps(steps)
