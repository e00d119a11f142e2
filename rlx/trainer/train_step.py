"""One optimizer step of the trainer, shared by SFT and RL: micro-batches grouped by token budget
(`budget_groups`), the micro-batch loop that keeps data-parallel ranks in step (`run_micro_batches`),
the loss normalized by the global (all data-parallel ranks) token count, sum-reduced gradients,
grad-norm clipping over DTensors, the non-finite check before the update (`checked_optimizer_step`),
AdamW, LR schedules, and the trainer's own seeded RNG.

Why the global count: FSDP reduces gradients as sums (gloo has no PREMUL_SUM), so dividing each
rank's token-loss sum by the count over all ranks makes the summed gradient that of the global
token mean, independent of how tokens are spread over ranks and micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

IGNORE_INDEX = -100
LR_SCHEDULES = ("constant", "cosine")


class NonFiniteError(RuntimeError):
    """The loss or gradient norm is NaN/inf; raised before the optimizer (or a checkpoint) sees it."""


# ---- micro-batches -----------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """Documents one per row, right-padded to the longest: input_ids, position_ids (0..L-1 per
    row) and labels ([R, L], the next token where it is trained on, else IGNORE_INDEX).

    One document per row (rather than several packed into a row with a block-diagonal mask) lets
    SDPA use its mask-free causal kernel; padding sits after each document, so causal attention
    never lets a real token see it."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    num_real_tokens: int = -1
    """Tokens that are not padding (-1: all of them)."""

    @property
    def num_tokens(self) -> int:
        return self.num_real_tokens if self.num_real_tokens >= 0 else self.input_ids.numel()

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> MicroBatch:
        moved = (t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids, self.labels))
        return MicroBatch(*moved, num_real_tokens=self.num_real_tokens)


def budget_groups(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into micro-batches of at most `token_budget` padded tokens (rows x longest
    row); an item longer than the budget gets a micro-batch of its own. Items are taken in length
    order, so rows of a micro-batch have similar lengths (little padding). SFT documents and RL
    rollouts are both grouped by it."""
    groups: list[list[int]] = []
    width = 0
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if groups and max(width, lengths[i]) * (len(groups[-1]) + 1) <= token_budget:
            groups[-1].append(i)
            width = max(width, lengths[i])
        else:
            groups.append([i])
            width = lengths[i]
    return groups


def pack_micro_batches(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], token_budget: int) -> list[MicroBatch]:
    """Group (token_ids, loss_mask) documents into micro-batches (`budget_groups`), one per row.

    loss_mask[i] = 1 means token i is a training target (predicted from tokens < i of its own
    document)."""
    for ids, mask in sequences:
        assert len(ids) == len(mask) and len(ids) > 0, "each document needs ids and a same-length loss mask"
    groups = budget_groups([len(ids) for ids, _ in sequences], token_budget)
    return [_pad_rows([sequences[i] for i in group]) for group in groups]


def _pad_rows(docs: list[tuple[Sequence[int], Sequence[int]]]) -> MicroBatch:
    width = max(len(ids) for ids, _ in docs)
    input_ids = torch.zeros(len(docs), width, dtype=torch.long)
    labels = torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, mask) in enumerate(docs):
        input_ids[r, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        # Position i predicts token i+1 of the same document; the last position predicts nothing.
        target = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids[1:], mask[1:])]
        labels[r, : len(target)] = torch.tensor(target, dtype=torch.long)
    position_ids = torch.arange(width).expand(len(docs), width).contiguous()
    return MicroBatch(input_ids, position_ids, labels, num_real_tokens=sum(len(ids) for ids, _ in docs))


def _padding_micro_batch() -> MicroBatch:
    """One token, nothing trained: lets a rank with fewer micro-batches join FSDP's collectives."""
    return MicroBatch(*(torch.tensor([[x]], dtype=torch.long) for x in (0, 0, IGNORE_INDEX)))


# ---- loss and the step -------------------------------------------------------------------------

LossFn = Callable[[nn.Module, MicroBatch], tuple[torch.Tensor, dict[str, float]]]


def token_ce_loss(model: nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy summed over target tokens (the step normalizes it)."""
    logits = model(mb.input_ids, mb.position_ids)  # [R, L, V]
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), mb.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, {}


def num_micro_batches(local: int, dp_group: dist.ProcessGroup | None) -> int:
    """The max of `local` over the data-parallel group: every rank runs that many forwards."""
    if dp_group is None or not dist.is_initialized() or dist.get_world_size(dp_group) == 1:
        return local
    t = torch.tensor([local], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dp_group)
    return int(t)


def run_micro_batches(items: Sequence[Any], run: Callable[[Any], None], pad: Callable[[], None],
                      dp_group: dist.ProcessGroup | None) -> None:  # fmt: skip
    """`run(item)` for this rank's micro-batches, then `pad()` until every data-parallel rank has run
    the same number: FSDP's all-gathers (forward) and reduce-scatters (backward) are collectives,
    matched call for call, so a rank with fewer micro-batches runs padding ones that add nothing."""
    for k in range(num_micro_batches(len(items), dp_group)):
        if k < len(items):
            run(items[k])
        else:
            pad()


def _check_finite(values: dict[str, float]) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} is {value}: stopping before the optimizer step and before any checkpoint")


def checked_optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                           losses: dict[str, float], *, norm_name: str = "grad_norm") -> float:  # fmt: skip
    """Clip the gradients, and step unless a loss or the gradient norm is not finite (then the gradients
    are dropped and NonFiniteError names the first bad value: the weights, the optimizer state and
    every later checkpoint stay clean). Returns the norm before clipping."""
    norm = clip_grad_norm_(model.parameters(), grad_clip).item()
    try:
        _check_finite({**losses, norm_name: norm})
    except NonFiniteError:
        optimizer.zero_grad(set_to_none=True)
        raise
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def dp_all_reduce(values: torch.Tensor, dp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over data-parallel ranks (no-op without a group)."""
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(values, group=dp_group)
    return values


def forward_backward(
    model: nn.Module,
    micro_batches: list[MicroBatch],
    loss_fn: LossFn,
    *,
    device: torch.device,
    dp_group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Accumulate gradients of sum(token losses over all DP ranks) / (global loss-token count).

    `loss_fn(model, micro_batch)` returns the *sum* of its per-token losses. Every DP rank runs the
    same number of micro-batches (short ranks are padded), since FSDP's collectives are matched
    call for call. Returns loss (global token mean), num_loss_tokens and num_tokens (global), plus
    loss_fn's metrics summed over this rank's micro-batches (not reduced across ranks)."""
    local_counts = [sum(mb.num_loss_tokens for mb in micro_batches), sum(mb.num_tokens for mb in micro_batches)]
    counts = dp_all_reduce(torch.tensor(local_counts, dtype=torch.float64, device=device), dp_group)
    global_loss_tokens, global_tokens = counts[0].item(), counts[1].item()
    denominator = max(global_loss_tokens, 1.0)
    local_loss = torch.zeros((), dtype=torch.float64, device=device)
    metrics: dict[str, float] = {}

    def run(mb: MicroBatch) -> None:
        nonlocal local_loss
        loss_sum, mb_metrics = loss_fn(model, mb.to(device))
        (loss_sum / denominator).backward()
        local_loss += loss_sum.detach().double()
        for k, v in mb_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v

    run_micro_batches(micro_batches, run, lambda: run(_padding_micro_batch()), dp_group)
    loss = dp_all_reduce(local_loss, dp_group).item() / denominator
    return {**metrics, "loss": loss, "num_loss_tokens": global_loss_tokens, "num_tokens": global_tokens}


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    micro_batches: list[MicroBatch],
    loss_fn: LossFn = token_ce_loss,
    *,
    device: torch.device,
    dp_group: dist.ProcessGroup | None = None,
) -> float:
    """Token-mean loss over all DP ranks' micro-batches, without gradients (padded like
    forward_backward, since FSDP all-gathers in forward are collectives too)."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, loss tokens)

    def run(mb: MicroBatch) -> None:
        loss_sum, _ = loss_fn(model, mb.to(device))
        sums.add_(torch.stack([loss_sum.double(), torch.tensor(float(mb.num_loss_tokens), device=device).double()]))

    run_micro_batches(micro_batches, run, lambda: run(_padding_micro_batch()), dp_group)
    loss_sum, count = dp_all_reduce(sums, dp_group).tolist()
    return loss_sum / max(count, 1.0)


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients of possibly sharded parameters (plain tensors and DTensors
    on any mix of meshes, e.g. FSDP-only norm weights beside FSDP x TP matrices).

    Each rank sums the squares of its local shard; squares are then summed over the mesh dims a
    gradient is sharded on, and counted once over the dims it is replicated on."""
    groups: dict[tuple, torch.Tensor] = {}
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
            # Any non-replicated placement is a shard (including FSDP x TP's _StridedShard).
            sharded_dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            key, local = (g.device_mesh, sharded_dims), g.to_local()
        else:
            key, local = (None, ()), g
        sq = torch.linalg.vector_norm(local, dtype=torch.float32).square()
        groups[key] = groups[key] + sq if key in groups else sq
    total = torch.zeros((), dtype=torch.float32)
    for (mesh, sharded_dims), sq in groups.items():
        for dim in sharded_dims:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total.to(sq.device) + sq
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients in place so their global norm is at most max_norm (0 = no clipping);
    returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.device, g.dtype))
    return norm


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[MicroBatch],
    loss_fn: LossFn = token_ce_loss,
    *,
    device: torch.device,
    dp_group: dist.ProcessGroup | None = None,
    grad_clip: float = 0.0,
) -> dict[str, float]:
    """forward/backward over this rank's micro-batches -> clip -> optimizer step -> LR step.

    Raises NonFiniteError (leaving the weights untouched) if the loss or grad norm is not finite."""
    metrics = forward_backward(model, micro_batches, loss_fn, device=device, dp_group=dp_group)
    lr = optimizer.param_groups[0]["lr"]
    norm = checked_optimizer_step(model, optimizer, grad_clip, {"loss": metrics["loss"]})
    scheduler.step()
    return {**metrics, "grad_norm": norm, "lr": lr}


# ---- optimizer, schedule, RNG ------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.AdamW:
    """AdamW from an `OptimConfig`-like object (lr, weight_decay, betas, eps).

    Weight decay applies to matrices only (linear and embedding weights), not to norms or biases.
    Parameters are grouped by mesh as well: foreach kernels cannot mix plain tensors and DTensors
    (TP-only norms are plain) or DTensors on different meshes (FSDP-only norms beside FSDP x TP)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.requires_grad:
            mesh = p.device_mesh if isinstance(p, DTensor) else None
            groups.setdefault((id(mesh), p.ndim >= 2), []).append(p)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0} for (_, decay), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Linear warm-up (step+1)/warmup_steps, then constant or a cosine from 1 to min_lr_ratio that
    reaches it at total_steps."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule '{schedule}' is not one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR from an `OptimConfig`-like object (lr_schedule, warmup_steps, min_lr_ratio)."""
    kwargs = dict(
        schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    lr_factor(0, **kwargs)  # validate the schedule name now, not at the first step

    def factor(step: int) -> float:
        return lr_factor(step, **kwargs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The trainer's own RNG (data order, sampling choices). vLLM reseeds and consumes the global
    torch RNG, so trainer randomness never uses it; checkpoints save and restore this generator."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
