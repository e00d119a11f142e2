"""Logprob of the target token and entropy, from hidden states and the (possibly vocabulary-sharded)
lm_head weight, as one autograd function over an implementation ("torch" or "triton").

Forward keeps per token only the statistics of `vocab_parallel.Stats`; backward recomputes the logits
tile by tile. Under tensor parallelism each rank works on its own vocabulary shard: the statistics are
all-reduced in forward, the partial hidden gradients in backward, and the weight gradient stays local.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from rlx.kernels.vocab_parallel import Stats, all_reduce_slices, local_labels, local_shard

# name -> module with `forward_stats` and `backward` (see torch_impl); imported on first use so that
# triton is needed only by the triton backend.
IMPLS = {"torch": "rlx.kernels.torch_impl", "triton": "rlx.kernels.triton_impl"}


def triton_available() -> bool:
    """Whether the triton package imports (the kernels themselves need CUDA or TRITON_INTERPRET=1)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _impl(name: str):
    if name not in IMPLS:
        raise ValueError(f"unknown kernel implementation {name!r}; valid: {', '.join(IMPLS)}")
    if name == "triton" and not triton_available():
        raise ValueError("logprob backend 'triton' needs the triton package (pip install triton)")
    return importlib.import_module(IMPLS[name])


def _stats(impl, hidden, weight, labels, group, temperature, chunk_size, with_entropy) -> Stats:
    stats = impl.forward_stats(hidden, weight, labels, temperature=temperature, chunk_size=chunk_size,
                               with_entropy=with_entropy)  # fmt: skip
    return stats if group is None else all_reduce_slices(stats, group)


class _FusedLogprobs(torch.autograd.Function):
    """(hidden [N, H], local weight [V_local, H]) -> (logprobs [N], entropy [N] or empty), fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, impl_name, group, start, chunk_size, temperature, with_entropy):
        impl = _impl(impl_name)
        mine = local_labels(labels, start, weight.shape[0])
        stats = _stats(impl, hidden, weight, mine, group, temperature, chunk_size, with_entropy)
        logprobs = stats.target - stats.lse
        entropy = stats.lse - stats.ez if with_entropy else logprobs.new_empty(0)
        ctx.save_for_backward(hidden, weight, mine, stats.lse, stats.ez)
        ctx.impl, ctx.group, ctx.chunk_size, ctx.temperature = impl, group, chunk_size, temperature
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, mine, lse, ez = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if grad_entropy is not None and grad_entropy.numel() == 0:
            grad_entropy = None
        grad_h, grad_w = ctx.impl.backward(hidden, weight, mine, lse, ez, grad_logprobs, grad_entropy,
                                           temperature=ctx.temperature, chunk_size=ctx.chunk_size,
                                           need_hidden=need_h, need_weight=need_w)  # fmt: skip
        if need_h and ctx.group is not None:
            # Each rank's dh = g W_local / tau covers its vocabulary shard only: sum them (in fp32).
            dist.all_reduce(grad_h, group=ctx.group)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None, None, None, None)  # fmt: skip


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, impl: str = "torch",
                   chunk_size: int = 1024, temperature: float = 1.0, with_entropy: bool = False):  # fmt: skip
    """log softmax(h W^T / temperature)[label] and the entropy of that softmax, per token.

    hidden `[N, H]`; weight `[V, H]`, a plain tensor or a DTensor sharded on the vocabulary over the TP
    mesh (then each rank computes on its shard only and the gradient lands in its shard); labels `[N]`
    global vocabulary ids. Returns fp32 (logprobs `[N]`, entropy `[N]` or an empty tensor), differentiable
    w.r.t. hidden and weight. Peak extra memory: `[chunk_size, V_local]` tiles plus a fp32 weight-grad
    accumulator of the local shard.
    """
    shard = local_shard(weight)
    return _FusedLogprobs.apply(hidden, shard.local, labels, impl, shard.group, shard.start, int(chunk_size),
                                float(temperature), bool(with_entropy))  # fmt: skip


@torch.no_grad()
def fused_token_stats(hidden: torch.Tensor, weight: torch.Tensor, *, impl: str = "torch", chunk_size: int = 1024,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Exact (max_prob, entropy) `[N]` fp32 of softmax(h W^T / temperature) over the full vocabulary,
    vocabulary-parallel like `fused_logprobs`: max_prob = exp(max z - logsumexp z)."""
    shard = local_shard(weight)
    no_label = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
    stats = _stats(_impl(impl), hidden, shard.local, no_label, shard.group, float(temperature), int(chunk_size), True)
    return torch.exp(stats.max - stats.lse), stats.lse - stats.ez
