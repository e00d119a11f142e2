"""How a run ends on signals, and that it leaves no process behind.

SIGTERM (scancel, preemption, `timeout`, torchrun forwarding) and SIGINT (Ctrl-C) ask the training
loop to stop at the next step boundary, after a checkpoint; a second signal aborts at once; the
exit status is 128 + the signal (143, 130). Child processes started during the run are stopped
when it ends, whatever the cause.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from rlx.errors import RunStopped

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The same signal again within this many seconds is the same request, not an abort: under SLURM,
# scancel signals every process of the job and torchrun forwards the signal to its workers again.
REPEAT_WINDOW_S = 2.0
# Children still alive at the end get SIGTERM, then SIGKILL after this grace.
REAP_GRACE_S = 3.0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Lifecycle:
    """A run's signal handling and child cleanup; use as `with Lifecycle() as life: ...`.

    First SIGTERM/SIGINT: remembered (`signum`); the loop calls `should_stop()` at step boundaries
    and, when it returns True, saves a checkpoint and raises `stopped(step, ...)`. Second signal
    (another signal, or the same one after REPEAT_WINDOW_S): `RunStopped` is raised where the main
    thread is, aborting the step (finally blocks still close the reward pool and the engine).
    Third: the process exits at once (the cleanup itself hung). On exit from the block, the
    previous handlers come back and child processes started inside the block are stopped
    (multiprocessing's resource tracker excepted: it cleans up after the interpreter)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        """The first stop signal received (on any rank, once `should_stop` agreed), else None."""
        self._received: list[tuple[int, float]] = []
        self._previous: dict[int, object] = {}
        self._children_before: set[int] = set()

    # ---- context ---------------------------------------------------------------------------

    def __enter__(self) -> Lifecycle:
        self._children_before = descendants(os.getpid())
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        else:
            logger.warning("not on the main thread: SIGTERM/SIGINT keep their default handling")
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        reap(descendants(os.getpid()) - self._children_before)

    # ---- signals ---------------------------------------------------------------------------

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._received and signum == self._received[0][0] and now - self._received[0][1] < REPEAT_WINDOW_S:
            return  # the same request delivered twice (scancel + torchrun)
        self._received.append((signum, now))
        name = signal_name(signum)
        if len(self._received) == 1:
            self.signum = signum
            logger.warning("%s received: stopping after the current step (send it again to abort now)", name)
        elif len(self._received) == 2:
            raise RunStopped(f"aborted by a second {name}: the step in progress is lost; the last complete "
                             "checkpoint is kept", 128 + self._received[0][0])  # fmt: skip
        else:
            os._exit(128 + self._received[0][0])

    def should_stop(self) -> bool:
        """Whether a stop was requested on this rank or any other (collective with several ranks:
        every rank calls it at the same point of every step, so that all stop after the same step)."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.signum is None:
                self.signum = int(flag.item())
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the stop signal (143 for SIGTERM, 130 for SIGINT); 0 without one."""
        return 128 + self.signum if self.signum else 0

    def stopped(self, step: int, checkpoint: str | os.PathLike | None, reason: str = "") -> RunStopped:
        """The exception that ends a run stopped after `step` (raise it from the loop). `checkpoint`
        is the path just saved, or None with `reason` saying why there is none."""
        name = signal_name(self.signum or signal.SIGTERM)
        if checkpoint is not None:
            saved = f"checkpoint {checkpoint} saved; rerun the same command to resume"
        else:
            saved = f"no checkpoint saved ({reason or 'checkpointing is off'})"
        return RunStopped(f"stopped by {name} after step {step}: {saved}", self.exit_code or 143)


# ---- child processes -------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) from /proc/<pid>/stat, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), fields[0].decode()
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> set[int]:
    """Live (not zombie) descendants of `pid` (Linux /proc; empty elsewhere)."""
    if not os.path.isdir("/proc"):
        return set()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[1] != "Z":
            parents[int(entry)] = stat[0]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"


def reap(pids: set[int], grace_s: float = REAP_GRACE_S) -> list[int]:
    """SIGTERM the given processes, SIGKILL those still alive after `grace_s`; returns the pids that
    had to be stopped. multiprocessing's resource tracker is left alone (it exits with us)."""
    pids = {p for p in pids if alive(p) and not _is_resource_tracker(p)}
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            _kill(pid, signal.SIGKILL)
    if pids:
        logger.warning("stopped %d leftover child process(es) of the run: %s", len(pids), sorted(pids))
    return sorted(pids)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
