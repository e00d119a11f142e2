"""Reward scorers: decode rollouts, run the reward function inline, in a process pool or on Ray.

Failures never raise: a reward that raises (anything, KeyboardInterrupt and CancelledError
included), hangs or returns garbage scores 0 and is counted; only the failure guard (guard.py)
stops a run whose reward keeps failing. Pool workers die with the trainer, even on SIGKILL.
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from rlx.errors import RunStopped, UserError
from rlx.reward.builtins import resolve_reward_fn
from rlx.reward.guard import RewardFailureGuard
from rlx.types import RewardResult, Rollout

try:
    import resource
except ImportError:  # not on POSIX: no per-worker limits
    resource = None

logger = logging.getLogger(__name__)

# One scoring outcome: (status, score, extras, message); status is ok | error | timeout | invalid.
Outcome = tuple[str, float, dict[str, float], str]
# One unit of work: (response text, ground truth, extra keyword arguments for this rollout).
Item = tuple[str, Any, dict[str, Any]]

FAILURE_KINDS = {"error": "reward/errors", "timeout": "reward/timeouts", "invalid": "reward/invalid"}
# A process-pool worker still busy this long after the per-rollout timeout is killed (its SIGALRM
# did not fire: a C extension holding the GIL, or a reward that blocks signals).
_KILL_GRACE_S = 2.0
# Context a reward function may ask for by naming the parameter: prompt text, raw record.
_CONTEXT_PARAMS = ("prompt", "data")


# ---------------------------------------------------------------------------------------------
# Scoring items (runs in the trainer, a pool worker or a Ray worker)


class _RewardTimeout(BaseException):
    """Raised by SIGALRM inside a reward call; a BaseException so `except Exception` cannot swallow it."""


class _RewardCpuLimit(BaseException):
    """Raised by SIGXCPU inside a reward call in a pool worker (reward.worker_cpu_seconds)."""


_ALARM_ARMED = [False]
# Per-worker limits, set by the pool's initializer only (never in the trainer's process).
_LIMITS = {"memory_mb": 0, "cpu_seconds": 0}


def _on_alarm(signum, frame):
    if _ALARM_ARMED[0]:  # a late signal after the call returned is ignored
        raise _RewardTimeout()


def _on_xcpu(signum, frame):
    if _ALARM_ARMED[0]:
        raise _RewardCpuLimit()


def _set_cpu_soft_limit(seconds: int) -> None:
    """RLIMIT_CPU counts the process's whole life: re-arm the soft limit at `seconds` from now
    (0 = none) so that it bounds one reward call. The hard limit is left alone (it cannot be raised)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = hard
    if seconds:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(usage.ru_utime + usage.ru_stime) + int(seconds)
        soft = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


@contextmanager
def _alarm_handler():
    """Install the SIGALRM timeout handler for a batch; yields False where signals are unavailable
    (not the main thread, or no SIGALRM), and the calls then run without an in-process timeout."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _as_finite(value) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def normalize_reward(value) -> Outcome:
    """A reward function's return value -> outcome; anything but a finite number or a dict with a
    finite `score` is `invalid`. Extras keep their finite numeric values (strings etc. are dropped);
    `acc` defaults to `float(score >= 1.0)`."""
    if isinstance(value, dict):
        if "score" not in value:
            return ("invalid", 0.0, {}, f"returned a dict without 'score' (keys: {sorted(map(str, value))})")
        score = _as_finite(value["score"])
        extras = {str(k): f for k, v in value.items() if k != "score" and (f := _as_finite(v)) is not None}
    else:
        score, extras = _as_finite(value), {}
    if score is None:
        shown = value["score"] if isinstance(value, dict) else value
        return ("invalid", 0.0, {}, f"returned score {shown!r:.80} ({type(shown).__name__}), not a finite number")
    extras.setdefault("acc", float(score >= 1.0))
    return ("ok", score, extras, "")


def _score_one(fn: Callable, item: Item, kwargs: dict, timeout_s: float | None) -> Outcome:
    response, ground_truth, context = item
    cpu_s = _LIMITS["cpu_seconds"]
    try:
        _ALARM_ARMED[0] = True
        if timeout_s:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        if cpu_s:
            _set_cpu_soft_limit(cpu_s)
        try:
            value = fn(response, ground_truth, **kwargs, **context)
        finally:
            _ALARM_ARMED[0] = False
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if cpu_s:
                _set_cpu_soft_limit(0)
    except _RewardTimeout:
        return ("timeout", 0.0, {}, f"timed out after {timeout_s:g} s")
    except _RewardCpuLimit:
        return ("timeout", 0.0, {}, f"used more than reward.worker_cpu_seconds={cpu_s} s of CPU time")
    except RunStopped:  # the trainer's own abort (a second SIGTERM/SIGINT) is not the function's failure
        raise
    except BaseException as e:  # never into the trainer: KeyboardInterrupt, CancelledError, SystemExit too
        return ("error", 0.0, {}, _describe(e))
    return normalize_reward(value)


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".rstrip(": ")
    if isinstance(e, MemoryError) and _LIMITS["memory_mb"]:
        text += f" (the worker is limited to reward.worker_memory_mb={_LIMITS['memory_mb']})"
    return text


def score_items(
    fn: Callable, items: Sequence[Item], kwargs: dict, timeout_s: float, on_item: Callable | None = None
) -> list[Outcome]:
    """Score items one by one, each under a SIGALRM timeout of `timeout_s` where signals work.
    `on_item(i)` is called before item i and `on_item(None)` at the end (the pool's heartbeat)."""
    outcomes = []
    try:
        with _alarm_handler() as can_alarm:
            for i, item in enumerate(items):
                if on_item is not None:
                    on_item(i)
                outcomes.append(_score_one(fn, item, kwargs, timeout_s if can_alarm else None))
    finally:
        if on_item is not None:
            on_item(None)
    return outcomes


# ---------------------------------------------------------------------------------------------
# Process-pool worker side. Worker state is process-global: one reward function per pool.

_WORKER: dict[str, Any] = {}


def _init_worker(sys_path: list[str], fn_spec, kwargs: dict, timeout_s: float, beats, slots, parent_pid: int,
                 limits: dict[str, int]) -> None:  # fmt: skip
    _die_with_parent(parent_pid)
    # Ctrl-C reaches every process of the terminal's process group: the trainer decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _apply_limits(limits)
    # Spawned workers start from a fresh interpreter: give them the trainer's import path so a
    # user reward module importable in the trainer is importable here too.
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    beats[3 * slot + 2] = os.getpid()
    _WORKER.update(kwargs=kwargs, timeout_s=timeout_s, beats=beats, slot=slot, fn=None, init_error=None)
    # An exception escaping an initializer only says "pool broken"; keep it for `_ping` to raise.
    try:
        _WORKER["fn"] = resolve_reward_fn(fn_spec)
        _warmup(_WORKER["fn"])
    except BaseException as e:
        _WORKER["init_error"] = e if isinstance(e, Exception) else RuntimeError(_describe(e))


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the trainer dies, even by SIGKILL (Linux: prctl
    PR_SET_PDEATHSIG; it fires when the thread that started the pool exits, which is the trainer's
    main thread). Elsewhere the worker lives until the pool is shut down."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


def _apply_limits(limits: dict[str, int]) -> None:
    """reward.worker_memory_mb (RLIMIT_AS of the whole worker) and reward.worker_cpu_seconds (per
    reward call, re-armed around each call; SIGXCPU interrupts the call)."""
    _LIMITS.update(limits)
    if resource is None:
        return
    if limits.get("memory_mb"):
        nbytes = int(limits["memory_mb"]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    if limits.get("cpu_seconds"):
        signal.signal(signal.SIGXCPU, _on_xcpu)


def _warmup(fn: Callable) -> None:
    """Call the function's optional `warmup()` (slow imports) once, outside any timeout."""
    warmup = getattr(fn, "warmup", None)
    if callable(warmup):
        warmup()


def _ping() -> bool:
    if _WORKER["init_error"] is not None:
        raise _WORKER["init_error"]
    return True


def _score_chunk(indices: list[int], items: list[Item]) -> list[Outcome]:
    beats, slot = _WORKER["beats"], _WORKER["slot"]

    def heartbeat(i):  # per worker: (start time of the current item, its batch index, pid); 0 = idle
        if i is None:
            beats[3 * slot] = 0.0
        else:
            beats[3 * slot + 1] = float(indices[i])
            beats[3 * slot] = time.monotonic()  # CLOCK_MONOTONIC is system-wide on Linux

    if _WORKER["init_error"] is not None:
        raise _WORKER["init_error"]
    return score_items(_WORKER["fn"], items, _WORKER["kwargs"], _WORKER["timeout_s"], heartbeat)


def _split(indices: list[int], num_chunks: int) -> list[list[int]]:
    """Contiguous chunks of near-equal size, at most `num_chunks`, none empty."""
    num_chunks = max(1, min(num_chunks, len(indices)))
    size, extra = divmod(len(indices), num_chunks)
    chunks, start = [], 0
    for c in range(num_chunks):
        end = start + size + (c < extra)
        chunks.append(indices[start:end])
        start = end
    return chunks


# ---------------------------------------------------------------------------------------------
# Scorers (trainer side)


class _Scorer:
    """Decodes rollouts, runs `_run(items)` (per backend) and counts failures. `score` never raises,
    except the `RewardFailureError` of an optional `RewardFailureGuard` (`guard`)."""

    def __init__(self, fn_spec, tokenizer, kwargs: dict | None, timeout_s: float, guard: RewardFailureGuard | None = None):
        self.fn = resolve_reward_fn(fn_spec)  # fail early, in the trainer, on a bad path
        self.fn_spec = fn_spec
        self.name = fn_spec if isinstance(fn_spec, str) else getattr(fn_spec, "__qualname__", repr(fn_spec))
        self.tokenizer = tokenizer
        self.kwargs = dict(kwargs or {})
        self.timeout_s = float(timeout_s)
        self.context_params = _context_params(self.fn)
        self.guard = guard
        self._counts = _zero_counts()

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        """One `RewardResult` per rollout, in order; failures score 0 (acc 0) and are counted."""
        if not rollouts:
            return []
        outcomes = self._run(self._items(rollouts))
        return self._account(outcomes)

    def metrics(self) -> dict[str, float]:
        """`reward/failures` (= timeouts + errors + invalid) and its breakdown, and `reward/num_scored`,
        since the last call; resets the counters."""
        counts, self._counts = self._counts, _zero_counts()
        return {k: float(v) for k, v in counts.items()}

    def end_step(self, failures: float, num_scored: float) -> dict[str, float]:
        """Close a training step for the failure guard with the step's `reward/failures` and
        `reward/num_scored` summed over data-parallel ranks (the same numbers on every rank).
        Returns `reward/failure_fraction` and `reward/failed_steps`; raises `RewardFailureError`
        when the reward failed too often for too long (reward.max_failure_fraction / max_failed_steps)."""
        if self.guard is None:
            return {}
        return self.guard.end_step(failures, num_scored)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _items(self, rollouts: Sequence[Rollout]) -> list[Item]:
        ids = [list(r.response_ids) for r in rollouts]
        if hasattr(self.tokenizer, "batch_decode"):
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        else:
            texts = [self.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        items = []
        for r, text in zip(rollouts, texts):
            prompt = r.prompt
            context = {"prompt": prompt.text if prompt else "", "data": prompt.data if prompt else {}}
            context = {k: context[k] for k in self.context_params}
            items.append((text, prompt.ground_truth if prompt else None, context))
        return items

    def _account(self, outcomes: list[Outcome]) -> list[RewardResult]:
        results, failures = [], []
        for status, score, extras, message in outcomes:
            if status == "ok":
                results.append(RewardResult(score, extras))
                continue
            self._counts[FAILURE_KINDS[status]] += 1
            failures.append(message)
            results.append(RewardResult(0.0, {"acc": 0.0}))
        self._counts["reward/failures"] += len(failures)
        self._counts["reward/num_scored"] += len(outcomes)
        if failures:
            logger.warning(
                "reward fn %r failed on %d/%d rollouts (scored 0); first: %s",
                self.name, len(failures), len(outcomes), failures[0],
            )
        if self.guard is not None:
            self.guard.observe(len(failures), len(outcomes), failures[0] if failures else None)
        return results

    def _run(self, items: list[Item]) -> list[Outcome]:
        raise NotImplementedError


def _zero_counts() -> dict[str, int]:
    return {"reward/failures": 0, **{key: 0 for key in FAILURE_KINDS.values()}, "reward/num_scored": 0}


def _context_params(fn: Callable) -> tuple[str, ...]:
    """Which of `prompt` / `data` the function names as parameters (it then receives them)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in _CONTEXT_PARAMS if name in params)


class InlineScorer(_Scorer):
    """Scores in the calling process: for tests and debugging. Hangs are cut by SIGALRM when called
    from the main thread; a hang that ignores signals blocks the caller."""

    def __init__(self, fn_spec, tokenizer, kwargs=None, timeout_s: float = 10.0, guard: RewardFailureGuard | None = None):
        super().__init__(fn_spec, tokenizer, kwargs, timeout_s, guard)
        _warmup(self.fn)

    def _run(self, items: list[Item]) -> list[Outcome]:
        return score_items(self.fn, items, self.kwargs, self.timeout_s)


class ProcessScorer(_Scorer):
    """A spawn-context `ProcessPoolExecutor` of `num_workers`; one task per chunk of rollouts.

    Every rollout gets `timeout_s` (SIGALRM in the worker, which keeps running). A worker still
    busy on one rollout `_KILL_GRACE_S` after that (signals blocked, or C code holding the GIL) is
    found from a shared heartbeat (current rollout, start time, pid per worker): that rollout is a
    timeout, the pool is killed and rebuilt, and the call's other unfinished rollouts run again.
    A worker that dies mid-rollout (segfault, os._exit, OOM kill) makes that rollout an error;
    workers killed from outside (SIGTERM/SIGINT/SIGHUP to the job's processes) re-run their rollouts.

    Workers die with the trainer, even on SIGKILL (Linux), ignore SIGINT (the trainer handles
    Ctrl-C), and run under `memory_mb` (RLIMIT_AS per worker) and `cpu_seconds` (CPU time per
    reward call) when set. Call `score` from the thread that built the scorer (the trainer's main
    thread): the kernel ties the workers' lives to the thread that started them.
    """

    def __init__(self, fn_spec, tokenizer, kwargs=None, timeout_s: float = 10.0, num_workers: int = 2, *,
                 memory_mb: int = 0, cpu_seconds: int = 0, guard: RewardFailureGuard | None = None):  # fmt: skip
        super().__init__(fn_spec, tokenizer, kwargs, timeout_s, guard)
        self.num_workers = int(num_workers)
        self.limits = {"memory_mb": int(memory_mb), "cpu_seconds": int(cpu_seconds)}
        self._pool: ProcessPoolExecutor | None = None
        self._external_kills = 0
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._beats = ctx.Array("d", 3 * self.num_workers, lock=False)
        initargs = (list(sys.path), self.fn_spec, self.kwargs, self.timeout_s, self._beats, ctx.Value("i", 0),
                    os.getpid(), self.limits)  # fmt: skip
        self._pool = ProcessPoolExecutor(self.num_workers, mp_context=ctx, initializer=_init_worker, initargs=initargs)
        # Start every worker now and resolve the function there: an import that works in the
        # trainer but not in a fresh interpreter fails here, loudly, not as silent zero rewards.
        pings = [self._pool.submit(_ping) for _ in range(self.num_workers)]
        try:
            for ping in pings:
                ping.result(timeout=60 + self.timeout_s)
        except BaseException as e:
            self._kill()
            if isinstance(e, UserError) or not isinstance(e, Exception):
                raise
            raise UserError(f"reward workers for {self.name!r} could not start: {self._start_failure(e)}") from None
        self._processes = dict(self._pool._processes)  # pid -> Process, to tell crashes apart

    def _start_failure(self, e: Exception) -> str:
        if isinstance(e, TimeoutError):
            text = f"no answer within {60 + self.timeout_s:g} s"
        elif isinstance(e, BrokenProcessPool):
            text = "a worker process exited while starting"
        else:
            text = f"{type(e).__name__}: {e}".rstrip(": ")
        if self.limits["memory_mb"] and isinstance(e, (MemoryError, BrokenProcessPool)):
            text += f" (reward.worker_memory_mb={self.limits['memory_mb']} may be too low for the interpreter and its imports)"
        return text

    def _run(self, items: list[Item]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        todo = list(range(len(items)))
        self._external_kills = 0
        while todo:
            futures = {}
            for chunk in _split(todo, self.num_workers):
                try:
                    futures[self._pool.submit(_score_chunk, chunk, [items[i] for i in chunk])] = chunk
                except BrokenProcessPool:
                    # A worker of an earlier chunk of this call died while we were submitting:
                    # collecting the submitted chunks finds the culprit, the rest is re-run.
                    break
            if not futures:  # broken before this call (nothing of ours ran): just rebuild
                self._restart()
            elif not self._collect(futures, outcomes):
                self._restart()
            todo = [i for i, o in enumerate(outcomes) if o is None]
        return outcomes

    def _collect(self, futures: dict, outcomes: list) -> bool:
        """Fill outcomes as chunks finish. On a hang or a crash, score the culprit rollouts as
        failures and return False: the pool is dead and the other unfinished rollouts are re-run."""
        limit = self.timeout_s + _KILL_GRACE_S
        while futures:
            done, _ = wait(futures, timeout=0.1, return_when=FIRST_COMPLETED)
            for future in done:
                chunk = futures.pop(future)
                try:
                    chunk_outcomes = future.result()
                except BrokenProcessPool:
                    self._blame_crash(outcomes)
                    return False
                except Exception as e:  # e.g. an unpicklable ground truth: the whole chunk fails
                    chunk_outcomes = [("error", 0.0, {}, f"{type(e).__name__}: {e}")] * len(chunk)
                for i, outcome in zip(chunk, chunk_outcomes):
                    outcomes[i] = outcome
            now = time.monotonic()
            hung = [i for start, i, _ in self._busy() if now - start > limit]
            if hung:
                for i in hung:
                    outcomes[i] = ("timeout", 0.0, {}, f"timed out after {self.timeout_s:g} s (worker killed)")
                return False
        return True

    def _busy(self) -> list[tuple[float, int, int]]:
        """(item start time, batch index, pid) of each worker that is scoring a rollout."""
        b = self._beats
        return [(b[k], int(b[k + 1]), int(b[k + 2])) for k in range(0, len(b), 3) if b[k]]

    def _blame_crash(self, outcomes: list) -> None:
        """A worker died (os._exit, segfault, OOM kill): the rollout it was on scores as an error.
        The executor SIGTERMs the other workers, so a different exit code marks the culprit. When
        every worker died by a signal from outside (scancel, a terminal's Ctrl-C), nothing is the
        function's fault: the rollouts are re-run on a new pool (twice at most per call)."""
        for process in self._processes.values():
            process.join(timeout=5)
        codes = [p.exitcode for p in self._processes.values() if p.exitcode is not None]
        outside = (-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP)
        if codes and all(code in outside for code in codes) and self._external_kills < 2:
            self._external_kills += 1
            logger.warning("reward workers were stopped from outside (exit codes %s); re-running their rollouts",
                           sorted(set(codes)))  # fmt: skip
            return
        busy = [(i, self._processes[pid].exitcode) for _, i, pid in self._busy() if pid in self._processes]
        culprits = [(i, code) for i, code in busy if code is not None and code != -signal.SIGTERM] or busy
        for i, code in culprits:
            outcomes[i] = ("error", 0.0, {}, self._death_message(code))
        if not culprits:  # nothing to go by: fail what is left rather than loop forever
            for i, o in enumerate(outcomes):
                if o is None:
                    outcomes[i] = ("error", 0.0, {}, "the reward worker pool broke")

    def _death_message(self, code: int | None) -> str:
        if code == -signal.SIGKILL:
            limit = self.limits["memory_mb"]
            return "the reward worker was killed (SIGKILL: out of memory?" + (
                f" it is limited to reward.worker_memory_mb={limit})" if limit else ")")
        if code == -getattr(signal, "SIGXCPU", 24):
            return f"the reward worker used more than reward.worker_cpu_seconds={self.limits['cpu_seconds']} s of CPU time"
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the reward worker process died ({name})"
        return f"the reward worker process died (exit code {code})"

    def _restart(self) -> None:
        self._kill()
        self._start()

    def _kill(self) -> None:
        if self._pool is None:
            return
        # ProcessPoolExecutor has no public way to kill a busy worker before Python 3.14.
        processes = list((self._pool._processes or {}).values())
        for process in processes:
            process.kill()
        for process in processes:
            process.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        """Stop the workers: idle ones exit at once, busy ones are killed after a short grace (a
        hung reward must not keep the trainer from exiting)."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        processes = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + _KILL_GRACE_S
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
