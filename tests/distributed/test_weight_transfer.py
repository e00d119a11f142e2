"""Weights from FSDP / TP trainer ranks to a separate generator rank (rlx.weight_sync.transfer): every
received tensor equals the trainer's, and the engine then decodes like the trainer's model (greedy
tokens equal, sampled tokens' logprobs within 1e-5). See run_transfer.py."""

from __future__ import annotations

import json

import pytest
import torch

from torchrun_util import torchrun

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("tp", [1, 2], ids=["fsdp2", "tp2"])
def test_shards_arrive_whole_and_the_engine_matches(tiny_model_dir, tmp_path, tp):
    out = tmp_path / "transfer.json"
    torchrun("run_transfer.py", 3, "--model", str(tiny_model_dir), "--out", str(out), "--tp", str(tp))
    result = json.loads(out.read_text())
    assert result["max_weight_diff"] == 0.0
    assert result["greedy_equal"] and result["max_logprob_diff"] < 1e-5, result
    assert "model.embed_tokens.weight" in result["names"] and "lm_head.weight" not in result["names"]  # tied
    assert result["device"] == ["cpu"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="GPU to GPU weight transfer needs 2 GPUs (trainer, generator)")
def test_nccl_shards_arrive_on_the_generator_gpu(tiny_model_dir, tmp_path):
    out = tmp_path / "transfer.json"
    torchrun("run_transfer.py", 2, "--model", str(tiny_model_dir), "--out", str(out), "--backend", "nccl")
    result = json.loads(out.read_text())
    assert result["device"] == ["cuda:1"]
    assert result["max_weight_diff"] == 0.0
    assert result["greedy_equal"] and result["max_logprob_diff"] < 1e-5, result
