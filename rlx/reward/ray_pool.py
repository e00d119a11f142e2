"""Reward scoring on a Ray cluster: one remote call per chunk of rollouts.

A Ray started here (no `reward.ray_address`) is local and protected: loopback address and a
per-run authentication token. A user's cluster is used as configured.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from typing import Any

from rlx.errors import UserError
from rlx.lifecycle import descendants
from rlx.reward.builtins import resolve_reward_fn
from rlx.reward.guard import RewardFailureGuard
from rlx.reward.scorer import _KILL_GRACE_S, Item, Outcome, _Scorer, _split, _warmup, score_items

logger = logging.getLogger(__name__)


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
    score as timeouts. `close()` shuts down a Ray this scorer started; one that was already running
    (shared, or the user's cluster) is left running.
    """

    def __init__(self, fn_spec, tokenizer, kwargs=None, timeout_s: float = 10.0, num_workers: int = 2, ray_address: str = "",
                 *, guard: RewardFailureGuard | None = None):  # fmt: skip
        super().__init__(fn_spec, tokenizer, kwargs, timeout_s, guard)
        try:
            import ray
        except ImportError as e:
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
                _protect_local_ray(options)
        self._owns_ray = not ray.is_initialized()
        self._watchdog: subprocess.Popen | None = None
        if self._owns_ray:
            before = descendants(os.getpid())
            ray.init(**options)
            if not ray_address:
                self._watchdog = _start_watchdog(descendants(os.getpid()) - before)
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

    def close(self) -> None:
        if getattr(self, "_owns_ray", False) and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None


# Started beside a local Ray: when the trainer dies without closing it (SIGKILL), Ray's head
# processes mostly follow, but some agents do not. This waits for the trainer to go (its parent
# changes) and SIGKILLs the Ray processes started with it (pid and start time must both match).
_WATCHDOG = """
import os, signal, sys, time

def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None

trainer, targets = int(sys.argv[1]), [arg.split(":") for arg in sys.argv[2:]]
while os.getppid() == trainer:
    time.sleep(1.0)
for pid, started in targets:
    if start_time(int(pid)) == started:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
"""


def _start_watchdog(pids: set[int]) -> subprocess.Popen | None:
    targets = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/stat") as f:
                targets.append(f"{pid}:{f.read().rsplit(')', 1)[1].split()[19]}")
        except (OSError, IndexError):
            continue
    if not targets:
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *targets], stdin=subprocess.DEVNULL)


def _protect_local_ray(options: dict[str, Any]) -> None:
    """A Ray started here serves only this machine: it advertises the loopback address, and, because
    Ray 2.x still listens on every interface, it requires a per-run random token (Ray's token
    authentication) unless the user configured authentication already. A multi-node cluster is the
    user's (reward.ray_address) and is left as configured."""
    options["_node_ip_address"] = "127.0.0.1"
    if os.environ.get("RAY_AUTH_MODE"):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:  # Ray caches its config and token at import: refresh both (what `ray` itself does)
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # a Ray without token authentication
        del os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"]
        logger.warning("this Ray has no token authentication: the local Ray started for rewards accepts "
                       "connections from the network")  # fmt: skip
