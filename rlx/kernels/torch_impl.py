"""Torch implementation of the fused logprob/entropy statistics: chunks of tokens against the whole
(local) vocabulary, `[chunk, V]` logits recomputed in backward; the reference for the Triton kernels.

Temperature is folded into the hidden states once (z = (h / tau) W^T): that saves a pass over every
`[chunk, V]` tile in forward and backward, and dW = g^T (h / tau) reuses the scaled copy.
"""

from __future__ import annotations

import torch

from rlx.kernels.vocab_parallel import Stats


def _scaled(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    # The matmul runs in the weight's dtype (like the model's lm_head); softmax math runs in fp32.
    h = hidden.to(weight.dtype)
    return h * (1.0 / temperature) if temperature != 1.0 else h


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                  chunk_size: int, with_entropy: bool) -> Stats:  # fmt: skip
    """`Stats` `[N]` of z = h W^T / temperature over the rows of `weight` [V, H]; `labels` [N] index
    those rows, -1 where the label is not in this slice."""
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.zeros(4, n, dtype=torch.float32, device=hidden.device)
    if v == 0:  # an empty vocabulary shard contributes exp(-inf) = 0 to every sum
        out[0:2] = float("-inf")
        return Stats(*out)
    h = _scaled(hidden, weight, temperature)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = (h[start:end] @ weight.t()).float()
        y = labels[start:end]
        picked = z.gather(-1, y.clamp(min=0)[:, None]).squeeze(-1)
        out[2, start:end] = torch.where(y >= 0, picked, torch.zeros_like(picked))
        top = z.max(dim=-1).values
        # One exp pass serves the logsumexp and the entropy's E_p[z]; in place when z is not needed after.
        e = (torch.sub(z, top[:, None]) if with_entropy else z.sub_(top[:, None])).exp_()
        total = e.sum(dim=-1)
        out[0, start:end], out[1, start:end] = top, top + torch.log(total)
        if with_entropy:  # E_p[z] = sum_v e_v z_v / sum_v e_v: row-wise dot products, no [chunk, V] temporary
            out[3, start:end] = torch.bmm(e[:, None, :], z[:, :, None]).view(-1) / total
        del z, e
    return Stats(*out)


def backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
             ez: torch.Tensor | None, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, *,
             temperature: float, chunk_size: int, need_hidden: bool, need_weight: bool):  # fmt: skip
    """Gradients of sum(g_lp * logprob + g_ent * entropy) w.r.t. hidden [N, H] and weight [V, H], fp32.

    With p = softmax(z) over the *whole* vocabulary (`lse`, `ez` are global statistics):
    d lp/dz = onehot(y) - p and d H/dz = -p (z - E_p[z]), chained through z = h W^T / tau. Under
    vocabulary parallelism the hidden gradient returned here is this shard's partial sum.
    """
    n, v = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    # Accumulate the weight gradient in fp32 across chunks (addmm_ in place when the weight is fp32).
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    if v == 0 or n == 0:
        return grad_hidden, grad_weight
    h = _scaled(hidden, weight, temperature)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = (h[start:end] @ weight.t()).float()
        lse_c = lse[start:end, None]
        # p = exp(z - lse), in z's own storage unless the entropy term still needs z.
        probs = (torch.sub(z, lse_c) if grad_entropy is not None else z.sub_(lse_c)).exp_()
        g = grad_logprobs[start:end, None].float()
        if grad_entropy is not None:
            # -g p - g_ent p (z - E_p[z]) = p (a + b z) with per-token a = g_ent E_p[z] - g, b = -g_ent:
            # three in-place passes over z's storage instead of five.
            g_ent = grad_entropy[start:end, None].float()
            grad_z = z.mul_(-g_ent).add_(g_ent * ez[start:end, None] - g).mul_(probs)
        else:
            grad_z = probs.mul_(-g)
        del z, probs
        y = labels[start:end, None]
        inside = y >= 0
        grad_z.scatter_add_(-1, y.clamp(min=0), torch.where(inside, g, torch.zeros_like(g)))
        grad_z = grad_z.to(weight.dtype)
        if need_hidden:
            grad_hidden[start:end] = grad_z @ weight
        if need_weight:
            if grad_weight.dtype == grad_z.dtype:
                grad_weight.addmm_(grad_z.t(), h[start:end])
            else:
                grad_weight += (grad_z.t() @ h[start:end]).float()
        del grad_z
    if need_hidden and temperature != 1.0:
        grad_hidden.mul_(1.0 / temperature)
    return grad_hidden, grad_weight
