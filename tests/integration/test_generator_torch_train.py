"""RL runs with `generator.backend = "torch"`: real TOMLs through the CLI, shrunk to a tiny model.

Two steps each (generate -> update -> weight sync -> generate from the new weights): the fixed
sampler (GRPO) and token_adaptive (per-request temperatures, max_tokens and prefix continuations).
The GRPO run also checks, through rollout correction's diagnostics, that the rollout logprobs equal
the trainer's at both steps: step 2 samples from the weights the first update pushed.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tomllib

import pytest

from tests.integration.conftest import read_metrics, tiny_records, train_env, write_records
from tests.integration.test_train_configs import CONFIG_DIR, tiny_arch, tiny_overrides

CONFIGS = ["qwen2.5_0.5b_gsm8k_grpo.toml", "token_adaptive.toml"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_two_steps_with_the_torch_generator(name, tiny_model, parity_reward_dir, tmp_path):
    path = CONFIG_DIR / name
    cfg = tomllib.loads(path.read_text())
    chat = cfg.get("model", {}).get("use_chat_template", True)
    data = cfg.get("data", {})
    records = tiny_records(data.get("prompt_key", "prompt"), data.get("answer_key", "answer"), chat=chat)
    train_file = write_records(records, tmp_path / "train.jsonl")
    args = tiny_overrides(cfg, tiny_model(tiny_arch(path, cfg)), train_file, parity_reward_dir, tmp_path, path.stem)
    args += ["--generator.backend=torch", "--train.steps=2"]
    parity = cfg.get("sampler", {}).get("type", "fixed") == "fixed"
    if parity:  # rollout vs trainer logprob diagnostics; a learning rate that moves the weights
        args += ["--rollout_correction.rollout_is=token", "--optim.lr=1e-3"]
    cmd = [sys.executable, "-m", "rlx.train", "--config", str(path), *args]
    proc = subprocess.run(cmd, env=train_env(parity_reward_dir), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    # (the torch backend's warning naming the vLLM-only options it ignores may mention vLLM)
    assert "building vLLM engine" not in proc.stderr and "vllm." not in proc.stderr, "the torch backend built vLLM"
    steps = {r["step"]: r for r in read_metrics(tmp_path / path.stem)}
    assert {1, 2} <= set(steps), sorted(steps)
    for step in (steps[1], steps[2]):
        assert math.isfinite(step["actor/pg_loss"])
        assert step["generator/dropped_prompts"] == 0 and step["perf/generated_tokens"] > 0
        if parity:
            assert step["rollout_corr/log_ppl_abs_diff"] < 1e-5, step["rollout_corr/log_ppl_abs_diff"]
