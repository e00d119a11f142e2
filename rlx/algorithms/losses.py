"""Loss aggregation and policy-gradient losses (PPO-clip, GSPO, CISPO, REINFORCE, bypass mode), verl 0.9.1 numbers.

Every loss maps `[B, T]` log-probs/advantages to a scalar via `agg_loss` and returns `(loss, metrics)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlx.algorithms.core import SAFETY_BOUND, masked_mean, masked_sum, to_floats
from rlx.algorithms.rollout_correction import rollout_correction

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# GSPO clamps its sequence log-ratio from above only, at 10 (verl).
GSPO_LOG_RATIO_MAX = 10.0


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: float | torch.Tensor | None = None,
    global_batch_size: float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar.

    With the defaults the normalisers are local counts. For data-parallel training pass the *global*
    counts (`batch_num_tokens` = valid tokens, `global_batch_size` = non-empty rows of the whole step):
    then each micro-batch's loss is its share of the full-batch loss, and the shares summed over
    micro-batches and ranks equal the full-batch loss (times `dp_size`, verl's convention for a gradient
    *average* across ranks; rlx sums gradients and passes dp_size=1).

    token-mean:               sum(loss*m) / batch_num_tokens * dp_size
    token-sum:                sum(loss*m) * dp_size
    seq-mean-token-sum:       sum_i [L_i>0] sum_t loss*m / global_batch_size * dp_size (empty rows don't count)
    seq-mean-token-mean:      same with each row's sum divided by (L_i + 1e-8)
    seq-mean-token-sum-norm:  seq-mean-token-sum / loss_scale_factor (default T = loss_mask.shape[-1], Dr.GRPO)
    Deviation from verl: an all-empty local batch gives 0 instead of 0/0 = NaN.
    """
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("agg_loss: token-mean with dp_size > 1 needs the global batch_num_tokens")
            batch_num_tokens = mask.sum().clamp(min=1)
        return masked_sum(loss_mat, mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, mask) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        seq_losses = masked_sum(loss_mat, mask, dim=-1)
        lengths = mask.sum(dim=-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq_losses = seq_losses / (lengths + 1e-8)
        seq_valid = (lengths > 0).to(loss_mat.dtype)
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError(f"agg_loss: {loss_agg_mode} with dp_size > 1 needs the global global_batch_size")
            global_batch_size = seq_valid.sum().clamp(min=1)
        loss = masked_sum(seq_losses, seq_valid) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
        return loss
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid modes: {list(LOSS_AGG_MODES)}")


def _weighted(per_token: torch.Tensor, rollout_is_weights: torch.Tensor | None) -> torch.Tensor:
    # Decoupled-mode IS correction multiplies the per-token loss before aggregation.
    return per_token if rollout_is_weights is None else per_token * rollout_is_weights


def ppo_clip_loss(
    old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode="token-mean", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=3.0, rollout_is_weights=None, **global_batch_info,
):  # fmt: skip
    """PPO-clip (verl "vanilla"): asymmetric clip-higher plus dual clip for negative advantages.

    r = exp(clamp(lp - old, +-20));  L = max(-A r, -A clamp(r, 1-eps_low, 1+eps_high));
    for A < 0 the loss is further capped at -A c (dual clip, c = clip_ratio_c > 1) so a huge ratio on a
    bad action cannot blow the loss up. All inputs `[B, T]`.
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for the dual-clip bound, got {clip_ratio_c}")
    log_ratio = torch.clamp(log_prob - old_log_prob, -SAFETY_BOUND, SAFETY_BOUND)
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -advantages * clip_ratio_c
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(loss3, clipped), clipped)
    loss = agg_loss(_weighted(per_token, rollout_is_weights), response_mask, loss_agg_mode, **global_batch_info)
    with torch.no_grad():
        metrics = {
            "actor/pg_clipfrac": masked_mean((loss2 > loss1).float(), response_mask),
            "actor/ppo_kl": masked_mean(-log_ratio, response_mask),  # the *clamped* log-ratio, as verl
            "actor/pg_clipfrac_lower": masked_mean(((clipped > loss3) & negative).float(), response_mask),
        }
    return loss, to_floats(metrics)


def gspo_loss(
    old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=3.0, rollout_is_weights=None, **global_batch_info,
):  # fmt: skip
    """GSPO: one length-normalised sequence ratio per response, clipped like PPO (no dual clip).

    s_i = sum_t (lp - old) m / max(L_i, 1); the token log-ratio is `lp - sg(lp) + sg(s_i)` -- its value is
    s_i but each token's gradient flows through its own lp -- clamped at <= 10, then PPO-clipped.
    """
    log_ratio = log_prob - old_log_prob
    lengths = response_mask.sum(dim=-1).clamp(min=1)
    seq_log_ratio = masked_sum(log_ratio, response_mask, dim=-1) / lengths
    token_log_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(token_log_ratio, max=GSPO_LOG_RATIO_MAX))
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    per_token = torch.maximum(loss1, loss2)
    loss = agg_loss(_weighted(per_token, rollout_is_weights), response_mask, loss_agg_mode, **global_batch_info)
    with torch.no_grad():
        metrics = {
            "actor/pg_clipfrac": masked_mean((loss2 > loss1).float(), response_mask),
            "actor/ppo_kl": masked_mean(-log_ratio, response_mask),  # unclamped
            "actor/pg_clipfrac_lower": 0.0,
        }
    return loss, to_floats(metrics)


def cispo_loss(
    old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode="token-mean", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=3.0, rollout_is_weights=None, **global_batch_info,
):  # fmt: skip
    """CISPO: REINFORCE with a clipped, stop-gradient IS ratio: loss = -sg(clamp(r, 1-eps_low, 1+eps_high)) A lp.

    Unlike PPO-clip, clipped tokens keep their gradient (only the weight is clipped).
    """
    log_ratio = torch.clamp(log_prob - old_log_prob, -SAFETY_BOUND, SAFETY_BOUND)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high).detach()
    per_token = -clipped_ratio * advantages * log_prob
    loss = agg_loss(_weighted(per_token, rollout_is_weights), response_mask, loss_agg_mode, **global_batch_info)
    with torch.no_grad():
        metrics = {
            "actor/pg_clipfrac": masked_mean((ratio != clipped_ratio).float(), response_mask),
            "actor/ppo_kl": masked_mean(-log_ratio, response_mask),
            "actor/pg_clipfrac_lower": 0.0,
        }
    return loss, to_floats(metrics)


def reinforce_loss(
    old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode="token-mean", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=3.0, rollout_is_weights=None, **global_batch_info,
):  # fmt: skip
    """REINFORCE with explicit IS weights: loss = -A lp w (w = 1 when None). The clip args are unused.

    Metric `actor/ppo_kl = masked_mean(old - lp)` (unclamped), as verl's bypass reinforce reports it.
    """
    per_token = -advantages * log_prob
    loss = agg_loss(_weighted(per_token, rollout_is_weights), response_mask, loss_agg_mode, **global_batch_info)
    with torch.no_grad():
        metrics = {"actor/ppo_kl": masked_mean(old_log_prob - log_prob, response_mask)}
    return loss, to_floats(metrics)


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, float]]]] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "reinforce": reinforce_loss,
}


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_type: str,
    loss_agg_mode: str,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    rollout_is_weights: torch.Tensor | None = None,
    **global_batch_info,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dispatch to `POLICY_LOSSES[loss_type]`. All tensors `[B, T]`; `global_batch_info` goes to `agg_loss`.

    Returns (scalar loss, metrics of Python floats keyed `actor/...`).
    """
    try:
        fn = POLICY_LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown policy loss_type {loss_type!r}; valid: {sorted(POLICY_LOSSES)}") from None
    return fn(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=loss_agg_mode,
        clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
        rollout_is_weights=rollout_is_weights, **global_batch_info,
    )  # fmt: skip


BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")


def bypass_policy_loss(
    rollout_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_type: str = "ppo_clip",
    loss_agg_mode: str = "token-mean",
    rollout_is: str | None = None,
    rollout_is_threshold: float | str | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: float | str | None = None,
    rollout_rs_threshold_lower: float | None = None,
    rollout_token_veto_threshold: float | None = None,
    rollout_is_threshold_lower: float | None = None,
    rollout_is_mode: str = "truncate",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    **global_batch_info,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bypass mode: the rollout log-probs serve as the old log-probs (no extra forward pass).

    Rollout correction runs (without grad) on pi_theta / pi_rollout, i.e. `old=log_prob, rollout=rollout_log_prob`;
    its RS mask becomes the loss mask. `ppo_clip`: the vanilla loss on the RS mask with *no* IS weights (the
    PPO ratio already is pi_theta/pi_rollout). `reinforce`: `-A lp w` (w = IS weights, or 1 when rollout_is is
    None) on the RS mask. Metrics: the loss's `actor/*` plus every `rollout_corr/*` key.
    """
    if loss_type not in BYPASS_LOSS_TYPES:
        raise ValueError(f"bypass loss_type {loss_type!r} is not valid; choose one of {list(BYPASS_LOSS_TYPES)}")
    with torch.no_grad():
        is_weights, rs_mask, corr_metrics = rollout_correction(
            log_prob.detach(), rollout_log_prob, response_mask, rollout_is=rollout_is,
            rollout_is_threshold=rollout_is_threshold, rollout_is_batch_normalize=rollout_is_batch_normalize,
            rollout_rs=rollout_rs, rollout_rs_threshold=rollout_rs_threshold,
            rollout_rs_threshold_lower=rollout_rs_threshold_lower,
            rollout_token_veto_threshold=rollout_token_veto_threshold,
            rollout_is_threshold_lower=rollout_is_threshold_lower, rollout_is_mode=rollout_is_mode,
        )  # fmt: skip
    if loss_type == "ppo_clip":
        loss, metrics = ppo_clip_loss(
            rollout_log_prob, log_prob, advantages, rs_mask, loss_agg_mode=loss_agg_mode,
            clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
            **global_batch_info,
        )  # fmt: skip
    else:
        loss, metrics = reinforce_loss(
            rollout_log_prob, log_prob, advantages, rs_mask, loss_agg_mode=loss_agg_mode,
            rollout_is_weights=is_weights, **global_batch_info,
        )  # fmt: skip
    metrics.update(corr_metrics)
    return loss, metrics


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", **global_batch_info):
    """Aggregate per-token entropy `[B, T]` like a loss (verl `compute_entropy_loss`); the caller signs/scales it."""
    return agg_loss(entropy, mask, mode, **global_batch_info)
