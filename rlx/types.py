"""Small data types shared between stages: prompts, generation requests, completions, rollouts.

Stages never import each other; they meet through these types (DESIGN.md section 1). The module
is torch-free except for `RolloutBatch.to_tensors`, which imports torch lazily.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Prompt:
    """One prompt from the dataset, already tokenized (chat template applied)."""

    prompt_ids: list[int]
    uid: Hashable
    """Stable id of the prompt (dataset index); rollouts of one prompt share it as their group."""
    ground_truth: Any = None
    """What the reward function checks the response against (answer string, number, ...)."""
    text: str = ""
    """The prompt as text (after the chat template), for reward functions and logs."""
    data: dict = field(default_factory=dict)
    """The raw dataset record, for user reward functions that need more fields."""


@dataclass
class GenerationRequest:
    """Ask the generator for `n` completions of one prompt. None means: the generator's default."""

    prompt_ids: list[int]
    n: int = 1
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


@dataclass
class Completion:
    """One sampled continuation: token ids, the sampled tokens' logprobs, and why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    """Log-probability of each sampled token under the sampling distribution (after temperature)."""
    finish_reason: str = "stop"
    """'stop' (EOS or a stop string), 'length' (max_tokens) or 'abort'."""


@dataclass
class RewardResult:
    """A reward function's answer for one rollout: a score and named extras (e.g. `acc`)."""

    score: float
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class Rollout:
    """One prompt + one response, with everything the loss stage needs."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    group_id: Hashable
    """Rollouts with the same group id form one advantage group (GRPO/RLOO baselines)."""
    reward: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "stop"
    response_mask: list[int] | None = None
    """1 for response tokens that are trained on; None means all of them."""
    prompt: Prompt | None = None

    @property
    def mask(self) -> list[int]:
        return self.response_mask if self.response_mask is not None else [1] * len(self.response_ids)


@dataclass
class RolloutBatch:
    """What the sampler stage hands to the trainer: a list of rollouts (groups may vary in size)."""

    rollouts: list[Rollout]

    def __len__(self) -> int:
        return len(self.rollouts)

    @property
    def group_ids(self) -> list[Hashable]:
        return [r.group_id for r in self.rollouts]

    def extend(self, other: RolloutBatch | Sequence[Rollout]) -> None:
        self.rollouts.extend(other.rollouts if isinstance(other, RolloutBatch) else other)

    def to_tensors(self) -> dict[str, Any]:
        """The loss stage's `[B, T]` tensors (T = the longest response, right padded with zeros):
        `response_mask`, `rollout_log_probs` and `token_level_rewards` (the reward on the last
        trained response token, verl's convention), plus `group_ids` (list)."""
        import torch

        B = len(self.rollouts)
        T = max((len(r.response_ids) for r in self.rollouts), default=0)
        mask = torch.zeros((B, T), dtype=torch.float32)
        logprobs = torch.zeros((B, T), dtype=torch.float32)
        rewards = torch.zeros((B, T), dtype=torch.float32)
        for i, r in enumerate(self.rollouts):
            L = len(r.response_ids)
            if not L:
                continue
            m = r.mask
            mask[i, :L] = torch.tensor(m, dtype=torch.float32)
            logprobs[i, :L] = torch.tensor(r.rollout_logprobs, dtype=torch.float32)
            last = max((t for t, keep in enumerate(m) if keep), default=None)
            if last is not None:
                rewards[i, last] = r.reward
        return {
            "response_mask": mask,
            "rollout_log_probs": logprobs,
            "token_level_rewards": rewards,
            "group_ids": self.group_ids,
        }


class Generator(Protocol):
    """What samplers need from a generator (the vLLM backend, or a scripted fake in tests)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """One list of `request.n` completions per request, in request order."""
        ...


class RewardScorer(Protocol):
    """What samplers need from the reward stage: score many rollouts in one call."""

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        """One result per rollout, in order. Failures are scored 0 and counted, never raised."""
        ...


class TokenStats(Protocol):
    """Exact per-token statistics of responses under the current policy (trainer forward)."""

    def __call__(self, rollouts: Sequence[Rollout]) -> list[tuple[list[float], list[float]]]:
        """For each rollout, (max_prob per response token, entropy per response token)."""
        ...
