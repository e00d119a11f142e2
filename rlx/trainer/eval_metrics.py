"""Metrics of `rlx eval`, as pure functions: the unbiased pass@k estimator and additive per-prompt
sums that ranks all-reduce before `summarize` turns them into the summary (torch-free).

A prompt's n samples are scored once; sample i is *correct* when its `acc` is >= 0.5 (the reward
stage's `acc` is 0 or 1 unless a user function returns a fraction). Definitions, per prompt with
n samples of which c are correct, averaged over prompts:
  pass@k  1 - C(n-c, k) / C(n, k): the probability that at least one of k samples drawn without
          replacement from the n is correct (Chen et al. 2021, "Evaluating Large Language Models
          Trained on Code", eq. 1). Unbiased, unlike 1 - (1 - c/n)^k.
  mean@n  c_acc / n, the mean accuracy of the prompt's n samples (verl's `mean@N`). For k < n the
          unbiased estimate of the mean accuracy of k samples is the same number, so only mean@n
          is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CORRECT_THRESHOLD = 0.5
"""A sample counts as correct for pass@k when its acc is at least this."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `n` samples of which `c` are correct: 1 - C(n-c,k)/C(n,k).

    Exact integer binomials (Python ints do not overflow); requires 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(n: int) -> list[int]:
    """The k of pass@k reported for n samples per prompt: 1 and the powers of two below n, then n
    itself (verl's choice of subset sizes): n=1 -> [1], n=6 -> [1, 2, 4, 6], n=8 -> [1, 2, 4, 8]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def empty_sums(n: int) -> dict[str, float]:
    """Zeroed additive sums for n samples per prompt; every rank builds the same keys in the same
    order, so `list(sums.values())` can be all-reduced as one vector."""
    keys = ["prompts", "samples", "reward", "acc", "mean_acc", "response_tokens", "clipped", "dropped_prompts"]
    keys += [f"pass@{k}" for k in k_values(n)]
    return dict.fromkeys(keys, 0.0)


def add_prompt(
    sums: dict[str, float], rewards: Sequence[float], accs: Sequence[float],
    response_lengths: Sequence[int], clipped: Sequence[bool],
) -> None:  # fmt: skip
    """Add one prompt's n scored samples to `sums` (in place). A prompt without samples (the
    generator dropped it) is counted in `dropped_prompts` only."""
    n = len(rewards)
    assert len(accs) == len(response_lengths) == len(clipped) == n, (n, len(accs), len(response_lengths))
    if n == 0:
        sums["dropped_prompts"] += 1
        return
    c = sum(a >= CORRECT_THRESHOLD for a in accs)
    sums["prompts"] += 1
    sums["samples"] += n
    sums["reward"] += sum(rewards)
    sums["acc"] += sum(accs)
    sums["mean_acc"] += sum(accs) / n
    sums["response_tokens"] += sum(response_lengths)
    sums["clipped"] += sum(bool(x) for x in clipped)
    for key in sums:
        if key.startswith("pass@"):
            sums[key] += pass_at_k(n, c, int(key[5:]))


def summarize(sums: dict[str, float], n: int) -> dict[str, float]:
    """The summary metrics from (all-reduced) sums: counts, `reward_mean` and `acc` over samples,
    `pass@k` and `mean@n` over prompts, response length and the fraction cut at max_tokens."""
    prompts, samples = sums["prompts"], sums["samples"]
    per_sample = lambda key: sums[key] / samples if samples else 0.0  # noqa: E731
    per_prompt = lambda key: sums[key] / prompts if prompts else 0.0  # noqa: E731
    out = {
        "num_prompts": int(prompts),
        "num_samples": int(samples),
        "n": n,
        "reward_mean": per_sample("reward"),
        "acc": per_sample("acc"),
    }
    out.update({key: per_prompt(key) for key in sums if key.startswith("pass@")})
    out[f"mean@{n}"] = per_prompt("mean_acc")
    out["response_length_mean"] = per_sample("response_tokens")
    out["clip_ratio"] = per_sample("clipped")
    out["dropped_prompts"] = int(sums["dropped_prompts"])
    return out
