"""Signals on a real `rlx train` run (tiny model, vLLM on CPU): SIGTERM finishes the step, saves a
checkpoint and exits 143 with one line, and the run resumes from it; a second SIGINT aborts at
once (130); SIGKILL leaves no process behind (the reward pool's workers die with the trainer)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import read_metrics, train_env
from tests.integration.test_failures import session_processes, wait_gone


pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FAILING_REWARD = '''\
"""Test reward that always fails."""


def score(response, ground_truth, **kwargs):
    return 1 / 0
'''

SLOW_REWARD = '''\
"""Test reward: the parity reward, slowed down so that a step lasts a few seconds."""
import time


def score(response, ground_truth, **kwargs):
    time.sleep(0.3)
    return float(len(response) % 2 == 0)
'''


def train_cmd(model: Path, data: Path, out: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlx.train", f"--model.path={model}", f"--data.train_files={json.dumps([str(data)])}",
            f"--job.output_dir={out}", f"--job.name={name}", f"--train.steps={steps}", "--train.val_every=0",
            "--data.train_batch_size=4", "--data.max_prompt_length=32", "--generator.n=4", "--generator.max_tokens=8",
            "--generator.kv_cache_space_gib=0.25", "--reward.fn=qs_reward:score", "--reward.backend=process",
            "--reward.num_workers=1", "--checkpoint.interval=1000", "--logging.progress_bar=false", *extra]  # fmt: skip


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    # A session of its own: every process the run starts can be found afterwards by its session id.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while True:
        if path.exists() and any(r.get("step", 0) >= step for r in map(json.loads, path.read_text().splitlines())):
            return
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err[-3000:]
    return err


@pytest.fixture(scope="module")
def slow_reward_dir(parity_reward_dir: Path) -> Path:
    (parity_reward_dir / "slow_reward.py").write_text(SLOW_REWARD)
    (parity_reward_dir / "failing_reward.py").write_text(FAILING_REWARD)
    return parity_reward_dir


def test_sigterm_saves_the_step_exits_143_and_resumes(tiny_model, tiny_jsonl, parity_reward_dir, tmp_path):
    model, env = tiny_model("qwen3"), train_env(parity_reward_dir)
    proc = start(train_cmd(model, tiny_jsonl, tmp_path, "term", 500), env)
    wait_for_step(tmp_path / "term", 2, proc)
    os.kill(proc.pid, signal.SIGTERM)
    err = finish(proc)
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"rlx: stopped by SIGTERM after step (\d+): checkpoint (\S+) saved; rerun the same command to resume", last)
    assert match, last
    step, ckpt = int(match.group(1)), Path(match.group(2))
    assert ckpt.name == f"step-{step}" and (ckpt / "COMPLETE").is_file() and (ckpt / "MANIFEST.json").is_file()
    assert wait_gone(session_processes(proc.pid)) == [], "processes outlived the run"
    logged = {r["step"] for r in read_metrics(tmp_path / "term")}
    assert step in logged  # the interrupted run's last step is not lost

    resumed = subprocess.run(train_cmd(model, tiny_jsonl, tmp_path, "term", step + 1), env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in resumed.stderr
    assert step + 1 in {r["step"] for r in read_metrics(tmp_path / "term")}


def test_second_sigint_aborts_the_step_without_a_checkpoint(tiny_model, tiny_jsonl, slow_reward_dir, tmp_path):
    model, env = tiny_model("qwen3"), train_env(slow_reward_dir)
    proc = start(train_cmd(model, tiny_jsonl, tmp_path, "int", 500, "--reward.fn=slow_reward:score"), env)
    wait_for_step(tmp_path / "int", 1, proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(2.5)  # past the window in which a repeat counts as the same request
    os.kill(proc.pid, signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("rlx: aborted by a second SIGINT: the step in progress is lost")
    assert not list((tmp_path / "int" / "checkpoints").glob("step-*/COMPLETE"))
    assert wait_gone(session_processes(proc.pid)) == []


def test_sigkill_leaves_no_process_behind(tiny_model, tiny_jsonl, parity_reward_dir, tmp_path):
    model, env = tiny_model("qwen3"), train_env(parity_reward_dir)
    proc = start(train_cmd(model, tiny_jsonl, tmp_path, "kill", 500), env)
    wait_for_step(tmp_path / "kill", 1, proc)
    others = [p for p in session_processes(proc.pid) if p != proc.pid]
    assert others, "expected reward workers"
    proc.kill()
    proc.wait(timeout=30)
    assert wait_gone(others) == [], "processes outlived a SIGKILLed run"


def test_a_reward_that_always_fails_stops_the_run(tiny_model, tiny_jsonl, slow_reward_dir, tmp_path):
    """The filtered sampler with max_num_gen_batches = 0 would otherwise never finish step 1."""
    model, env = tiny_model("qwen3"), train_env(slow_reward_dir)
    cmd = train_cmd(model, tiny_jsonl, tmp_path, "fail", 5, "--reward.fn=failing_reward:score", "--reward.backend=inline",
                    "--sampler.type=filtered", "--sampler.filtered.max_num_gen_batches=0", "--reward.max_failed_steps=2")  # fmt: skip
    proc = start(cmd, env)
    err = finish(proc, timeout=600)
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlx: error: reward function 'failing_reward:score' failed on more than "
                           "reward.max_failure_fraction=0.5 of the rollouts for 2 ")  # fmt: skip
    assert "first error: ZeroDivisionError: division by zero" in last
    assert wait_gone(session_processes(proc.pid)) == []
