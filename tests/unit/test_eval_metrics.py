"""`rlx eval` metrics: the unbiased pass@k estimator against hand-computed binomials and brute-force
enumeration of k-subsets, the reported k, and the additive sums -> summary (as ranks all-reduce them)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from rlx.trainer.eval_metrics import add_prompt, empty_sums, k_values, pass_at_k, summarize


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 0, 1, 0.0),
        (1, 1, 1, 1.0),
        (4, 1, 1, 0.25),  # pass@1 is c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (4, 3, 2, 1.0),  # n - c < k: every pair holds a correct sample
        (8, 2, 4, 11 / 14),  # 1 - C(6,4)/C(8,4) = 1 - 15/70
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
        (5, 0, 5, 0.0),
        (5, 5, 1, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_equals_enumeration_of_k_subsets():
    """The estimator is the fraction of k-subsets of the n samples that contain a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                exact = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-15), (n, c, k)


def test_pass_at_k_is_not_the_biased_formula_and_handles_large_n():
    # The naive 1 - (1 - c/n)^k overestimates: n=4, c=1, k=2 gives 0.4375, not 0.5.
    assert pass_at_k(4, 1, 2) == 0.5 != 1 - (1 - 1 / 4) ** 2
    # Exact integer binomials: no overflow at n = 1024.
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(("n", "ks"), [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]),
                                       (8, [1, 2, 4, 8]), (16, [1, 2, 4, 8, 16])])  # fmt: skip
def test_k_values_are_one_powers_of_two_and_n(n, ks):
    assert k_values(n) == ks


def test_summary_of_two_prompts():
    sums = empty_sums(4)
    # prompt A: 1 of 4 correct; prompt B: 2 of 4, one of them with partial reward but acc 1.
    add_prompt(sums, [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [3, 5, 8, 8], [False, False, True, True])
    add_prompt(sums, [1.0, 0.5, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [2, 2, 2, 2], [False] * 4)
    add_prompt(sums, [], [], [], [])  # a prompt the generator dropped
    s = summarize(sums, 4)
    assert (s["num_prompts"], s["num_samples"], s["n"], s["dropped_prompts"]) == (2, 8, 4, 1)
    assert s["reward_mean"] == pytest.approx(2.5 / 8)
    assert s["acc"] == pytest.approx(3 / 8)
    assert s["mean@4"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert s["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert s["pass@2"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert s["pass@4"] == pytest.approx(1.0)
    assert s["response_length_mean"] == pytest.approx(32 / 8)
    assert s["clip_ratio"] == pytest.approx(2 / 8)
    assert [k for k in s if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@4"]


def test_sums_add_across_ranks():
    """Summing two ranks' sums key by key (the all-reduce) gives the single-rank summary."""
    prompts = [([1.0, 0.0], [1.0, 0.0]), ([0.0, 0.0], [0.0, 0.0]), ([1.0, 1.0], [1.0, 1.0])]
    one, rank0, rank1 = empty_sums(2), empty_sums(2), empty_sums(2)
    for i, (rewards, accs) in enumerate(prompts):
        add_prompt(one, rewards, accs, [1, 1], [False, False])
        add_prompt(rank0 if i % 2 == 0 else rank1, rewards, accs, [1, 1], [False, False])
    assert list(rank0) == list(rank1) == list(one)  # same keys, same order: one vector to all-reduce
    reduced = {k: rank0[k] + rank1[k] for k in rank0}
    assert summarize(reduced, 2) == summarize(one, 2)
    assert summarize(one, 2)["pass@2"] == pytest.approx(2 / 3)


def test_fractional_acc_counts_as_correct_from_one_half():
    sums = empty_sums(2)
    add_prompt(sums, [0.0, 0.0], [0.6, 0.4], [1, 1], [False, False])
    s = summarize(sums, 2)
    assert s["pass@1"] == pytest.approx(0.5)
    assert s["acc"] == pytest.approx(0.5)  # acc is the mean of the acc values themselves


def test_empty_summary_is_zero_not_nan():
    s = summarize(empty_sums(1), 1)
    assert s["num_prompts"] == 0 and s["acc"] == 0.0 and s["pass@1"] == 0.0
