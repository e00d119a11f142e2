"""The token-adaptive sampler: cut rollouts where the policy becomes uncertain, resample from there.

Compute goes to the hard segments of a reasoning trace: a rollout is truncated at its first
uncertain token and the prefix before it is resampled at a higher temperature.

Algorithm (`[sampler.token_adaptive]`: uncertainty_threshold u, entropy_threshold e,
min_prefix_length m, max_resamples_per_prefix R, adaptive_temperature_scale s, target_rollouts T
(0 = the generator's n)):

1. Generate n rollouts per prompt at the base temperature t0 and get each response token's exact
   max-prob and entropy from `ctx.token_stats` (the trainer's forward over the full vocabulary).
2. Failure point: the first response position i >= max(m, 1) with max_prob[i] < u or
   entropy[i] > e (position 0 never counts: a piece keeps at least one token).
   The rollout is truncated BEFORE token i: the kept piece is response[:i] (the failing token is
   dropped) and it stays in the batch. Why drop it: token i was drawn from the uncertain
   distribution; resampling from response[:i] re-draws exactly that decision, which is the fork we
   want to explore. (Keeping it would only explore what follows an already made uncertain choice.)
3. Retry round k = 1..R (one generator call for all prompts): each pending failure gets one more
   attempt at temperature t0 * s**k. Where the attempt starts is `resample_from`:
   - "failure_prefix" (default; seed 003's "maximum resamples from the same prefix"): always from
     the ORIGINAL truncation point, prompt + piece_0. R is the number of attempts at that one hard
     segment; an attempt that fails again is truncated and kept, and the next round tries the same
     prefix again, until an attempt completes or R attempts are spent.
   - "latest_piece": from the previous attempt's own truncation, so one original truncation starts a
     CHAIN of growing prefixes with at most R links.
   In an attempt the scan starts after the re-drawn token at the prefix end: that token's
   distribution is the prefix's (already known to be uncertain) and would always fail again.
4. T counts COMPLETE rollouts (not truncated) per prompt: before a round, a prompt launches at most
   T - complete of its pending chains (oldest first); the others stop there. Resampling for a
   prompt therefore stops at the target; with the default T = n, every truncation can be replaced
   by a completed continuation.

Representation: a continuation is a Rollout of the ORIGINAL prompt with response_ids = prefix +
continuation and a response mask over the continuation tokens only (rollout logprobs of the prefix
are copied from the piece it extends; they are masked). The prefix tokens are already trained in
the piece that produced them, so masking them here means every sampled token is trained exactly
once: a chain (piece, piece, ..., end) is one trajectory split in segments, no prefix gradient is
double-counted, and the reward function still sees the whole response. All rollouts keep the
prompt's uid as group id, so GRPO compares continuations with the prompt's other rollouts.

Rewards: a truncated piece has no final answer, and scoring it as-is would punish a prefix for a
cut the sampler made. So every piece of a chain gets the chain's OUTCOME: the reward (and extras)
of the complete continuation that ends the chain, i.e. a one-sample Monte-Carlo value of the
prefix. A chain that never completes (retry budget spent, or the prompt reached T) is scored on its
longest piece like a response cut at max_tokens, and its pieces share that score. The reward
function is called once per step, on complete rollouts and unfinished chain ends only. Trade-off:
a chain of k pieces enters its group's mean/std k times (the method's emphasis on hard prompts).
Continuations are sampled at a raised temperature; their rollout logprobs are of that
distribution, which rollout correction accounts for when enabled.

Pieces have finish_reason "truncated". Metrics (this rank), `adaptive/`: truncation_rate
(truncated / total), resample_rate (continuations / total), avg_failure_point (mean response
position of the failure points, 0 if none), total_rollouts (every rollout in the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlx.sampler.base import Sampler, SamplerContext, common_metrics, generate_groups, score_rollouts
from rlx.types import GenerationRequest, Prompt, Rollout, RolloutBatch

TRUNCATED = "truncated"


def first_failure_point(max_probs: Sequence[float], entropies: Sequence[float], start: int,
                        uncertainty_threshold: float, entropy_threshold: float) -> int | None:
    """The first position i >= start with max_prob < uncertainty_threshold or entropy > entropy_threshold."""
    for i in range(start, len(max_probs)):
        if max_probs[i] < uncertainty_threshold or entropies[i] > entropy_threshold:
            return i
    return None


def truncate(rollout: Rollout, at: int, trained_from: int) -> Rollout:
    """The piece response[:at] of `rollout`, trained on positions [trained_from, at)."""
    assert trained_from < at <= len(rollout.response_ids)
    mask = None if trained_from == 0 else [0] * trained_from + [1] * (at - trained_from)
    return Rollout(
        prompt_ids=rollout.prompt_ids,
        response_ids=rollout.response_ids[:at],
        rollout_logprobs=rollout.rollout_logprobs[:at],
        group_id=rollout.group_id,
        finish_reason=TRUNCATED,
        response_mask=mask,
        prompt=rollout.prompt,
    )


@dataclass
class _Chain:
    """The pieces cut from one original rollout and its continuations; they share one outcome."""

    prompt_index: int
    pieces: list[Rollout]
    end: Rollout | None = None
    """The complete continuation that finished the chain; None while pending or if it never did."""


class _Ledger:
    """Book-keeping of one `sample` call: every kept rollout by prompt, complete ones, chains."""

    def __init__(self, num_prompts: int) -> None:
        self.per_prompt: list[list[Rollout]] = [[] for _ in range(num_prompts)]
        self.complete: list[list[Rollout]] = [[] for _ in range(num_prompts)]
        self.chains: list[_Chain] = []
        self.pending: list[_Chain] = []
        """Chains whose last piece was cut in the latest round (candidates for the next one)."""

    def add(self, i: int, rollout: Rollout, failure: int | None, trained_from: int, chain: _Chain | None) -> None:
        """File a fresh rollout of prompt i: complete (ends `chain`) or truncated (starts/extends one).

        `trained_from` is the prefix length of a continuation (0 for an original rollout).
        """
        if failure is None:
            if trained_from:  # a continuation: the response mask covers only the new tokens
                rollout.response_mask = [0] * trained_from + [1] * (len(rollout.response_ids) - trained_from)
            if chain is not None:
                chain.end = rollout
            self.complete[i].append(rollout)
            self.per_prompt[i].append(rollout)
            return
        piece = truncate(rollout, failure, trained_from)
        self.per_prompt[i].append(piece)
        if chain is None:
            chain = _Chain(i, [])
            self.chains.append(chain)
        chain.pieces.append(piece)
        self.pending.append(chain)


class TokenAdaptiveSampler(Sampler):
    """Truncate at uncertain tokens and resample from the prefix; reads `cfg.token_adaptive`."""

    def __init__(self, cfg, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        t = cfg.token_adaptive
        self.uncertainty_threshold = float(t.uncertainty_threshold)
        self.entropy_threshold = float(t.entropy_threshold)
        self.min_prefix_length = int(t.min_prefix_length)
        self.max_resamples = int(t.max_resamples_per_prefix)
        self.temperature_scale = float(t.adaptive_temperature_scale)
        self.resample_from = str(t.resample_from)
        if self.resample_from not in ("failure_prefix", "latest_piece"):
            raise ValueError(f"resample_from={self.resample_from!r}: choose 'failure_prefix' or 'latest_piece'")
        self.target = int(t.target_rollouts)
        if self.target < 1:
            raise ValueError("sampler.token_adaptive.target_rollouts must be >= 1 (Config.resolved() sets 0 to generator.n)")

    def _base(self, chain: _Chain) -> Rollout:
        """The piece the next attempt of `chain` continues from."""
        return chain.pieces[0] if self.resample_from == "failure_prefix" else chain.pieces[-1]

    def _failure(self, stats: tuple[list[float], list[float]], rollout: Rollout, start: int) -> int | None:
        max_probs, entropies = stats
        assert len(max_probs) == len(entropies) == len(rollout.response_ids), "token_stats: one value per token"
        # Position 0 is never a failure point: a piece must keep at least one token.
        start = max(start, self.min_prefix_length, 1)
        return first_failure_point(max_probs, entropies, start, self.uncertainty_threshold, self.entropy_threshold)

    def sample(self, prompts: list[Prompt], ctx: SamplerContext) -> tuple[RolloutBatch, dict[str, float]]:
        if ctx.token_stats is None:
            raise ValueError("the token_adaptive sampler needs SamplerContext(token_stats=...) (the trainer's forward)")
        book = _Ledger(len(prompts))

        # Round 0: n rollouts per prompt at the base temperature.
        groups = generate_groups(ctx, prompts, [self.n] * len(prompts), self.temperature)
        initial = [(i, r) for i, g in enumerate(groups) for r in g]
        stats = ctx.token_stats([r for _, r in initial])
        for (i, rollout), st in zip(initial, stats, strict=True):
            book.add(i, rollout, self._failure(st, rollout, start=0), 0, None)

        num_resamples = 0
        for retry in range(1, self.max_resamples + 1):
            launch = self._select(book.pending, book.complete)
            book.pending = []  # chains not launched now stop here (their prompt reached the target)
            # Collective: every rank runs the same rounds (generator / token_stats may be collective).
            if ctx.global_sum(len(launch))[0] == 0:
                break
            continuations = self._continue(ctx, launch, self.temperature * self.temperature_scale**retry)
            num_resamples += len(continuations)
            stats = ctx.token_stats(continuations)
            for chain, rollout, st in zip(launch, continuations, stats, strict=True):
                prefix_len = len(self._base(chain).response_ids)
                # Skip the re-drawn token at prefix_len: its distribution is the uncertain one we cut at.
                failure = self._failure(st, rollout, start=prefix_len + 1)
                book.add(chain.prompt_index, rollout, failure, prefix_len, chain)

        self._score(ctx, book)
        batch = RolloutBatch([r for rs in book.per_prompt for r in rs])
        return batch, {**common_metrics(batch), **self._metrics(batch, book.chains, num_resamples)}

    def _select(self, pending: list[_Chain], complete: list[list[Rollout]]) -> list[_Chain]:
        """Pending chains to continue this round: per prompt, oldest first, up to T - complete."""
        room = [max(0, self.target - len(c)) for c in complete]
        launch = []
        for chain in pending:
            if room[chain.prompt_index] > 0:
                room[chain.prompt_index] -= 1
                launch.append(chain)
        return launch

    def _continue(self, ctx: SamplerContext, launch: list[_Chain], temperature: float) -> list[Rollout]:
        """ONE generator call: one continuation of each chain's base piece, as a rollout of the prompt."""
        requests = []
        for chain in launch:
            piece = self._base(chain)
            max_tokens = None if self.max_tokens is None else max(1, self.max_tokens - len(piece.response_ids))
            requests.append(GenerationRequest(piece.prompt_ids + piece.response_ids, n=1,
                                              temperature=temperature, max_tokens=max_tokens))
        outputs = ctx.generator.generate(requests)
        assert len(outputs) == len(requests), "generator must answer every request"
        rollouts = []
        for chain, completions in zip(launch, outputs):
            assert len(completions) == 1, "generator must return n=1 completion per continuation request"
            completion, piece = completions[0], self._base(chain)
            rollouts.append(Rollout(
                prompt_ids=piece.prompt_ids,
                response_ids=piece.response_ids + list(completion.token_ids),
                rollout_logprobs=piece.rollout_logprobs + list(completion.logprobs),
                group_id=piece.group_id,
                finish_reason=completion.finish_reason,
                prompt=piece.prompt,
            ))
        return rollouts

    def _score(self, ctx: SamplerContext, book: _Ledger) -> None:
        """One reward call for complete rollouts and unfinished chain ends; pieces inherit the outcome."""
        unfinished = {id(c): max(c.pieces, key=lambda p: len(p.response_ids)) for c in book.chains if c.end is None}
        score_rollouts(ctx, [r for rs in book.complete for r in rs] + list(unfinished.values()))
        for chain in book.chains:
            outcome = chain.end if chain.end is not None else unfinished[id(chain)]
            for piece in chain.pieces:
                piece.reward, piece.extras = outcome.reward, dict(outcome.extras)

    def global_metrics(self, rollouts, local: dict[str, float]) -> dict[str, float]:
        # From the rollouts alone: a truncated piece has finish_reason "truncated" and its response
        # length is its failure point; a continuation's mask starts with its untrained prefix.
        failure_points = [len(r.response_ids) for r in rollouts if r.finish_reason == "truncated"]
        num_resamples = sum(1 for r in rollouts if r.response_mask is not None and r.mask[:1] == [0])
        return {**super().global_metrics(rollouts, local), **_rate_metrics(len(rollouts), failure_points, num_resamples)}

    def _metrics(self, batch: RolloutBatch, chains: list[_Chain], num_resamples: int) -> dict[str, float]:
        failure_points = [len(p.response_ids) for c in chains for p in c.pieces]
        return _rate_metrics(len(batch), failure_points, num_resamples)


def _rate_metrics(total: int, failure_points: list[int], num_resamples: int) -> dict[str, float]:
    p = "adaptive/"
    return {
        p + "truncation_rate": len(failure_points) / total if total else 0.0,
        p + "resample_rate": num_resamples / total if total else 0.0,
        p + "avg_failure_point": sum(failure_points) / len(failure_points) if failure_points else 0.0,
        p + "total_rollouts": float(total),
    }
