"""Scripted fakes of the stage protocols (generator, reward, token stats, DP all-reduce) for tests.

Fakes over mocks (STYLE.md 12): each one is a tiny deterministic implementation of the protocol in
`rlx.types` that records how it was called, so tests can assert exact call counts and arguments.
Token conventions: a response containing `CORRECT` is scored 1.0 by `FakeReward`; a token
`LOW_PROB` / `HIGH_ENTROPY` was "drawn" with max_prob 0.5 / entropy 3.0 for `FakeTokenStats`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

from rlx.types import Completion, GenerationRequest, Prompt, RewardResult, Rollout

CORRECT, WRONG, FILLER, LOW_PROB, HIGH_ENTROPY = 1, 2, 3, 7, 8


def make_prompts(k: int, start: int = 0) -> list[Prompt]:
    """Prompts uid=start..start+k-1, each one token long: prompt_ids == [1000 + uid]."""
    return [Prompt(prompt_ids=[1000 + i], uid=i, text=f"prompt {i}") for i in range(start, start + k)]


def uid_of(request: GenerationRequest) -> int:
    """The uid of the prompt a request (or a continuation request) starts with."""
    return request.prompt_ids[0] - 1000


def position_logprob(position: int) -> float:
    """The logprob `ScriptedGenerator` reports for a token at absolute sequence position `position`."""
    return -0.001 * (position + 1)


class ScriptedGenerator:
    """`Generator` whose completions come from `script(request, k) -> token ids | Completion`.

    `k` counts the completions already produced for the same `request.prompt_ids` (0, 1, 2, ...),
    so a script can say "the 5th rollout of prompt 3 is correct". Token logprobs encode the
    absolute position in prompt + response (`position_logprob`), so stitched rollouts can be checked.
    """

    def __init__(self, script: Callable[[GenerationRequest, int], Sequence[int] | Completion]):
        self.script = script
        self.calls: list[list[GenerationRequest]] = []
        self._counts: Counter = Counter()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        self.calls.append(list(requests))
        out = []
        for req in requests:
            key = tuple(req.prompt_ids)
            completions = []
            for _ in range(req.n):
                result = self.script(req, self._counts[key])
                self._counts[key] += 1
                if not isinstance(result, Completion):
                    ids = list(result)
                    P = len(req.prompt_ids)
                    result = Completion(ids, [position_logprob(P + j) for j in range(len(ids))], "stop")
                completions.append(result)
            out.append(completions)
        return out

    @property
    def temperatures(self) -> list[list[float | None]]:
        """The temperature of every request, per call."""
        return [[r.temperature for r in call] for call in self.calls]

    @property
    def non_empty_calls(self) -> list[list[GenerationRequest]]:
        return [c for c in self.calls if c]


class FakeReward:
    """`RewardScorer`: `fn(rollout) -> score` (default: 1.0 if CORRECT is in the response), extras {'acc': score}."""

    def __init__(self, fn: Callable[[Rollout], float] | None = None):
        self.fn = fn or (lambda r: 1.0 if CORRECT in r.response_ids else 0.0)
        self.calls: list[list[Rollout]] = []

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        self.calls.append(list(rollouts))
        return [RewardResult(float(s), {"acc": float(s)}) for s in map(self.fn, rollouts)]

    @property
    def scored(self) -> list[Rollout]:
        """Every rollout ever scored, in order."""
        return [r for call in self.calls for r in call]

    def metrics(self) -> dict[str, float]:
        """The scorer's per-step metrics (a pool reports failures and timeouts; the fake has none)."""
        return {}

    def close(self) -> None: ...


class FakeTokenStats:
    """`TokenStats`: per response token, max_prob 0.5 if it is LOW_PROB (else 0.95) and entropy 3.0
    if it is HIGH_ENTROPY (else 0.1). Real stats depend on the prefix only; the fake marks the token
    drawn at an uncertain position, which is what a script needs."""

    def __init__(self):
        self.calls: list[list[Rollout]] = []

    def __call__(self, rollouts: Sequence[Rollout]) -> list[tuple[list[float], list[float]]]:
        self.calls.append(list(rollouts))
        return [([0.5 if t == LOW_PROB else 0.95 for t in r.response_ids],
                 [3.0 if t == HIGH_ENTROPY else 0.1 for t in r.response_ids]) for r in rollouts]


class ThreadedAllReduce:
    """`all_reduce_sum` across `world_size` simulated ranks, one thread each (see `run_ranks`)."""

    def __init__(self, world_size: int, timeout: float = 20.0):
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[list[float]] = [[] for _ in range(world_size)]
        self.num_calls = [0] * world_size

    def for_rank(self, rank: int) -> Callable[[list[float]], list[float]]:
        def all_reduce_sum(values: list[float]) -> list[float]:
            self.num_calls[rank] += 1
            self.slots[rank] = list(values)
            self.barrier.wait()
            total = [sum(column) for column in zip(*self.slots, strict=True)]
            self.barrier.wait()  # nobody overwrites its slot before every rank has read the sum
            return total

        return all_reduce_sum


def run_ranks(reducer: ThreadedAllReduce, fns: Sequence[Callable[[], object]]) -> list[object]:
    """Run fns[rank]() on one thread per rank; return their results or re-raise the first error.

    A failing rank aborts the barrier so the others fail fast instead of waiting for it.
    """
    results: list[object] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def target(rank: int) -> None:
        try:
            results[rank] = fns[rank]()
        except BaseException as e:  # collected and re-raised in the main thread
            errors[rank] = e
            reducer.barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
