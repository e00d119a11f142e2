"""The filtered sampler (DAPO dynamic sampling): keep only prompts whose rollouts disagree.

A group whose rollouts all score the same (all right or all wrong) has zero GRPO advantage and
only costs compute; it is dropped, and more prompts are generated until the batch is full.

Algorithm (`[sampler.filtered]`: metric, max_num_gen_batches; batch sizes from `[data]`):

    kept = []
    repeat:                                       # one round = one generation batch
        generate n rollouts for each of gen_batch_size prompts, score them
        keep the groups whose metric has std > 0  (i.e. not all equal; a group of 1 is dropped)
        stop when every rank has train_batch_size kept groups
        raise at max_num_gen_batches rounds (0 = unlimited)
    return the first train_batch_size kept groups (the surplus is discarded, as in DAPO)

Metric per rollout: `acc` reads `extras["acc"]` (the reward function must return it); `score`
and `seq_reward` read the rollout's scalar reward (in rlx a reward is one outcome score per response,
so the sequence reward, verl's sum of token-level scores, IS the score). `seq_final_reward` is the
sequence reward after the in-reward KL penalty (algorithm.use_kl_in_reward): score - beta * sum of
the response's token KLs to the reference, from `ctx.final_rewards` (a policy and a reference
forward per generation batch, on every rank), stored in `extras["seq_final_reward"]`; without KL in
the reward it equals the reward.

Prompts: the first generation batch is the `prompts` argument (`num_prompts == gen_batch_size`);
each further batch is `ctx.next_prompts(gen_batch_size)` from this rank's data stream.

Several DP ranks: `train_batch_size` and `gen_batch_size` are this rank's share of the global
sizes. Ranks generate in lock step; after each round they sum their shortfalls
(`max(0, share - kept)`) with `all_reduce_sum` and all stop together when the global shortfall is
0, so every rank returns exactly its share and the global batch is exactly share x DP size.
Metrics `train/num_gen_batches` (rounds, global), `train/num_kept_groups` and
`train/num_dropped_groups` (groups that passed / failed the filter, summed over ranks, before
trimming).
"""

from __future__ import annotations

from rlx.errors import UserError
from rlx.sampler.base import Sampler, SamplerContext, common_metrics, generate_groups, score_rollouts
from rlx.types import Prompt, Rollout, RolloutBatch

METRICS = ("acc", "score", "seq_reward", "seq_final_reward")


class TooManyGenBatchesError(UserError, RuntimeError):
    """The filter kept too few groups within `max_num_gen_batches` rounds (data too easy/hard)."""


def group_metric(rollout: Rollout, metric: str) -> float:
    """The per-rollout value whose spread decides whether a group is kept (see module docstring)."""
    if metric == "acc":
        if "acc" not in rollout.extras:
            raise ValueError("[sampler.filtered] metric='acc' needs the reward function to return an 'acc' "
                             "extra; it returned " f"{sorted(rollout.extras)}. Use metric='score' instead.")
        return float(rollout.extras["acc"])
    if metric == "seq_final_reward":
        return float(rollout.extras.get("seq_final_reward", rollout.reward))
    return float(rollout.reward)


def has_variance(group: list[Rollout], metric: str) -> bool:
    """std > 0 of the group's metric, tested as 'not all equal' (exact, no float round-off)."""
    return len({group_metric(r, metric) for r in group}) > 1


class FilteredSampler(Sampler):
    """DAPO dynamic sampling; reads `cfg.filtered`."""

    def __init__(self, cfg, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        f = cfg.filtered
        self.metric = str(f.metric)
        self.max_num_gen_batches = int(f.max_num_gen_batches)
        if self.metric not in METRICS:
            raise ValueError(f"[sampler.filtered] metric={self.metric!r} is not one of {list(METRICS)}")
        if self.n < 2:
            raise ValueError(f"the filtered sampler needs n >= 2 rollouts per prompt (a group of one has no "
                             f"variance and is always dropped), got n={self.n}")

    @property
    def num_prompts(self) -> int:
        return self.gen_batch_size

    def sample(self, prompts: list[Prompt], ctx: SamplerContext) -> tuple[RolloutBatch, dict[str, float]]:
        kept: list[list[Rollout]] = []
        num_kept = num_dropped = 0.0
        num_gen_batches = 0
        seen: set = set()
        while True:
            num_gen_batches += 1
            groups = generate_groups(ctx, prompts, [self.n] * len(prompts), self.temperature)
            # A prompt drawn again within the step (the data stream crossed an epoch end between two
            # generation batches) is a new group: with the prompt's uid alone, the two would merge.
            for g in groups:
                if g[0].group_id in seen:
                    for r in g:
                        r.group_id = (r.group_id, num_gen_batches)
                seen.add(g[0].group_id)
            rollouts = [r for g in groups for r in g]
            score_rollouts(ctx, rollouts)
            if self.metric == "seq_final_reward" and ctx.final_rewards is not None:
                for r, final in zip(rollouts, ctx.final_rewards(rollouts)):
                    r.extras["seq_final_reward"] = final
            passed = [g for g in groups if has_variance(g, self.metric)]
            kept.extend(passed)
            shortfall = max(0, self.train_batch_size - len(kept))
            g_shortfall, g_kept, g_dropped = ctx.global_sum(shortfall, len(passed), len(groups) - len(passed))
            num_kept += g_kept
            num_dropped += g_dropped
            if g_shortfall == 0:
                break
            # Same check on every rank (global counts), so all ranks raise together.
            if 0 < self.max_num_gen_batches <= num_gen_batches:
                raise TooManyGenBatchesError(
                    f"num_gen_batches={num_gen_batches} >= max_num_gen_batches={self.max_num_gen_batches}. "
                    "Generated too many batches. Please check if your data are too difficult.")
            prompts = self._more_prompts(ctx)

        batch = RolloutBatch([r for g in kept[: self.train_batch_size] for r in g])
        metrics = {
            "train/num_gen_batches": float(num_gen_batches),
            "train/num_kept_groups": num_kept,
            "train/num_dropped_groups": num_dropped,
        }
        return batch, {**common_metrics(batch), **metrics}

    def _more_prompts(self, ctx: SamplerContext) -> list[Prompt]:
        if ctx.next_prompts is None:
            raise ValueError("the filtered sampler needs more prompts than one batch: pass "
                             "SamplerContext(next_prompts=...) (the trainer wires its data stream)")
        return list(ctx.next_prompts(self.gen_batch_size))
