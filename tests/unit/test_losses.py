"""agg_loss, policy losses, bypass mode and KL penalties against hand-computed values."""

import math

import pytest
import torch

from rlx.algorithms import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    bypass_policy_loss,
    entropy_loss,
    kl_penalty,
    policy_loss,
)

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, expect",
    [
        ("token-mean", (1 + 2 + 4 + 5 + 6) / 5),
        ("token-sum", 18.0),
        ("seq-mean-token-sum", (3 + 15) / 2),  # the empty row is not counted
        ("seq-mean-token-mean", (1.5 + 5) / 2),
        ("seq-mean-token-sum-norm", (3 + 15) / 2 / 3),  # / T, the padded width
    ],
)
def test_agg_loss_modes(mode, expect):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expect, rel=1e-6)


def test_agg_loss_nan_in_padding_and_empty_batch_and_errors():
    loss = LOSS.clone()
    loss[0, 2] = float("nan")
    assert agg_loss(loss, MASK, "token-mean").item() == pytest.approx(18 / 5)
    for mode in LOSS_AGG_MODES:
        assert agg_loss(LOSS, torch.zeros(3, 3), mode).item() == 0.0  # verl: 0/0 = NaN
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", loss_scale_factor=6).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        agg_loss(LOSS, MASK, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="valid modes"):
        agg_loss(LOSS, MASK, "mean")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_over_two_ranks_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 5, generator=g)
    mask = (torch.rand(8, 5, generator=g) > 0.3).float()
    mask[3] = 0  # an empty response somewhere
    full = agg_loss(loss, mask, mode)
    info = {
        "batch_num_tokens": mask.sum(),
        "global_batch_size": (mask.sum(-1) > 0).sum(),
        "loss_scale_factor": 5,
    }
    ranks = [range(0, 4), range(4, 8)]  # each rank gets 4 rows, split in 2 micro-batches of 2
    micro = [[list(r)[i : i + 2] for i in (0, 2)] for r in ranks]
    # rlx convention: gradients summed over ranks, dp_size=1, global normalisers.
    total = sum(agg_loss(loss[idx], mask[idx], mode, **info) for rank in micro for idx in rank)
    assert total.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    # verl convention: dp_size=2 and gradients averaged over ranks.
    per_rank = [sum(agg_loss(loss[idx], mask[idx], mode, dp_size=2, **info) for idx in rank) for rank in micro]
    assert (sum(per_rank) / 2).item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)


def test_ppo_clip_hand_values_dual_clip_and_metrics():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.1]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4)
    loss, m = policy_loss(old, lp, adv, mask, loss_type="ppo_clip", loss_agg_mode="token-sum",
                          clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    # tok0: max(-1.5, -1.28) = -1.28 ; tok1: max(-0.5, -0.8) = -0.5 ; tok2 (A<0): max(5, 1.28)=5 -> min(3, 5) = 3
    # tok3: A=-2, r=1.1: max(2.2, 2.2) = 2.2, min(6, 2.2) = 2.2
    assert loss.item() == pytest.approx(-1.28 - 0.5 + 3.0 + 2.2, rel=1e-5)
    assert m["actor/pg_clipfrac"] == pytest.approx(0.25)  # only tok0 has L2 > L1
    assert m["actor/pg_clipfrac_lower"] == pytest.approx(0.25)  # tok2 dual-clipped
    assert m["actor/ppo_kl"] == pytest.approx(-float(lp.detach().sum()) / 4, rel=1e-5)
    loss.backward()
    # clipped tokens get no gradient; unclipped tokens get -A * r
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -0.5, 0.0, 2.2]]), atol=1e-6)
    assert all(isinstance(v, float) for v in m.values())


def test_ppo_clip_extreme_log_ratio_and_is_weights():
    old = torch.tensor([[0.0, 0.0]])
    lp = torch.tensor([[80.0, -80.0]])  # beyond +-20: clamped before exp
    loss, m = policy_loss(old, lp, torch.ones(1, 2), torch.ones(1, 2), loss_type="ppo_clip",
                          loss_agg_mode="token-mean", rollout_is_weights=torch.tensor([[2.0, 0.5]]))
    assert math.isfinite(loss.item()) and m["actor/ppo_kl"] == pytest.approx(0.0)
    # tok0: max(-e^20, -1.2) = -1.2, * 2 ; tok1: max(-e^-20, -0.8) ~ 0, * .5
    assert loss.item() == pytest.approx((-2.4 - 0.5 * math.exp(-20)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(old, lp, torch.ones(1, 2), torch.ones(1, 2), loss_type="ppo_clip",
                    loss_agg_mode="token-mean", clip_ratio_c=1.0)


def test_gspo_sequence_ratio_and_upper_clamp():
    old = torch.zeros(2, 3)
    lp = torch.tensor([[0.3, 0.0, 9.0], [30.0, 30.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.ones(2, 3)
    loss, m = policy_loss(old, lp, adv, mask, loss_type="gspo", loss_agg_mode="token-sum",
                          clip_ratio_low=0.1, clip_ratio_high=0.1)
    # row0: s = .15 -> r = e^.15 = 1.1618 > 1.1: max(-1.1618, -1.1) = -1.1 per token, 2 tokens
    # row1: s = 20 -> clamped to 10 -> r = e^10: max(-e^10, -1.1) = -1.1, 3 tokens
    assert loss.item() == pytest.approx(-1.1 * 5, rel=1e-5)
    assert m["actor/pg_clipfrac"] == pytest.approx(1.0)
    assert m["actor/pg_clipfrac_lower"] == 0.0
    assert m["actor/ppo_kl"] == pytest.approx(-(0.3 + 60) / 5, rel=1e-5)  # unclamped
    # value is s_i, gradient per token is that of its own lp: unclipped case
    lp2 = torch.tensor([[0.02, 0.0]], requires_grad=True)
    l2, _ = policy_loss(torch.zeros(1, 2), lp2, torch.ones(1, 2), torch.ones(1, 2), loss_type="gspo",
                        loss_agg_mode="token-sum")
    l2.backward()
    assert torch.allclose(lp2.grad, -torch.exp(torch.tensor(0.01)).expand(1, 2))


def test_cispo_and_reinforce():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[2.0, 1.0, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, m = policy_loss(old, lp, adv, torch.ones(1, 3), loss_type="cispo", loss_agg_mode="token-sum")
    w = torch.tensor([1.2, 1.0, 0.8])
    assert loss.item() == pytest.approx(float(-(w * adv[0] * lp[0].detach()).sum()), rel=1e-5)
    assert m["actor/pg_clipfrac"] == pytest.approx(2 / 3)
    loss.backward()
    assert torch.allclose(lp.grad[0], -w * adv[0])  # gradient flows through every token, incl. clipped ones
    lp.grad = None
    loss, m = policy_loss(old, lp, adv, torch.ones(1, 3), loss_type="reinforce", loss_agg_mode="token-sum",
                          rollout_is_weights=torch.tensor([[0.5, 1.0, 2.0]]))
    assert loss.item() == pytest.approx(float(-(torch.tensor([0.5, 1, 2]) * adv[0] * lp[0].detach()).sum()))
    assert set(m) == {"actor/ppo_kl"}
    with pytest.raises(ValueError, match="valid"):
        policy_loss(old, lp, adv, torch.ones(1, 3), loss_type="vanilla", loss_agg_mode="token-mean")
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo", "cispo", "reinforce"}


def test_bypass_ppo_clip_uses_rs_mask_and_no_is_weights():
    g = torch.Generator().manual_seed(1)
    rollout = -torch.rand(3, 5, generator=g) * 2
    lp = rollout + 0.05 * torch.randn(3, 5, generator=g)
    lp[1, 2] = rollout[1, 2] + 3.0  # one off-policy token: row 1 rejected by seq_max_k2
    adv = torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    loss, m = bypass_policy_loss(rollout, lp, adv, mask, loss_type="ppo_clip", loss_agg_mode="token-mean",
                                 rollout_is="token", rollout_rs="seq_max_k2", rollout_rs_threshold=2.5)
    keep = torch.ones(3, 5)
    keep[1] = 0
    ref, ref_m = policy_loss(rollout, lp, adv, keep, loss_type="ppo_clip", loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert m["actor/pg_clipfrac"] == ref_m["actor/pg_clipfrac"]
    assert m["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(1 / 3)
    assert "rollout_corr/rollout_is_mean" in m and "rollout_corr/kl" in m


def test_bypass_reinforce_with_is_weights():
    rollout = torch.tensor([[-1.0, -2.0, -0.5]])
    lp = torch.tensor([[-0.5, -2.0, -1.5]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, m = bypass_policy_loss(rollout, lp, adv, torch.ones(1, 3), loss_type="reinforce",
                                 loss_agg_mode="token-sum", rollout_is="token", rollout_is_threshold=1.5)
    w = torch.tensor([1.5, 1.0, math.exp(-1.0)])  # pi_theta/pi_rollout, truncated at 1.5
    assert loss.item() == pytest.approx(float(-(w * adv[0] * lp[0].detach()).sum()), rel=1e-6)
    assert m["actor/ppo_kl"] == pytest.approx((-0.5 + 0 + 1.0) / 3, rel=1e-6)
    loss.backward()
    assert torch.allclose(lp.grad[0], -w * adv[0])  # weights are detached
    loss2, _ = bypass_policy_loss(rollout, lp, adv, torch.ones(1, 3), loss_type="reinforce", loss_agg_mode="token-sum")
    assert loss2.item() == pytest.approx(float(-(adv[0] * lp[0].detach()).sum()))
    with pytest.raises(ValueError, match="ppo_clip"):
        bypass_policy_loss(rollout, lp, adv, torch.ones(1, 3), loss_type="gspo")


@pytest.mark.parametrize(
    "name, expect",
    [
        ("kl", [0.5, -1.0, 30.0]),
        ("k1", [0.5, -1.0, 30.0]),
        ("abs", [0.5, 1.0, 30.0]),
        ("mse", [0.125, 0.5, 450.0]),
        ("k2", [0.125, 0.5, 450.0]),
        ("low_var_kl", [math.exp(-0.5) + 0.5 - 1, math.exp(1) - 2, math.exp(-20) + 20 - 1]),
        ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(1) - 2, math.exp(-20) + 20 - 1]),
    ],
)
def test_kl_values(name, expect):
    lp, ref = torch.tensor([0.5, -1.0, 30.0]), torch.zeros(3)
    expect_t = torch.tensor(expect).clamp(max=10.0) if "k3" in name or "low" in name else torch.tensor(expect)
    assert torch.allclose(kl_penalty(lp, ref, name), expect_t, atol=1e-6)
    assert torch.allclose(kl_penalty(lp, ref, name + "+"), expect_t, atol=1e-6)


def test_kl_gradients_straight_through_and_clamps():
    lp = torch.tensor([0.5, -1.0, 30.0], requires_grad=True)
    kl_penalty(lp, torch.zeros(3), "k3").sum().backward()
    # d/dlp of e^-d + d - 1 = 1 - e^-d ; the third token hits the +-10 clamp -> 0
    assert torch.allclose(lp.grad, torch.tensor([1 - math.exp(-0.5), 1 - math.e, 0.0]), atol=1e-6)
    lp.grad = None
    kl_penalty(lp, torch.zeros(3), "k3+").sum().backward()
    assert torch.allclose(lp.grad, lp.detach())  # gradient of k2 is d
    with pytest.raises(NotImplementedError):
        kl_penalty(lp, lp, "full")
    with pytest.raises(ValueError, match="valid"):
        kl_penalty(lp, lp, "k4")


def test_entropy_loss_aggregates():
    assert entropy_loss(LOSS, MASK, "token-mean").item() == pytest.approx(18 / 5)
    assert entropy_loss(LOSS, MASK, "token-mean", batch_num_tokens=9).item() == pytest.approx(2.0)
