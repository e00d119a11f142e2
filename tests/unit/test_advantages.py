"""Advantage estimators against hand-computed values (verl 0.9.1 quirks included)."""

import math

import numpy as np
import pytest
import torch

from rlx.algorithms import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)


def outcome(scores, T=3, lengths=None):
    """Rewards with the score on the last valid token, and the matching right-padded mask."""
    B = len(scores)
    lengths = lengths or [T] * B
    rewards, mask = torch.zeros(B, T), torch.zeros(B, T)
    for i, (s, L) in enumerate(zip(scores, lengths)):
        mask[i, :L] = 1
        rewards[i, max(L - 1, 0)] = s
    return rewards, mask


def test_grpo_two_groups_noncontiguous_string_labels():
    rewards, mask = outcome([1.0, 5.0, 0.0, 3.0], lengths=[3, 2, 3, 1])
    adv = grpo_advantages(rewards, mask, ["a", "b", "a", "b"])
    # group a: scores 1, 0 -> mean .5, unbiased std sqrt(.5); group b: 5, 3 -> mean 4, std sqrt(2)
    expect = [0.5 / (math.sqrt(0.5) + 1e-6), 1 / (math.sqrt(2) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6), -1 / (math.sqrt(2) + 1e-6)]
    assert torch.allclose(adv, torch.tensor(expect)[:, None] * mask, atol=1e-6)
    assert adv[1, 2] == 0 and adv[3, 1] == 0  # padding stays 0


def test_grpo_singleton_quirk_and_zero_std_group():
    rewards, mask = outcome([2.0, 0.1, 0.1, 0.1])
    adv = grpo_advantages(rewards, mask, np.array([7, 8, 8, 8]))
    assert torch.allclose(adv[0], torch.full((3,), 2.0 / (1 + 1e-6)))  # singleton: mean 0, std 1
    assert torch.equal(adv[1:], torch.zeros(3, 3))  # equal scores: exactly 0, not rounding noise / eps


def test_dr_grpo_and_empty_response():
    rewards, mask = outcome([1.0, 3.0, 4.0], lengths=[2, 0, 3])
    rewards[1, 0] = 3.0  # a reward in padding still counts (the score sum is unmasked)
    adv = grpo_advantages(rewards, mask, torch.tensor([0, 0, 1]), norm_by_std=False)
    assert torch.allclose(adv[0], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.equal(adv[1], torch.zeros(3))  # empty response: all zeros, no NaN
    assert torch.allclose(adv[2], torch.full((3,), 4.0))  # singleton keeps s
    a2, r2 = compute_advantages("dr_grpo", rewards, mask, [0, 0, 1])
    assert torch.equal(a2, adv) and torch.equal(r2, adv)


def test_rloo_leave_one_out_and_singleton():
    rewards, mask = outcome([1.0, 2.0, 6.0, 9.0])
    adv = rloo_advantages(rewards, mask, ["g", "g", "g", "solo"])
    # s_i - mean of the others: 1 - 4, 2 - 3.5, 6 - 1.5 ; singleton keeps 9
    assert torch.allclose(adv[:, 0], torch.tensor([-3.0, -1.5, 4.5, 9.0]), atol=1e-6)


def test_reinforce_pp_returns_discount_and_whitening():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    expect_ret = torch.tensor([[0.25, 0.5, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    assert torch.allclose(ret, expect_ret)
    vals = torch.tensor([0.25, 0.5, 1.0, 1.0, 2.0])
    mu, sd = vals.mean(), vals.std()  # unbiased
    expect_adv = torch.zeros(2, 4)
    expect_adv[mask.bool()] = (vals - mu) / torch.sqrt(sd**2 + 1e-8)
    assert torch.allclose(adv, expect_adv, atol=1e-6)


def test_reinforce_pp_interior_mask_carries_return():
    rewards = torch.tensor([[1.0, 5.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    _, ret = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    # t=2: 1; t=1 unmasked: carried, returns 0; t=0: 1 + 1
    assert torch.equal(ret, torch.tensor([[2.0, 0.0, 1.0]]))


def test_reinforce_pp_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        reinforce_pp_advantages(torch.ones(2, 2), torch.tensor([[1.0, 0], [0, 0]]))


def test_reinforce_pp_baseline():
    rewards, mask = outcome([1.0, 3.0, 5.0], T=2, lengths=[2, 1, 2])
    adv = reinforce_pp_baseline_advantages(rewards, mask, [0, 0, 1])
    b = torch.tensor([-1.0, -1.0, 1.0, 5.0, 5.0])  # tokens of rows: (-1,-1), (1), (5,5)
    w = (b - b.mean()) / torch.sqrt(b.var() + 1e-8)
    expect = torch.zeros(3, 2)
    expect[mask.bool()] = w
    assert torch.allclose(adv, expect, atol=1e-6)


def test_registry_and_errors():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    rewards, mask = outcome([1.0, 0.0, 1.0, 1.0])
    for name in ADVANTAGE_ESTIMATORS:
        adv, ret = compute_advantages(name, rewards, mask, [0, 0, 1, 1])
        assert adv.shape == (4, 3) and torch.isfinite(adv).all() and torch.isfinite(ret).all()
    with pytest.raises(ValueError, match="valid names: .*grpo"):
        compute_advantages("gae", rewards, mask, [0, 0, 1, 1])
    a, _ = compute_advantages("grpo", rewards, mask, [0, 0, 1, 1], norm_by_std=False)
    assert torch.allclose(a[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # A misspelt or foreign option is an error, never silently dropped (it used to swallow norm_by_std).
    with pytest.raises(ValueError, match="has no option 'norm_adv_by_std_in_grpo'; its options: \\['eps', 'norm_by_std'\\]"):
        compute_advantages("grpo", rewards, mask, [0, 0, 1, 1], norm_adv_by_std_in_grpo=False)
    with pytest.raises(ValueError, match="'rloo' has no option 'gamma'"):
        compute_advantages("rloo", rewards, mask, [0, 0, 1, 1], gamma=0.9)
