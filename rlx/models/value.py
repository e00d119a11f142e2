"""The value model of PPO with a critic: the policy's transformer with a scalar head in place of lm_head.

`ValueModel` keeps the policy's parameter names for the decoder (`model.*`) and adds `score.weight`
[1, H] and `score.bias` [1], the layout of HF's `<Arch>ForTokenClassification` with `num_labels = 1`
(what verl's critic loads and saves), so an exported critic is an ordinary HF directory. Its
embedding is never tied to anything: the head is not a vocabulary projection.

Initialization (`load_value_weights`): the decoder from any HF directory of the family (a causal LM,
usually the policy, whose `lm_head.weight` is ignored; or an exported critic); the head from the
directory when it has one, else `score.weight ~ N(0, initializer_range)` drawn from a seeded CPU
generator (the same numbers at any world size or mesh) and `score.bias = 0`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
from torch import nn

from rlx.errors import UserError
from rlx.models.args import ARCHS, ModelArgs
from rlx.models.transformer import DecoderStack, Transformer

HEAD = "score"
HEAD_NAMES = (f"{HEAD}.weight", f"{HEAD}.bias")
_CAUSAL, _VALUE = "ForCausalLM", "ForTokenClassification"
DEFAULT_INIT_STD = 0.02


def value_arch(causal_arch: str) -> str:
    """`Qwen3ForCausalLM` -> `Qwen3ForTokenClassification` (the HF class of a scalar-head model)."""
    return causal_arch.removesuffix(_CAUSAL) + _VALUE


def value_model_args(hf_config: dict[str, Any]) -> ModelArgs:
    """ModelArgs of the value model described by an HF config.json dict: a supported causal LM or its
    `...ForTokenClassification` counterpart with one label. Embeddings are untied."""
    archs = list(hf_config.get("architectures") or [])
    if archs and archs[0].endswith(_VALUE):
        labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels", 1)
        if labels != 1:
            raise UserError(f"{archs[0]} with {labels} labels is not a value model (it needs num_labels = 1)")
        archs[0] = archs[0].removesuffix(_VALUE) + _CAUSAL
        if archs[0] not in ARCHS:
            raise UserError(f"unsupported value model architecture {hf_config['architectures'][0]!r}; supported: "
                            + ", ".join(value_arch(a) for a in ARCHS))  # fmt: skip
    args = ModelArgs.from_hf_config({**hf_config, "architectures": archs})
    return dataclasses.replace(args, tie_word_embeddings=False)


def value_hf_config(args: ModelArgs, dtype: str = "float32") -> dict[str, Any]:
    """config.json of a value model: HF's `<Arch>ForTokenClassification` with one label."""
    cfg = args.to_hf_config(dtype)
    cfg.update(architectures=[value_arch(args.arch)], tie_word_embeddings=False,
               id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})  # fmt: skip
    return cfg


class ValueModel(Transformer):
    """The decoder stack of `Transformer` and a `score` Linear(H, 1) with bias.

    `forward` returns values `[B, T]` (one per position: the value of the state after that token), or
    `output_fn(hidden, score)` when given (runs inside forward, like the policy's, so parallel wrappers
    have gathered the head)."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        nn.Module.__init__(self)
        if args.tie_word_embeddings:
            raise ValueError("a value model's embedding is untied: build it from value_model_args(...)")
        self.args = args
        self.model = DecoderStack(args, device, dtype)
        self.score = nn.Linear(args.hidden_size, 1, bias=True, device=device, dtype=dtype)

    def tie_weights(self) -> None:
        """Nothing is tied."""

    def output_weight(self) -> torch.Tensor:
        return self.score.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        output_fn: Callable[[torch.Tensor, nn.Linear], Any] | None = None,
    ) -> Any:
        # The decoder of Transformer.forward (return_hidden never touches lm_head, which this model lacks).
        hidden = super().forward(input_ids, position_ids, cu_seqlens=cu_seqlens, return_hidden=True)
        if output_fn is not None:
            return output_fn(hidden, self.score)
        return self.score(hidden).squeeze(-1)


def init_value_head(hidden_size: int, seed: int, std: float = DEFAULT_INIT_STD) -> dict[str, torch.Tensor]:
    """A fresh head, the same numbers everywhere: {'score.weight': N(0, std) [1, H], 'score.bias': 0 [1]}."""
    gen = torch.Generator().manual_seed(seed)
    return {HEAD_NAMES[0]: torch.randn(1, hidden_size, generator=gen) * std, HEAD_NAMES[1]: torch.zeros(1)}


@torch.no_grad()
def load_value_weights(model: ValueModel, path: str | os.PathLike, *, seed: int) -> bool:
    """Load the decoder (and the head, when the directory has one) of HF directory `path` into the
    (possibly sharded) `model`; initialize the head otherwise. Returns whether the head was loaded.
    Names and shapes are checked before the first copy; a causal LM's `lm_head.weight` is ignored."""
    from rlx.models.hf_io import check_hf_shapes, expected_hf_shapes, hf_tensor_shapes, iter_hf_tensors, read_hf_config
    from rlx.parallel.parallelize import local_slice

    found = {k: v for k, v in hf_tensor_shapes(path).items() if k != "lm_head.weight"}
    has_head = all(name in found for name in HEAD_NAMES)
    expected = expected_hf_shapes(model)
    if not has_head:
        found = {k: v for k, v in found.items() if k not in HEAD_NAMES}
        expected = {k: v for k, v in expected.items() if k not in HEAD_NAMES}
    check_hf_shapes(expected, found, tied=False, where=str(path))
    params = model.state_dict(keep_vars=True)
    tensors = iter_hf_tensors(path, lazy=True)
    if not has_head:
        std = float(read_hf_config(path).get("initializer_range", DEFAULT_INIT_STD))
        head = init_value_head(model.args.hidden_size, seed, std)
        tensors = [*((n, t) for n, t in tensors if n in expected), *head.items()]
    for name, handle in tensors:
        if name not in params:
            continue  # lm_head.weight of a causal LM
        local, index = local_slice(params[name])
        if local.numel():
            local.copy_(handle[index])
    return has_head
