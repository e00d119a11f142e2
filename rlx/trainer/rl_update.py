"""The loss-stage side of an RL step: the global batch, its split over DP ranks, and the update.

Every rank holds the whole step's rollouts (they are small: token ids and a few floats per token)
and computes advantages and rollout correction on the full batch, identically, as verl's driver
does. Each data-parallel rank then runs forward/backward on its token-balanced share; losses use
global-batch normalizers so the gradients summed over micro-batches and ranks (FSDP sum reduction)
are exactly those of the full-batch loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rlx.trainer.loss_stage import GlobalBatch, LossStage, StepPlan  # noqa: F401 (GlobalBatch: re-exported)
from rlx.trainer.policy import dummy_pack, local_weight, pack_logprobs, pack_rollouts, scatter_rows
from rlx.trainer.train_step import checked_optimizer_step, run_micro_batches
from rlx.types import Rollout


def balance_by_tokens(lengths: Sequence[int], num_parts: int) -> list[list[int]]:
    """Split indices into `num_parts` lists with nearly equal token sums (longest first, each to
    the lightest part). Deterministic, so every rank computes the same split; each part is
    returned in ascending index order."""
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    loads = [0] * num_parts
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min(range(num_parts), key=lambda k: (loads[k], len(parts[k]), k))
        parts[k].append(i)
        loads[k] += lengths[i]
    return [sorted(p) for p in parts]


def seq_lengths(rollouts: Sequence[Rollout]) -> list[int]:
    return [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]


def gather_rows(local: torch.Tensor, shares: list[list[int]], total: int, group) -> torch.Tensor:
    """Reassemble per-rank `[len(share), T_local]` results into the full `[total, T]` tensor."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    pieces: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(pieces, local, group=group)
    width = max(p.shape[1] for p in pieces)
    out = torch.zeros(total, width)
    for share, piece in zip(shares, pieces):
        if share:
            out[share, : piece.shape[1]] = piece
    return out


def group_mini_batches(rollouts: Sequence[Rollout], size: int, rng: torch.Generator) -> list[list[int]]:
    """Row indices of each mini-batch: `size` whole groups each (0 = the whole batch), groups in a
    fresh order per call (epoch) drawn from `rng`, the trainer's RNG."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.group_id, []).append(i)
    keys = list(groups)
    size = size or len(keys)
    if size >= len(keys):
        return [list(range(len(rollouts)))]
    order = torch.randperm(len(keys), generator=rng).tolist()
    chunks = [order[s : s + size] for s in range(0, len(order), size)]
    return [sorted(i for k in chunk for i in groups[keys[k]]) for chunk in chunks]


def sum_over_ranks(totals: torch.Tensor, sums: dict[str, float], group) -> dict[str, float]:
    """All-reduce `totals` in place and sum the metric dicts over the DP group (a rank that ran
    only padding micro-batches has no keys, so dicts are gathered rather than reduced)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return sums
    dist.all_reduce(totals, group=group)
    pieces: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(pieces, sums, group=group)
    merged: dict[str, float] = {}
    for piece in pieces:
        for key, v in piece.items():
            merged[key] = merged.get(key, 0.0) + v
    return merged


class PolicyUpdater:
    """PPO epochs x mini-batches x micro-batches of the loss stage's loss, then clip and step.

    `loss_cfg` is the `[loss]` section (epochs, mini/micro batching, chunk size); `loss` the built
    `LossStage`; `temperature` the sampling temperature (logprobs are of logits / temperature, the
    distribution vLLM sampled from)."""

    def __init__(self, model: nn.Module, optimizer, loss_cfg: Any, loss: LossStage, *, device: torch.device,
                 dp_rank: int, dp_size: int, dp_group, temperature: float, grad_clip: float, rng: torch.Generator):  # fmt: skip
        self.model, self.optimizer, self.cfg, self.loss = model, optimizer, loss_cfg, loss
        self.device, self.dp_rank, self.dp_size, self.dp_group = device, dp_rank, dp_size, dp_group
        self.temperature, self.grad_clip, self.rng = temperature, grad_clip, rng

    def num_mini_batches(self, batch: GlobalBatch) -> int:
        groups = len({r.group_id for r in batch.rollouts})
        size = self.cfg.mini_batch_size or groups
        return max(1, math.ceil(groups / size))

    def mini_batches(self, batch: GlobalBatch) -> list[list[int]]:
        return group_mini_batches(batch.rollouts, self.cfg.mini_batch_size, self.rng)

    def update(self, batch: GlobalBatch, plan: StepPlan) -> dict[str, float]:
        sums: dict[str, float] = {}
        num_updates = 0
        for _ in range(self.cfg.ppo_epochs):
            for rows in self.mini_batches(batch):
                for k, v in self._mini_batch_step(batch, rows, plan).items():
                    sums[k] = sums.get(k, 0.0) + v
                num_updates += 1
        out = {k: v / num_updates for k, v in sums.items()}
        out["actor/num_updates"] = float(num_updates)
        return out

    def _mini_batch_step(self, batch: GlobalBatch, rows: list[int], plan: StepPlan) -> dict[str, float]:
        mask = batch.response_mask[rows]
        global_info = dict(
            dp_size=1,  # gradients are summed over ranks (not averaged): no dp_size factor
            batch_num_tokens=max(float(mask.sum()), 1.0),
            global_batch_size=max(float((mask.sum(-1) > 0).sum()), 1.0),
            loss_scale_factor=self.cfg.loss_scale_factor,
        )
        share = balance_by_tokens(seq_lengths([batch.rollouts[i] for i in rows]), self.dp_size)[self.dp_rank]
        mine = [rows[j] for j in share]
        packs = pack_rollouts([batch.rollouts[i] for i in mine], self.cfg.micro_batch_tokens)
        # Loss terms add up over micro-batches and ranks; metrics of each micro-batch are
        # weighted by its share of the mini-batch's tokens.
        totals = torch.zeros(4, dtype=torch.float64)  # pg_loss, kl_loss, entropy, token weight
        metric_sums: dict[str, float] = {}
        correction_rows: list[dict] = []

        def run(pack) -> None:
            idx = [mine[j] for j in pack.rows]
            terms, metrics, rc_rows = self._micro_batch_loss(batch, idx, pack, plan, global_info)
            if rc_rows is not None:
                correction_rows.append(rc_rows)
            weight = float(batch.response_mask[idx].sum()) / global_info["batch_num_tokens"]
            totals.add_(torch.tensor([*terms, weight], dtype=torch.float64))
            for key, v in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + v * weight

        run_micro_batches(packs, run, self._dummy_backward, self.dp_group)
        metric_sums = sum_over_ranks(totals, metric_sums, self.dp_group)
        out: dict[str, float] = {}
        if plan.correction == "micro":
            rc_metrics, factor = self.loss.finish_correction(_gather_lists(correction_rows, self.dp_group))
            out.update(rc_metrics)
            if factor != 1.0:  # batch quantities of the correction: the pg term is linear in them
                _scale_grads(self.model.parameters(), factor)
                totals[0] *= factor
        pg_loss, kl_loss, ent, weight = totals.tolist()
        grad_norm = checked_optimizer_step(self.model, self.optimizer, self.grad_clip,
                                           {"actor/pg_loss": pg_loss, "actor/kl_loss": kl_loss},
                                           norm_name="actor/grad_norm")  # fmt: skip
        out.update({"actor/pg_loss": pg_loss, "actor/grad_norm": grad_norm, "actor/lr": self.optimizer.param_groups[0]["lr"]})
        if self.cfg.kl_coef > 0:
            out["actor/kl_loss"] = kl_loss
        if self.cfg.entropy_coef > 0:
            out["actor/entropy"] = ent
        out.update({key: v / max(weight, 1e-12) for key, v in metric_sums.items()})
        return out

    def _micro_batch_loss(self, batch: GlobalBatch, idx: list[int], pack, plan: StepPlan, global_info: dict):
        """Forward + backward of one packed micro-batch: its (pg, kl, entropy) terms, loss metrics and
        rollout-correction rows (per-micro-batch correction only)."""
        need_entropy = self.cfg.entropy_coef > 0
        lp_flat, ent_flat = pack_logprobs(self.model, pack, self.device, temperature=self.temperature,
                                          chunk_size=self.cfg.logprob_chunk_size, with_entropy=need_entropy,
                                          backend=self.cfg.logprob_backend)  # fmt: skip
        width = batch.response_mask.shape[1]
        inputs = batch.rows(idx, self.device)
        entropy = scatter_rows(ent_flat, pack, width) if need_entropy else None
        loss, terms, metrics, rows = self.loss.micro_batch_loss(scatter_rows(lp_flat, pack, width), entropy, inputs,
                                                                plan, global_info)  # fmt: skip
        loss.backward()
        return terms, metrics, rows

    def _dummy_backward(self) -> None:
        """A zero loss through every parameter: FSDP's collectives need every rank's backward."""
        pack = dummy_pack()
        zero = self.model(pack.input_ids.to(self.device), pack.position_ids.to(self.device),
                          output_fn=lambda h, w: (h.sum() + local_weight(w).sum()) * 0.0)  # fmt: skip
        zero.backward()


def _gather_lists(items: list, group) -> list:
    """Every DP rank's list, concatenated in rank order (the rank's own list without a group)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return items
    pieces: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(pieces, items, group=group)
    return [x for piece in pieces for x in piece]


@torch.no_grad()
def _scale_grads(parameters, factor: float) -> None:
    for p in parameters:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(factor)
