"""Reward scorers: decode rollouts, run the reward function inline, in a process pool or on Ray.

Failures never raise: a reward that raises, hangs or returns garbage scores 0 and is counted.
"""

from __future__ import annotations

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

from rlx.reward.builtins import resolve_reward_fn
from rlx.types import RewardResult, Rollout

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


_ALARM_ARMED = [False]


def _on_alarm(signum, frame):
    if _ALARM_ARMED[0]:  # a late signal after the call returned is ignored
        raise _RewardTimeout()


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
    try:
        if timeout_s:
            _ALARM_ARMED[0] = True
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = fn(response, ground_truth, **kwargs, **context)
        finally:
            _ALARM_ARMED[0] = False
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _RewardTimeout:
        return ("timeout", 0.0, {}, f"timed out after {timeout_s:g} s")
    except (Exception, SystemExit) as e:
        return ("error", 0.0, {}, f"{type(e).__name__}: {e}")
    return normalize_reward(value)


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


def _init_worker(sys_path: list[str], fn_spec, kwargs: dict, timeout_s: float, beats, slots) -> None:
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
    except Exception as e:
        _WORKER["init_error"] = e


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
    """Decodes rollouts, runs `_run(items)` (per backend) and counts failures; `score` never raises."""

    def __init__(self, fn_spec, tokenizer, kwargs: dict | None, timeout_s: float):
        self.fn = resolve_reward_fn(fn_spec)  # fail early, in the trainer, on a bad path
        self.fn_spec = fn_spec
        self.name = fn_spec if isinstance(fn_spec, str) else getattr(fn_spec, "__qualname__", repr(fn_spec))
        self.tokenizer = tokenizer
        self.kwargs = dict(kwargs or {})
        self.timeout_s = float(timeout_s)
        self.context_params = _context_params(self.fn)
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

    def __init__(self, fn_spec, tokenizer, kwargs=None, timeout_s: float = 10.0):
        super().__init__(fn_spec, tokenizer, kwargs, timeout_s)
        _warmup(self.fn)

    def _run(self, items: list[Item]) -> list[Outcome]:
        return score_items(self.fn, items, self.kwargs, self.timeout_s)


class ProcessScorer(_Scorer):
    """A spawn-context `ProcessPoolExecutor` of `num_workers`; one task per chunk of rollouts.

    Every rollout gets `timeout_s` (SIGALRM in the worker, which keeps running). A worker still
    busy on one rollout `_KILL_GRACE_S` after that (signals blocked, or C code holding the GIL) is
    found from a shared heartbeat (current rollout, start time, pid per worker): that rollout is a
    timeout, the pool is killed and rebuilt, and the call's other unfinished rollouts run again.
    A worker that dies mid-rollout (segfault, os._exit, OOM kill) makes that rollout an error.
    """

    def __init__(self, fn_spec, tokenizer, kwargs=None, timeout_s: float = 10.0, num_workers: int = 2):
        super().__init__(fn_spec, tokenizer, kwargs, timeout_s)
        self.num_workers = int(num_workers)
        self._pool: ProcessPoolExecutor | None = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._beats = ctx.Array("d", 3 * self.num_workers, lock=False)
        initargs = (list(sys.path), self.fn_spec, self.kwargs, self.timeout_s, self._beats, ctx.Value("i", 0))
        self._pool = ProcessPoolExecutor(self.num_workers, mp_context=ctx, initializer=_init_worker, initargs=initargs)
        # Start every worker now and resolve the function there: an import that works in the
        # trainer but not in a fresh interpreter fails here, loudly, not as silent zero rewards.
        pings = [self._pool.submit(_ping) for _ in range(self.num_workers)]
        try:
            for ping in pings:
                ping.result(timeout=60 + self.timeout_s)
        except BaseException:
            self._kill()
            raise
        self._processes = dict(self._pool._processes)  # pid -> Process, to tell crashes apart

    def _run(self, items: list[Item]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        todo = list(range(len(items)))
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
        The executor SIGTERMs the other workers, so a different exit code marks the culprit."""
        for process in self._processes.values():
            process.join(timeout=5)
        busy = [(i, self._processes[pid].exitcode) for _, i, pid in self._busy() if pid in self._processes]
        culprits = [(i, code) for i, code in busy if code is not None and code != -signal.SIGTERM] or busy
        for i, code in culprits:
            outcomes[i] = ("error", 0.0, {}, f"the reward worker process died (exit code {code})")
        if not culprits:  # nothing to go by: fail what is left rather than loop forever
            for i, o in enumerate(outcomes):
                if o is None:
                    outcomes[i] = ("error", 0.0, {}, "the reward worker pool broke")

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
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_score_chunk(sys_path: list[str], fn_spec, kwargs: dict, items: list[Item], timeout_s: float) -> list[Outcome]:
    """Body of the Ray task: one call scores one chunk (SIGALRM per rollout where Ray runs tasks
    on the worker's main thread)."""
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        fn = resolve_reward_fn(fn_spec)
        _warmup(fn)
    except Exception as e:  # UserError from a worker that cannot import the function
        return [("error", 0.0, {}, f"{type(e).__name__}: {e}")] * len(items)
    return score_items(fn, items, kwargs, timeout_s)


class RayScorer(_Scorer):
    """Scores on a Ray cluster: one remote call per chunk, `num_workers` chunks per `score` call.

    `ray_address` empty starts a local Ray with `num_workers` CPUs; its workers get the trainer's
    import path (PYTHONPATH). On a remote cluster rlx and the reward module must be installed on
    the workers. Each rollout gets `timeout_s` (SIGALRM in the worker); a chunk that has not
    returned after `timeout_s` x its size + grace is cancelled (worker killed) and its rollouts
    score as timeouts. `close()` leaves Ray running (it may be shared): `ray.shutdown()` is the caller's.
    """

    def __init__(self, fn_spec, tokenizer, kwargs=None, timeout_s: float = 10.0, num_workers: int = 2, ray_address: str = ""):
        super().__init__(fn_spec, tokenizer, kwargs, timeout_s)
        try:
            import ray
        except ImportError as e:
            from rlx.errors import UserError

            raise UserError("reward.backend='ray' needs ray: pip install 'rlx[ray]'") from e
        self.num_workers = int(num_workers)
        options: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True, "log_to_driver": True}
        if ray_address:
            options["address"] = ray_address
        else:
            options["num_cpus"] = self.num_workers
            pythonpath = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
        if not ray.is_initialized():
            ray.init(**options)
        self._ray = ray
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_score_chunk)
        self.num_remote_calls = 0  # for tests and logs: remote calls made so far

    def _run(self, items: list[Item]) -> list[Outcome]:
        chunks = _split(list(range(len(items))), self.num_workers)
        sys_path = list(sys.path)
        refs = [
            self._remote.remote(sys_path, self.fn_spec, self.kwargs, [items[i] for i in chunk], self.timeout_s)
            for chunk in chunks
        ]
        self.num_remote_calls += len(refs)
        deadline = self.timeout_s * max(len(c) for c in chunks) + 10 * _KILL_GRACE_S
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=deadline)
        ready = set(ready)
        outcomes: list[Outcome] = [None] * len(items)
        for ref, chunk in zip(refs, chunks):
            if ref in ready:
                try:
                    chunk_outcomes = self._ray.get(ref, timeout=self.timeout_s)
                except Exception as e:  # RayTaskError, a dead worker, ...
                    chunk_outcomes = [("error", 0.0, {}, f"{type(e).__name__}: {e}")] * len(chunk)
            else:
                self._ray.cancel(ref, force=True)
                chunk_outcomes = [("timeout", 0.0, {}, f"Ray task over its {deadline:g} s deadline (cancelled)")] * len(chunk)
            for i, outcome in zip(chunk, chunk_outcomes):
                outcomes[i] = outcome
        return outcomes
