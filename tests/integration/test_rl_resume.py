"""RL checkpoint/resume: a run stopped after a checkpoint and resumed (also after SIGKILL) logs the
same metrics afterwards as an uninterrupted run (same rollouts, losses and weights)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import read_metrics, train_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

COMPARED = ("reward/mean", "response/length_mean", "actor/pg_loss", "actor/grad_norm", "perf/num_tokens",
            "perf/total_generated_tokens")  # fmt: skip


def train_cmd(model: Path, data: Path, out: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlx.train", f"--model.path={model}", f"--data.train_files={json.dumps([str(data)])}",
            f"--job.output_dir={out}", f"--job.name={name}", f"--train.steps={steps}", "--train.val_every=0",
            "--data.train_batch_size=4", "--data.max_prompt_length=32", "--generator.n=4", "--generator.max_tokens=8",
            "--generator.kv_cache_space_gib=0.25", "--reward.fn=qs_reward:score", "--reward.backend=inline",
            "--optim.lr=1e-3", "--checkpoint.interval=1", "--logging.progress_bar=false", *extra]  # fmt: skip


def by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if r["step"] > 0}  # the last record of a step wins


def assert_same(a: dict, b: dict, step: int) -> None:
    for key in COMPARED:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"step {step}: {key} {a[key]} != {b[key]}"


def kill_after_a_checkpoint(cmd: list[str], run_dir: Path, env: dict) -> None:
    """Start `cmd` and SIGKILL it as soon as its first checkpoint is complete."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any((p / "COMPLETE").exists() for p in (run_dir / "checkpoints").glob("step-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_stop_and_after_sigkill_matches_uninterrupted(tiny_model, tiny_jsonl, parity_reward_dir, tmp_path):
    model, env = tiny_model("qwen3"), train_env(parity_reward_dir)
    run = lambda *cmd: subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=600)  # noqa: E731

    full = run(*train_cmd(model, tiny_jsonl, tmp_path, "full", 4))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = by_step(read_metrics(tmp_path / "full"))
    assert sorted(reference) == [1, 2, 3, 4]

    # Stop after step 2 (its checkpoint is complete), then resume to step 4.
    first = run(*train_cmd(model, tiny_jsonl, tmp_path, "stopped", 2))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(*train_cmd(model, tiny_jsonl, tmp_path, "stopped", 4, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    after = by_step(read_metrics(tmp_path / "stopped"))
    for step in (3, 4):
        assert_same(after[step], reference[step], step)

    # SIGKILL as soon as a checkpoint exists, then resume from the latest complete one.
    kill_after_a_checkpoint(train_cmd(model, tiny_jsonl, tmp_path, "killed", 4), tmp_path / "killed", env)
    again = run(*train_cmd(model, tiny_jsonl, tmp_path, "killed", 4))  # checkpoint.resume = "auto"
    assert again.returncode == 0, again.stderr[-3000:]
    killed = by_step(read_metrics(tmp_path / "killed"))
    assert sorted(killed) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        assert_same(killed[step], reference[step], step)


CRITIC_COMPARED = ("critic/vf_loss", "critic/values_mean", "critic/returns_mean", "critic/grad_norm",
                   "actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff")  # fmt: skip


def test_critic_run_resumes_after_sigkill_like_uninterrupted(tiny_model, tiny_jsonl, parity_reward_dir, tmp_path):
    """PPO with a critic: value model, its optimizer and schedule, the adaptive KL controller's beta and
    the warm-up all come back from the checkpoint (step 2 is the first actor update)."""
    model, env = tiny_model("qwen3"), train_env(parity_reward_dir)
    critic = ("--algorithm.adv_estimator=gae", "--algorithm.lam=0.95", "--algorithm.use_kl_in_reward=true",
              "--algorithm.kl_ctrl.type=adaptive", "--algorithm.kl_ctrl.target_kl=0.0001",
              "--algorithm.kl_ctrl.horizon=50", "--critic.warmup=2", "--critic.optim.lr=1e-3",
              "--critic.optim.lr_schedule=cosine")  # fmt: skip
    run = lambda *cmd: subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    full = run(*train_cmd(model, tiny_jsonl, tmp_path, "full", 4, *critic))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = by_step(read_metrics(tmp_path / "full"))
    assert "actor/pg_loss" not in reference[1] and "actor/pg_loss" in reference[2]
    betas = [reference[s]["actor/reward_kl_penalty_coeff"] for s in (1, 2, 3, 4)]
    assert len(set(betas)) == 4, f"the adaptive beta must move every step: {betas}"

    kill_after_a_checkpoint(train_cmd(model, tiny_jsonl, tmp_path, "killed", 4, *critic), tmp_path / "killed", env)
    again = run(*train_cmd(model, tiny_jsonl, tmp_path, "killed", 4, *critic))
    assert again.returncode == 0, again.stderr[-3000:]
    killed = by_step(read_metrics(tmp_path / "killed"))
    assert sorted(killed) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        assert_same(killed[step], reference[step], step)
        for key in CRITIC_COMPARED:
            assert killed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)
