"""Vocabulary-parallel logprobs under torchrun + gloo: each TP rank keeps its lm_head shard, results and
gradients equal one process's within 1e-5, and a guard shows the full weight is never gathered."""

from __future__ import annotations

import importlib.util
import json

import pytest

from torchrun_util import torchrun

pytestmark = pytest.mark.distributed
HAS_TRITON = importlib.util.find_spec("triton") is not None
# The embedding's backward (not the lm_head) is allowed one dense [V, H] gradient; see FullVocabGuard.
EMBEDDING_BACKWARD = {"aten.embedding_dense_backward.default made (512, 64)",
                      "redistribute (Replicate(),)->(Shard(dim=0),) (512, 64)"}  # fmt: skip


def run(tiny_model_dir, tmp_path, nproc: int, *args: str) -> dict:
    out = tmp_path / "vp.json"
    torchrun("run_vocab_parallel.py", nproc, "--model", str(tiny_model_dir), "--out", str(out), *args)
    return json.loads(out.read_text())


def check_policy_and_guard(result: dict) -> None:
    policy = result["policy"]
    assert policy.pop("lm_head_is_dtensor") == 1.0  # the TP plan really shards the lm_head
    for name, worst in policy.items():
        assert worst < 1e-5, f"policy path {name}: TP differs from one process by {worst}"
    guard = result["guard"]
    assert guard["violations_any_rank"] == 0, guard["violations"]
    assert guard["min_ops_seen"] > 10  # the guard saw the region's ops
    assert {e.split(": ", 1)[1] for e in guard["embedding_backward"]} <= EMBEDDING_BACKWARD


def test_tp2_equals_one_process_and_never_gathers_lm_head(tiny_model_dir, tmp_path):
    impls = "torch,triton" if HAS_TRITON else "torch"
    result = run(tiny_model_dir, tmp_path, 2, "--tp", "2", "--dp-shard", "1", "--impls", impls)
    # Function level, every kernel: values, entropy, token stats, d hidden and this rank's d weight rows.
    assert len(result["kernels"]) == 4 * len(impls.split(","))
    for case, worst in result["kernels"].items():
        assert worst < 1e-5, f"{case}: vocabulary-parallel differs from one process by {worst}"
    check_policy_and_guard(result)
    # The guard is not blind: gathering the sharded weight (the old path) trips it.
    assert result["controls"] == {"full_tensor": 1.0, "redistribute_to_replicate": 1.0}


@pytest.mark.slow
def test_fsdp2_x_tp2_policy_path(tiny_model_dir, tmp_path):
    """Under FSDP x TP the forward sees the lm_head as the FSDP-unsharded TP shard: same results."""
    result = run(tiny_model_dir, tmp_path, 4, "--tp", "2", "--dp-shard", "2")
    check_policy_and_guard(result)
