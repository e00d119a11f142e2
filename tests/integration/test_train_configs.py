"""Every TOML in train_configs/ runs one RL step on CPU with a tiny model of the same architecture.

Only CLI overrides shrink a config (tiny model, 2 prompts, 2-4 rollouts of 8 tokens, parallel
degrees 1, fp32, inline reward, no checkpoints or validation); its algorithm settings (sampler,
loss, rollout correction, activation checkpointing, mini-batches, PPO epochs) run as written.
The glob picks up new files automatically. Asserts: exit 0, step 1 in metrics.jsonl with a
finite `actor/pg_loss`, and the metric keys that the config's sampler, critic and rollout
correction promise (DESIGN.md section 5).

A fast test also loads every file through the config loader and resolves its reward function.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, read_metrics, tiny_records, train_env, write_records

CONFIG_DIR = REPO / "train_configs"
ALL_CONFIGS = sorted(CONFIG_DIR.rglob("*.toml"))
# quickstart_cpu.toml runs as written on CPU through `rlx quickstart` (SFT then RL; model and data
# are filled in by the command), and the quickstart's own test trains it end to end.
SKIP = {"quickstart_cpu.toml"}
CONFIGS = [p for p in ALL_CONFIGS if p.name not in SKIP]
IDS = [str(p.relative_to(CONFIG_DIR)) for p in CONFIGS]

N = 4  # rollouts per prompt (fixed / filtered); 4 so a group's parity rewards usually differ
TRAIN_BATCH = 2
MAX_TOKENS = 8


def tiny_arch(path: Path, cfg: dict) -> str:
    """The tiny architecture standing in for the config's model: a `# tiny-arch: X` comment wins,
    else the model path or file name (qwen2.5/qwen2 -> qwen2, llama -> llama, anything else -> qwen3)."""
    for line in path.read_text().splitlines():
        if line.strip().startswith("# tiny-arch:"):
            return line.split(":", 1)[1].strip()
    name = (cfg.get("model", {}).get("path", "") + " " + path.name).lower()
    for marker, arch in (("qwen3", "qwen3"), ("qwen2", "qwen2"), ("llama", "llama")):
        if marker in name:
            return arch
    return "qwen3"


def expected_keys(cfg: dict) -> list[str]:
    """Metric keys the config's sampler, critic and rollout correction must log (no actor/ loss keys
    while a critic warm-up freezes the policy at step 1)."""
    algorithm, critic = cfg.get("algorithm", {}), cfg.get("critic", {})
    frozen = algorithm.get("adv_estimator") == "gae" and critic.get("warmup", 0) > 1
    keys = [] if frozen else ["actor/pg_loss"]
    if algorithm.get("adv_estimator") == "gae":
        keys += ["critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/values_mean",
                 "critic/returns_mean", "critic/grad_norm"]  # fmt: skip
    if algorithm.get("use_kl_in_reward"):
        keys += ["actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff"]
    sampler = cfg.get("sampler", {}).get("type", "fixed")
    keys += {
        "adaptive": ["adaptive_rollout/total_rollouts", "adaptive_rollout/efficiency"],
        "filtered": ["train/num_gen_batches"],
        "token_adaptive": ["adaptive/truncation_rate", "adaptive/total_rollouts"],
    }.get(sampler, [])
    rc = cfg.get("rollout_correction", {})
    on = lambda key: str(rc.get(key, "none")).lower() not in ("none", "null", "")  # noqa: E731
    if rc:
        keys += ["rollout_corr/kl", "rollout_corr/ppl_ratio"]  # the always-present diagnostics
    if on("rollout_is"):
        keys += ["rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_eff_sample_size"]
        if rc.get("rollout_is_batch_normalize"):
            keys.append("rollout_corr/rollout_is_batch_norm_factor")
    if on("rollout_rs"):
        keys.append("rollout_corr/rollout_rs_masked_fraction")
        keys += [f"rollout_corr/rollout_rs_{o.strip()}_mean" for o in str(rc["rollout_rs"]).split(",")]
    if rc.get("rollout_token_veto_threshold") is not None:
        keys.append("rollout_corr/rollout_is_veto_fraction")
    return keys


def tiny_overrides(cfg: dict, model: Path, train_file: Path, reward_dir: Path, out: Path, name: str) -> list[str]:
    """CLI overrides that shrink `cfg` to one CPU step with a tiny model, keeping its algorithm."""
    ov = {
        "job.output_dir": str(out), "job.name": name,
        "model.path": str(model), "model.tokenizer_path": "", "model.ref_path": "", "model.dtype": "float32",
        "parallel.dp_replicate": 1, "parallel.dp_shard": -1, "parallel.tp": 1, "parallel.compile": "false",
        "parallel.param_dtype": "float32", "parallel.reduce_dtype": "float32", "parallel.backend": "auto",
        "data.train_files": str(train_file), "data.val_files": "[]", "data.max_prompt_length": 64,
        "data.train_batch_size": TRAIN_BATCH,
        "generator.tp": 1, "generator.dtype": "auto", "generator.n": N, "generator.max_tokens": MAX_TOKENS,
        "generator.max_model_len": 0, "generator.kv_cache_space_gib": 0.25,
        "generator.enforce_eager": "true",  # on CPU, false means ~30 s of torch.compile warm-up
        # a reward with variance: random tiny models never solve the task (see conftest)
        "reward.fn": "qs_reward:score", "reward.backend": "inline",
        "train.steps": 1, "train.val_every": 0, "train.val_before_train": "false",
        "checkpoint.enable": "false", "checkpoint.resume": "none", "checkpoint.init_from": "",
        "logging.jsonl": "true", "logging.wandb": "false", "logging.tensorboard": "false",
        "logging.progress_bar": "false",
    }  # fmt: skip
    if cfg.get("data", {}).get("gen_batch_size", 0):
        ov["data.gen_batch_size"] = 2 * TRAIN_BATCH
    if cfg.get("loss", {}).get("mini_batch_size", 0):
        ov["loss.mini_batch_size"] = 1  # keep several optimizer steps per batch
    if cfg.get("critic", {}).get("mini_batch_size", 0):
        ov["critic.mini_batch_size"] = 1
    sampler = cfg.get("sampler", {})
    if sampler.get("type") == "adaptive":
        ov |= {"sampler.adaptive.max_n": 8, "sampler.adaptive.rollouts_per_batch": 2,
               "sampler.adaptive.min_rollouts": 2}  # fmt: skip
    if sampler.get("type") == "token_adaptive":
        ov |= {"sampler.token_adaptive.min_prefix_length": 2, "sampler.token_adaptive.max_resamples_per_prefix": 1,
               "sampler.token_adaptive.target_rollouts": 2}  # fmt: skip
    return [f"--{k}={v}" for k, v in ov.items()]


def test_configs_found():
    assert len(CONFIGS) >= 10, IDS


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in ALL_CONFIGS])
def test_config_loads(path: Path):
    """Each file passes the config loader as written, names a reward function that resolves, and
    opens with a comment block (the GPU configs: what it is, how to launch it, on what hardware)."""
    from rlx.config import load_config
    from rlx.reward.builtins import resolve_reward_fn

    cfg = load_config(path)
    cfg.validate()
    resolve_reward_fn(cfg.reward.fn)
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must open with a comment block"
    if path.name not in SKIP:
        assert "Launch" in text and "Hardware" in text, f"{path.name}: the header must say how to launch it and on what"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_one_step(path: Path, tiny_model, parity_reward_dir, tmp_path):
    cfg = tomllib.loads(path.read_text())
    data = cfg.get("data", {})
    suffix = ".parquet" if any(str(f).endswith(".parquet") for f in data.get("train_files", [])) else ".jsonl"
    records = tiny_records(data.get("prompt_key", "prompt"), data.get("answer_key", "answer"),
                           chat=cfg.get("model", {}).get("use_chat_template", True))  # fmt: skip
    train_file = write_records(records, tmp_path / f"train{suffix}")
    name = path.stem
    args = tiny_overrides(cfg, tiny_model(tiny_arch(path, cfg)), train_file, parity_reward_dir, tmp_path, name)

    cmd = [sys.executable, "-m", "rlx.train", "--config", str(path), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=train_env(parity_reward_dir), cwd=tmp_path, capture_output=True, text=True,
                          timeout=420)  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\nexit {proc.returncode} after {elapsed:.0f}s\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )

    records = read_metrics(tmp_path / name)
    steps = {r["step"]: r for r in records}
    assert 1 in steps, f"no step 1 in metrics.jsonl: {sorted(steps)}"
    step = steps[1]
    missing = [k for k in expected_keys(cfg) if k not in step]
    assert not missing, f"{path.name}: missing metrics {missing}; logged: {sorted(step)}"
    if "actor/pg_loss" not in expected_keys(cfg):  # a critic warm-up: the policy must not have moved
        assert "actor/pg_loss" not in step and "weight_sync/seconds" not in step, sorted(step)
    for key in expected_keys(cfg):
        assert isinstance(step[key], (int, float)) and math.isfinite(step[key]), (key, step[key])
