"""The fixed sampler: `n` rollouts per prompt, all kept (plain GRPO/RLOO sampling).

One generator call and one reward call per step.
"""

from __future__ import annotations

from rlx.sampler.base import Sampler, SamplerContext, common_metrics, generate_groups, score_rollouts
from rlx.types import Prompt, RolloutBatch


class FixedSampler(Sampler):
    """`n` rollouts per prompt at the base temperature; reads no sub-section of the config."""

    def sample(self, prompts: list[Prompt], ctx: SamplerContext) -> tuple[RolloutBatch, dict[str, float]]:
        groups = generate_groups(ctx, prompts, [self.n] * len(prompts), self.temperature)
        rollouts = [r for group in groups for r in group]
        score_rollouts(ctx, rollouts)
        batch = RolloutBatch(rollouts)
        return batch, common_metrics(batch)
