"""Policy forward passes over rollouts: packing, per-token logprobs/entropy, exact token stats.

Rollouts (prompt + response) are grouped into right-padded micro-batches up to a token budget, run
through the model, and the response tokens' logprobs are computed from hidden states chunk by chunk
(`logprobs_from_hidden`), never as a full [T, V] logits tensor, and under TP on each rank's vocabulary
shard of the lm_head. Results come back in the flat `[B, T]` layout of the loss stage: row i is
rollout i, column t its t-th response token.

Every data-parallel rank must run the same number of forwards (FSDP all-gathers are collectives),
so the callers pad with a 1-token dummy row; `num_micro_batches` agrees on that number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rlx.algorithms.critic import apply_kl_penalty
from rlx.algorithms.logprobs import logprobs_from_hidden, token_stats_from_hidden
from rlx.trainer.train_step import budget_groups, num_micro_batches
from rlx.types import Rollout, RolloutBatch


@dataclass
class Pack:
    """One micro-batch: rollouts `rows` (indices into the caller's list), one per row, right-padded.

    Each rollout gets its own row (causal attention, positions 0..L-1) rather than being packed
    into one long row with a block-diagonal mask: with SDPA the padded layout takes the mask-free
    causal kernel, which is much cheaper for the short sequences of RL than a dense [S, S] mask."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    rows: list[int]
    hidden_pos: torch.Tensor  # [N] flat index into [R * L] of the hidden state predicting a response token
    labels: torch.Tensor  # [N] the response tokens
    out_row: torch.Tensor  # [N] index into `rows` order (0..len(rows)-1)
    out_col: torch.Tensor  # [N] response position t

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def pack_rollouts(rollouts: Sequence[Rollout], token_budget: int) -> list[Pack]:
    """Micro-batches of whole rollouts with at most `token_budget` padded tokens each, grouped like
    SFT documents (`budget_groups`: length order, a longer rollout alone). An empty list gives none."""
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    return [_make_pack(rollouts, rows) for rows in budget_groups(lengths, token_budget)]


def _make_pack(rollouts: Sequence[Rollout], rows: list[int]) -> Pack:
    width = max(len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids) for i in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    hidden_pos, labels, out_row, out_col = [], [], [], []
    for j, i in enumerate(rows):
        r = rollouts[i]
        P, L = len(r.prompt_ids), len(r.response_ids)
        ids[j, : P + L] = torch.tensor(list(r.prompt_ids) + list(r.response_ids), dtype=torch.long)
        # The hidden state at position p predicts token p + 1: response token t (at P + t) is
        # predicted from P + t - 1. A prompt is never empty, so that index stays in the row.
        hidden_pos += range(j * width + P - 1, j * width + P + L - 1)
        labels += r.response_ids
        out_row += [j] * L
        out_col += range(L)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    # Padding sits after each sequence, so causal attention never lets real tokens see it.
    position_ids = torch.arange(width).expand(len(rows), width).contiguous()
    return Pack(ids, position_ids, rows, as_long(hidden_pos), as_long(labels), as_long(out_row), as_long(out_col))


def dummy_pack() -> Pack:
    """A 1-token row with no response tokens: keeps a rank's forward count equal to its peers'."""
    empty = torch.zeros(0, dtype=torch.long)
    return Pack(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), [], empty, empty, empty, empty)


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the `[V, H]` output weight: its vocabulary shard under TP (`to_local()`, a
    differentiable view whose gradient lands in the DTensor), the weight itself otherwise. Never gathers."""
    return weight.to_local() if isinstance(weight, DTensor) else weight



def pack_logprobs(
    model: nn.Module,
    pack: Pack,
    device: torch.device,
    *,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (and entropy) of the pack's response tokens, flat `[N]` (differentiable).

    The output weight goes to the kernel as the model holds it: under TP a vocabulary-sharded DTensor,
    so each rank computes on its shard (rlx.kernels) and the full lm_head is never gathered."""

    def head(hidden: torch.Tensor, weight: torch.Tensor):
        h = hidden.flatten(0, 1).index_select(0, pack.hidden_pos.to(device))
        return logprobs_from_hidden(h, weight, pack.labels.to(device), chunk_size=chunk_size, temperature=temperature,
                                    return_entropy=with_entropy, backend=backend)  # fmt: skip

    out = model(pack.input_ids.to(device), pack.position_ids.to(device), output_fn=head)
    return out if with_entropy else (out, None)


def scatter_rows(flat: torch.Tensor, pack: Pack, width: int) -> torch.Tensor:
    """Flat `[N]` per-token values of a pack -> `[len(pack.rows), width]` (zeros elsewhere)."""
    out = flat.new_zeros(len(pack.rows), width)
    return out.index_put((pack.out_row.to(flat.device), pack.out_col.to(flat.device)), flat)


def forward_packs(model: nn.Module, rollouts: Sequence[Rollout], head, *, device: torch.device, token_budget: int,
                 dp_group: dist.ProcessGroup | None):  # fmt: skip
    """Yield (pack, head(response hidden states [N, H], output weight as the model holds it)) for every
    micro-batch of `rollouts`, plus dummy forwards so every DP rank runs the same number (collectives).
    Under TP the weight is the vocabulary-sharded DTensor: heads pass it to the vocabulary-parallel
    kernels, and every TP rank of a DP group runs the same packs, so their all-reduces pair up."""
    packs = pack_rollouts(rollouts, token_budget)
    for k in range(num_micro_batches(len(packs), dp_group)):
        pack = packs[k] if k < len(packs) else dummy_pack()

        def output_fn(hidden: torch.Tensor, weight: torch.Tensor, pack: Pack = pack):
            return head(hidden.flatten(0, 1).index_select(0, pack.hidden_pos.to(device)), weight, pack)

        yield pack, model(pack.input_ids.to(device), pack.position_ids.to(device), output_fn=output_fn)


@torch.no_grad()
def compute_logprobs(
    model: nn.Module,
    rollouts: Sequence[Rollout],
    *,
    device: torch.device,
    token_budget: int,
    temperature: float,
    chunk_size: int,
    dp_group: dist.ProcessGroup | None,
    backend: str = "auto",
) -> torch.Tensor:
    """`[B, T]` logprobs of every rollout's response tokens under `model` (no grad), fp32 on CPU.
    `backend`: a `loss.logprob_backend` name (rlx.algorithms.LOGPROB_BACKENDS or "auto")."""
    width = max((len(r.response_ids) for r in rollouts), default=0)
    out = torch.zeros(len(rollouts), width)

    def head(h, w, pack):
        return logprobs_from_hidden(h, w, pack.labels.to(device), chunk_size=chunk_size, temperature=temperature,
                                    backend=backend)  # fmt: skip

    for pack, lp in forward_packs(model, rollouts, head, device=device, token_budget=token_budget, dp_group=dp_group):
        if pack.rows:
            out[pack.rows] = scatter_rows(lp.float().cpu(), pack, width)
    return out


@torch.no_grad()
def compute_token_stats(
    model: nn.Module,
    rollouts: Sequence[Rollout],
    *,
    device: torch.device,
    token_budget: int,
    temperature: float,
    chunk_size: int,
    dp_group: dist.ProcessGroup | None,
    backend: str = "auto",
) -> list[tuple[list[float], list[float]]]:
    """Exact (max_prob, entropy) of every response token under `model`'s sampling distribution
    (logits / temperature, full vocabulary), for the token-adaptive sampler. Vocabulary-parallel
    under TP like `compute_logprobs` (max_prob = exp(max logit - logsumexp), all-reduced)."""
    results: list[tuple[list[float], list[float]]] = [([], []) for _ in rollouts]

    def head(h, w, pack):
        return _max_prob_entropy(h, w, temperature, chunk_size, backend)

    for pack, (max_prob, entropy) in forward_packs(model, rollouts, head, device=device, token_budget=token_budget,
                                                  dp_group=dp_group):  # fmt: skip
        max_prob, entropy = max_prob.cpu(), entropy.cpu()
        for j, i in enumerate(pack.rows):
            sel = pack.out_row == j
            results[i] = (max_prob[sel].tolist(), entropy[sel].tolist())
    return results


def _max_prob_entropy(h: torch.Tensor, w: torch.Tensor, temperature: float, chunk: int, backend: str = "auto"):
    return token_stats_from_hidden(h, w, chunk_size=chunk, temperature=temperature, backend=backend)


def forward_options(cfg: Any, device: torch.device, dp_group: dist.ProcessGroup | None) -> dict[str, Any]:
    """The keyword arguments of `compute_logprobs` / `compute_token_stats` from a resolved Config."""
    return dict(device=device, token_budget=cfg.loss.micro_batch_tokens, temperature=cfg.generator.temperature,
                chunk_size=cfg.loss.logprob_chunk_size, dp_group=dp_group, backend=cfg.loss.logprob_backend)


def penalized_sequence_rewards(policy: nn.Module, ref: nn.Module, rollouts: Sequence[Rollout], beta: float,
                               estimator: str, **options) -> list[float]:  # fmt: skip
    """Each rollout's reward after the in-reward KL penalty (the filtered sampler's seq_final_reward):
    score - beta * sum_t KL_t(policy || ref), KL by `estimator` (algorithm.kl_penalty). `options` are
    `forward_options`; both forwards run even for an empty list (they may be collective)."""
    old = compute_logprobs(policy, rollouts, **options)
    ref_lp = compute_logprobs(ref, rollouts, **options)
    if not rollouts:
        return []
    t = RolloutBatch(list(rollouts)).to_tensors()
    rewards, _ = apply_kl_penalty(t["token_level_rewards"], old, ref_lp, t["response_mask"], beta, estimator)
    return rewards.sum(-1).tolist()
