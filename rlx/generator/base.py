"""Backend-independent parts of the generator stage: engine layout over ranks, prompt-length
filtering, RNG isolation and counters. The vLLM backend (vllm_backend.py) builds on these.

Layout: one engine per trainer rank. Consecutive ranks form one generator tensor-parallel group
(vLLM's external_launcher layout: TP groups [0..tp-1], [tp..2tp-1], ...); each group is one
data-parallel generator replica with index `rank // tp`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rlx.errors import UserError
from rlx.types import Completion, GenerationRequest

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class GeneratorLayout:
    """Where this process sits among the colocated engines (ranks of the trainer's world)."""

    rank: int = 0
    world_size: int = 1
    tp: int = 1
    """Generator tensor-parallel size: ranks [k*tp, (k+1)*tp) share one engine replica."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world_size % self.tp != 0:
            raise UserError(
                f"generator.tp={self.tp} must divide the number of ranks ({self.world_size})"
            )

    @classmethod
    def from_process_group(cls, tp: int) -> GeneratorLayout:
        """The layout over torch.distributed's default group (one rank if it is not initialized)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), tp)
        return cls(0, 1, tp)

    @property
    def dp_index(self) -> int:
        """Index of this rank's engine replica; ranks of one TP group share it."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        """Number of independent engine replicas."""
        return self.world_size // self.tp

    @property
    def tp_group_rank(self) -> int:
        """This rank's position inside its generator TP group."""
        return self.rank % self.tp

    def shard(self, items: Sequence[T]) -> list[T]:
        """This replica's share of `items` (strided), identical on all ranks of the TP group.

        Every rank passes the same global list; TP peers get the same slice, so they submit
        identical requests in the same order, as vLLM's TP engines require."""
        return list(items[self.dp_index :: self.dp_size])


class EngineLayoutMixin:
    """What both engines share: `dp_index`, `dp_size`, `tp_group_rank` read from their `layout`, the
    checked limits (`_set_limits`), the admission of a generate call's requests (`_admit`) and its
    counters (`_count`)."""

    layout: GeneratorLayout
    is_sleeping: bool
    max_prompt_length: int
    max_model_len: int
    _counters: dict[str, float]
    _last_tokens_per_second: float

    def _set_limits(self, cfg: Any, layout: GeneratorLayout, max_prompt_length: int) -> None:
        """cfg, layout and the length limits, checked (the layout's TP is generator.tp)."""
        if layout.tp != cfg.tp:
            raise UserError(f"layout.tp={layout.tp} differs from generator.tp={cfg.tp}")
        self.cfg, self.layout, self.max_prompt_length = cfg, layout, max_prompt_length
        self.max_model_len = check_max_lengths(max_prompt_length, cfg.max_tokens, cfg.max_model_len)

    def _admit(self, requests: Sequence[GenerationRequest]) -> tuple[list[int], list[list[Completion]]]:
        """(indices of the requests to generate, one empty result list per request). Prompts that are
        empty or longer than max_prompt_length never reach the engine: a warning, and they count in
        `generator/dropped_prompts`. An engine asleep refuses to generate."""
        if self.is_sleeping:
            raise RuntimeError("the generator is asleep: call wake_up() before generate()")
        keep, drop = split_by_prompt_length(requests, self.max_prompt_length, self.max_model_len)
        if drop:
            logger.warning("generator: dropped %d of %d prompts (empty or longer than max_prompt_length=%d)",
                           len(drop), len(requests), self.max_prompt_length)  # fmt: skip
        self._counters["dropped_prompts"] += len(drop)
        return keep, [[] for _ in requests]

    def _count(self, keep: list[int], results: list[list[Completion]], num_tokens: int, seconds: float) -> None:
        """Add one generate call to the counters `metrics()` reports."""
        self._counters["prompts"] += len(keep)
        self._counters["completions"] += sum(len(results[i]) for i in keep)
        self._counters["tokens"] += num_tokens
        self._counters["seconds"] += seconds
        self._last_tokens_per_second = num_tokens / max(seconds, 1e-9)

    @property
    def dp_index(self) -> int:
        return self.layout.dp_index

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    @property
    def tp_group_rank(self) -> int:
        return self.layout.tp_group_rank


def split_by_prompt_length(
    requests: Sequence[GenerationRequest], max_prompt_length: int, max_model_len: int | None = None
) -> tuple[list[int], list[int]]:
    """Indices of requests to keep and to drop (empty prompt, or longer than the limit).

    A request that sets its own `max_tokens` (a continuation of a truncated rollout: prompt +
    kept prefix) may exceed `max_prompt_length` as long as it fits the engine's context with
    its max_tokens, `max_model_len`."""
    keep, drop = [], []
    for i, r in enumerate(requests):
        n = len(r.prompt_ids)
        ok = 0 < n <= max_prompt_length
        if not ok and max_model_len is not None and r.max_tokens is not None:
            ok = 0 < n and n + max(r.max_tokens, 1) <= max_model_len
        (keep if ok else drop).append(i)
    return keep, drop


@dataclass
class RngState:
    """Snapshot of the process-global RNGs that vLLM seeds and samples from."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    python: Any
    numpy: Any

    @classmethod
    def capture(cls) -> RngState:
        import numpy as np

        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, random.getstate(), np.random.get_state())

    def restore(self) -> None:
        import numpy as np

        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


class RngSwap:
    """Keeps the engine's RNG stream apart from the trainer's.

    vLLM seeds the global RNGs when the engine is created and unseeded requests sample from
    them. `with swap:` installs the engine's stream, and on exit saves where the engine left it
    and puts the trainer's state back, so generation neither disturbs the trainer nor replays the
    same random numbers on every call."""

    def __init__(self) -> None:
        self.engine_state: RngState | None = None

    def reseed(self, seed: int) -> None:
        """Restart the engine's stream from `seed` (trainer state untouched). The trainer reseeds
        every step from (seed, step, replica), so a resumed run samples what an uninterrupted one
        would have, instead of replaying the stream from engine creation."""
        import numpy as np

        with self.engine():
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)

    @contextmanager
    def engine(self):
        trainer_state = RngState.capture()
        if self.engine_state is not None:
            self.engine_state.restore()
        try:
            yield
        finally:
            self.engine_state = RngState.capture()
            trainer_state.restore()


class TorchThreads:
    """Keeps the trainer's torch intra-op thread count across a CPU engine's construction.

    vLLM's CPU worker replaces `torch.set_num_threads` with a no-op while the engine is built (and
    serving code may lower the count to 1); `with TorchThreads().building():` puts back both the
    function and the count, so training and generation keep every core. Measured on 2 cores:
    generation at 1 thread was no faster than at 2 (one call per step, 512 sequences)."""

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()

    @contextmanager
    def building(self):
        set_num_threads = torch.set_num_threads
        try:
            yield
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(self.threads)


def check_max_lengths(max_prompt_length: int, max_tokens: int, max_model_len: int) -> int:
    """The engine's context length: `max_model_len`, or prompt + response limits when it is 0."""
    if max_prompt_length < 1:
        raise UserError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    derived = max_prompt_length + max_tokens
    if max_model_len == 0:
        return derived
    if max_model_len < derived:
        raise UserError(
            f"generator.max_model_len={max_model_len} is shorter than max_prompt_length + "
            f"generator.max_tokens = {derived}; raise it or set it to 0 to derive it"
        )
    return max_model_len
