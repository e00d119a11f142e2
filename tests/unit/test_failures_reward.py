"""Reward pool processes under faults: its workers (and multiprocessing's resource tracker) die
with the trainer even on SIGKILL, workers killed from outside re-run their rollouts instead of
failing them, and close() does not wait for a hung reward. A locally started Ray is protected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from rlx.reward.scorer import ProcessScorer
from tests.unit.test_reward import CharTokenizer, rollout, scores

REPO = Path(__file__).resolve().parents[2]

OWNER = textwrap.dedent(
    """
    import sys, time
    import psutil
    from rlx.reward.scorer import ProcessScorer
    from tests.unit.test_reward import CharTokenizer

    if __name__ == "__main__":
        scorer = ProcessScorer("exact_match", CharTokenizer(), num_workers=2)
        print(" ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
        time.sleep(600)
    """
)

SLOW = textwrap.dedent(
    """
    import time

    def score(response, ground_truth):
        time.sleep(float(response))
        return 1.0
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_workers_and_resource_tracker_die_when_the_trainer_is_sigkilled(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) >= 3, pids  # two workers and the resource tracker
        proc.kill()
        proc.wait(timeout=10)
        assert wait_gone(pids) == [], "processes outlived a SIGKILLed trainer"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def slow_module(tmp_path):
    (tmp_path / "rlx_test_slow.py").write_text(SLOW)
    sys.path.insert(0, str(tmp_path))
    yield "rlx_test_slow:score"
    sys.path.remove(str(tmp_path))
    sys.modules.pop("rlx_test_slow", None)


def test_workers_killed_from_outside_rerun_their_rollouts(slow_module):
    with ProcessScorer(slow_module, CharTokenizer(), timeout_s=10.0, num_workers=2) as scorer:
        workers = list(scorer._processes)
        killer = subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time; time.sleep(0.7); "
                                   "[os.kill(int(p), signal.SIGTERM) for p in sys.argv[1:]]", *map(str, workers)])  # fmt: skip
        results = scorer.score([rollout("1.5", None) for _ in range(4)])  # like scancel's SIGTERM to the job
        killer.wait()
        assert scores(results) == [1.0] * 4
        assert scorer.metrics()["reward/failures"] == 0.0
        assert not any(alive(p) for p in workers) and set(scorer._processes).isdisjoint(workers)


def test_close_does_not_wait_for_a_hung_reward(slow_module):
    import threading

    scorer = ProcessScorer(slow_module, CharTokenizer(), timeout_s=60.0, num_workers=1)
    workers = list(scorer._processes)
    thread = threading.Thread(target=lambda: scorer.score([rollout("60", None)]), daemon=True)
    thread.start()
    time.sleep(1.0)
    start = time.monotonic()
    scorer.close()
    assert time.monotonic() - start < 8.0
    assert wait_gone(workers, 5.0) == []


def test_a_local_ray_is_protected_and_a_user_cluster_is_not(monkeypatch):
    from rlx.reward.ray_pool import _protect_local_ray

    refreshed = []
    loader = SimpleNamespace(reset_cache=lambda: refreshed.append("token"))
    fake = SimpleNamespace(Config=SimpleNamespace(initialize=lambda _: refreshed.append("config")),
                           AuthenticationTokenLoader=SimpleNamespace(instance=lambda: loader))  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray._raylet", fake)  # this process's real Ray stays untouched
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # set-then-delete: monkeypatch restores the original
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    options: dict = {}
    _protect_local_ray(options)
    assert options == {"_node_ip_address": "127.0.0.1"} and refreshed == ["config", "token"]
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's own choice stands
    monkeypatch.setenv("RAY_AUTH_TOKEN", "mine")
    _protect_local_ray({})
    assert os.environ["RAY_AUTH_TOKEN"] == "mine"


def test_sigint_reaches_workers_without_breaking_the_pool(slow_module):
    with ProcessScorer(slow_module, CharTokenizer(), timeout_s=10.0, num_workers=2) as scorer:
        for pid in scorer._processes:
            os.kill(pid, signal.SIGINT)  # what Ctrl-C sends to the whole process group
        assert scores(scorer.score([rollout("0", None)] * 4)) == [1.0] * 4
        assert scorer.metrics()["reward/failures"] == 0.0


RAY_OWNER = textwrap.dedent(
    """
    import time
    from rlx.reward.ray_pool import RayScorer
    from tests.unit.test_reward import CharTokenizer

    if __name__ == "__main__":
        scorer = RayScorer("exact_match", CharTokenizer(), num_workers=1)
        print("ready", flush=True)
        time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_local_ray_dies_with_a_sigkilled_trainer(tmp_path):
    pytest.importorskip("ray")
    from tests.integration.test_failures import session_processes, wait_gone

    script = tmp_path / "ray_owner.py"
    script.write_text(RAY_OWNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        started = session_processes(proc.pid)
        assert len(started) > 3  # gcs, raylet, agents, workers
        proc.kill()
        proc.wait(timeout=10)
        assert wait_gone(started, 30.0) == [], "Ray processes outlived a SIGKILLed trainer"
    finally:
        if proc.poll() is None:
            proc.kill()
