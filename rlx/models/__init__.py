"""Decoder-only transformer family (Llama 3.x, Qwen2, Qwen3) with HF parameter names.

Build (also on the meta device), load/save HF safetensors directories, tokenizer helpers.
"""

from rlx.models.args import ARCHS, ModelArgs
from rlx.models.hf_io import (
    expected_hf_shapes,
    from_pretrained,
    hf_tensor_shapes,
    iter_hf_tensors,
    load_hf_weights,
    read_hf_config,
    save_hf_state_dict,
    save_pretrained,
)
from rlx.models.tokenizer import apply_chat_template, load_tokenizer
from rlx.models.transformer import Transformer, build_model

__all__ = [
    "ARCHS",
    "ModelArgs",
    "Transformer",
    "apply_chat_template",
    "build_model",
    "expected_hf_shapes",
    "from_pretrained",
    "hf_tensor_shapes",
    "iter_hf_tensors",
    "load_hf_weights",
    "load_tokenizer",
    "read_hf_config",
    "save_hf_state_dict",
    "save_pretrained",
]
