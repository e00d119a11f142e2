"""PPO with a critic through `RLTrainer.step` on fakes, against an independent full-batch reference.

The trainer packs micro-batches, computes values, logprobs and the reference's logprobs per pack,
penalizes the reward with the controller's beta, runs GAE, the critic's epochs and the policy update.
The reference redoes each step from the public algorithm functions on the whole batch, with naive
per-sequence forwards of plain copies of the policy and the critic: `apply_kl_penalty`,
`gae_advantages`, `value_loss` (two critic epochs: the second one's predictions have moved, so the
value clip acts), `policy_loss`, SGD. Both must agree over two steps, and the adaptive controller's
beta must follow. Also: the critic warm-up freezes the policy; the config rules of [critic].
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rlx.algorithms import policy_loss
from rlx.algorithms.critic import AdaptiveKLController, apply_kl_penalty, gae_advantages, value_loss
from rlx.config import Config
from rlx.config.fields import ConfigError
from rlx.models import from_pretrained, load_tokenizer
from rlx.models.value import ValueModel
from rlx.trainer.critic_update import CriticUpdater
from rlx.trainer.loss_stage import LossStage, build_advantage
from rlx.trainer.rl import RLTrainer
from rlx.trainer.rl_setup import build_stages
from rlx.trainer.rl_update import PolicyUpdater
from rlx.trainer.train_step import build_lr_scheduler
from rlx.types import RolloutBatch
from tests.fakes import FakeReward
from tests.unit.test_rl_step import N, PROMPTS, TEMPERATURE, PolicyEngine, fake_run_config, naive_logprobs, varied_reward

LR, CRITIC_LR, GAMMA, LAM = 0.5, 0.3, 0.9, 0.8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stages of a GAE run with KL in the reward (adaptive controller), a fake engine and reward."""
    cfg, model_dir = fake_run_config(tmp_path_factory.mktemp("critic_step"), "critic", steps=3)
    cfg.optim.lr, cfg.optim.grad_clip = LR, 1.0
    cfg.loss.micro_batch_tokens, cfg.loss.logprob_chunk_size = 40, 5  # several micro-batches per step
    cfg.algorithm.adv_estimator, cfg.algorithm.gamma, cfg.algorithm.lam = "gae", GAMMA, LAM
    cfg.algorithm.use_kl_in_reward, cfg.algorithm.kl_penalty = True, "low_var_kl"
    cfg.algorithm.kl_ctrl.type, cfg.algorithm.kl_ctrl.kl_coef = "adaptive", 0.05
    cfg.algorithm.kl_ctrl.target_kl, cfg.algorithm.kl_ctrl.horizon = 1e-4, 40.0  # beta moves visibly
    cfg.critic.ppo_epochs, cfg.critic.cliprange_value, cfg.critic.micro_batch_tokens = 2, 0.05, 30
    cfg.critic.optim.lr, cfg.critic.optim.grad_clip = CRITIC_LR, 1.0
    cfg.validate()
    cfg = cfg.resolved()
    eos = load_tokenizer(str(model_dir)).eos_token_id
    stages = build_stages(cfg, engine=PolicyEngine(model_dir, eos), reward_scorer=FakeReward(varied_reward))
    initial = {
        "policy": copy.deepcopy(stages.model.state_dict()),
        "critic": copy.deepcopy(stages.critic.model.state_dict()),
        "stream": stages.stream.state_dict(),
    }
    yield cfg, stages, initial, model_dir
    stages.close()


def configure(run, **critic_changes) -> RLTrainer:
    """Fresh weights, SGD optimizers (weights linear in the gradient: tight comparisons) and controller."""
    cfg, s, initial, _ = run
    cfg = dataclasses.replace(cfg, critic=dataclasses.replace(cfg.critic, **critic_changes))
    s.model.load_state_dict(initial["policy"])
    s.engine.model.load_state_dict(initial["policy"])
    s.critic.model.load_state_dict(initial["critic"])
    s.stream.load_state_dict(initial["stream"])
    s.optimizer = torch.optim.SGD(s.model.parameters(), lr=LR)
    s.scheduler = build_lr_scheduler(s.optimizer, cfg.optim, total_steps=cfg.train.steps)
    s.advantage = build_advantage(cfg.algorithm)
    s.loss = LossStage(cfg.loss, cfg.rollout_correction)
    s.updater = PolicyUpdater(s.model, s.optimizer, cfg.loss, s.loss, device=s.device, dp_rank=0, dp_size=1,
                              dp_group=s.dp_group, temperature=TEMPERATURE, grad_clip=cfg.optim.grad_clip, rng=s.rng)  # fmt: skip
    critic_opt = torch.optim.SGD(s.critic.model.parameters(), lr=CRITIC_LR)
    s.critic = CriticUpdater(s.critic.model, critic_opt, build_lr_scheduler(critic_opt, cfg.critic.optim, 3), cfg.critic,
                             loss_scale_factor=cfg.loss.loss_scale_factor, device=s.device, dp_rank=0, dp_size=1,
                             dp_group=s.dp_group, rng=s.rng)  # fmt: skip
    # The controller build_stages made from [algorithm.kl_ctrl], back at its initial beta.
    assert isinstance(s.kl_ctrl, AdaptiveKLController) and (s.kl_ctrl.target, s.kl_ctrl.horizon) == (1e-4, 40.0)
    s.kl_ctrl.load_state_dict({"type": "adaptive", "value": cfg.algorithm.kl_ctrl.kl_coef})
    return RLTrainer(cfg, s)


def naive_values(critic, rollouts, width):
    rows = []
    for r in rollouts:
        row = torch.zeros(width)
        P, L = len(r.prompt_ids), len(r.response_ids)
        if L:
            v = critic(torch.tensor([r.prompt_ids + r.response_ids]))[0, P - 1 : P - 1 + L]
            row = torch.cat([v, row[L:]])
        rows.append(row)
    return torch.stack(rows)


def reference_step(policy, critic, ref, beta, rollouts, cfg):
    """One full-batch step; returns its metrics (the same keys as the trainer's) and the new beta."""
    t = RolloutBatch(rollouts).to_tensors()
    mask = t["response_mask"]
    width = mask.shape[1]
    with torch.no_grad():
        old = naive_logprobs(policy, rollouts, width)
        ref_lp = naive_logprobs(ref, rollouts, width)
        values = naive_values(critic, rollouts, width)
    rewards, kl_metrics = apply_kl_penalty(t["token_level_rewards"], old, ref_lp, mask, beta.value,
                                           cfg.algorithm.kl_penalty)  # fmt: skip
    beta.update(kl_metrics["actor/reward_kl_penalty"], n_steps=len(rollouts))
    adv, returns = gae_advantages(rewards, values, mask, GAMMA, LAM)
    info = dict(batch_num_tokens=float(mask.sum()), global_batch_size=float((mask.sum(-1) > 0).sum()),
                loss_scale_factor=cfg.loss.loss_scale_factor)  # fmt: skip
    critic_opt = torch.optim.SGD(critic.parameters(), lr=CRITIC_LR)
    vf = []
    for _ in range(cfg.critic.ppo_epochs):
        loss, m = value_loss(naive_values(critic, rollouts, width), values, returns, mask, cfg.critic.cliprange_value,
                             cfg.critic.loss_agg_mode, **info)  # fmt: skip
        critic_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.critic.optim.grad_clip)
        critic_opt.step()
        vf.append(m)
    lp = naive_logprobs(policy, rollouts, width)
    pg, _ = policy_loss(old, lp, adv, mask, loss_type="ppo_clip", loss_agg_mode=cfg.loss.agg_mode,
                        clip_ratio_low=cfg.loss.clip_ratio_low, clip_ratio_high=cfg.loss.clip_ratio_high,
                        clip_ratio_c=cfg.loss.clip_ratio_c, **info)  # fmt: skip
    opt = torch.optim.SGD(policy.parameters(), lr=LR)
    opt.zero_grad()
    pg.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip)
    opt.step()
    out = {key: sum(m[key] for m in vf) / len(vf) for key in vf[0]}
    out.update(kl_metrics)
    out["actor/pg_loss"] = pg.item()
    out["critic/values_mean"] = float((values * mask).sum() / mask.sum())
    out["critic/returns_mean"] = float((returns * mask).sum() / mask.sum())
    return out


def test_gae_step_with_kl_in_reward_equals_the_full_batch_reference(run):
    cfg, s, initial, model_dir = run
    trainer = configure(run)
    policy = from_pretrained(model_dir)
    policy.load_state_dict(initial["policy"])
    ref = from_pretrained(model_dir).eval()
    critic = ValueModel(s.critic.model.args)
    critic.load_state_dict(initial["critic"])
    beta = AdaptiveKLController(cfg.algorithm.kl_ctrl.kl_coef, cfg.algorithm.kl_ctrl.target_kl, cfg.algorithm.kl_ctrl.horizon)
    seen = []
    for step in (1, 2):
        s.engine.reseed(step)
        metrics = trainer.step(step)
        rollouts = s.reward.inner.scored[-PROMPTS * N:]
        expected = reference_step(policy, critic, ref, beta, rollouts, cfg)
        for key, want in expected.items():
            assert math.isclose(metrics[key], want, rel_tol=2e-4, abs_tol=2e-6), (step, key, metrics[key], want)
        assert math.isclose(s.kl_ctrl.value, beta.value, rel_tol=1e-9), (s.kl_ctrl.value, beta.value)
        seen.append(metrics)
        for name, p in critic.state_dict().items():
            torch.testing.assert_close(s.critic.model.state_dict()[name], p, atol=2e-5, rtol=2e-4,
                                       msg=lambda m, name=name, step=step: f"step {step}, {name}: {m}")  # fmt: skip
        for name, p in policy.state_dict().items():
            torch.testing.assert_close(s.model.state_dict()[name], p, atol=2e-5, rtol=2e-4,
                                       msg=lambda m, name=name, step=step: f"step {step}, {name}: {m}")  # fmt: skip
    assert seen[0]["critic/vf_clipfrac"] > 0, "the second critic epoch must hit the value clip"
    assert s.kl_ctrl.value != cfg.algorithm.kl_ctrl.kl_coef and seen[1]["actor/reward_kl_penalty_coeff"] != seen[0][
        "actor/reward_kl_penalty_coeff"]  # fmt: skip
    assert seen[0]["critic/num_updates"] == 2 and seen[0]["timing/values"] > 0


def test_critic_warmup_freezes_the_policy_until_its_step(run):
    cfg, s, initial, _ = run
    trainer = configure(run, warmup=3)
    pushed = len(s.engine.versions)
    for step in (1, 2):
        metrics = trainer.step(step)
        assert "actor/pg_loss" not in metrics and "critic/vf_loss" in metrics
        for name, p in initial["policy"].items():
            assert torch.equal(s.model.state_dict()[name], p), name
    assert len(s.engine.versions) == pushed, "a frozen policy is not pushed"
    metrics = trainer.step(3)  # verl's rule: the actor first updates at step critic_warmup
    assert "actor/pg_loss" in metrics and len(s.engine.versions) == pushed + 1


def test_critic_config_rules():
    cfg = Config()
    cfg.critic.cliprange_value = 0.2
    with pytest.raises(ConfigError, match="trains no critic"):
        cfg.validate()
    cfg = Config()
    cfg.algorithm.kl_ctrl.type = "adaptive"
    with pytest.raises(ConfigError, match="use_kl_in_reward = false"):
        cfg.validate()
    cfg = Config()
    cfg.model.path = "m"
    cfg.algorithm.adv_estimator = "gae"
    cfg.loss.ppo_epochs, cfg.loss.mini_batch_size, cfg.loss.agg_mode = 3, 4, "seq-mean-token-mean"
    cfg.validate()
    r = cfg.resolved()
    assert (r.critic.path, r.critic.ppo_epochs, r.critic.mini_batch_size, r.critic.loss_agg_mode) == (
        "m", 3, 4, "seq-mean-token-mean")  # fmt: skip
    cfg.critic.mini_batch_size, cfg.critic.ppo_epochs = 0, 1  # 0 = the whole batch, not "follow the actor"
    assert (cfg.resolved().critic.mini_batch_size, cfg.resolved().critic.ppo_epochs) == (0, 1)
