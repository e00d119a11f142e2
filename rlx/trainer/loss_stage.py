"""The loss stage of an RL step, each part built from its own config section: advantages from
`[algorithm]`, rollout correction from `[rollout_correction]`, the policy loss with its KL and entropy
terms from `[loss]` (plus bypass mode's loss type from `[rollout_correction]`).

Where pi_old comes from, and so where rollout correction runs, is decided here, once per step
(`LossStage.plan`):

  decoupled, separate pass  pi_old is a no-grad forward of the policy before the update. Rollout
                            correction runs once on the full batch (IS weights, RS mask, metrics).
  decoupled, on-policy      one PPO epoch over one mini-batch: the policy does not change between that
                            pass and the training forward, so pi_old is the training forward's own
                            logprobs (detached) and the pass is skipped. Same numbers, one forward less.
  bypass                    pi_old is the rollout engine's logprobs (no pass at all).

In the last two, pi_theta (what rollout correction compares with pi_rollout) is only known one
micro-batch at a time, during the update. Correction terms are then computed per micro-batch and the
batch quantities (the IS batch normalizer, every metric) from the merged per-row reductions of all
micro-batches and ranks (`RolloutCorrection.metrics`), so they equal the full-batch ones. The loss is
linear in the IS weights and in its normalizer, so two batch quantities become one rescale of the
policy-gradient part of the gradient, applied after the last micro-batch: the IS batch mean
(rollout_is_batch_normalize) and, in decoupled mode, the token (or sequence) count after rejection
sampling (verl normalizes the decoupled loss by the RS-masked count; its bypass loss by the
response mask's). A KL or entropy term would need a different factor; with one of those and a batch
quantity in play, the step runs the no-grad pass and corrects on the full batch instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from rlx.algorithms import (
    RolloutCorrection,
    agg_loss,
    compute_advantages,
    entropy_loss,
    gae_advantages,
    kl_penalty,
    policy_loss,
)
from rlx.types import Rollout

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def build_advantage(cfg: Any) -> AdvantageFn:
    """`fn(token_level_rewards, response_mask, group_ids, values=None) -> (advantages, returns)` from
    `[algorithm]`; `values` (the critic's, `[B, T]`) is what gae reads, and only gae.

    Each estimator gets exactly the options it defines; the registry rejects any other keyword."""
    if cfg.adv_estimator == "gae":
        gamma, lam = cfg.gamma, cfg.lam

        def gae(rewards: torch.Tensor, mask: torch.Tensor, group_ids: Sequence, values: torch.Tensor | None = None):
            if values is None:
                raise ValueError("adv_estimator = 'gae' needs the critic's values")
            return gae_advantages(rewards, values, mask, gamma, lam)

        return gae
    options = {"grpo": {"norm_by_std": cfg.norm_adv_by_std}, "reinforce_pp": {"gamma": cfg.gamma}}
    estimator = partial(compute_advantages, cfg.adv_estimator, **options.get(cfg.adv_estimator, {}))

    def advantage(rewards: torch.Tensor, mask: torch.Tensor, group_ids: Sequence, values: torch.Tensor | None = None):
        return estimator(rewards, mask, group_ids)

    return advantage


def build_rollout_correction(cfg: Any) -> RolloutCorrection | None:
    """The `[rollout_correction]` section as a `RolloutCorrection`, or None when it has nothing to do.

    Bypass mode always computes it (its diagnostics are how a user sees the rollout/trainer gap, as in
    verl); decoupled mode only when IS, RS or the veto is set."""
    active = cfg.rollout_is is not None or cfg.rollout_rs is not None or cfg.rollout_token_veto_threshold is not None
    if not (active or cfg.bypass_mode):
        return None
    return RolloutCorrection(
        rollout_is=cfg.rollout_is, rollout_is_threshold=cfg.rollout_is_threshold,
        rollout_is_batch_normalize=cfg.rollout_is_batch_normalize, rollout_rs=cfg.rollout_rs,
        rollout_rs_threshold=cfg.rollout_rs_threshold, rollout_rs_threshold_lower=cfg.rollout_rs_threshold_lower,
        rollout_token_veto_threshold=cfg.rollout_token_veto_threshold,
        rollout_is_threshold_lower=cfg.rollout_is_threshold_lower, rollout_is_mode=cfg.rollout_is_mode,
    )  # fmt: skip


def build_loss(loss_cfg: Any, rc_cfg: Any) -> LossStage:
    """The loss stage from `[loss]` and `[rollout_correction]` (bypass mode picks the loss type there)."""
    return LossStage(loss_cfg, rc_cfg)


@dataclass(frozen=True)
class StepPlan:
    """Which no-grad passes one step runs and where rollout correction happens."""

    old_logprob_pass: bool
    """Run the no-grad policy forward (pi_old, or pi_theta for a bypass-mode batch correction)."""
    ref_pass: bool
    """Run the reference model (KL term)."""
    correction: str
    """"batch" (once, on the full batch, before the update), "micro" (per micro-batch) or "none"."""


@dataclass
class GlobalBatch:
    """The step's full batch, identical on every rank (tensors `[B, T]`, fp32, CPU), or the rows of one
    micro-batch of it on the training device (`rows`)."""

    rollouts: list[Rollout]
    response_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_log_probs: torch.Tensor
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    rs_mask: torch.Tensor | None = None
    """Bypass mode with a batch correction: the policy loss's mask (response_mask keeps the normalizers)."""

    def rows(self, idx: list[int], device: torch.device) -> GlobalBatch:
        """Rows `idx` of every tensor, on `device`."""
        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx].to(device)

        return GlobalBatch([self.rollouts[i] for i in idx], *(take(getattr(self, f.name))
                           for f in dataclasses.fields(self)[1:]))  # fmt: skip


class LossStage:
    """Policy loss + KL + entropy per micro-batch, and rollout correction wherever the plan puts it.

    `loss_cfg` is `[loss]`, `rc_cfg` is `[rollout_correction]`. `on_policy_shortcut=False` always runs the
    separate pi_old pass in decoupled mode (the tests compare both ways)."""

    def __init__(self, loss_cfg: Any, rc_cfg: Any, *, on_policy_shortcut: bool = True):
        self.cfg = loss_cfg
        self.bypass = bool(rc_cfg.bypass_mode)
        self.loss_type = rc_cfg.loss_type if self.bypass else loss_cfg.type
        self.correction = build_rollout_correction(rc_cfg)
        self.on_policy_shortcut = on_policy_shortcut
        if loss_cfg.loss_scale_factor is None:
            raise ValueError("loss.loss_scale_factor must be resolved (Config.resolved() derives it)")

    @property
    def weights_in_loss(self) -> bool:
        """IS weights multiply the per-token loss (always in decoupled mode; bypass: reinforce only, since
        the bypass PPO ratio already is pi_theta / pi_rollout)."""
        return self.correction is not None and self.correction.has_weights and (
            not self.bypass or self.loss_type == "reinforce")  # fmt: skip

    def plan(self, num_mini_batches: int, *, reward_kl: bool = False) -> StepPlan:
        """`reward_kl`: the KL penalty is in the reward (algorithm.use_kl_in_reward), so the rewards need
        pi_old (decoupled: the pass; bypass: the rollout logprobs) and the reference before the update."""
        extra_terms = self.cfg.kl_coef > 0 or self.cfg.entropy_coef > 0
        # A per-micro-batch correction rescales the policy-gradient term afterwards, which is exact only
        # when that term is the whole loss or no batch quantity needs rescaling.
        batch_quantity = self.correction is not None and (
            (self.correction.normalizes and self.weights_in_loss) or (not self.bypass and self.correction.rejects))
        rescale_ok = not (batch_quantity and extra_terms)
        if self.bypass:
            old_pass = not rescale_ok
        else:
            single_pass = self.cfg.ppo_epochs == 1 and num_mini_batches == 1
            old_pass = reward_kl or not (self.on_policy_shortcut and single_pass and rescale_ok)
        correction = "none" if self.correction is None else ("batch" if old_pass else "micro")
        return StepPlan(old_pass, self.cfg.kl_coef > 0 or reward_kl, correction)

    @torch.no_grad()
    def correct_batch(self, batch: Any) -> dict[str, float]:
        """Batch-mode rollout correction: IS weights and the RS mask on `batch` (a GlobalBatch whose
        old_log_probs hold pi_train: pi_old, or pi_theta in bypass mode), returning the metrics.

        Decoupled mode replaces the response mask (so the loss normalizers count kept tokens, as verl);
        bypass mode keeps it and masks the policy loss only."""
        weights, rs_mask, metrics = self.correction(batch.old_log_probs, batch.rollout_log_probs, batch.response_mask)
        if self.bypass:
            batch.rs_mask = rs_mask
        else:
            batch.response_mask = rs_mask
        batch.is_weights = weights if self.weights_in_loss else None
        return metrics

    def micro_batch_loss(
        self, log_prob: torch.Tensor, entropy: torch.Tensor | None, x: GlobalBatch, plan: StepPlan,
        global_info: dict,
    ) -> tuple[torch.Tensor, tuple[float, float, float], dict[str, float], dict | None]:  # fmt: skip
        """(loss, (pg, kl, entropy) terms, loss metrics, correction rows or None) of one micro-batch.

        `log_prob`/`entropy` are the training forward's `[R, T]` values (with grad); `x` the micro-batch's
        rows of the batch (`GlobalBatch.rows`)."""
        cfg = self.cfg
        mask = x.rs_mask if x.rs_mask is not None else x.response_mask
        weights, rows = x.is_weights, None
        if plan.correction == "micro" and bool(x.response_mask.any()):  # (a micro-batch of empty responses has none)
            terms = self.correction.terms(log_prob.detach(), x.rollout_log_probs, x.response_mask)
            mask, rows = terms.rs_mask, terms.rows
            weights = terms.weights if self.weights_in_loss else None
        if self.bypass:
            old = x.rollout_log_probs
        else:  # the separate pass, or (on-policy) this very forward: the ratio is exactly 1
            old = x.old_log_probs if x.old_log_probs is not None else log_prob.detach()
        loss, metrics = policy_loss(
            old, log_prob, x.advantages, mask, loss_type=self.loss_type, loss_agg_mode=cfg.agg_mode,
            clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high, clip_ratio_c=cfg.clip_ratio_c,
            rollout_is_weights=weights, **global_info,
        )  # fmt: skip
        pg_value = loss.detach().item()
        # verl: bypass mode keeps the response mask for the KL/entropy terms (RS lives inside its policy
        # loss); decoupled mode trains them on the RS mask like everything else.
        term_mask = x.response_mask if self.bypass else mask
        kl_value = ent_value = 0.0
        if cfg.kl_coef > 0:
            kl_loss = agg_loss(kl_penalty(log_prob, x.ref_log_probs, cfg.kl_estimator), term_mask, cfg.agg_mode,
                               **global_info)  # fmt: skip
            loss = loss + cfg.kl_coef * kl_loss
            kl_value = kl_loss.detach().item()
        if cfg.entropy_coef > 0:
            ent_loss = entropy_loss(entropy, term_mask, cfg.agg_mode, **global_info)
            loss = loss - cfg.entropy_coef * ent_loss
            ent_value = ent_loss.detach().item()
        return loss, (pg_value, kl_value, ent_value), metrics, rows

    def finish_correction(self, rows: list[dict]) -> tuple[dict[str, float], float]:
        """Metrics of a per-micro-batch correction from every piece's rows (all micro-batches and ranks),
        and the factor the policy-gradient term must be multiplied by: 1 / (IS batch mean) when the
        weights are normalized, times (count before RS) / (count after RS) in decoupled mode, where the
        micro-batches were normalized by the response mask's count."""
        metrics, is_mean = self.correction.metrics(rows)
        factor = 1.0 / is_mean if self.weights_in_loss else 1.0
        if not self.bypass and self.correction.rejects:
            before, after = self.correction.kept_counts(rows, self.cfg.agg_mode)
            factor *= before / max(after, 1.0)
        return metrics, factor
