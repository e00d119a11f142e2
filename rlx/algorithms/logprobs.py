"""Token log-probs and entropy, from logits or straight from hidden states without a [T, V] fp32 logits copy.

`logprobs_from_hidden` chunks over tokens in forward *and* backward (a custom autograd.Function).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    # The matmul runs in the weight's dtype (like the model's lm_head); softmax math runs in fp32.
    logits = (hidden.to(weight.dtype) @ weight.t()).float()
    return logits / temperature if temperature != 1.0 else logits


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward keeps only `lse [N]` (and the inputs by reference); backward recomputes each chunk's logits.

    Per token, with p = softmax(z):  d lp/dz = onehot(y) - p,  d H/dz = -p (z - E_p[z]).
    The chain rule through z = h W^T / tau gives dh = g W / tau and dW += g^T h / tau, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, temperature, with_entropy):
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = _chunk_logits(hidden[start:end], weight, temperature)
            chunk_lse = torch.logsumexp(z, dim=-1)
            lse[start:end] = chunk_lse
            logprobs[start:end] = z.gather(-1, labels[start:end, None]).squeeze(-1) - chunk_lse
            if with_entropy:
                probs = torch.exp(z - chunk_lse[:, None])
                entropy[start:end] = chunk_lse - (probs * z).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.temperature, ctx.with_entropy = chunk_size, temperature, with_entropy
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # Accumulate the weight gradient in fp32 across chunks, cast once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        use_entropy = ctx.with_entropy and grad_entropy is not None and grad_entropy.numel() > 0
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            z = _chunk_logits(h, weight, ctx.temperature)
            probs = torch.exp(z - lse[start:end, None])
            if grad_logprobs is not None:
                g = grad_logprobs[start:end, None].float()
                grad_z = -g * probs
                grad_z.scatter_add_(-1, labels[start:end, None], g)
            else:
                grad_z = torch.zeros_like(z)
            if use_entropy:
                expected_z = (probs * z).sum(-1, keepdim=True)
                grad_z -= grad_entropy[start:end, None] * probs * (z - expected_z)
            del z, probs
            if ctx.temperature != 1.0:
                grad_z /= ctx.temperature
            grad_z = grad_z.to(weight.dtype)
            if need_h:
                grad_hidden[start:end] = (grad_z @ weight).to(hidden.dtype)
            if need_w:
                grad_weight += (grad_z.t() @ h.to(weight.dtype)).float()
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _torch_chunked(hidden, weight, labels, chunk_size, temperature, with_entropy):
    logprobs, entropy, _ = _ChunkedLogprobs.apply(hidden, weight, labels, chunk_size, temperature, with_entropy)
    return logprobs, entropy


# Hook for faster implementations with the same contract (a Triton kernel registers "triton" here):
# fn(hidden [N, H], weight [V, H], labels [N] int64, chunk_size, temperature, with_entropy)
#   -> (logprobs [N] fp32, entropy [N] fp32 or an empty tensor), differentiable w.r.t. hidden and weight.
LOGPROB_BACKENDS: dict[str, Callable] = {"torch": _torch_chunked}


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "torch",
):
    """log softmax(h W^T / temperature)[label] (and optionally the entropy), chunked over tokens.

    hidden `[N, H]` or `[B, T, H]`; weight `[V, H]` (the lm_head / tied embedding: a plain tensor, e.g. a
    DTensor's `full_tensor()`); labels `[N]` or `[B, T]`. Returns fp32 logprobs shaped like labels (and entropy).
    Temperature divides the logits, so the values match vLLM's processed (post-temperature) logprobs.
    Peak extra memory is a few `[chunk_size, V]` fp32 buffers plus a `[V, H]` fp32 weight-grad accumulator.
    """
    if backend not in LOGPROB_BACKENDS:
        raise ValueError(f"unknown logprob backend {backend!r}; valid: {sorted(LOGPROB_BACKENDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")
    out_shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if flat_hidden.shape[0] != flat_labels.shape[0]:
        raise ValueError(f"hidden has {flat_hidden.shape[0]} tokens but labels has {flat_labels.shape[0]}")
    logprobs, entropy = LOGPROB_BACKENDS[backend](
        flat_hidden, weight, flat_labels, int(chunk_size), float(temperature), bool(return_entropy)
    )
    if return_entropy:
        return logprobs.reshape(out_shape), entropy.reshape(out_shape)
    return logprobs.reshape(out_shape)
