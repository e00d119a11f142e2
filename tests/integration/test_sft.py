"""`rlx sft` end to end on a synthetic task (reverse a 5-letter string) with a tiny char-level model:
validation loss goes down, the HF output loads, a SIGKILLed run resumes to the same metrics, and it
runs under torchrun with two ranks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
COMPARED = ("train/loss", "train/grad_norm", "train/lr", "val/loss")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    from rlx.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("sft")
    model = make_tiny(root / "model", "qwen3", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=32, intermediate_size=128, char_level=True)  # fmt: skip
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(400):
            s = "".join(rng.choice("abcdef") for _ in range(5))
            f.write(json.dumps({"prompt": s, "response": s[::-1]}) + "\n")
    return model, root / "train.jsonl"


def sft_args(task, run_dir: Path, *extra: str) -> list[str]:
    model, data = task
    return ["sft", f"--model.path={model}", f"--sft.train_files={data}", "--sft.batch_tokens=512",
            "--sft.epochs=4", "--sft.steps=40", "--sft.val_every=10", "--sft.val_fraction=0.1", "--optim.lr=3e-3",
            "--optim.warmup_steps=4", "--optim.lr_schedule=cosine", "--optim.min_lr_ratio=0.1",
            f"--job.output_dir={run_dir.parent}", f"--job.name={run_dir.name}", "--checkpoint.interval=5",
            "--checkpoint.keep_last=2", *extra]  # fmt: skip


def rlx(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rlx.cli", *args], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out


def test_sft_lowers_validation_loss_and_writes_an_hf_dir(task, tmp_path):
    run_dir = tmp_path / "run"
    proc = rlx(sft_args(task, run_dir))
    assert "sft step 40/40" in proc.stdout
    m = metrics_by_step(run_dir)
    assert m[40]["val/loss"] < 0.6 * m[0]["val/loss"], (m[0]["val/loss"], m[40]["val/loss"])
    from rlx.models import from_pretrained

    model = from_pretrained(run_dir / "hf")  # the RL starting point
    assert model.args.num_hidden_layers == 2 and (run_dir / "hf" / "tokenizer.json").is_file()
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-35", "step-40"]


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_metrics(task, tmp_path):
    reference = tmp_path / "reference"
    rlx(sft_args(task, reference))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rlx.cli", *sft_args(task, killed)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        path = killed / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= 18:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = max(metrics_by_step(killed))
    assert 0 < interrupted_at < 40
    proc = rlx(sft_args(task, killed))
    assert "resumed at step" in proc.stdout
    expected, got = metrics_by_step(reference), metrics_by_step(killed)
    assert sorted(got) == sorted(expected)
    for step in expected:
        for key in COMPARED:
            if key in expected[step]:
                assert got[step][key] == pytest.approx(expected[step][key], abs=1e-6), (step, key)


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_under_torchrun(task, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "rlx.cli",
           *sft_args(task, run_dir, "--sft.steps=6", "--parallel.tp=2", "--checkpoint.interval=3")]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m = metrics_by_step(run_dir)
    assert m[6]["val/loss"] < m[0]["val/loss"]
    from rlx.models import from_pretrained

    from_pretrained(run_dir / "hf")
