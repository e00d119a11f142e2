"""Softmax statistics of vocabulary slices and how they combine: over the tiles of one kernel launch
and over tensor-parallel ranks that each hold a vocabulary shard of the lm_head weight.

Per token, a slice of the vocabulary is summarized by four numbers (`Stats`): its max logit, its
logsumexp, the target's logit if the target lies in the slice (else 0), and E_p[z] under the
slice's own softmax (for the entropy). Slices combine exactly, so no rank ever needs the full weight
or the full logits: with w_i = exp(lse_i - lse), lse = log sum_i exp(lse_i), E_p[z] = sum_i w_i
E_i[z], and then logprob = target - lse, entropy = lse - E_p[z], max_prob = exp(max - lse).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


class Stats(NamedTuple):
    """Per-token statistics of the logits z = h W^T / temperature over one vocabulary slice, fp32 `[..., N]`."""

    max: torch.Tensor  # max_v z_v
    lse: torch.Tensor  # log sum_v exp(z_v)
    target: torch.Tensor  # z_label when the label is in the slice, else 0
    ez: torch.Tensor  # sum_v softmax(z)_v z_v (zeros when the entropy was not asked for)


def merge_slices(parts: Stats) -> Stats:
    """Combine slices stacked on dim 0 (`[S, N]` each) into the statistics of their union (`[N]`)."""
    top = parts.lse.max(dim=0).values
    # An empty slice has lse = -inf and weight exp(-inf) = 0; its ez must then be finite (0), not nan.
    w = torch.exp(parts.lse - top)
    total = w.sum(dim=0)
    return Stats(parts.max.max(dim=0).values, top + torch.log(total), parts.target.sum(dim=0),
                 (w * parts.ez).sum(dim=0) / total)  # fmt: skip


def all_reduce_slices(local: Stats, group: dist.ProcessGroup) -> Stats:
    """The statistics over the whole vocabulary from each rank's shard statistics: two all-reduces of
    `[2, N]` and `[3, N]` floats (never anything of vocabulary size)."""
    tops = torch.stack([local.lse, local.max])
    dist.all_reduce(tops, op=dist.ReduceOp.MAX, group=group)
    top, max_logit = tops[0], tops[1]
    w = torch.exp(local.lse - top)
    sums = torch.stack([w, w * local.ez, local.target])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    total = sums[0]
    return Stats(max_logit, top + torch.log(total), sums[2], sums[1] / total)


class Shard0(NamedTuple):
    """What a rank needs of a (possibly vocabulary-sharded) output weight."""

    local: torch.Tensor  # [V_local, H], a plain tensor; gradients flow back into the DTensor's shard
    group: dist.ProcessGroup | None  # None: `local` is the whole vocabulary
    start: int  # first vocabulary id of `local`
    vocab_size: int  # the global vocabulary size


def local_shard(weight: torch.Tensor) -> Shard0:
    """Split an lm_head weight into this rank's vocabulary shard and its process group, never gathering.

    A plain tensor is the whole vocabulary. A DTensor sharded on dim 0 over a 1-D mesh (the TP plan of
    rlx.parallel) gives its local rows; the mesh must be one over which the hidden states and labels
    are replicated (TP ranks), since the shard statistics are combined by all-reduce over it."""
    if not isinstance(weight, DTensor):
        return Shard0(weight, None, 0, weight.shape[0])
    placements = tuple(weight.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return Shard0(weight.to_local(), None, 0, weight.shape[0])
    if weight.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"lm_head weight layout {placements} on a {weight.device_mesh.ndim}-D mesh is not supported: "
            "expected Shard(0) (vocabulary) on the 1-D tensor-parallel mesh, or Replicate"
        )
    # `__create_chunk_list__` is what DCP uses for a shard's global offset (uneven shards included).
    (chunk,) = weight.__create_chunk_list__()
    return Shard0(weight.to_local(), weight.device_mesh.get_group(), int(chunk.offsets[0]), weight.shape[0])


def local_labels(labels: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Labels relative to a shard holding ids [start, start + size); -1 for labels outside it."""
    rel = labels - start
    return torch.where((rel >= 0) & (rel < size), rel, torch.full_like(rel, -1))
