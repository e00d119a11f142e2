"""Staleness check: does the engine sample from the trainer's current weights?

Recomputes the engine's completions with the trainer model (teacher forcing) and compares the
greedy choices and the sampled-token logprobs. Used by tests, benchmarks and debugging runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rlx.types import Completion


@torch.no_grad()
def compare_with_model(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Completion],
    *,
    temperature: float,
) -> dict[str, float]:
    """Teacher-forced recomputation of one completion per prompt.

    `model(input_ids [1, T]) -> logits [1, T, V]` may be sharded (TP / FSDP); every rank must call
    this with the same arguments. With `temperature == 0` (greedy completions) it counts tokens
    that differ from the model's argmax: zero mismatches means greedy decoding with the model
    produces exactly these sequences. Otherwise it compares the engine's logprobs with
    `log_softmax(logits / temperature)` at the sampled tokens.

    Returns `tokens`, `argmax_mismatches` (greedy only), `max_logprob_diff` (sampled only).
    """
    mismatches, tokens, max_diff = 0, 0, 0.0
    for prompt, completion in zip(prompts, completions, strict=True):
        response = torch.tensor(completion.token_ids, dtype=torch.long)
        if response.numel() == 0:
            continue
        ids = torch.tensor([list(prompt) + completion.token_ids], dtype=torch.long)
        logits = _full(model(ids))[0, len(prompt) - 1 : -1].float()  # predicts each response token
        tokens += response.numel()
        if temperature == 0:
            mismatches += int((logits.argmax(-1) != response).sum())
        else:
            ref = torch.log_softmax(logits / temperature, dim=-1).gather(-1, response[:, None])[:, 0]
            engine = torch.tensor(completion.logprobs, dtype=torch.float32)
            max_diff = max(max_diff, float((ref - engine).abs().max()))
    out = {"tokens": float(tokens)}
    if temperature == 0:
        out["argmax_mismatches"] = float(mismatches)
    else:
        out["max_logprob_diff"] = max_diff
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
