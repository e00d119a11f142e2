"""Shared fixtures for the model tests: small HF-written checkpoints with randomized weights.

Checkpoints are written by HF transformers itself, so rlx is checked against the reference.
"""

from __future__ import annotations

import pytest
import torch

# name -> (HF class name, config kwargs). Every family gets GQA, 3 layers and non-default rope_theta;
# Llama also gets llama3 rope scaling with a short original context so that scaling matters.
HF_CASES = {
    "llama": (
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2": ("Qwen2ForCausalLM", dict(rope_theta=1000000.0)),
    "qwen3": ("Qwen3ForCausalLM", dict(rope_theta=1000000.0, head_dim=32)),
}
SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def write_hf_checkpoint(path, family: str, tied: bool, seed: int = 0):
    """Save a random-weight HF model of `family`; every parameter (norms and biases included) is
    randomized so that a wrong norm, bias or tie cannot hide behind HF's ones/zeros init."""
    transformers = pytest.importorskip("transformers")
    cls_name, extra = HF_CASES[family]
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(**SIZES, **extra, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """(family, tied) -> (directory, HF model) for every family, tied and untied; built once."""
    cache = {}

    def get(family: str, tied: bool):
        if (family, tied) not in cache:
            path = tmp_path_factory.mktemp(f"hf_{family}_{'tied' if tied else 'untied'}")
            cache[family, tied] = (path, write_hf_checkpoint(path, family, tied))
        return cache[family, tied]

    return get
