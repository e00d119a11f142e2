"""Every formula the seed documents state is expressible with rlx keys, and means what it says.

The seeds' prose sometimes differs from verl's code under the same name (token_k1, seq_max_k2): rlx keeps
verl's meaning for verl's names and offers the prose formulas under their own keys. Each test writes the
seed's formula directly and checks the rlx keys of the README table ("Seed formulas") against it.
"""

from __future__ import annotations

import math

import torch

from rlx.algorithms import rollout_correction

# Token ratios w = pi_train / pi_rollout of three responses (the third has 2 valid tokens).
W = torch.tensor([[1.0, 1.3, 0.9, 1.1], [0.55, 1.0, 1.0, 1.2], [2.7, 0.8, 1.0, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
ROLL = torch.full_like(W, -1.0)
OLD = (ROLL + W.log()) * MASK + ROLL * (1 - MASK)


def rc(**options):
    weights, rs_mask, metrics = rollout_correction(OLD, ROLL * MASK + ROLL * (1 - MASK), MASK, **options)
    return weights, rs_mask, metrics


def seq_keep(rule) -> torch.Tensor:
    """0/1 per response of `rule(valid token ratios)`, broadcast over its valid tokens."""
    keep = torch.tensor([float(rule(W[i][MASK[i].bool()])) for i in range(W.shape[0])], dtype=torch.float64)
    return keep[:, None] * MASK


def test_seed004_is_clip_both_sides():
    """seed 004: w_clipped = clip(w, 1/threshold, threshold) -> rollout_is_threshold_lower = 1/threshold."""
    w, _, _ = rc(rollout_is="token", rollout_is_threshold=2.0, rollout_is_threshold_lower=0.5)
    torch.testing.assert_close(w, W.clamp(0.5, 2.0) * MASK)
    # verl's TIS (the default, lower unset) truncates above only: 0.55 and 0.8 stay as they are.
    w, _, _ = rc(rollout_is="token", rollout_is_threshold=1.05)
    torch.testing.assert_close(w, W.clamp(max=1.05) * MASK)


def test_seed001_auto_reciprocal_lower_bound_in_mask_mode():
    """seed 001: lower null = auto 1/upper. rlx: mask mode zeroes outside [1/upper, upper]."""
    w, _, m = rc(rollout_is="token", rollout_is_threshold=1.25, rollout_is_mode="mask")
    inside = ((W >= 0.8) & (W <= 1.25)).double()
    torch.testing.assert_close(w, W * inside * MASK)
    assert math.isclose(m["rollout_corr/rollout_is_masked_fraction"], 3 / 10, rel_tol=1e-8)  # verl: / (n + 1e-8)


def test_seed004_token_k1_formula_per_token():
    """seed 004 formula: lower <= w_token <= upper per token -> rollout_rs = "token", "lo_hi"."""
    _, rs_mask, _ = rc(rollout_rs="token", rollout_rs_threshold="0.6_1.6")
    torch.testing.assert_close(rs_mask, ((W >= 0.6) & (W <= 1.6)).double() * MASK)


def test_seed004_token_k1_prose_rejects_the_sequence():
    """seed 004 prose: reject any sequence with a token weight outside [0.6, 1.6] ->
    rollout_rs = "seq_min_ratio,seq_max_ratio", rollout_rs_threshold = "0.6,1.6"."""
    _, rs_mask, m = rc(rollout_rs="seq_min_ratio,seq_max_ratio", rollout_rs_threshold="0.6,1.6")
    torch.testing.assert_close(rs_mask, seq_keep(lambda w: w.min() >= 0.6 and w.max() <= 1.6))
    assert m["rollout_corr/rollout_rs_seq_masked_fraction"] == 2 / 3


def test_seed004_seq_max_k2_formula():
    """seed 004: max_t w_token <= threshold -> rollout_rs = "seq_max_ratio" (verl's seq_max_k2 bounds
    max_t 0.5 * log(w)^2 instead, kept under its own name)."""
    _, rs_mask, _ = rc(rollout_rs="seq_max_ratio", rollout_rs_threshold=2.5)
    torch.testing.assert_close(rs_mask, seq_keep(lambda w: w.max() <= 2.5))
    _, verl_mask, _ = rc(rollout_rs="seq_max_k2", rollout_rs_threshold=2.5)
    torch.testing.assert_close(verl_mask, seq_keep(lambda w: (0.5 * w.log() ** 2).max() <= 2.5))


def test_seed004_verl_token_k1_is_a_band_on_the_inverse_log_ratio():
    """verl's token_k1 (kept): k1 = log(pi_rollout / pi_train) = -log w must lie in [log lo, log hi]."""
    _, rs_mask, _ = rc(rollout_rs="token_k1", rollout_rs_threshold="0.6_1.6")
    k1 = -W.log()
    torch.testing.assert_close(rs_mask, ((k1 >= math.log(0.6)) & (k1 <= math.log(1.6))).double() * MASK)


def test_seed004_batch_normalize_over_the_batch():
    """seed 004: w_normalized = w / (sum w / N), N the valid tokens of the batch."""
    w, _, m = rc(rollout_is="token", rollout_is_threshold=5.0, rollout_is_batch_normalize=True)
    mean = (W * MASK).sum() / MASK.sum()
    torch.testing.assert_close(w, W * MASK / mean)
    assert math.isclose(m["rollout_corr/rollout_is_batch_norm_factor"], float(mean), rel_tol=1e-8)


def test_seed001_sequence_and_geometric_rs():
    """seed 001: sequence = prod_t w in [1/u, u]; geometric = (prod_t w)^(1/L) in [lower, upper]."""
    _, rs_mask, _ = rc(rollout_rs="sequence", rollout_rs_threshold=1.5)
    torch.testing.assert_close(rs_mask, seq_keep(lambda w: 1 / 1.5 <= w.prod() <= 1.5))
    _, rs_mask, _ = rc(rollout_rs="geometric", rollout_rs_threshold=1.1, rollout_rs_threshold_lower=0.9)
    torch.testing.assert_close(rs_mask, seq_keep(lambda w: 0.9 <= w.prod() ** (1 / len(w)) <= 1.1))


def test_seed001_veto():
    """seed 001: a sequence with any token ratio < veto threshold is rejected whole."""
    _, rs_mask, m = rc(rollout_token_veto_threshold=0.6)
    torch.testing.assert_close(rs_mask, seq_keep(lambda w: bool((w >= 0.6).all())))
    assert m["rollout_corr/rollout_is_veto_fraction"] == 1 / 3
