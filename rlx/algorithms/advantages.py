"""Outcome advantage estimators (GRPO, Dr.GRPO, RLOO, REINFORCE++) matching verl 0.9.1's numbers.

Each turns `token_level_rewards [B, T]` into per-token advantages `[B, T]`; `ADVANTAGE_ESTIMATORS` is the registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from rlx.algorithms.core import group_index, group_stats, masked_whiten


def _scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    # verl sums the rewards over all T positions, *not* masked: a reward written into padding still counts.
    return token_level_rewards.sum(dim=-1)


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return per_sample.to(dtype).unsqueeze(-1) * response_mask.to(dtype)


@torch.no_grad()
def grpo_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO: `a_i = (s_i - mean_g) / (std_g + eps)`; Dr.GRPO (`norm_by_std=False`): `a_i = s_i - mean_g`.

    rewards, mask: `[B, T]`; group_ids: `B` hashable labels. Returns advantages `[B, T]` (zero on padding).
    std is the unbiased (N-1) group std. verl quirk kept: a group of one uses mean 0 and std 1, so its
    advantage is `s / (1 + eps)`, not 0. A group whose scores are all equal gets exactly 0.
    """
    scores = _scores(token_level_rewards)
    group = group_index(group_ids, device=scores.device)
    mean, std, count = group_stats(scores, group)
    singleton = count < 2
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    # verl normalises in fp32: centre first (exact 0 for equal groups), then divide by (std + eps).
    adv = (scores.double() - mean).to(scores.dtype)
    if norm_by_std:
        adv = adv / (std.to(scores.dtype) + eps)
    return _broadcast(adv, response_mask, token_level_rewards.dtype)


@torch.no_grad()
def rloo_advantages(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, group_ids) -> torch.Tensor:
    """RLOO: `a_i = s_i - mean_{j != i} s_j = n/(n-1) * (s_i - mean_g)`; a group of one keeps `a_i = s_i`.

    This is verl's loop version `rloo` (its `rloo_vectorized` zeroes singletons instead). Returns `[B, T]`.
    """
    scores = _scores(token_level_rewards)
    group = group_index(group_ids, device=scores.device)
    mean, _, count = group_stats(scores, group)
    s = scores.double()
    # verl writes it as s*n/(n-1) - mean*n/(n-1); algebraically the leave-one-out baseline.
    factor = count / (count - 1).clamp(min=1)
    adv = torch.where(count > 1, s * factor - mean * factor, s)
    return _broadcast(adv, response_mask, token_level_rewards.dtype)


@torch.no_grad()
def reinforce_pp_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted returns `R_t = r_t + gamma R_{t+1}` over masked tokens, whitened over the batch.

    Returns (advantages `[B, T]` = masked_whiten(returns) * mask, returns `[B, T]` = the raw discounted
    returns). At unmasked positions the running return is carried through unchanged and `returns[t] = 0`.
    Whitening needs at least 2 valid tokens in the batch (raises otherwise, as verl does).
    """
    mask = response_mask.bool()
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros_like(token_level_rewards[:, 0])
    for t in reversed(range(token_level_rewards.shape[1])):
        updated = token_level_rewards[:, t] + gamma * running
        running = torch.where(mask[:, t], updated, running)
        returns[:, t] = torch.where(mask[:, t], running, torch.zeros_like(running))
    maskf = response_mask.to(returns.dtype)
    advantages = masked_whiten(returns, maskf) * maskf
    return advantages, returns


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, group_ids
) -> torch.Tensor:
    """REINFORCE++ with a group-mean baseline: `b_i = s_i - mean_g` (singleton mean 0), tiled over tokens,
    then whitened over all valid tokens of the batch and re-masked. Returns `[B, T]`.
    """
    scores = _scores(token_level_rewards)
    group = group_index(group_ids, device=scores.device)
    mean, _, count = group_stats(scores, group)
    mean = torch.where(count < 2, torch.zeros_like(mean), mean)
    maskf = response_mask.to(token_level_rewards.dtype)
    tiled = _broadcast(scores.double() - mean, response_mask, token_level_rewards.dtype)
    return masked_whiten(tiled, maskf) * maskf


# ---- registry: uniform signature (rewards, mask, group_ids, **options) -> (advantages, returns) ---------
# Each entry takes exactly its own options: a keyword it does not define is an error, never ignored.


def _grpo(rewards, mask, group_ids, *, norm_by_std: bool = True, eps: float = 1e-6):
    adv = grpo_advantages(rewards, mask, group_ids, norm_by_std=norm_by_std, eps=eps)
    return adv, adv


def _dr_grpo(rewards, mask, group_ids, *, eps: float = 1e-6):
    adv = grpo_advantages(rewards, mask, group_ids, norm_by_std=False, eps=eps)
    return adv, adv


def _rloo(rewards, mask, group_ids):
    adv = rloo_advantages(rewards, mask, group_ids)
    return adv, adv


def _reinforce_pp(rewards, mask, group_ids=None, *, gamma: float = 1.0):
    return reinforce_pp_advantages(rewards, mask, gamma=gamma)


def _reinforce_pp_baseline(rewards, mask, group_ids):
    adv = reinforce_pp_baseline_advantages(rewards, mask, group_ids)
    return adv, adv


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
    "reinforce_pp_baseline": _reinforce_pp_baseline,
}


def estimator_options(name: str) -> list[str]:
    """The keyword options estimator `name` accepts (e.g. grpo: eps, norm_by_std)."""
    params = inspect.signature(ADVANTAGE_ESTIMATORS[name]).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def compute_advantages(
    name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, group_ids=None, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Look up estimator `name` and run it with `options`; an option it does not define is a ValueError."""
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid names: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    unknown = sorted(set(options) - set(estimator_options(name)))
    if unknown:
        raise ValueError(f"advantage estimator {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {estimator_options(name) or 'none'}")  # fmt: skip
    if group_ids is None and name != "reinforce_pp":
        raise ValueError(f"advantage estimator {name!r} needs group_ids (one label per response)")
    return fn(token_level_rewards, response_mask, group_ids, **options)
