"""Token selection of the torch generator backend (torch_backend.py), with vLLM's semantics: the
processed-logprob sampler (temperature, top-k / top-p masks, the min_tokens stop-token ban, greedy
rows) and stop strings checked on the decoded response."""

from __future__ import annotations

from typing import Any

import torch

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it means greedy


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    top_k: int,
    top_p: float,
    suppress: torch.Tensor | None,
    is_stop: torch.Tensor,
    any_greedy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their logprobs [B] under the distribution they were drawn from.

    logits [B, V] fp32; temperature [B] (below 1e-5: greedy); noise [B, V] Exponential(1), None
    when every row is greedy; suppress [B] bool: rows whose stop tokens (`is_stop` [V]) are
    banned (min_tokens); any_greedy False skips the greedy path (no row is greedy).
    As vLLM with `logprobs_mode="processed_logprobs"`: sampled rows get
    log_softmax(top_k_top_p(logits / temperature)), the masked-out tokens renormalized away;
    greedy rows take the argmax and log_softmax(logits) (no temperature, top-k or top-p)."""
    if suppress is not None:
        logits = logits.masked_fill(suppress[:, None] & is_stop[None, :], float("-inf"))
    if noise is None:  # every row greedy
        drawn = logits.argmax(dim=-1)
        return drawn, torch.log_softmax(logits, dim=-1).gather(-1, drawn[:, None])[:, 0]
    greedy = temperature < GREEDY_EPS
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    processed = torch.log_softmax(apply_top_k_top_p(scaled, top_k, top_p), dim=-1)
    # Exponential race: argmax p / E with E ~ Exp(1) is a draw from p (vLLM's random_sample).
    drawn = (processed.exp() / noise).argmax(dim=-1)
    if any_greedy:
        processed = torch.where(greedy[:, None], torch.log_softmax(logits, dim=-1), processed)
        drawn = torch.where(greedy, logits.argmax(dim=-1), drawn)
    return drawn, processed.gather(-1, drawn[:, None])[:, 0]


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's masks (apply_top_k_top_p_pytorch): -inf outside the k largest (ties at the k-th
    value kept), then outside the smallest set whose mass reaches top_p (the top token always
    stays). top_k <= 0 or >= V and top_p >= 1 disable them."""
    V = logits.shape[-1]
    use_k, use_p = 0 < top_k < V, top_p < 1.0
    if not use_k and not use_p:
        return logits
    if not use_p:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
    ascending, index = logits.sort(dim=-1)
    if use_k:
        ascending = ascending.masked_fill(ascending < ascending[:, V - top_k : V - top_k + 1], float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p
    drop[:, -1] = False
    ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, index, ascending)


class StopStrings:
    """Stop strings (generator.stop) checked on the decoded response, as vLLM does: a sequence
    stops at the token that completes a stop string ending after its first min_tokens tokens;
    that token is kept. Costs a decode per live sequence and step: only built when configured."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop

    def hit(self, tokens: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """tokens [B, t] generated so far; allowed [B] rows past min_tokens -> [B] bool."""
        out = torch.zeros(tokens.shape[0], dtype=torch.bool)
        for i, (ids, ok) in enumerate(zip(tokens.tolist(), allowed.tolist())):
            if ok:
                text = self.tokenizer.decode(ids)
                prev = len(self.tokenizer.decode(ids[:-1]))  # only a string ending in the new text counts
                out[i] = any(text.find(s, max(0, prev - len(s) + 1)) >= 0 for s in self.stop)
        return out.to(tokens.device)
