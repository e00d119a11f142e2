"""FSDP2 x TP trainer on CPU (torchrun + gloo): parity with one process, and DCP checkpoints saved at
one mesh and resumed at others. Each case is a few optimizer steps of a tiny Qwen3."""

from __future__ import annotations

import pytest
import torch

from torchrun_util import torchrun

pytestmark = pytest.mark.distributed
STEPS = 3


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One process, no parallelism: the numbers every mesh must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "ref.pt"
    torchrun("run_trainer.py", 1, "--model", str(tiny_model_dir), "--out", str(out), "--steps", str(STEPS))
    return torch.load(out)


@pytest.fixture(scope="module")
def dp2_with_checkpoints(tiny_model_dir, tmp_path_factory):
    """dp_shard=2 with selective AC for 2*STEPS steps, an async checkpoint every STEPS steps, params
    recorded after STEPS."""
    tmp = tmp_path_factory.mktemp("dp2")
    out, ckpt_dir = tmp / "dp2.pt", tmp / "ckpt"
    torchrun("run_trainer.py", 2, "--model", str(tiny_model_dir), "--out", str(out), "--dp-shard", "2",
             "--steps", str(2 * STEPS), "--snapshot", str(STEPS), "--ckpt-dir", str(ckpt_dir),
             "--save-every", str(STEPS), "--ac", "selective", "--async-save")  # fmt: skip
    return torch.load(out), ckpt_dir


def test_dp_shard_2_matches_single_process(reference, dp2_with_checkpoints):
    run, _ = dp2_with_checkpoints
    assert run["losses"][:STEPS] == pytest.approx(reference["losses"], abs=1e-6)
    assert run["grad_norms"][:STEPS] == pytest.approx(reference["grad_norms"], rel=1e-5)
    assert _max_param_diff(run["params"], reference["params"]) < 1e-5


@pytest.mark.parametrize(
    "nproc,dp_shard,tp",
    [(2, 1, 2), pytest.param(4, 2, 2, marks=pytest.mark.slow)],
    ids=["tp2", "dp2xtp2"],
)
def test_mesh_matches_single_process(reference, tiny_model_dir, tmp_path, nproc, dp_shard, tp):
    out = tmp_path / "run.pt"
    torchrun("run_trainer.py", nproc, "--model", str(tiny_model_dir), "--out", str(out),
             "--dp-shard", str(dp_shard), "--tp", str(tp), "--steps", str(STEPS), "--check-reference")  # fmt: skip
    run = torch.load(out)
    assert run["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5)
    assert _max_param_diff(run["params"], reference["params"]) < 1e-5


@pytest.mark.parametrize("nproc,tp", [(1, 1), (2, 2)], ids=["world1", "tp2"])
def test_resume_at_another_mesh(dp2_with_checkpoints, tiny_model_dir, tmp_path, nproc, tp):
    """Saved at dp_shard=2 after STEPS steps; resumed at another mesh, the next steps' losses equal
    the uninterrupted run's, and the trainer RNG continues where it was."""
    uninterrupted, ckpt_dir = dp2_with_checkpoints
    out, resume_dir = tmp_path / "resumed.pt", tmp_path / "ckpt"
    # Resume from a copy holding only step-STEPS (the uninterrupted run also saved step-2*STEPS).
    import shutil

    shutil.copytree(ckpt_dir / f"step-{STEPS}", resume_dir / f"step-{STEPS}")
    torchrun("run_trainer.py", nproc, "--model", str(tiny_model_dir), "--out", str(out), "--dp-shard", "1",
             "--tp", str(tp), "--steps", str(2 * STEPS), "--ckpt-dir", str(resume_dir), "--resume")  # fmt: skip
    resumed = torch.load(out)
    assert resumed["start"] == STEPS
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][STEPS:], abs=1e-6)
    assert resumed["rng"] == uninterrupted["rng"]
