"""generator.placement = "separate" under torchrun (1 trainer rank + 1 generator rank, gloo, CPU):
max_staleness = 0 equals the colocated run; max_staleness = 1 keeps the fixed lag (never more) and
resumes after SIGKILL exactly like an uninterrupted run; a generator rank that dies stops the job
in bounded time with one line. Generation uses the torch backend (the vLLM engine also runs on
generator ranks; the torch one keeps these runs short)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import read_metrics, train_env

pytestmark = [pytest.mark.slow]

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
COMPARED = ("reward/mean", "response/length_mean", "actor/pg_loss", "actor/grad_norm", "perf/num_tokens")


def args(model: Path, data: Path, out: Path, name: str, steps: int, *extra: str) -> list[str]:
    return ["--config", "train_configs/quickstart_cpu.toml", f"--model.path={model}",
            f"--data.train_files={json.dumps([str(data)])}", f"--data.val_files={json.dumps([str(data)])}",
            f"--job.output_dir={out}", f"--job.name={name}", f"--train.steps={steps}", "--train.val_every=2",
            "--data.train_batch_size=4", "--data.gen_batch_size=4", "--data.max_prompt_length=32",
            "--generator.n=4", "--generator.max_tokens=8", "--generator.backend=torch",
            "--reward.fn=qs_reward:score", "--optim.lr=1e-3", "--optim.warmup_steps=0",
            "--checkpoint.enable=true", "--checkpoint.interval=1", "--logging.progress_bar=false", *extra]  # fmt: skip


def separate(*extra: str) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "rlx.train", *extra,
            "--generator.placement=separate"]  # fmt: skip


def colocated(*extra: str) -> list[str]:
    return [sys.executable, "-m", "rlx.train", *extra]


def by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if r["step"] > 0}


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def env(parity_reward_dir):
    return train_env(parity_reward_dir)  # OMP_NUM_THREADS=1 for both placements: the same arithmetic


def test_max_staleness_0_equals_colocated(tiny_model, tiny_jsonl, env, tmp_path):
    model = tiny_model("qwen3")
    run(colocated(*args(model, tiny_jsonl, tmp_path, "colocated", 3)), env)
    run(separate(*args(model, tiny_jsonl, tmp_path, "separate", 3)), env)
    a_records, records = read_metrics(tmp_path / "colocated"), read_metrics(tmp_path / "separate")
    a, b = by_step(a_records), by_step(records)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in COMPARED:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-7), (step, key)
        assert b[step]["async/staleness_max"] == 0.0
    # Validation of version v arrives with a later step's record (val/version says which): none is lost.
    val = {r["val/version"]: r["val/acc"] for r in records if "val/version" in r}
    assert val == pytest.approx({0.0: a_records[0]["val/acc"], 2.0: a[2]["val/acc"], 3.0: a[3]["val/acc"]})


def test_max_staleness_1_lags_by_one_and_resumes_after_sigkill(tiny_model, tiny_jsonl, env, tmp_path):
    model = tiny_model("qwen3")
    lag = ("--train.max_staleness=1",)
    run(separate(*args(model, tiny_jsonl, tmp_path, "full", 4, *lag)), env)
    full = by_step(read_metrics(tmp_path / "full"))
    assert [full[s]["async/staleness_max"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert [full[s]["async/policy_version"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 2.0]

    proc = subprocess.Popen(separate(*args(model, tiny_jsonl, tmp_path, "killed", 4, *lag)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any((p / "COMPLETE").exists() for p in ckpts.glob("step-2")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once
    proc.wait()
    run(separate(*args(model, tiny_jsonl, tmp_path, "killed", 4, *lag)), env)  # resume = "auto"
    killed = by_step(read_metrics(tmp_path / "killed"))
    assert sorted(killed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in (*COMPARED, "async/policy_version"):
            assert killed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-7), (step, key)


def test_a_dead_generator_rank_stops_the_job_with_one_line(tiny_model, tiny_jsonl, env, tmp_path):
    model = tiny_model("qwen3")
    proc = subprocess.Popen(separate(*args(model, tiny_jsonl, tmp_path, "dies", 200, "--train.max_staleness=1",
                                           "--checkpoint.enable=false")),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    metrics = tmp_path / "dies" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"step": 2' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
        time.sleep(0.1)
    generator = [pid for pid in _children(proc.pid) if _rank(pid) == "1"]  # the last rank generates
    assert len(generator) == 1, generator
    os.kill(generator[0], signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert time.monotonic() - killed_at < 120 and proc.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("rlx: error:")]
    assert len(lines) == 1 and "rank 1 of this job stopped" in lines[0], stderr[-3000:]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _rank(pid: int) -> str:
    """RANK as torchrun started the process with it (/proc shows the initial environment)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), "")


def test_token_adaptive_samples_on_the_generator_rank(tiny_model, tiny_jsonl, env, tmp_path):
    """The sampler that needs a trainer forward while it samples gets it from the generator rank's copy of
    the policy version it generates with."""
    model = tiny_model("qwen3")
    cmd = separate(*args(model, tiny_jsonl, tmp_path, "ta", 2, "--train.max_staleness=1", "--sampler.type=token_adaptive",
                         "--sampler.filtered.metric=acc", "--sampler.filtered.max_num_gen_batches=10",
                         "--sampler.token_adaptive.min_prefix_length=1", "--checkpoint.enable=false"))  # fmt: skip
    run(cmd, env)
    steps = by_step(read_metrics(tmp_path / "ta"))
    assert sorted(steps) == [1, 2] and steps[2]["async/staleness_max"] == 1.0
    assert steps[1]["adaptive/total_rollouts"] > 0 and "adaptive/truncation_rate" in steps[2]


def test_sigterm_saves_the_batch_in_flight_and_resumes(tiny_model, tiny_jsonl, env, tmp_path):
    """SIGTERM to the whole job (what a scheduler sends): the generator rank keeps serving while the
    trainer finishes its step and saves, with the batch already generated for the next step; the
    rerun continues from there with the lag intact."""
    model = tiny_model("qwen3")
    cmd = separate(*args(model, tiny_jsonl, tmp_path, "term", 8, "--train.max_staleness=1", "--checkpoint.interval=100"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"step": 2' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    stopped = [line for line in stderr.splitlines() if line.startswith("rlx: stopped by SIGTERM")]
    assert len(stopped) == 1 and "rlx: error" not in stderr, stderr[-3000:]
    saved = sorted((tmp_path / "term" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    at = state["step"]
    assert [m["step"] for m in state["data"]["async_pending"]] == [at + 1]
    run(cmd, env)
    steps = by_step(read_metrics(tmp_path / "term"))
    assert sorted(steps) == list(range(1, 9))
    assert all(steps[s]["async/policy_version"] == s - 2 for s in range(2, 9))
