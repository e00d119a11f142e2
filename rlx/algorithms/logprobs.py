"""Token log-probs and entropy, from logits or straight from hidden states without a [T, V] fp32 logits copy.

`logprobs_from_hidden` dispatches to a `LOGPROB_BACKENDS` entry: the fused kernels of rlx.kernels ("torch"
chunks tokens, "triton" tiles the vocabulary on CUDA; both vocabulary-parallel when the lm_head weight is a
DTensor sharded on the vocabulary) or "naive" full logits, the reference. "auto" picks per device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

from rlx.kernels import IMPLS, fused_logprobs, fused_token_stats, triton_available

DEFAULT_CHUNK_SIZE = 1024


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: `logsumexp(z) - sum softmax(z) z`. `[..., V] -> [...]`."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels]. `logits [..., V]`, `labels [...]` -> `[...]`.

    fp32/fp64: `z_y - logsumexp(z)`; other dtypes (bf16): log_softmax + gather in that dtype, as verl does.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _naive_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    # The reference materializes everything: a sharded weight is all-gathered (differentiably).
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    return (hidden.to(weight.dtype) @ weight.t()).float() / temperature


def _naive(hidden, weight, labels, chunk_size, temperature, with_entropy):
    logits = _naive_logits(hidden, weight, temperature)
    entropy = entropy_from_logits(logits) if with_entropy else logits.new_empty(0)
    return logprobs_from_logits(logits, labels), entropy


def _fused(impl: str, hidden, weight, labels, chunk_size, temperature, with_entropy):
    return fused_logprobs(hidden, weight, labels, impl=impl, chunk_size=chunk_size, temperature=temperature,
                          with_entropy=with_entropy)  # fmt: skip


# name -> fn(hidden [N, H], weight [V, H] (tensor or vocabulary-sharded DTensor), labels [N] int64,
#            chunk_size, temperature, with_entropy)
#   -> (logprobs [N] fp32, entropy [N] fp32 or an empty tensor), differentiable w.r.t. hidden and weight.
LOGPROB_BACKENDS: dict[str, Callable] = {"naive": _naive, **{n: functools.partial(_fused, n) for n in IMPLS}}


def resolve_logprob_backend(name: str, device: torch.device | str) -> str:
    """The backend to run for `name` (a `loss.logprob_backend` value) on `device`: "auto" is "triton" on
    CUDA when triton imports, else "torch". Unknown names fail with the valid ones listed."""
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if name not in LOGPROB_BACKENDS:
        raise ValueError(f"unknown logprob backend {name!r}; valid: {', '.join(['auto', *LOGPROB_BACKENDS])}")
    return name


def _check(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """log softmax(h W^T / temperature)[label] (and optionally the entropy), never as full fp32 logits.

    hidden `[N, H]` or `[B, T, H]`; weight `[V, H]`: the lm_head / tied embedding, a plain tensor or, under
    TP, the DTensor sharded on the vocabulary (each rank then works on its shard; nothing is gathered);
    labels `[N]` or `[B, T]`. Returns fp32 logprobs shaped like labels (and entropy). Temperature divides
    the logits, so the values match vLLM's processed (post-temperature) logprobs. Peak extra memory is a few
    `[chunk_size, V_local]` buffers plus a `[V_local, H]` fp32 weight-grad accumulator.
    """
    name = resolve_logprob_backend(backend, weight.device)
    _check(hidden, weight, temperature, chunk_size)
    out_shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if flat_hidden.shape[0] != flat_labels.shape[0]:
        raise ValueError(f"hidden has {flat_hidden.shape[0]} tokens but labels has {flat_labels.shape[0]}")
    logprobs, entropy = LOGPROB_BACKENDS[name](
        flat_hidden, weight, flat_labels, int(chunk_size), float(temperature), bool(return_entropy)
    )
    if return_entropy:
        return logprobs.reshape(out_shape), entropy.reshape(out_shape)
    return logprobs.reshape(out_shape)


@torch.no_grad()
def token_stats_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (max_prob, entropy) `[N]` fp32 of softmax(h W^T / temperature) over the full vocabulary (the
    token-adaptive sampler's statistics); hidden `[N, H]`, weight as in `logprobs_from_hidden`."""
    name = resolve_logprob_backend(backend, weight.device)
    _check(hidden, weight, temperature, chunk_size)
    if name == "naive":
        logp = torch.log_softmax(_naive_logits(hidden, weight, temperature), dim=-1)
        return logp.max(dim=-1).values.exp(), -(logp.exp() * logp).sum(dim=-1)
    if name not in IMPLS:
        raise ValueError(f"logprob backend {name!r} has no token statistics; use one of {', '.join(IMPLS)}")
    return fused_token_stats(hidden, weight, impl=name, chunk_size=chunk_size, temperature=temperature)
