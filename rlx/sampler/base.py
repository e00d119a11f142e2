"""The sampler contract: `Sampler.sample(prompts, ctx) -> (RolloutBatch, metrics)` and its context.

A sampler decides which rollouts to generate and which to keep; it talks to the generator, the
reward stage and (token_adaptive only) the trainer's forward through `SamplerContext`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlx.types import (
    Completion,
    GenerationRequest,
    Generator,
    Prompt,
    RewardScorer,
    Rollout,
    RolloutBatch,
    TokenStats,
)


def _identity(values: list[float]) -> list[float]:
    return list(values)


@dataclass
class SamplerContext:
    """Everything a sampler may call during one `sample`.

    Collective calls: with several data-parallel ranks every rank runs the same sampler on its own
    prompts. Samplers use `all_reduce_sum` to agree on how many rounds to run, so that every rank
    makes the same number of `generator.generate`, `token_stats` and `final_rewards` calls (each may be a
    collective: a generator with TP across ranks, an FSDP forward). A rank with nothing to do in a
    round therefore calls them with an EMPTY list; both must accept that and return `[]`.
    `reward.score` is never called with an empty list and is not assumed to be collective.
    """

    generator: Generator
    reward: RewardScorer
    token_stats: TokenStats | None = None
    """Exact per-token (max_prob, entropy) of responses under the current policy; token_adaptive only."""
    all_reduce_sum: Callable[[list[float]], list[float]] = _identity
    """Element-wise sum of a small vector over DP ranks, the same result on every rank.
    The identity (default) is the single-process case; the trainer passes a torch.distributed one."""
    final_rewards: Callable[[list[Rollout]], list[float]] | None = None
    """Each rollout's reward after the in-reward KL penalty (algorithm.use_kl_in_reward: score - beta *
    sum of its token KLs to the reference); a forward of the policy and the reference, so collective like
    token_stats. None without KL in the reward: the final reward is the reward."""
    next_prompts: Callable[[int], list[Prompt]] | None = None
    """`next_prompts(k)`: the next k prompts of this rank's data stream (advances the resumable
    data sampler). Only samplers that need more prompts than the first batch call it (filtered)."""

    def global_sum(self, *values: float) -> list[float]:
        """`all_reduce_sum` of a few numbers (one collective call)."""
        return self.all_reduce_sum([float(v) for v in values])


class Sampler(abc.ABC):
    """Base class of every sampler (built-ins and `pkg.module:ClassName` user samplers).

    Constructed by `build_sampler` as `cls(cfg, n=..., temperature=..., train_batch_size=...,
    gen_batch_size=..., max_tokens=...)`, where `cfg` is the `[sampler]` section (a subclass reads
    only its own sub-section, e.g. `cfg.adaptive`). `train_batch_size` and `gen_batch_size` count
    prompts (groups) for THIS rank: the trainer divides the global sizes by the DP size.
    """

    def __init__(
        self,
        cfg,
        *,
        n: int,
        temperature: float,
        train_batch_size: int,
        gen_batch_size: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if n < 1 or train_batch_size < 1:
            raise ValueError(f"sampler needs n >= 1 and train_batch_size >= 1, got n={n}, "
                             f"train_batch_size={train_batch_size}")
        self.cfg = cfg
        self.n = n
        self.temperature = temperature
        self.train_batch_size = train_batch_size
        self.gen_batch_size = gen_batch_size if gen_batch_size is not None else train_batch_size
        self.max_tokens = max_tokens
        """The generator's response-length limit, if known; continuations get what remains of it."""

    @property
    def num_prompts(self) -> int:
        """How many prompts the trainer should pass as the first argument of `sample`."""
        return self.train_batch_size

    @abc.abstractmethod
    def sample(self, prompts: list[Prompt], ctx: SamplerContext) -> tuple[RolloutBatch, dict[str, float]]:
        """Generate, score and select rollouts for `prompts`.

        Returns the rollouts (group id = the prompt's uid; groups may vary in size) with rewards and
        extras set, and a flat metrics dict (this rank's values unless a docstring says global).
        """

    def global_metrics(self, rollouts: Sequence[Rollout], local: dict[str, float]) -> dict[str, float]:
        """The step's metrics over ALL data-parallel ranks, from `rollouts` (every rank's batch,
        gathered by the trainer) and this rank's `local` metrics. The default recomputes the
        common counts; samplers whose metrics describe the batch recompute those too."""
        return {**local, **common_metrics(RolloutBatch(list(rollouts)))}


# ---------------------------------------------------------------- helpers shared by samplers


def make_rollout(prompt: Prompt, completion: Completion) -> Rollout:
    """A rollout of `prompt` whose response is one completion, grouped by the prompt's uid."""
    assert len(completion.logprobs) == len(completion.token_ids), "generator must return one logprob per token"
    return Rollout(
        prompt_ids=list(prompt.prompt_ids),
        response_ids=list(completion.token_ids),
        rollout_logprobs=list(completion.logprobs),
        group_id=prompt.uid,
        finish_reason=completion.finish_reason,
        prompt=prompt,
    )


def generate_groups(
    ctx: SamplerContext, prompts: Sequence[Prompt], counts: Sequence[int], temperature: float
) -> list[list[Rollout]]:
    """ONE generator call: `counts[i]` completions of `prompts[i]`, returned as unscored rollouts."""
    requests = [GenerationRequest(list(p.prompt_ids), n=k, temperature=temperature) for p, k in zip(prompts, counts)]
    outputs = ctx.generator.generate(requests)
    assert len(outputs) == len(requests), "generator must answer every request"
    groups = []
    for prompt, k, completions in zip(prompts, counts, outputs):
        assert len(completions) == k, f"generator returned {len(completions)} completions, asked for {k}"
        groups.append([make_rollout(prompt, c) for c in completions])
    return groups


def score_rollouts(ctx: SamplerContext, rollouts: Sequence[Rollout]) -> None:
    """Score `rollouts` in one reward call (none if empty) and store reward and extras on each."""
    if not rollouts:
        return
    results = ctx.reward.score(rollouts)
    assert len(results) == len(rollouts), "reward must return one result per rollout"
    for rollout, result in zip(rollouts, results):
        rollout.reward = float(result.score)
        rollout.extras = dict(result.extras)


def common_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Metrics every sampler reports: rollouts and groups in the returned batch (this rank)."""
    return {
        "sampler/num_rollouts": float(len(batch)),
        "sampler/num_groups": float(len(set(batch.group_ids))),
    }
