"""Rollout correction (IS weights, rejection sampling, veto, diagnostics) and its option parsing, by hand."""

import math

import pytest
import torch

from rlx.algorithms import rollout_correction
from rlx.config.rollout_correction_options import (
    RS_OPTIONS,
    parse_is_threshold,
    parse_rs_options,
    parse_rs_thresholds,
)

P = "rollout_corr/"
LN = math.log


def batch(log_ratios, lengths):
    """rollout log-probs fixed at -1; old = rollout + log-ratio; right padding with -inf (must not leak)."""
    B, T = len(log_ratios), max(len(r) for r in log_ratios)
    lr, mask = torch.zeros(B, T), torch.zeros(B, T)
    for i, (row, L) in enumerate(zip(log_ratios, lengths)):
        lr[i, : len(row)] = torch.tensor(row)
        mask[i, :L] = 1
    rollout = torch.full((B, T), -1.0)
    old = rollout + lr
    old[mask == 0] = float("-inf")
    return old, rollout, mask


def test_token_tis_weights_and_metrics():
    old, roll, mask = batch([[LN(3), LN(0.5), 0.0]], [3])
    w, rs_mask, m = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 1.0]]))
    assert torch.equal(rs_mask, mask)
    assert m[P + "rollout_is_mean"] == pytest.approx(3.5 / 3)
    assert m[P + "rollout_is_ratio_fraction_high"] == pytest.approx(1 / 3)
    assert m[P + "rollout_is_ratio_fraction_low"] == 0.0  # 0.5 is not < 1/2
    assert (m[P + "rollout_is_max"], m[P + "rollout_is_min"]) == pytest.approx((2.0, 0.5))
    std = torch.tensor([2.0, 0.5, 1.0]).std(unbiased=False).item()
    assert m[P + "rollout_is_std"] == pytest.approx(std, rel=1e-5)
    wn = torch.tensor([2.0, 0.5, 1.0]) / (3.5 / 3)
    assert m[P + "rollout_is_eff_sample_size"] == pytest.approx(1 / (wn**2).mean().item(), rel=1e-5)
    assert m[P + "rollout_is_seq_mean"] == pytest.approx(3.5 / 3)
    assert m[P + "rollout_is_seq_std"] == 0.0  # one row: 0 (torch.std would give NaN)
    assert m[P + "rollout_is_seq_fraction_high"] == 0.0  # raw row mean (3+.5+1)/3 = 1.5 <= 2
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert not any("rollout_rs" in k or "oob" in k for k in m)


def test_sequence_is_with_empty_row_and_batch_norm():
    old, roll, mask = batch([[LN(2), LN(2)], [LN(0.5), 0.0], [0.0, 0.0]], [2, 2, 0])
    w, _, m = rollout_correction(old, roll, mask, rollout_is="sequence", rollout_is_threshold=3.0,
                                 rollout_is_batch_normalize=True)
    # row weights: min(4, 3) = 3, 0.5; empty row 0. bn mean over non-empty rows: 1.75
    assert torch.allclose(w, torch.tensor([[3.0, 3.0], [0.5, 0.5], [0.0, 0.0]]) / 1.75)
    assert m[P + "rollout_is_batch_norm_factor"] == pytest.approx(1.75)
    assert m[P + "rollout_is_mean"] == pytest.approx(7 / 4)  # token-weighted, before normalisation
    assert m[P + "rollout_is_max"] == pytest.approx(4.0)  # from the unclamped sequence log-ratio
    assert m[P + "rollout_is_min"] == pytest.approx(0.5)
    assert m[P + "rollout_is_ratio_fraction_high"] == pytest.approx(1 / 3)  # over all rows, empty included
    assert m[P + "rollout_is_ratio_fraction_low"] == 0.0
    assert m[P + "rollout_is_seq_mean"] == pytest.approx(3.5 / 3)
    assert m[P + "rollout_is_seq_max_deviation"] == pytest.approx(2.0)
    assert m[P + "rollout_is_seq_fraction_high"] == pytest.approx(1 / 3)  # raw row mean 4 > 3
    assert m[P + "rollout_is_seq_fraction_low"] == pytest.approx(1 / 3)  # the empty row's 0 < 1/3


def test_icepop_mask_mode_and_truncate_with_lower():
    old, roll, mask = batch([[LN(3), LN(0.5), LN(0.4), 0.0]], [4])
    w, _, m = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold="0.5_2")
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 0.0, 1.0]]))
    assert m[P + "rollout_is_oob_ratio"] == pytest.approx(0.5)
    assert P + "rollout_is_masked_fraction" not in m
    w2, _, m2 = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold=2.0, rollout_is_mode="mask")
    assert torch.equal(w2, w) and m2[P + "rollout_is_masked_fraction"] == pytest.approx(0.5)  # lower = 1/upper
    w3, _, m3 = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold=2.0,
                                   rollout_is_threshold_lower=0.45)
    assert torch.allclose(w3, torch.tensor([[2.0, 0.5, 0.45, 1.0]]))
    assert m3[P + "rollout_is_ratio_fraction_low"] == pytest.approx(0.25)  # 0.4 < 0.45
    w4, _, _ = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold=2.0)
    assert torch.allclose(w4, torch.tensor([[2.0, 0.5, 0.4, 1.0]]))  # TIS: no lower truncation
    with pytest.raises(ValueError, match="once"):
        rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold="0.5_2", rollout_is_threshold_lower=0.5)
    with pytest.raises(ValueError, match="truncate"):
        rollout_correction(old, roll, mask, rollout_is="token", rollout_is_mode="clip")
    w5, _, m5 = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold=None)
    assert w5 is None and not any("rollout_is" in k for k in m5)


def test_icepop_all_rejected_gives_zero_ess_not_inf():
    old, roll, mask = batch([[LN(5.0), LN(6.0)]], [2])
    w, _, m = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold="0.5_2",
                                 rollout_is_batch_normalize=True)
    assert torch.equal(w, torch.zeros(1, 2))
    assert m[P + "rollout_is_eff_sample_size"] == 0.0 and m[P + "rollout_is_batch_norm_factor"] == 1.0


def test_rs_token_k1_seq_max_k2_combination():
    old, roll, mask = batch([[LN(3), 0.0, 0.1], [0.05, -0.05, 0.0], [0.0, 2.5, 0.0]], [3, 3, 2])
    _, rs_mask, m = rollout_correction(old, roll, mask, rollout_rs=" token_k1 , seq_max_k2,token_k1",
                                       rollout_rs_threshold="0.6_1.6,2.5")
    # token_k1 rejects row0 tok0 (pi_rollout/pi_train = 1/3) and row2 tok1 (e^-2.5); seq_max_k2 rejects
    # row2 (max k2 = 2.5^2/2 = 3.125 > 2.5)
    expect = torch.tensor([[0.0, 1, 1], [1, 1, 1], [0, 0, 0]])
    assert torch.equal(rs_mask, expect)
    assert m[P + "rollout_rs_token_k1_masked_fraction"] == pytest.approx(2 / 8)
    assert m[P + "rollout_rs_token_k1_seq_masked_fraction"] == pytest.approx(2 / 3)
    assert m[P + "rollout_rs_token_k1_fraction_low"] == pytest.approx(2 / 8)  # k1 < log .6
    assert m[P + "rollout_rs_token_k1_min"] == pytest.approx(-2.5)
    assert m[P + "rollout_rs_seq_max_k2_max"] == pytest.approx(3.125)
    assert m[P + "rollout_rs_seq_max_k2_fraction_high"] == pytest.approx(1 / 3)
    assert m[P + "rollout_rs_seq_max_k2_fraction_low"] == 0.0
    assert P + "rollout_rs_seq_max_k2_seq_fraction_low" not in m  # only k1 options report it
    assert m[P + "rollout_rs_seq_max_k2_masked_fraction"] == pytest.approx(2 / 8)
    assert m[P + "rollout_rs_masked_fraction"] == pytest.approx(3 / 8)
    assert m[P + "rollout_rs_seq_masked_fraction"] == pytest.approx(2 / 3)


def test_rs_seq_sum_and_mean_k3_and_reciprocal_rule():
    old, roll, mask = batch([[0.5, 0.5], [0.1, 0.0]], [2, 2])
    k3 = math.exp(0.5) - 1.5
    _, rs, m = rollout_correction(old, roll, mask, rollout_rs="seq_sum_k3,seq_mean_k1", rollout_rs_threshold="0.2,2")
    assert torch.equal(rs, torch.tensor([[0.0, 0.0], [1, 1]]))  # seq_sum_k3 row0 = 2*k3 = 0.297 > 0.2
    assert m[P + "rollout_rs_seq_sum_k3_max"] == pytest.approx(2 * k3, rel=1e-5)
    # seq_mean_k1 with one value 2 keeps log(1/2) <= -mean lr <= log 2: both rows pass
    assert m[P + "rollout_rs_seq_mean_k1_masked_fraction"] == 0.0


def test_first_vocabulary_rs_modes():
    old, roll, mask = batch([[LN(1.5), LN(1.5)], [LN(4), LN(0.5)], [LN(0.9), 0.0]], [2, 2, 1])
    _, rs, m = rollout_correction(old, roll, mask, rollout_rs="token", rollout_rs_threshold=2.0)
    assert torch.equal(rs, torch.tensor([[1.0, 1], [0, 1], [1, 0]]))  # ratio 4 > 2; 0.5 >= 1/2 kept
    _, rs, _ = rollout_correction(old, roll, mask, rollout_rs="sequence", rollout_rs_threshold=2.0)
    assert torch.equal(rs, torch.tensor([[0.0, 0], [1, 1], [1, 0]]))  # products 2.25, 2, 0.9
    _, rs, m = rollout_correction(old, roll, mask, rollout_rs="geometric", rollout_rs_threshold=1.45,
                                  rollout_rs_threshold_lower=0.95)
    # geometric means 1.5, sqrt(2)=1.414, 0.9: keep only row 1
    assert torch.equal(rs, torch.tensor([[0.0, 0], [1, 1], [0, 0]]))
    assert m[P + "rollout_rs_geometric_seq_max"] == pytest.approx(LN(1.5), rel=1e-5)
    assert m[P + "rollout_rs_geometric_seq_fraction_low"] == pytest.approx(1 / 3)


def test_veto_rejects_whole_sequence():
    old, roll, mask = batch([[0.0, LN(1e-5), 0.0], [LN(1e-3), 0.0, LN(1e-9)]], [3, 2])  # row1's 1e-9 is padding
    w, rs, m = rollout_correction(old, roll, mask, rollout_is="token", rollout_token_veto_threshold=1e-4)
    assert torch.equal(rs, torch.tensor([[0.0, 0, 0], [1, 1, 0]]))
    assert m[P + "rollout_is_veto_fraction"] == pytest.approx(0.5)
    assert m[P + "rollout_is_catastrophic_token_fraction"] == pytest.approx(1 / 5)
    assert w[0, 1] > 0  # the veto is a rejection (mask); it leaves the IS weights alone
    with pytest.raises(ValueError, match="veto"):
        rollout_correction(old, roll, mask, rollout_token_veto_threshold=0.0)


def test_offpolicy_diagnostics_hand_values():
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    roll = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _, _, m = rollout_correction(old, roll, mask)
    ell, rho = torch.tensor([-1.5, -0.5]), torch.tensor([-1.75, -0.5])
    assert m[P + "training_ppl"] == pytest.approx(torch.exp(-ell).mean().item(), rel=1e-6)
    assert m[P + "rollout_log_ppl"] == pytest.approx(1.125)
    assert m[P + "kl"] == pytest.approx(-0.5 / 3)
    assert m[P + "k3_kl"] == pytest.approx((math.exp(0.5) - 1.5) / 3, rel=1e-6)
    assert m[P + "log_ppl_diff"] == pytest.approx(-0.125)
    assert (m[P + "log_ppl_diff_max"], m[P + "log_ppl_diff_min"]) == pytest.approx((0.0, -0.25))
    assert m[P + "ppl_ratio"] == pytest.approx((math.exp(-0.25) + 1) / 2)
    assert m[P + "chi2_token"] == pytest.approx((math.exp(1.0) + 2) / 3 - 1, rel=1e-6)
    assert m[P + "chi2_seq"] == pytest.approx((math.exp(1.0) + 1) / 2 - 1, rel=1e-6)
    assert len(m) == 13


def test_extreme_log_ratios_and_empty_rows_stay_finite():
    old, roll, mask = batch([[50.0, -50.0, 25.0], [-80.0, 30.0, 0.0], [0.0, 0.0, 0.0]], [3, 2, 0])
    for rollout_is in ("token", "sequence"):
        w, rs, m = rollout_correction(
            old, roll, mask, rollout_is=rollout_is, rollout_is_threshold="0.1_10", rollout_is_batch_normalize=True,
            rollout_rs="token_k1,token_k2,token_k3,seq_sum_k1,seq_sum_k3,seq_mean_k2,seq_max_k3,sequence,geometric,token",
            rollout_rs_threshold="5", rollout_token_veto_threshold=1e-4,
        )
        assert torch.isfinite(w).all() and torch.isfinite(rs).all()
        bad = {k: v for k, v in m.items() if not math.isfinite(v)}
        assert not bad, bad
    assert m[P + "k3_kl"] > 1e20  # verl's unclamped exp(50), kept finite by float64


def test_input_errors():
    old, roll, mask = batch([[0.0]], [1])
    with pytest.raises(ValueError, match="at least one valid token"):
        rollout_correction(old, roll, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="shape"):
        rollout_correction(old, roll[:, :0], mask)
    with pytest.raises(ValueError, match="seq_max_k2"):
        rollout_correction(old, roll, mask, rollout_rs="seq_max_k1", rollout_rs_threshold=2)
    with pytest.raises(ValueError, match="required"):
        rollout_correction(old, roll, mask, rollout_rs="token_k2")
    with pytest.raises(ValueError, match="sequence"):
        rollout_correction(old, roll, mask, rollout_is="tokens")
    with pytest.warns(UserWarning, match="ignored"):
        rollout_correction(old, roll, mask, rollout_rs="token_k2", rollout_rs_threshold=2, rollout_rs_threshold_lower=0.5)


def test_option_parsing():
    assert parse_is_threshold(2) == (None, 2.0)
    assert parse_is_threshold("2.5") == (None, 2.5)
    assert parse_is_threshold("0.5_2") == (0.5, 2.0)
    for bad in (True, "2_0.5", "0_2", -1.0, "abc", [2.0]):
        with pytest.raises(ValueError):
            parse_is_threshold(bad)
    assert parse_rs_options("token_k1, seq_max_k2,token_k1") == ["token_k1", "seq_max_k2"]
    assert parse_rs_options("none") == [] and parse_rs_options(None) == []
    assert {"token", "sequence", "geometric", "seq_max_k3"} <= set(RS_OPTIONS)
    with pytest.raises(ValueError, match="choose from"):
        parse_rs_options("token_k4")
    assert parse_rs_thresholds(["token_k1", "seq_max_k2"], "0.6_1.6,2.5") == [(0.6, 1.6), (None, 2.5)]
    assert parse_rs_thresholds(["token_k1", "token_k3"], 2.0) == [(0.5, 2.0), (None, 2.0)]
    assert parse_rs_thresholds(["geometric"], "1.0002", lower=0.9998) == [(0.9998, 1.0002)]
    with pytest.raises(ValueError, match="single upper bound"):
        parse_rs_thresholds(["token_k2"], "0.5_2")
    with pytest.raises(ValueError, match="exactly 2"):
        parse_rs_thresholds(["token_k1", "token_k2"], "1,2,3")
    with pytest.raises(ValueError, match="lower"):
        parse_rs_thresholds(["token_k1"], "2_1")


ALL_OPTIONS = dict(
    rollout_is="token", rollout_is_threshold="0.5_2", rollout_is_batch_normalize=True,
    rollout_rs="token_k1,token_k3,seq_sum_k1,seq_mean_k2,seq_max_k3,geometric", rollout_rs_threshold="3,0.5,4,1,2,1.5",
    rollout_token_veto_threshold=0.05,
)  # fmt: skip


def random_batch(seed, B=6, T=11, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    roll = -torch.rand(B, T, generator=g) * 3
    return roll + scale * torch.randn(B, T, generator=g), roll, mask


@pytest.mark.parametrize("pad", [float("-inf"), float("nan"), float("inf"), 7.0])
def test_padding_values_never_change_any_output(pad):
    # Finite padding takes the multiply-by-mask path, non-finite padding the masked_fill one: same outputs.
    old, roll, mask = random_batch(0)
    w0, rs0, m0 = rollout_correction(old, roll, mask, **ALL_OPTIONS)
    padded_old, padded_roll = old.masked_fill(mask == 0, pad), roll.masked_fill(mask == 0, -pad)
    w1, rs1, m1 = rollout_correction(padded_old, padded_roll, mask, **ALL_OPTIONS)
    assert torch.equal(w0, w1) and torch.equal(rs0, rs1)
    assert m1 == pytest.approx(m0, rel=1e-12, abs=1e-12)


def test_nan_on_a_valid_token_shows_in_the_outputs():
    old, roll, mask = batch([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]], [3, 2])
    old[0, 1] = float("nan")
    w, rs, m = rollout_correction(old, roll, mask, rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold=2)
    assert torch.isnan(w[0, 1]) and torch.isfinite(w[1]).all()
    assert rs[0, 1] == 0 and rs[0, 0] == 1  # a NaN statistic fails the RS check
    assert math.isnan(m[P + "kl"]) and math.isnan(m[P + "rollout_is_mean"])


def test_dtypes_float64_inputs_and_bool_mask():
    old, roll, mask = random_batch(1)
    w, rs, m = rollout_correction(old, roll, mask, **ALL_OPTIONS)
    w64, rs64, m64 = rollout_correction(old.double(), roll.double(), mask.double(), **ALL_OPTIONS)
    assert w64.dtype == torch.float64 and rs64.dtype == torch.float64
    assert torch.allclose(w.double(), w64, rtol=1e-6) and torch.equal(rs.double(), rs64)
    assert m == pytest.approx(m64, rel=1e-5, abs=1e-7)
    _, rs_bool, _ = rollout_correction(old, roll, mask.bool(), **ALL_OPTIONS)
    assert rs_bool.dtype == torch.bool and torch.equal(rs_bool, rs.bool())


def test_tiny_log_ratios_keep_k3_and_std_exact():
    # |lr| ~ 1e-4: exp(lr) - 1 - lr ~ 5e-9 and the IS weights differ by ~1e-4, where fp32 formulas cancel.
    g = torch.Generator().manual_seed(2)
    roll = -torch.rand(4, 64, generator=g) * 3
    old = roll + 1e-4 * torch.randn(4, 64, generator=g)
    mask = torch.ones(4, 64)
    _, _, m = rollout_correction(old, roll, mask, rollout_is="token", rollout_rs="token_k3", rollout_rs_threshold=1.0)
    lr = (old.double() - roll.double()).flatten().tolist()  # exact: a difference of two fp32 numbers
    lr32 = (old - roll).flatten().double()
    k3 = [math.expm1(x) - x for x in lr32.tolist()]
    assert m[P + "k3_kl"] == pytest.approx(statistics_mean(k3), rel=1e-6)
    assert m[P + "rollout_rs_token_k3_mean"] == pytest.approx(statistics_mean(k3), rel=1e-5)
    assert m[P + "kl"] == pytest.approx(-statistics_mean(lr), rel=1e-6)
    w = torch.exp(lr32).float().double()  # the fp32 weights
    assert m[P + "rollout_is_std"] == pytest.approx(w.std(unbiased=False).item(), rel=1e-4)


def statistics_mean(values):
    return math.fsum(values) / len(values)
