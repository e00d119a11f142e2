"""rlx.lifecycle in one process: the first SIGTERM/SIGINT only sets the stop flag, the same signal
again at once (scancel + torchrun) is the same request, a later one aborts with RunStopped (143/130),
handlers are restored, and children started inside the block are stopped when it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rlx import lifecycle
from rlx.errors import RunStopped
from rlx.lifecycle import Lifecycle, descendants


def test_first_signal_sets_the_flag_and_a_second_aborts(monkeypatch):
    monkeypatch.setattr(lifecycle, "REPEAT_WINDOW_S", 0.2)
    previous = signal.getsignal(signal.SIGTERM)
    with Lifecycle() as life:
        assert not life.should_stop() and life.exit_code == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a duplicate delivery: no abort
        assert life.should_stop() and life.exit_code == 143
        stopped = life.stopped(7, "/runs/x/checkpoints/step-7")
        assert str(stopped) == ("stopped by SIGTERM after step 7: checkpoint /runs/x/checkpoints/step-7 saved; "
                                "rerun the same command to resume")  # fmt: skip
        assert stopped.exit_code == 143
        assert "no checkpoint saved (checkpoint.enable = false)" in str(life.stopped(7, None, "checkpoint.enable = false"))
        time.sleep(0.3)
        with pytest.raises(RunStopped, match="aborted by a second SIGTERM") as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert e.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigint_exit_code_is_130():
    with Lifecycle() as life:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert life.should_stop() and life.exit_code == 130
        assert str(life.stopped(3, None)).startswith("stopped by SIGINT after step 3: no checkpoint saved")


def test_a_different_second_signal_aborts_at_once():
    with Lifecycle() as life:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(RunStopped, match="aborted by a second SIGTERM") as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert e.value.exit_code == 130 and life.signum == signal.SIGINT


def test_children_started_in_the_block_are_stopped_at_its_end():
    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Lifecycle():
            child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])  # fmt: skip
            time.sleep(0.3)
            assert child.pid in descendants(os.getpid())
        assert child.wait(timeout=10) == -signal.SIGKILL  # it ignored SIGTERM: killed after the grace
        assert older.poll() is None  # started before the block: not ours to stop
    finally:
        older.kill()
        older.wait()
