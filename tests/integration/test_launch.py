"""launch/torchrun.sh and launch/slurm.sbatch: syntax, the commands they build, and a real 2-node
job on loopback (two torchrun "nodes" of one process each, static rendezvous on 127.0.0.1).

The sbatch script runs under fake `srun` / `scontrol` / `ray` commands (shims on PATH that log
their arguments and run the wrapped command), with the launcher in dry-run mode, so the test
checks the exact torchrun command each node would run without a SLURM cluster.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, read_metrics, tiny_records, train_env, write_records

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
CONFIG = "train_configs/qwen3_8b_fsdp_tp_multinode.toml"


def run_script(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def launcher_env(**extra: str) -> dict[str, str]:
    """A clean environment for the launcher: none of the caller's rendezvous/SLURM/GPU variables."""
    drop = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_BACKEND", "RDZV_ID",
            "CUDA_VISIBLE_DEVICES", "RLX_RAY_HEAD", "RLX_RAY_WORKERS")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "PYTHON": "python3", "RLX_LAUNCH_DRY_RUN": "1", **extra}


def torchrun_args(stdout: str) -> list[str]:
    """The dry-run command line (the last line of stdout starting with the interpreter), split."""
    lines = [line for line in stdout.splitlines() if "torch.distributed.run" in line]
    assert lines, f"no torchrun command printed:\n{stdout}"
    return shlex.split(lines[-1])


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH], ids=lambda p: p.name)
def test_bash_syntax(script: Path):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_torchrun_single_node_defaults():
    proc = run_script([str(TORCHRUN_SH), CONFIG, "--train.steps=3"], launcher_env(CUDA_VISIBLE_DEVICES="0,1,2,3"))
    assert proc.returncode == 0, proc.stderr
    args = torchrun_args(proc.stdout)
    assert args[:3] == ["python3", "-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in args and "--standalone" in args  # one process per visible GPU
    assert args[-5:] == ["-m", "rlx.train", "--config", CONFIG, "--train.steps=3"]


def test_torchrun_multi_node_static_and_c10d():
    env = launcher_env(NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="1234", NPROC_PER_NODE="8")
    args = torchrun_args(run_script([str(TORCHRUN_SH), CONFIG], env).stdout)
    for flag in ("--nnodes=2", "--node_rank=1", "--master_addr=node0", "--master_port=1234", "--nproc_per_node=8"):
        assert flag in args, (flag, args)
    assert "--standalone" not in args

    env |= {"RDZV_BACKEND": "c10d", "RDZV_ID": "job7"}
    args = torchrun_args(run_script([str(TORCHRUN_SH), CONFIG], env).stdout)
    for flag in ("--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:1234", "--rdzv_id=job7"):
        assert flag in args, (flag, args)
    assert not any(a.startswith("--node_rank") for a in args)


def test_torchrun_rejects_missing_config():
    proc = run_script([str(TORCHRUN_SH), "no/such.toml"], launcher_env())
    assert proc.returncode == 2 and "not found" in proc.stderr
    assert run_script([str(TORCHRUN_SH)], launcher_env()).returncode == 2


# Fake SLURM/Ray commands: log "name args" to $SHIM_LOG; srun drops its own options and runs the rest.
SHIMS = {
    "scontrol": """\
        #!/usr/bin/env bash
        echo "scontrol $*" >> "$SHIM_LOG"
        [[ "$1 $2" == "show hostnames" ]] && printf '%s\\n' $FAKE_HOSTS
        """,
    "srun": """\
        #!/usr/bin/env bash
        echo "srun $*" >> "$SHIM_LOG"
        while [[ $# -gt 0 && "$1" == -* ]]; do
            case "$1" in -w|-N|-n|--nodelist) shift 2 ;; *) shift ;; esac
        done
        exec "$@"
        """,
    "ray": """\
        #!/usr/bin/env bash
        echo "ray $*" >> "$SHIM_LOG"
        """,
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in SHIMS.items():
        (bin_dir / name).write_text(textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "shims.log"
    env = launcher_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SHIM_LOG=str(log), FAKE_HOSTS="gpu-a17 gpu-a18",
        SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(REPO),
    )  # fmt: skip
    return env, log


def test_sbatch_builds_torchrun_command(fake_slurm):
    env, log = fake_slurm
    proc = run_script([str(SBATCH), CONFIG, "--train.steps=3"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = torchrun_args(proc.stdout)
    for flag in ("--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-a17:29500",
                 "--rdzv_id=4242"):  # fmt: skip
        assert flag in args, (flag, args)
    assert args[-5:] == ["-m", "rlx.train", "--config", CONFIG, "--train.steps=3"]
    calls = log.read_text().splitlines()
    assert "scontrol show hostnames gpu-a[17-18]" in calls
    srun = [c for c in calls if c.startswith("srun")]
    assert len(srun) == 1 and "--nodes=2" in srun[0] and "--ntasks-per-node=1" in srun[0], srun
    assert not any(c.startswith("ray") for c in calls)


def test_sbatch_ray_head(fake_slurm):
    env, log = fake_slurm
    proc = run_script([str(SBATCH), CONFIG], {**env, "RLX_RAY_HEAD": "1", "RLX_RAY_WORKERS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = torchrun_args(proc.stdout)
    assert args[-2:] == ["--reward.backend=ray", "--reward.ray_address=gpu-a17:6379"], args
    calls = log.read_text().splitlines()
    assert any(c.startswith("srun") and "-w gpu-a17 ray start --head --port=6379" in c for c in calls), calls
    assert any(c.startswith("srun") and "-w gpu-a18 ray start --address=gpu-a17:6379" in c for c in calls), calls
    assert any(c.startswith("ray status --address=gpu-a17:6379") for c in calls), calls


def test_sbatch_requires_config(fake_slurm):
    env, _ = fake_slurm
    proc = run_script([str(SBATCH)], env)
    assert proc.returncode == 2 and "usage" in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_NODE_TOML = """\
[job]
name = "two-node"
output_dir = "{out}"

[model]
path = "{model}"

[parallel]
dp_shard = 2
tp = 1

[data]
train_files = ["{data}"]
train_batch_size = 2
max_prompt_length = 32

[generator]
tp = 1
n = 2
max_tokens = 8
kv_cache_space_gib = 0.25
enforce_eager = true

[reward]
fn = "quickstart"
backend = "inline"

[train]
steps = 2
val_every = 0
val_before_train = false

[optim]
lr = 1e-4

[checkpoint]
interval = 2

[logging]
progress_bar = false
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.vllm
def test_two_nodes_on_loopback(tiny_model, tmp_path):
    """Two torchrun invocations (node_rank 0 and 1, one process each) via launch/torchrun.sh train
    two steps together: FSDP over both "nodes", one vLLM engine per rank, a DCP checkpoint at step 2."""
    data = write_records(tiny_records(chat=False), tmp_path / "train.jsonl")
    config = tmp_path / "two_node.toml"
    config.write_text(TWO_NODE_TOML.format(out=tmp_path / "runs", model=tiny_model("qwen3"), data=data))
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        env = {**train_env(), "NNODES": "2", "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "NPROC_PER_NODE": "1", "PYTHON": sys.executable}  # fmt: skip
        for key in ("RDZV_BACKEND", "CUDA_VISIBLE_DEVICES", "RLX_LAUNCH_DRY_RUN"):
            env.pop(key, None)
        log = open(tmp_path / f"node{node_rank}.log", "w")
        procs.append((subprocess.Popen(["bash", str(TORCHRUN_SH), str(config)], env=env, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))  # fmt: skip
    try:
        codes = [proc.wait(timeout=400) for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: torchrun and its worker
                proc.wait()
            log.close()
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(f"== node {r} (exit {c})\n{text[-5000:]}" for r, (c, text) in
                                        enumerate(zip(codes, logs)))  # fmt: skip
    assert "world=2" in logs[0], logs[0][-3000:]

    run_dir = tmp_path / "runs" / "two-node"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]  # written once per step (rank 0 only)
    for record in records:
        assert math.isfinite(record["actor/pg_loss"]), record["actor/pg_loss"]
        assert record["perf/num_rollouts"] == 4  # 2 prompts x n=2, gathered from both nodes

    from rlx.checkpoint import list_checkpoints

    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [2]


def slurm_available() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster answers sinfo")
def test_sbatch_on_a_real_slurm_cluster(tiny_model, tmp_path):
    """`sbatch --wait launch/slurm.sbatch` one step on one node of whatever cluster `sinfo` reaches
    (a one-node cluster on this machine works: see the launch section of the README)."""
    data = write_records(tiny_records(chat=False), tmp_path / "train.jsonl")
    config = tmp_path / "one_node.toml"
    text = TWO_NODE_TOML.format(out=tmp_path / "runs", model=tiny_model("qwen3"), data=data)
    config.write_text(text.replace("dp_shard = 2", "dp_shard = -1"))
    env = {**train_env(), "PYTHON": sys.executable, "RLX_DIR": str(REPO)}
    cmd = ["sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
           f"--output={tmp_path}/job-%j.out", str(SBATCH), str(config),
           "--train.steps=1", "--checkpoint.enable=false"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs[-5000:]}"
    assert "rdzv=c10d" in logs, logs[:3000]
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "two-node")] == [1]
