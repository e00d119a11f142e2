"""Fixtures for the trainer's torchrun tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Qwen3 (qk-norm, GQA, tied embeddings), 2 layers, hidden 64: everything TP must handle."""
    from rlx.models.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny_qwen3")
    return make_tiny(out, "qwen3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                     intermediate_size=128, vocab_size=512, tie=True)  # fmt: skip
