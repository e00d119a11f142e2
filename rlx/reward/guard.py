"""The reward failure guard: stops a run whose reward function keeps failing, instead of training
on zero rewards forever. Torch-free; the scorer feeds it, the trainer closes each step.
"""

from __future__ import annotations

from rlx.errors import UserError

_MAX_ERROR_CHARS = 300


class RewardFailureError(UserError):
    """The reward function failed on too many rollouts for too long (see RewardFailureGuard)."""


class RewardFailureGuard:
    """Counts reward failures (errors, timeouts, invalid values) per reward call and per step.

    A call or a step *fails* when more than `max_failure_fraction` of its rollouts failed. The run
    stops with a `RewardFailureError` naming the function and the first error of the streak when
    `max_failed_steps` steps in a row failed (`end_step`, with the step's counts over all ranks, so
    every rank stops together), or when `max_failed_steps` reward calls in a row failed (`observe`:
    a safety net for samplers that call the reward many times per step and would otherwise never
    finish a step whose rewards are all failures, e.g. `filtered` with max_num_gen_batches = 0).
    With one call per step (the fixed sampler) both rules count the same thing.
    """

    def __init__(self, fn_name: str, max_failure_fraction: float = 0.5, max_failed_steps: int = 3):
        if not 0.0 <= max_failure_fraction <= 1.0 or max_failed_steps < 1:
            raise ValueError(f"need 0 <= max_failure_fraction <= 1 and max_failed_steps >= 1, got "
                             f"{max_failure_fraction}, {max_failed_steps}")  # fmt: skip
        self.fn_name = fn_name
        self.max_failure_fraction = float(max_failure_fraction)
        self.max_failed_steps = int(max_failed_steps)
        self.failed_steps = 0
        """Consecutive failing steps so far."""
        self.failed_calls = 0
        """Consecutive failing reward calls so far."""
        self.first_error: str | None = None
        """The first error message of the current streak of failing calls or steps."""
        self._step_error: str | None = None  # the first error of the current step

    def _fails(self, failures: float, total: float) -> bool:
        return total > 0 and failures / total > self.max_failure_fraction

    def observe(self, failures: int, total: int, first_error: str | None) -> None:
        """One reward call: `failures` of `total` rollouts failed, the first with `first_error`."""
        if failures and self._step_error is None:
            self._step_error = first_error
        if self._fails(failures, total):
            self.first_error = self.first_error or first_error
            self.failed_calls += 1
            if self.failed_calls >= self.max_failed_steps:
                self._stop(f"{self.failed_calls} reward calls in a row", failures / total)
        elif total > 0:
            self.failed_calls = 0

    def end_step(self, failures: float, total: float) -> dict[str, float]:
        """Close a step with its failure counts (summed over data-parallel ranks by the caller,
        identical on every rank). Returns `reward/failure_fraction` and `reward/failed_steps`;
        raises `RewardFailureError` once max_failed_steps steps in a row failed."""
        fraction = failures / total if total > 0 else 0.0
        if self._fails(failures, total):
            self.first_error = self.first_error or self._step_error
            self.failed_steps += 1
        elif total > 0:
            self.failed_steps = 0
            if self.failed_calls == 0:
                self.first_error = None  # the streak is over
        self._step_error = None
        if self.failed_steps >= self.max_failed_steps:
            self._stop(f"{self.failed_steps} steps in a row", fraction)
        return {"reward/failure_fraction": fraction, "reward/failed_steps": float(self.failed_steps)}

    def _stop(self, span: str, fraction: float) -> None:
        error = " ".join((self.first_error or "no error message").split())
        if len(error) > _MAX_ERROR_CHARS:
            error = error[: _MAX_ERROR_CHARS - 3] + "..."
        raise RewardFailureError(
            f"reward function {self.fn_name!r} failed on more than reward.max_failure_fraction="
            f"{self.max_failure_fraction:g} of the rollouts for {span} (last: {fraction:.0%}); first error: {error}. "
            "Fix the function (try it on a few responses by hand), or raise reward.max_failure_fraction / "
            "reward.max_failed_steps"
        )
