"""Rollout correction: importance-sampling weights and rejection masks for pi_train vs pi_rollout mismatch.

verl 0.9.1 semantics (TIS, IcePop, batch-normalised IS, k1/k2/k3 rejection, off-policy diagnostics) plus the
first vocabulary's extras (IS lower bound with truncate|mask, token/sequence/geometric RS, token veto).

The rollout engine (vLLM, bf16, different kernels) samples from pi_rollout while the loss is computed for
pi_train; the per-token log-ratio `lr = log pi_train - log pi_rollout` measures the mismatch. IS weights
`exp(lr)` (per token, or summed per sequence) re-weight the gradient towards pi_train; truncation (TIS) or
masking outside a band (IcePop) bounds their variance. Rejection sampling instead drops tokens/sequences whose
divergence is too large. Both only read log-probs, so everything here runs without grad.
"""

from __future__ import annotations

import math
import warnings

import torch

from rlx.algorithms.core import FLOAT64_EXP_BOUND, SAFETY_BOUND, masked_max, to_floats
from rlx.config.rollout_correction_options import (
    TOKEN_LEVEL_RS_OPTIONS, is_ratio_bounded, parse_is_level, parse_is_mode, parse_is_threshold,
    parse_rs_options, parse_rs_thresholds, parse_veto_threshold,
)  # fmt: skip

PREFIX = "rollout_corr/"


# Inputs are sanitised once (padding -> 0) on entry, so inside this module a masked reduction is a plain
# multiply-and-sum; core.masked_sum's extra `where` pass per reduction would dominate the run time.
def masked_sum(x: torch.Tensor, maskf: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * maskf).sum() if dim is None else (x * maskf).sum(dim)


def masked_mean(x: torch.Tensor, maskf: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = maskf.sum() if dim is None else maskf.sum(dim)
    return masked_sum(x, maskf, dim) / (count + 1e-8)


def _is_weights(lr, maskf, level, threshold, lower_opt, mode, batch_normalize, metrics):
    """IS weights `[B, T]` (zero on padding, detached) and their `rollout_is_*` metrics (before batch norm)."""
    band_lower, upper = parse_is_threshold(threshold)
    mode = parse_is_mode(mode)
    if lower_opt is not None:
        if band_lower is not None:
            raise ValueError("give the IS lower bound once: either rollout_is_threshold='lo_hi' or rollout_is_threshold_lower")
        if not 0 < lower_opt <= upper:
            raise ValueError(f"rollout_is_threshold_lower must be in (0, upper={upper}], got {lower_opt}")
    # IcePop ("lo_hi") and mode="mask" zero weights outside [lower, upper]; truncate clamps into it.
    band = band_lower is not None or mode == "mask"
    lower = next(v for v in (band_lower, lower_opt, 1.0 / upper) if v is not None)  # metrics convention: 1/upper

    if level == "token":
        raw = torch.exp(torch.clamp(lr, -SAFETY_BOUND, SAFETY_BOUND)) * maskf
    else:
        # Sequence weight = product of token ratios = exp(sum of log-ratios), one value per row.
        seq_log = masked_sum(lr, maskf, dim=-1)
        raw = torch.exp(torch.clamp(seq_log, -SAFETY_BOUND, SAFETY_BOUND)).unsqueeze(-1) * maskf
    if band:
        inside = (raw >= lower) & (raw <= upper)
        weights = torch.where(inside, raw, torch.zeros_like(raw))
    elif lower_opt is not None:
        weights = raw.clamp(min=lower_opt, max=upper) * maskf
    else:
        weights = raw.clamp(max=upper)  # TIS: upper truncation only (verl; no implicit 1/upper floor)

    m = metrics
    m["rollout_is_mean"] = masked_mean(weights, maskf)
    if level == "token":
        m["rollout_is_ratio_fraction_high"] = masked_mean((raw > upper).float(), maskf)
        m["rollout_is_ratio_fraction_low"] = masked_mean((raw < lower).float(), maskf)
        m["rollout_is_max"] = masked_max(weights.reshape(1, -1), maskf.reshape(1, -1)).squeeze(0)
        m["rollout_is_min"] = -masked_max(-weights.reshape(1, -1), maskf.reshape(1, -1)).squeeze(0)
    else:
        # Extremes over *all* rows (an empty row has log-weight 0), from the unclamped sequence log-ratio.
        m["rollout_is_max"] = torch.exp(seq_log.max().clamp(max=SAFETY_BOUND))
        m["rollout_is_min"] = torch.exp(seq_log.min().double().clamp(max=FLOAT64_EXP_BOUND))
        m["rollout_is_ratio_fraction_high"] = (seq_log > math.log(upper)).float().mean()
        m["rollout_is_ratio_fraction_low"] = (seq_log < math.log(lower)).float().mean()
    clipped = weights.clamp(min=0.0, max=upper)
    mean_c = masked_mean(clipped, maskf)
    if float(maskf.sum()) > 1:
        m["rollout_is_std"] = torch.sqrt(torch.clamp(masked_mean(clipped.square(), maskf) - mean_c.square(), min=0))
    else:
        m["rollout_is_std"] = 0.0
    # Normalised effective sample size in (0, 1]: 1 / E[(w / E w)^2]. All-zero weights give 0, not inf.
    second = masked_mean((clipped / (mean_c + 1e-8)).square(), maskf)
    m["rollout_is_eff_sample_size"] = torch.where(second > 0, 1.0 / second.clamp(min=1e-30), torch.zeros_like(second))
    q = masked_mean(weights, maskf, dim=-1)  # per-row mean weight, all rows (empty -> 0)
    m["rollout_is_seq_mean"] = q.mean()
    m["rollout_is_seq_std"] = q.std() if q.numel() > 1 else 0.0
    m["rollout_is_seq_max"] = q.max()
    m["rollout_is_seq_min"] = q.min()
    m["rollout_is_seq_max_deviation"] = (q - 1.0).abs().max()
    q_raw = masked_mean(raw, maskf, dim=-1)  # pre-truncation, so the high fraction is not dead under TIS
    m["rollout_is_seq_fraction_high"] = (q_raw > upper).float().mean()
    m["rollout_is_seq_fraction_low"] = (q_raw < lower).float().mean()
    if band:
        outside = masked_mean((~inside).float(), maskf)
        m["rollout_is_oob_ratio"] = outside
        if band_lower is None:  # the first vocabulary's name for mode="mask"
            m["rollout_is_masked_fraction"] = outside

    weights = weights.detach()
    if batch_normalize:
        if level == "token":
            mu = masked_mean(weights, maskf)
        else:
            valid = (maskf.sum(-1) > 0).to(weights.dtype)
            mu = (masked_mean(weights, maskf, dim=-1) * valid).sum() / valid.sum().clamp(min=1e-8)
        ok = mu > 1e-8
        weights = torch.where(ok, weights / mu.clamp(min=1e-8), weights)
        m["rollout_is_batch_norm_factor"] = torch.where(ok, mu, torch.ones_like(mu))
    return weights


def _rs_statistic(option, x, maskf, cache):
    """(per-token statistic `[B, T]`, per-row statistic `[B]` or None) for one RS option."""
    if option in ("token", "sequence", "geometric"):
        token = x  # ratio modes bound log(pi_train / pi_rollout)
    else:
        kind = option[-2:]
        if kind not in cache:  # k1 = -x, k2 = x^2/2, k3 = e^x - 1 - x (x clamped to +-20)
            cache[kind] = {"k1": lambda: -x, "k2": lambda: 0.5 * x.square(), "k3": lambda: torch.exp(x) - 1.0 - x}[kind]()
        token = cache[kind]
    if option in TOKEN_LEVEL_RS_OPTIONS:
        return token, None
    if option.startswith("seq_sum") or option == "sequence":
        seq = masked_sum(token, maskf, dim=-1)
    elif option.startswith("seq_mean") or option == "geometric":
        seq = masked_mean(token, maskf, dim=-1)  # geometric: log of the geometric-mean ratio
    else:
        seq = masked_max(token, maskf, dim=-1)
    return seq.unsqueeze(-1).expand_as(token), seq


def _rs_option_metrics(p, stat, seq, keep, maskf, valid, lo, hi, m):
    """verl's per-option RS metrics `rollout_rs_<option>_*`; lo is None for upper-only (k2/k3) options."""
    has_lower = lo is not None
    lo_val = lo if has_lower else 0.0
    row_vals = (seq if seq is not None else masked_mean(stat, maskf, dim=-1))[valid]
    m[f"{p}_mean"] = masked_mean(stat, maskf)
    if seq is not None:
        m[f"{p}_max"], m[f"{p}_min"] = row_vals.max(), row_vals.min()
        m[f"{p}_fraction_high"] = (row_vals > hi).float().mean()
        m[f"{p}_fraction_low"] = (row_vals < lo_val).float().mean() if has_lower else 0.0
    else:
        flat_s, flat_m = stat.reshape(1, -1), maskf.reshape(1, -1)
        m[f"{p}_max"] = masked_max(flat_s, flat_m).squeeze(0)
        m[f"{p}_min"] = -masked_max(-flat_s, flat_m).squeeze(0)
        m[f"{p}_fraction_high"] = masked_mean((stat > hi).float(), maskf)
        m[f"{p}_fraction_low"] = masked_mean((stat < lo_val).float(), maskf) if has_lower else 0.0
    if float(maskf.sum()) > 1:
        c = stat.clamp(min=lo_val, max=hi)
        m[f"{p}_std"] = torch.sqrt(torch.clamp(masked_mean(c.square(), maskf) - masked_mean(c, maskf).square(), min=0))
    else:
        m[f"{p}_std"] = 0.0
    m[f"{p}_seq_mean"] = row_vals.mean()
    m[f"{p}_seq_std"] = row_vals.std() if row_vals.numel() > 1 else 0.0
    m[f"{p}_seq_max"], m[f"{p}_seq_min"] = row_vals.max(), row_vals.min()
    m[f"{p}_seq_max_deviation"] = row_vals.abs().max()
    m[f"{p}_seq_fraction_high"] = (row_vals > hi).float().mean()
    if has_lower:
        m[f"{p}_seq_fraction_low"] = (row_vals < lo_val).float().mean()
    m[f"{p}_masked_fraction"] = masked_mean(1.0 - keep.float(), maskf)
    rejected_row = (~keep & maskf.bool()).any(dim=-1)
    m[f"{p}_seq_masked_fraction"] = rejected_row[valid].float().mean()


def _rs_keep(lr, maskf, options, bounds, metrics):
    """Combined keep mask `[B, T]` (bool): every option must pass. Fills `rollout_rs_*` metrics."""
    x = torch.clamp(lr, -SAFETY_BOUND, SAFETY_BOUND)
    valid = maskf.sum(-1) > 0
    cache: dict[str, torch.Tensor] = {}
    keep_all = torch.ones_like(maskf, dtype=torch.bool)
    for option, (lo, hi) in zip(options, bounds):
        stat, seq = _rs_statistic(option, x, maskf, cache)
        if is_ratio_bounded(option):  # compare in log space: no exp, no overflow
            lo_s, hi_s = math.log(lo), math.log(hi)
            keep = (stat >= lo_s) & (stat <= hi_s)
        else:
            lo_s, hi_s = None, hi
            keep = stat <= hi_s
        keep_all &= keep
        _rs_option_metrics(f"rollout_rs_{option}", stat, seq, keep, maskf, valid, lo_s, hi_s, metrics)
    metrics["rollout_rs_masked_fraction"] = masked_mean(1.0 - keep_all.float(), maskf)
    metrics["rollout_rs_seq_masked_fraction"] = (~keep_all & maskf.bool()).any(dim=-1).float().mean()
    return keep_all


def _veto_keep(lr, maskf, veto, metrics):
    """Per-row keep `[B, 1]`: a response with any token ratio pi_train/pi_rollout < veto is rejected whole."""
    catastrophic = (lr < math.log(veto)) & maskf.bool()
    vetoed = catastrophic.any(dim=-1, keepdim=True)
    metrics["rollout_is_veto_fraction"] = vetoed.float().mean()
    metrics["rollout_is_catastrophic_token_fraction"] = masked_mean(catastrophic.float(), maskf)
    return ~vetoed


def offpolicy_metrics(old_log_prob, rollout_log_prob, maskf, lr):
    """The 13 always-present diagnostics, in float64 (verl's unclamped exps stay finite up to e^700).

    Inputs `[B, T]` must already be zero (finite) on padding: `rollout_correction` does that.
    """
    old, roll, m = old_log_prob.double(), rollout_log_prob.double(), maskf.double()
    lr64 = lr.double()

    def exp64(v):
        return torch.exp(v.clamp(max=FLOAT64_EXP_BOUND))

    ell = masked_mean(old, m, dim=-1)  # per-row mean log-prob under pi_train
    rho = masked_mean(roll, m, dim=-1)  # ... under pi_rollout
    diff = rho - ell  # log(training_ppl_i / rollout_ppl_i)
    seq_log = torch.clamp(masked_sum(lr64, m, dim=-1), -SAFETY_BOUND, SAFETY_BOUND)
    return {
        "training_ppl": exp64(-ell).mean(),
        "training_log_ppl": (-ell).mean(),
        "kl": masked_mean(roll - old, m),  # KL(pi_rollout || pi_train), k1 estimator on rollout samples
        "k3_kl": masked_mean(exp64(lr64) - lr64 - 1, m),
        "rollout_ppl": exp64(-rho).mean(),
        "rollout_log_ppl": (-rho).mean(),
        "log_ppl_diff": diff.mean(),
        "log_ppl_abs_diff": diff.abs().mean(),
        "log_ppl_diff_max": diff.max(),
        "log_ppl_diff_min": diff.min(),
        "ppl_ratio": exp64(diff).mean(),
        "chi2_token": masked_mean(torch.exp(torch.clamp(lr64, -SAFETY_BOUND, SAFETY_BOUND)).square(), m) - 1.0,
        "chi2_seq": torch.exp(2.0 * seq_log).mean() - 1.0,
    }


@torch.no_grad()
def rollout_correction(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rollout_is: str | None = None,
    rollout_is_threshold: float | str | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: float | str | None = None,
    rollout_token_veto_threshold: float | None = None,
    rollout_is_threshold_lower: float | None = None,
    rollout_is_mode: str = "truncate",
    rollout_rs_threshold_lower: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """IS weights, rejection mask and metrics for pi_train (`old_log_prob`) vs pi_rollout. Inputs `[B, T]`.

    Returns (is_weights `[B, T]` fp32 detached or None, rs_mask `[B, T]` in response_mask's dtype, metrics
    with Python-float values, every key prefixed `rollout_corr/`). RS and veto never zero the IS weights:
    the trainer applies the mask as the loss mask. See README "Rollout correction" for every option.
    """
    if old_log_prob.shape != rollout_log_prob.shape or old_log_prob.shape != response_mask.shape:
        raise ValueError(
            f"shape mismatch: old_log_prob {tuple(old_log_prob.shape)}, rollout_log_prob "
            f"{tuple(rollout_log_prob.shape)}, response_mask {tuple(response_mask.shape)}"
        )
    if not bool(response_mask.any()):
        raise ValueError("rollout_correction: response_mask must contain at least one valid token")
    level = parse_is_level(rollout_is)
    options = parse_rs_options(rollout_rs)
    bounds = parse_rs_thresholds(options, rollout_rs_threshold, rollout_rs_threshold_lower) if options else []
    if rollout_rs_threshold_lower is not None and not any(is_ratio_bounded(o) for o in options):
        warnings.warn("rollout_rs_threshold_lower is ignored: no ratio-bounded rollout_rs option (k1, token, "
                      "sequence, geometric) is set", stacklevel=2)  # fmt: skip
    veto = parse_veto_threshold(rollout_token_veto_threshold)

    dtype = old_log_prob.dtype if old_log_prob.dtype.is_floating_point else torch.float32
    maskf = response_mask.to(dtype)
    # Padding may hold anything (-inf, NaN); zero it once so nothing leaks into any reduction below.
    valid_tok = response_mask.bool()
    old_log_prob = old_log_prob.masked_fill(~valid_tok, 0.0)
    rollout_log_prob = rollout_log_prob.masked_fill(~valid_tok, 0.0)
    lr = old_log_prob - rollout_log_prob

    metrics: dict[str, torch.Tensor | float] = {}
    weights = None
    if level is not None and rollout_is_threshold is not None:
        weights = _is_weights(lr, maskf, level, rollout_is_threshold, rollout_is_threshold_lower,
                              rollout_is_mode, rollout_is_batch_normalize, metrics)  # fmt: skip
    keep = torch.ones_like(maskf, dtype=torch.bool)
    if options:
        keep = keep & _rs_keep(lr, maskf, options, bounds, metrics)
    if veto is not None:
        keep = keep & _veto_keep(lr, maskf, veto, metrics)
    rs_mask = (response_mask * keep).to(response_mask.dtype)
    metrics.update(offpolicy_metrics(old_log_prob, rollout_log_prob, maskf, lr))
    return weights, rs_mask, {PREFIX + k: v for k, v in to_floats(metrics).items()}
