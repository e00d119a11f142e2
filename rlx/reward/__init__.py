"""Reward stage: reward functions (built-ins or a user import path) and the pools that run them.

`build_reward(cfg.reward, tokenizer)` returns a `RewardScorer` whose `score(rollouts)` decodes the
responses and scores them in batches, on a local process pool, on Ray or inline.

Reward-function contract
------------------------
    fn(response: str, ground_truth, **kwargs) -> float | dict

- `response` is the decoded response (special tokens skipped); `ground_truth` is the prompt's
  answer (`Prompt.ground_truth`, None for a rollout without a prompt); `kwargs` are
  `reward.kwargs`. A function that names a parameter `prompt` also gets the prompt text (after
  the chat template), one that names `data` gets the raw dataset record.
- Return a number (the score) or a dict with a numeric `score` plus extras. Extras with finite
  numeric values (bools count) are kept as floats, anything else (strings such as a parsed
  prediction) is dropped.
- `acc` rule: the extra `acc` is what the function returns; when it returns none,
  `acc = float(score >= 1.0)` (a rollout is "accurate" when it earns the full reward, so partial
  or format rewards below 1.0 do not count as correct).
- A call that raises (any exception, KeyboardInterrupt, SystemExit and asyncio.CancelledError
  included), runs past `reward.timeout_s`, or returns anything else (None, NaN, inf, a string, a
  dict without `score`) scores 0 with `acc` 0, is counted (`reward/failures`, split into
  `reward/errors`, `reward/timeouts`, `reward/invalid`) and logged in one warning line per call
  naming the function and the first error. It never raises into the trainer, with one exception:
- Failure guard: when more than `reward.max_failure_fraction` of the rollouts fail for
  `reward.max_failed_steps` steps (or reward calls) in a row, the run stops with one line naming
  the function and its first error (`RewardFailureError`, a UserError). The trainer closes each
  step with `scorer.end_step(failures, num_scored)` (counts over all ranks).

Isolation: reward code runs with the trainer's user, environment variables and files. The process
backend runs it in separate processes that die with the trainer (even on SIGKILL), under optional
limits: `reward.worker_memory_mb` (address space per worker) and `reward.worker_cpu_seconds` (CPU
time per reward call). It is not a sandbox: run untrusted reward code in a container.

`reward.fn` is `math`, `exact_match`, `quickstart` (see `builtins`) or `pkg.module:function`.
Process-pool workers are spawned, so they start with the trainer's `sys.path` copied in: a module
importable in the trainer (installed, on PYTHONPATH, or added to `sys.path` before
`build_reward`) is importable in the workers. A function may carry a `warmup()` attribute (slow
imports, loading a verifier): each pool worker calls it once at start, outside the timeout. An import path that does not resolve raises
`rlx.errors.UserError` naming it, when the scorer is built.
"""

from __future__ import annotations

from typing import Any

from rlx.errors import UserError
from rlx.reward.builtins import REWARD_FNS, resolve_reward_fn
from rlx.reward.guard import RewardFailureError, RewardFailureGuard
from rlx.reward.ray_pool import RayScorer
from rlx.reward.scorer import InlineScorer, ProcessScorer, normalize_reward

__all__ = [
    "REWARD_FNS",
    "InlineScorer",
    "ProcessScorer",
    "RayScorer",
    "RewardFailureError",
    "RewardFailureGuard",
    "build_reward",
    "check_reward",
    "normalize_reward",
    "resolve_reward_fn",
]


BACKENDS = ("process", "ray", "inline")


def check_reward(cfg: Any) -> None:
    """What `build_reward` would refuse, without starting anything: an unknown backend, a missing
    package, a function that does not import. For checking a run's inputs before slow work."""
    fn, backend = cfg.fn, getattr(cfg, "backend", "process")
    if backend not in BACKENDS:
        raise UserError(f"reward.backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if fn == "math":
        try:
            import math_verify  # noqa: F401
        except ImportError as e:
            raise UserError("reward.fn='math' needs the math-verify package: pip install 'rlx[math]'") from e
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise UserError("reward.backend='ray' needs ray: pip install 'rlx[ray]'") from e
    resolve_reward_fn(fn)


def build_reward(cfg: Any, tokenizer: Any) -> InlineScorer | ProcessScorer | RayScorer:
    """The scorer for a `RewardConfig` (`fn`, `backend`, `num_workers`, `timeout_s`,
    `ray_address`, `kwargs`, `max_failure_fraction`, `max_failed_steps`, `worker_memory_mb`,
    `worker_cpu_seconds`). `tokenizer` needs `decode(ids, skip_special_tokens=True)` (or
    `batch_decode`). Call `close()` when done (the process pool's workers stop)."""
    check_reward(cfg)
    fn, backend = cfg.fn, getattr(cfg, "backend", "process")
    kwargs = dict(getattr(cfg, "kwargs", None) or {})
    timeout_s = float(getattr(cfg, "timeout_s", 10.0))
    num_workers = int(getattr(cfg, "num_workers", 2))
    guard = RewardFailureGuard(fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn)),
                               float(getattr(cfg, "max_failure_fraction", 0.5)), int(getattr(cfg, "max_failed_steps", 3)))  # fmt: skip
    if backend == "inline":
        return InlineScorer(fn, tokenizer, kwargs, timeout_s, guard=guard)
    if backend == "process":
        return ProcessScorer(fn, tokenizer, kwargs, timeout_s, num_workers, guard=guard,
                             memory_mb=int(getattr(cfg, "worker_memory_mb", 0)),
                             cpu_seconds=int(getattr(cfg, "worker_cpu_seconds", 0)))  # fmt: skip
    return RayScorer(fn, tokenizer, kwargs, timeout_s, num_workers, getattr(cfg, "ray_address", "") or "", guard=guard)
