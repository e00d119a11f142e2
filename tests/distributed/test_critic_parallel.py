"""The critic under FSDP2 x TP (torchrun + gloo on CPU): three PPO-with-a-critic steps on a fixed batch
(values, KL in the reward, GAE, two critic epochs over two mini-batches, a policy update) give the same
losses and weights at dp_shard=2 and at tp=2 as in one process (run_critic.py)."""

from __future__ import annotations

import pytest
import torch

from torchrun_util import torchrun

pytestmark = pytest.mark.distributed
STEPS = 3
KEYS = ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm", "actor/pg_loss",
        "actor/grad_norm", "actor/reward_kl_penalty", "values_sum")  # fmt: skip


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("critic_ref") / "ref.pt"
    torchrun("run_critic.py", 1, "--model", str(tiny_model_dir), "--out", str(out), "--steps", str(STEPS))
    return torch.load(out)


@pytest.mark.parametrize("dp_shard,tp", [(2, 1), (1, 2)], ids=["dp_shard2", "tp2"])
def test_critic_run_matches_single_process(single, tiny_model_dir, tmp_path, dp_shard, tp):
    out = tmp_path / "run.pt"
    torchrun("run_critic.py", 2, "--model", str(tiny_model_dir), "--out", str(out), "--dp-shard", str(dp_shard),
             "--tp", str(tp), "--steps", str(STEPS))  # fmt: skip
    run = torch.load(out)
    assert single["metrics"][-1]["critic/vf_clipfrac"] > 0, "the value clip must act somewhere"
    for step, (got, want) in enumerate(zip(run["metrics"], single["metrics"])):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)
    for which in ("critic", "policy"):
        assert run[which].keys() == single[which].keys()
        worst = max((run[which][k] - single[which][k]).abs().max().item() for k in single[which])
        assert worst < 1e-5, f"{which}: max weight difference {worst:.2e} after {STEPS} steps"
    assert {"score.weight", "score.bias"} <= set(run["critic"])
