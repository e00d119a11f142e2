"""The adaptive sampler: per prompt, sample in small batches until a positive rollout (or `max_n`).

Hard prompts, where a fixed n often yields no correct rollout and so no GRPO signal, get more
samples; easy prompts stop early. All rollouts are kept, so groups vary in size.

Algorithm (`[sampler.adaptive]`: max_n, rollouts_per_batch, positive_threshold, min_rollouts):

    active = all prompts
    while some rank still has an active prompt:          # one iteration = ONE generator call
        for every active prompt, ask min(rollouts_per_batch, max_n - count) more rollouts
        score only the new rollouts (one reward call; earlier rewards are reused)
        a prompt is done when (some reward >= positive_threshold and count >= min_rollouts)
                           or count == max_n

So a step costs at most ceil(max_n / rollouts_per_batch) generator calls whatever the number of
prompts, and each rollout is scored exactly once. The generator's `n` is not used. With several DP
ranks the loop runs until no rank has an active prompt (agreed through `all_reduce_sum`); a rank
that is already done joins the remaining rounds with an empty generator call.

Metrics (this rank), `adaptive_rollout/`: iterations (rounds, the same on every rank),
total_rollouts, avg/min/max_rollouts_per_sample, samples_with_positive, samples_without_positive,
positive_rate, efficiency (= samples / total_rollouts; 1/max_n is the worst case).
"""

from __future__ import annotations

from rlx.sampler.base import Sampler, SamplerContext, common_metrics, generate_groups, score_rollouts
from rlx.types import Prompt, Rollout, RolloutBatch


class AdaptiveSampler(Sampler):
    """Generate until a positive rollout per prompt; reads `cfg.adaptive`."""

    def __init__(self, cfg, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        a = cfg.adaptive
        self.max_n = int(a.max_n)
        self.rollouts_per_batch = int(a.rollouts_per_batch)
        self.positive_threshold = float(a.positive_threshold)
        self.min_rollouts = int(a.min_rollouts)
        if self.max_n < 1 or self.rollouts_per_batch < 1:
            raise ValueError(f"[sampler.adaptive] needs max_n >= 1 and rollouts_per_batch >= 1, got "
                             f"max_n={self.max_n}, rollouts_per_batch={self.rollouts_per_batch}")

    def _is_done(self, group: list[Rollout]) -> bool:
        if len(group) >= self.max_n:
            return True
        has_positive = any(r.reward >= self.positive_threshold for r in group)
        return has_positive and len(group) >= self.min_rollouts

    def sample(self, prompts: list[Prompt], ctx: SamplerContext) -> tuple[RolloutBatch, dict[str, float]]:
        groups: list[list[Rollout]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        iterations = 0
        # Collective loop condition: every rank runs the same number of generator calls.
        while ctx.global_sum(len(active))[0] > 0:
            iterations += 1
            # Never exceed max_n: the last batch of a prompt is cut to the remainder.
            counts = [min(self.rollouts_per_batch, self.max_n - len(groups[i])) for i in active]
            new_groups = generate_groups(ctx, [prompts[i] for i in active], counts, self.temperature)
            score_rollouts(ctx, [r for g in new_groups for r in g])
            for i, new in zip(active, new_groups):
                groups[i].extend(new)
            active = [i for i in active if not self._is_done(groups[i])]

        batch = RolloutBatch([r for g in groups for r in g])
        return batch, {**common_metrics(batch), **self._metrics(groups, iterations)}

    def global_metrics(self, rollouts, local: dict[str, float]) -> dict[str, float]:
        # Every count is a function of the groups; `iterations` is the same on every rank.
        groups: dict = {}
        for r in rollouts:
            groups.setdefault(r.group_id, []).append(r)
        iterations = int(local.get("adaptive_rollout/iterations", 0))
        return {**super().global_metrics(rollouts, local), **self._metrics(list(groups.values()), iterations)}

    def _metrics(self, groups: list[list[Rollout]], iterations: int) -> dict[str, float]:
        sizes = [len(g) for g in groups]
        total = sum(sizes)
        with_positive = sum(any(r.reward >= self.positive_threshold for r in g) for g in groups)
        num = len(groups)
        p = "adaptive_rollout/"
        return {
            p + "iterations": float(iterations),
            p + "total_rollouts": float(total),
            p + "avg_rollouts_per_sample": total / num if num else 0.0,
            p + "min_rollouts_per_sample": float(min(sizes, default=0)),
            p + "max_rollouts_per_sample": float(max(sizes, default=0)),
            p + "samples_with_positive": float(with_positive),
            p + "samples_without_positive": float(num - with_positive),
            p + "positive_rate": with_positive / num if num else 0.0,
            p + "efficiency": num / total if total else 0.0,
        }
