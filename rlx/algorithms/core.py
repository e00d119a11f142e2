"""Masked reductions, group indexing and scalar-metric helpers shared by rlx.algorithms.

All functions are pure and work on `[B, T]` tensors with a `{0,1}` response mask (any dtype).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

# Log-ratios are clamped to +-20 before exp (exp(20) ~ 4.9e8): large enough to never bind for a sane
# policy, small enough that squares and products of weights stay finite in fp32.
SAFETY_BOUND = 20.0
# Diagnostics that verl exponentiates without a clamp are computed in float64 and clamped here instead,
# so they equal verl's value whenever verl's is finite, and stay finite where verl's would be inf.
FLOAT64_EXP_BOUND = 700.0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is set; padding is replaced by 0 first so NaN/inf there cannot leak."""
    valid = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = valid * mask if mask.dtype.is_floating_point else valid
    return out.sum() if dim is None else out.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`masked_sum / (count + 1e-8)`: an empty row gives 0, not NaN (verl's convention)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / (count + 1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance over all masked entries; raises for fewer than 2."""
    count = float(mask.sum())
    if count < 2:
        raise ValueError(
            f"masked_var needs at least 2 valid tokens in the batch, got {count:g}: whitening an empty or "
            "one-token batch divides by zero"
        )
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * (count / (count - 1))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(x - mean) * rsqrt(var + 1e-8)` over the masked entries of the whole batch (no mean shift back).

    Padded positions are transformed too; callers multiply by the mask afterwards.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def group_index(group_ids: Sequence[Hashable] | np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """Map arbitrary hashable group labels to dense int64 ids `[B]` (0..G-1, order of first appearance).

    Labels may be strings, ints, tuples, numpy arrays or tensors; groups need not be contiguous.
    """
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.reshape(-1)
        _, inverse = torch.unique(ids, return_inverse=True)
        return inverse.to(device=device if device is not None else ids.device, dtype=torch.long)
    labels = group_ids.tolist() if isinstance(group_ids, np.ndarray) else list(group_ids)
    table: dict[Hashable, int] = {}
    dense = [table.setdefault(label, len(table)) for label in labels]
    return torch.tensor(dense, dtype=torch.long, device=device)


def group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group mean, group unbiased std, group size), each `[B]`, for scores `[B]`.

    Accumulated in float64: a group of identical float32 scores then has a mean exactly equal to the
    score, so its centred scores (and GRPO advantages) are exactly 0 rather than rounding noise / eps.
    Singletons get std NaN here; the estimators apply verl's singleton rules before using it.
    """
    s = scores.double()
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64, device=s.device).index_add_(0, group, torch.ones_like(s))
    total = torch.zeros_like(count).index_add_(0, group, s)
    mean = (total / count)[group]
    sq = torch.zeros_like(count).index_add_(0, group, (s - mean) ** 2)
    std = torch.sqrt(sq / (count - 1))[group]
    return mean, std, count[group]


def to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Convert a dict of 0-dim tensors / numbers to Python floats with one host transfer."""
    keys = list(metrics)
    tensor_keys = [k for k in keys if isinstance(metrics[k], torch.Tensor)]
    out = {k: float(metrics[k]) for k in keys if k not in tensor_keys}
    if tensor_keys:
        stacked = torch.stack([metrics[k].detach().reshape(()).double() for k in tensor_keys]).tolist()
        out.update(zip(tensor_keys, stacked))
    return {k: out[k] for k in keys}
