"""`RLTrainer.step` on fakes: the real stages (policy, optimizer, data, sampler, loss stage, weight sync)
with a policy-sampling fake engine and a fake reward, checked against an independent full-batch reference.

The reference recomputes each step from the public algorithm functions (themselves checked against
verl's numbers): naive per-sequence logprobs of a plain copy of the policy, advantages, rollout
correction and the policy loss on the WHOLE batch, autograd, clipping and AdamW. The trainer instead
packs micro-batches, skips or runs the pi_old pass as its plan says, computes bypass-mode correction per
micro-batch and merges it. Both must agree for every estimator x loss x bypass/decoupled x
batch-normalize combination, over two steps (the second samples from the updated, pushed weights).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlx.algorithms import (
    grpo_advantages,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    rollout_correction,
)
from rlx.config import Config
from rlx.config.train_sections import AlgorithmConfig, LossConfig, RolloutCorrectionConfig
from rlx.generator.base import GeneratorLayout
from rlx.models import from_pretrained, load_tokenizer
from rlx.trainer.loss_stage import LossStage, build_advantage
from rlx.trainer.rl import RLTrainer
from rlx.trainer.rl_setup import build_stages
from rlx.trainer.rl_update import PolicyUpdater
from rlx.trainer.train_step import build_lr_scheduler
from rlx.types import Completion, RolloutBatch
from tests.fakes import FakeReward

MAX_TOKENS, N, PROMPTS, TEMPERATURE, LR = 6, 4, 2, 0.9, 0.5


class PolicyEngine:
    """A colocated-engine fake that samples from its own copy of the policy. Weights arrive through the
    real WeightSync (`reload_weights`); sampled-token logprobs carry a small deterministic offset, the
    bf16/kernel gap between pi_rollout and pi_train that rollout correction measures."""

    def __init__(self, model_dir, eos_id: int):
        self.model = from_pretrained(model_dir).eval()
        self.eos_id = eos_id
        self.layout = GeneratorLayout()
        self.engine_dtype = torch.float32
        self.tie_word_embeddings = True
        self.is_sleeping = False
        self.step = 0
        self.versions: list[int] = []

    def reseed(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def generate(self, requests, validation: bool = False) -> list[list[Completion]]:
        out = []
        for i, req in enumerate(requests):
            completions = []
            for k in range(req.n):
                gen = torch.Generator().manual_seed(1000 * self.step + 10 * i + k)
                ids, tokens, logprobs = list(req.prompt_ids), [], []
                for t in range(MAX_TOKENS):
                    logp = torch.log_softmax(self.model(torch.tensor([ids]))[0, -1].float() / TEMPERATURE, -1)
                    tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
                    tokens.append(tok)
                    logprobs.append(float(logp[tok]) + 0.3 * math.sin(1.7 * t + 0.9 * k + self.step))
                    ids.append(tok)
                    if tok == self.eos_id:
                        break
                completions.append(Completion(tokens, logprobs, "stop" if tokens[-1] == self.eos_id else "length"))
            out.append(completions)
        return out

    def reload_weights(self, named_tensors) -> None:
        self.model.load_state_dict(dict(named_tensors), strict=False)

    def reset_prefix_cache(self) -> None:
        self.versions.append(self.step)

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...

    def metrics(self) -> dict[str, float]:
        return {}

    def shutdown(self) -> None: ...


def varied_reward(rollout) -> float:
    """Deterministic rewards that vary inside a group (so GRPO/RLOO advantages are not all zero)."""
    return float(sum(rollout.response_ids) % 5) / 4.0


def fake_run_config(root, name: str, steps: int):
    """A tiny char-level Qwen3 under `root` and a Config for a few steps of it on addition prompts with
    the fake engine (no checkpoints, no validation, no sinks); returns (config, model directory)."""
    from rlx.models.tiny import make_tiny

    model_dir = make_tiny(root / "model", arch="qwen3", char_level=True, hidden_size=64, num_heads=2, num_kv_heads=1,
                          intermediate_size=128)  # fmt: skip
    data = root / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "{a}+{b}=", "answer": "{a + b}"}}\n' for a, b in
                            [(12, 34), (7, 8), (20, 22), (3, 4), (15, 15), (9, 1), (40, 2), (11, 11)]))  # fmt: skip
    cfg = Config()
    cfg.job.output_dir, cfg.job.name = str(root / "runs"), name
    cfg.model.path, cfg.model.use_chat_template = str(model_dir), False
    cfg.data.train_files, cfg.data.train_batch_size, cfg.data.max_prompt_length = [str(data)], PROMPTS, 32
    cfg.generator.n, cfg.generator.max_tokens, cfg.generator.temperature = N, MAX_TOKENS, TEMPERATURE
    cfg.checkpoint.enable, cfg.checkpoint.resume = False, "none"
    cfg.logging.console = cfg.logging.jsonl = cfg.logging.progress_bar = False
    cfg.train.steps, cfg.train.val_every, cfg.train.val_before_train = steps, 0, False
    return cfg, model_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One set of built stages (tiny model, data, fake engine and reward), shared by every case."""
    cfg, model_dir = fake_run_config(tmp_path_factory.mktemp("rl_step"), "step", steps=2)
    cfg.optim.lr, cfg.optim.grad_clip = LR, 1.0
    cfg.loss.micro_batch_tokens = 40  # several micro-batches per step: per-micro-batch correction must merge
    cfg.loss.logprob_chunk_size = 5
    cfg.validate()
    cfg = cfg.resolved()
    eos = load_tokenizer(str(model_dir)).eos_token_id
    reward = FakeReward(varied_reward)
    stages = build_stages(cfg, engine=PolicyEngine(model_dir, eos), reward_scorer=reward)
    # The reference policy for cases with a KL term (the fixture's own config has none).
    from rlx.parallel import build_parallel_model

    stages.ref_model = build_parallel_model(str(model_dir), stages.dims, cfg.parallel, device=stages.device,
                                            dtype=torch.float32, reference=True)  # fmt: skip
    initial = {k: v.detach().clone() for k, v in stages.model.state_dict().items()}
    initial["stream"] = stages.stream.state_dict()
    yield cfg, stages, reward, initial, model_dir
    stages.close()


def configure(run, algorithm: AlgorithmConfig, loss: LossConfig, rc: RolloutCorrectionConfig, **updater):
    """Fresh weights (trainer and engine), optimizer and loss stage for one case; returns the trainer."""
    cfg, s, reward, initial, _ = run
    cfg = dataclasses.replace(cfg, algorithm=algorithm, loss=loss, rollout_correction=rc)
    weights = {k: v for k, v in initial.items() if k != "stream"}
    s.model.load_state_dict(weights)
    s.engine.model.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in weights.items()})
    s.stream.load_state_dict(initial["stream"])  # the same prompts for every case
    # SGD: the weights after a step are linear in the gradient, so they compare tightly with the reference
    # (Adam's first step moves every weight by about lr * sign(g), which turns float noise near g = 0 into
    # differences of up to 2 lr). The updater only calls optimizer.step().
    s.optimizer = torch.optim.SGD(s.model.parameters(), lr=LR)
    s.scheduler = build_lr_scheduler(s.optimizer, cfg.optim, total_steps=cfg.train.steps)
    s.advantage = build_advantage(cfg.algorithm)
    s.loss = LossStage(cfg.loss, cfg.rollout_correction, **updater)
    s.updater = PolicyUpdater(s.model, s.optimizer, cfg.loss, s.loss, device=s.device, dp_rank=0, dp_size=1,
                              dp_group=s.dp_group, temperature=TEMPERATURE, grad_clip=cfg.optim.grad_clip, rng=s.rng)  # fmt: skip
    return RLTrainer(cfg, s)


# ---- the reference -----------------------------------------------------------------------------------


def naive_logprobs(model, rollouts, width):
    rows = []
    for r in rollouts:
        row = torch.zeros(width)
        if r.response_ids:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            P, L = len(r.prompt_ids), len(r.response_ids)
            logp = torch.log_softmax(model(ids)[0, P - 1 : P - 1 + L].float() / TEMPERATURE, -1)
            row = torch.cat([logp.gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0], row[L:]])
        rows.append(row)
    return torch.stack(rows)


def reference_advantages(alg: AlgorithmConfig, rewards, mask, group_ids):
    if alg.adv_estimator in ("grpo", "dr_grpo"):
        return grpo_advantages(rewards, mask, group_ids, norm_by_std=alg.norm_adv_by_std and alg.adv_estimator == "grpo")
    if alg.adv_estimator == "rloo":
        return rloo_advantages(rewards, mask, group_ids)
    if alg.adv_estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, gamma=alg.gamma)[0]
    return reinforce_pp_baseline_advantages(rewards, mask, group_ids)


def reference_step(model, opt, rollouts, trainer):
    """One step of the full-batch reference; returns (pg_loss, grad_norm, rollout_corr metrics, adv mean)."""
    loss_cfg, rc = trainer.cfg.loss, trainer.cfg.rollout_correction
    t = RolloutBatch(rollouts).to_tensors()
    mask, roll = t["response_mask"], t["rollout_log_probs"]
    lp = naive_logprobs(model, rollouts, mask.shape[1])
    adv = reference_advantages(trainer.cfg.algorithm, t["token_level_rewards"], mask, t["group_ids"])
    options = {k: getattr(rc, k) for k in ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize",
               "rollout_rs", "rollout_rs_threshold", "rollout_rs_threshold_lower", "rollout_token_veto_threshold",
               "rollout_is_threshold_lower", "rollout_is_mode")}  # fmt: skip
    weights, rs_mask, metrics = rollout_correction(lp.detach(), roll, mask, **options)
    if rc.bypass_mode:  # ratio to pi_rollout; normalizers of the response mask; IS weights only for reinforce
        old, norm_mask, loss_type = roll, mask, rc.loss_type
        weights = weights if loss_type == "reinforce" else None
    else:  # pi_old = the policy before the update; the RS mask replaces the response mask
        old, norm_mask, loss_type = lp.detach(), rs_mask, loss_cfg.type
    info = dict(batch_num_tokens=max(float(norm_mask.sum()), 1.0),
                global_batch_size=max(float((norm_mask.sum(-1) > 0).sum()), 1.0),
                loss_scale_factor=loss_cfg.loss_scale_factor)  # fmt: skip
    loss, _ = policy_loss(old, lp, adv, rs_mask, loss_type=loss_type, loss_agg_mode=loss_cfg.agg_mode,
                          clip_ratio_low=loss_cfg.clip_ratio_low, clip_ratio_high=loss_cfg.clip_ratio_high,
                          clip_ratio_c=loss_cfg.clip_ratio_c, rollout_is_weights=weights, **info)  # fmt: skip
    opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.cfg.optim.grad_clip)
    opt.step()
    valid = mask.sum(-1) > 0
    return loss.item(), float(norm), metrics, adv[:, 0][valid].mean().item()


# ---- the cases ---------------------------------------------------------------------------------------

ESTIMATORS = [("grpo", True), ("grpo", False), ("rloo", True), ("reinforce_pp", True), ("reinforce_pp_baseline", True)]
DECOUPLED_LOSSES = ["ppo_clip", "gspo", "cispo", "reinforce"]
CASES = [(est, std, bypass, loss, bn)
         for est, std in ESTIMATORS
         for bypass, losses in ((False, DECOUPLED_LOSSES), (True, ["ppo_clip", "reinforce"]))
         for loss in losses for bn in (False, True)]  # fmt: skip


def case_configs(run, est, std, bypass, loss_type, bn):
    cfg = run[0]
    algorithm = AlgorithmConfig(adv_estimator=est, norm_adv_by_std=std, gamma=0.9 if est == "reinforce_pp" else 1.0)
    loss = dataclasses.replace(cfg.loss, type="ppo_clip" if bypass else loss_type, clip_ratio_low=0.1,
                               clip_ratio_high=0.15, agg_mode="seq-mean-token-mean" if loss_type == "gspo" else "token-mean")  # fmt: skip
    rc = RolloutCorrectionConfig(rollout_is="sequence" if bn else "token", rollout_is_threshold=1.6,
                                 rollout_is_batch_normalize=bn, rollout_rs="token,seq_max_ratio",
                                 rollout_rs_threshold="0.6_1.5,1.45", bypass_mode=bypass,
                                 loss_type=loss_type if bypass else "ppo_clip")  # fmt: skip
    return algorithm, loss, rc


def close(a: float, b: float, what: str, rel: float = 2e-4, abs_: float = 2e-6) -> None:
    assert math.isclose(a, b, rel_tol=rel, abs_tol=abs_), f"{what}: trainer {a!r} vs reference {b!r}"


@pytest.mark.parametrize("est, std, bypass, loss_type, bn", CASES,
                         ids=[f"{e}{'' if s else '-nostd'}-{'bypass' if b else 'decoupled'}-{lt}-{'bn' if n else 'nobn'}"
                              for e, s, b, lt, n in CASES])  # fmt: skip
def test_two_steps_equal_the_full_batch_reference(run, est, std, bypass, loss_type, bn):
    cfg, s, reward, initial, model_dir = run
    trainer = configure(run, *case_configs(run, est, std, bypass, loss_type, bn))
    ref = from_pretrained(model_dir)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for step in (1, 2):
        metrics = trainer.step(step)
        pg, norm, rc_metrics, adv_mean = reference_step(ref, ref_opt, reward.calls[-1], trainer)
        close(metrics["actor/pg_loss"], pg, "actor/pg_loss")
        close(metrics["actor/grad_norm"], norm, "actor/grad_norm")
        close(metrics["critic/advantages_mean"], adv_mean, "critic/advantages_mean", abs_=1e-5)
        for key, value in rc_metrics.items():
            close(metrics[key], value, key, rel=1e-3, abs_=2e-5)
        assert metrics["actor/num_updates"] == 1.0
    # The plan: pi_old from the training forward (decoupled) or the rollout (bypass): no separate pass.
    assert not trainer.s.loss.plan(1).old_logprob_pass
    state = trainer.s.model.state_dict()
    for name, p in ref.state_dict().items():
        mine = state[name].full_tensor() if hasattr(state[name], "full_tensor") else state[name]
        torch.testing.assert_close(mine, p, atol=2e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_on_policy_shortcut_equals_the_separate_pass(run):
    """Decoupled mode, one epoch, one mini-batch: pi_old from the training forward equals the pass."""
    results = []
    for shortcut in (True, False):
        trainer = configure(run, *case_configs(run, "grpo", True, False, "ppo_clip", True), on_policy_shortcut=shortcut)
        plan = trainer.s.loss.plan(1)
        assert plan.old_logprob_pass is not shortcut and plan.correction == ("micro" if shortcut else "batch")
        results.append((trainer.step(1), {k: v.clone() for k, v in trainer.s.model.state_dict().items()}))
    (m1, w1), (m2, w2) = results
    for key in m1:
        if key.startswith(("actor/", "rollout_corr/", "critic/", "reward/")) and key != "actor/ppo_kl":
            close(m1[key], m2[key], key, rel=1e-4, abs_=1e-6)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-6, rtol=1e-5, msg=name)


def test_kl_with_a_batch_quantity_runs_the_pass(run):
    """A KL term cannot be rescaled with the pg term: the plan falls back to the pi_old pass."""
    algorithm, loss, rc = case_configs(run, "grpo", True, True, "reinforce", True)
    stage = LossStage(dataclasses.replace(loss, kl_coef=0.1), rc)
    assert stage.plan(1).old_logprob_pass and stage.plan(1).correction == "batch"
    stage = LossStage(loss, rc)
    assert not stage.plan(1).old_logprob_pass and stage.plan(1).correction == "micro"
    decoupled = LossStage(loss, dataclasses.replace(rc, bypass_mode=False))
    assert decoupled.plan(1).correction == "micro" and decoupled.plan(2).correction == "batch"


# ---- every key of [algorithm], [loss] and [rollout_correction] reaches the loss stage ------------------

BASES = {
    "decoupled": dict(),
    "bypass": dict(rc=dict(bypass_mode=True)),
    "is": dict(rc=dict(rollout_is="token", rollout_is_threshold=1.2)),
    "rs": dict(rc=dict(rollout_rs="token", rollout_rs_threshold=1.25)),
    "rs_bounds": dict(rc=dict(rollout_rs_threshold=1.25)),  # bounds set, no criterion yet
    "kl": dict(loss=dict(kl_coef=0.1)),
    # At step 1 the policy IS the reference: KL is 0, and only k1's gradient (grad log pi) is not.
    "k1": dict(loss=dict(kl_estimator="k1")),
    "norm": dict(loss=dict(agg_mode="seq-mean-token-sum-norm")),
    "reinforce_pp": dict(algorithm=dict(adv_estimator="reinforce_pp")),
}
# (section, key, base, new value): changing the key alone must change the step's numbers.
KEY_CASES = [
    ("algorithm", "adv_estimator", "decoupled", "rloo"),
    ("algorithm", "norm_adv_by_std", "decoupled", False),
    ("algorithm", "gamma", "reinforce_pp", 0.5),
    ("loss", "type", "decoupled", "cispo"),
    ("loss", "agg_mode", "decoupled", "seq-mean-token-sum"),
    ("loss", "clip_ratio_low", "bypass", 0.02),  # bypass: the ratio pi_theta / pi_rollout is not 1
    ("loss", "clip_ratio_high", "bypass", 0.02),
    ("loss", "clip_ratio_c", "bypass", 1.01),
    ("loss", "loss_scale_factor", "norm", 2.0),
    ("loss", "kl_coef", "k1", 0.1),
    ("loss", "kl_estimator", "kl", "k1"),
    ("loss", "entropy_coef", "decoupled", 0.01),
    ("loss", "ppo_epochs", "decoupled", 2),
    ("loss", "mini_batch_size", "decoupled", 1),
    ("rollout_correction", "rollout_is", "decoupled", "token"),
    ("rollout_correction", "rollout_is_threshold", "is", 1.05),
    ("rollout_correction", "rollout_is_threshold_lower", "is", 0.95),
    ("rollout_correction", "rollout_is_mode", "is", "mask"),
    ("rollout_correction", "rollout_is_batch_normalize", "is", True),
    ("rollout_correction", "rollout_rs", "rs_bounds", "token"),
    ("rollout_correction", "rollout_rs_threshold", "rs", 1.1),
    ("rollout_correction", "rollout_rs_threshold_lower", "rs", 0.95),
    ("rollout_correction", "rollout_token_veto_threshold", "decoupled", 0.8),
    ("rollout_correction", "bypass_mode", "decoupled", True),
    ("rollout_correction", "loss_type", "bypass", "reinforce"),
]
# Keys that must NOT change the numbers (how the work is cut), checked by where they arrive instead.
NEUTRAL_KEYS = {"micro_batch_tokens", "logprob_chunk_size", "logprob_backend"}
# PPO-with-a-critic keys: this fixture has no critic. tests/unit/test_critic_step.py sets each to a
# non-default value and matches a reference computed from those values, so a key that did not arrive
# would fail there.
CRITIC_STEP_KEYS = {"lam", "use_kl_in_reward", "kl_penalty", "kl_ctrl"}


def sections(run, base: str, change: tuple[str, str, object] | None = None):
    cfg = run[0]
    parts = {"algorithm": AlgorithmConfig(), "loss": cfg.loss, "rc": RolloutCorrectionConfig()}
    for name, options in BASES[base].items():
        parts[name] = dataclasses.replace(parts[name], **options)
    if change is not None:
        section, key, value = change
        name = "rc" if section == "rollout_correction" else section
        parts[name] = dataclasses.replace(parts[name], **{key: value})
    return parts["algorithm"], parts["loss"], parts["rc"]


_BASELINES: dict[str, tuple] = {}


def fingerprint(run, algorithm, loss, rc):
    trainer = configure(run, algorithm, loss, rc)
    metrics = trainer.step(1)
    weights = torch.cat([p.detach().flatten() for p in trainer.s.model.parameters()])
    return metrics, weights


def baseline(run, base: str):
    if base not in _BASELINES:
        _BASELINES[base] = fingerprint(run, *sections(run, base))
    return _BASELINES[base]


def test_every_key_of_the_loss_sections_is_covered():
    covered = {(section, key) for section, key, *_ in KEY_CASES}
    for section, cls in (("algorithm", AlgorithmConfig), ("loss", LossConfig),
                         ("rollout_correction", RolloutCorrectionConfig)):  # fmt: skip
        for f in dataclasses.fields(cls):
            assert (section, f.name) in covered or f.name in NEUTRAL_KEYS | CRITIC_STEP_KEYS, f"{section}.{f.name} has no test"


@pytest.mark.parametrize("section, key, base, value", KEY_CASES, ids=[f"{s}.{k}" for s, k, *_ in KEY_CASES])
def test_changing_a_key_changes_the_step(run, section, key, base, value):
    before, w_before = baseline(run, base)
    after, w_after = fingerprint(run, *sections(run, base, (section, key, value)))
    changed_weights = (w_before - w_after).abs().max().item()
    changed_metrics = [k for k in ("actor/pg_loss", "actor/grad_norm", "critic/advantages_mean", "actor/num_updates")
                       if k in before and not math.isclose(before[k], after.get(k, math.nan), rel_tol=1e-6)]  # fmt: skip
    assert changed_weights > 1e-6 or changed_metrics, f"{section}.{key} = {value!r} changed nothing"


def test_work_splitting_keys_arrive_but_keep_the_numbers(run, monkeypatch):
    import rlx.trainer.policy as policy

    seen: list[tuple] = []
    real = policy.logprobs_from_hidden

    def spy(*args, **kwargs):
        seen.append((kwargs.get("chunk_size"), kwargs.get("backend")))
        return real(*args, **kwargs)

    monkeypatch.setattr(policy, "logprobs_from_hidden", spy)
    base, w_base = fingerprint(run, *sections(run, "is"))  # (not cached: the spy counts its calls)
    calls_base = len(seen)
    for key, value in (("micro_batch_tokens", 4096), ("logprob_chunk_size", 3), ("logprob_backend", "naive")):
        seen.clear()
        metrics, weights = fingerprint(run, *sections(run, "is", ("loss", key, value)))
        torch.testing.assert_close(weights, w_base, atol=1e-6, rtol=1e-5, msg=key)
        close(metrics["actor/pg_loss"], base["actor/pg_loss"], key, rel=1e-5)
        if key == "micro_batch_tokens":  # one micro-batch instead of several
            assert 0 < len(seen) < calls_base
        else:
            assert seen and all(s[0 if key == "logprob_chunk_size" else 1] == value for s in seen), (key, seen)
