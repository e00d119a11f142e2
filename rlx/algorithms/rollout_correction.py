"""Rollout correction: importance-sampling weights and rejection masks for pi_train vs pi_rollout mismatch.

verl 0.9.1 semantics (TIS, IcePop, batch-normalised IS, k1/k2/k3 rejection, off-policy diagnostics) plus the
first vocabulary's extras (IS lower bound with truncate|mask, token/sequence/geometric RS, token veto).

The rollout engine (vLLM, bf16, different kernels) samples from pi_rollout while the loss is computed for
pi_train; the per-token log-ratio `lr = log pi_train - log pi_rollout` measures the mismatch. IS weights
`exp(lr)` (per token, or summed per sequence) re-weight the gradient towards pi_train; truncation (TIS) or
masking outside a band (IcePop) bounds their variance. Rejection sampling instead drops tokens/sequences whose
divergence is too large. Both only read log-probs, so everything here runs without grad.

Cost: every metric (~60 of them) is a function of a few per-row reductions (sums, maxima) of per-token
statistics. The device computes those, one pass each and no host sync, they travel to the host as one `[K, B]`
tensor, and the scalar metrics are derived there in float64 numpy. One `exp` (float64, which the diagnostics
need anyway) is shared by the IS weights, the k3 criterion and the diagnostics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rlx.algorithms.core import FLOAT64_EXP_BOUND, SAFETY_BOUND
from rlx.config.rollout_correction_options import (
    RATIO_MODES, SEQ_RATIO_BOUNDS, TOKEN_LEVEL_RS_OPTIONS, is_ratio_bounded, is_ratio_statistic, parse_is_level, parse_is_mode, parse_is_threshold,
    parse_rs_options, parse_rs_thresholds, parse_veto_threshold,
)  # fmt: skip

PREFIX = "rollout_corr/"
# Added to padded positions before a min (subtracted before a max) so that padding never wins. Every statistic
# reduced that way is a function of the log-ratio clamped to +-20, so at most e^20 in magnitude.
_BIG = 1e30


def _cmp(op, x: torch.Tensor, value: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """`op(x, value)` as 0/1 in x's dtype (into `out` if given). Comparisons and `where` on bool tensors cost
    ~5-30x an arithmetic pass on CPU, so keep masks stay floating point and combine by multiplication."""
    return op(x, value, out=torch.empty_like(x) if out is None else out)


def _within(x: torch.Tensor, lo: float | None, hi: float, scratch: torch.Tensor) -> torch.Tensor:
    """0/1 `lo <= x <= hi` (`x <= hi` when lo is None); NaN is outside. Overwrites `scratch`."""
    keep = _cmp(torch.le, x, hi)
    return keep if lo is None else keep.mul_(_cmp(torch.ge, x, lo, out=scratch))


def _zero_padding(x: torch.Tensor, m: torch.Tensor, needed: bool) -> torch.Tensor:
    """`x * m` in place, skipped when the caller knows x is already 0 on padding."""
    return x.mul_(m) if needed else x


class _Rows:
    """Named per-row vectors `[B]` queued on the device, then fetched to the host in one transfer."""

    def __init__(self):
        self.names: list[str] = []
        self.rows: list[torch.Tensor] = []

    def add(self, name: str, row: torch.Tensor) -> None:
        self.names.append(name)
        self.rows.append(row)

    def sum(self, name: str, x: torch.Tensor) -> None:
        self.add(name, x.sum(-1))

    def fetch(self) -> dict[str, np.ndarray]:
        host = torch.stack(self.rows).double().cpu().numpy()  # the only sync after the input check
        return dict(zip(self.names, host))


def _prepare(old, roll, response_mask, dtype):
    """Inputs with padding zeroed: (rollout log-probs, log-ratio lr in `dtype`, exact log-ratio fp64, its row
    sums S `[B]` fp64), then the float mask, row lengths `[B]` and the token count (one host sync).

    The fp64 log-ratio is exact (a difference of two fp32 numbers), so the diagnostics' log-ppl differences match
    verl's float64 ones; rounded to `dtype` it is bit-identical to `old - roll` computed in that dtype.
    Padding may hold anything (-inf, NaN). When S is finite, so is every value that reaches it, and a multiply
    by the mask zeroes the padding (rlx pads with 0). Otherwise the inputs take `masked_fill`, which keeps a
    non-finite *valid* value as it is (it must show in the outputs); on CPU a bool fill is ~10x a multiply.
    """
    m = response_mask.to(dtype)
    lengths = m.sum(-1)
    # A copy even for float64 inputs (.double() would alias them): never write into the caller's tensor.
    lr64 = old.to(torch.float64, copy=True).sub_(roll).mul_(m)
    seq = lr64.sum(-1)
    num_tokens, total = torch.stack([lengths.sum().double(), seq.sum()]).tolist()
    if num_tokens == 0:
        raise ValueError("rollout_correction: response_mask must contain at least one valid token")
    if math.isfinite(total):
        return roll * m, lr64.to(dtype, copy=True), lr64, seq, m, lengths, num_tokens
    padding = ~response_mask.bool()
    old, roll = old.masked_fill(padding, 0.0), roll.masked_fill(padding, 0.0)
    lr64 = old.to(torch.float64, copy=True).sub_(roll)
    return roll, lr64.to(dtype, copy=True), lr64, lr64.sum(-1), m, lengths, num_tokens


@dataclass
class _ISSpec:
    """Parsed IS threshold: `band` zeroes weights outside [lower, upper] (IcePop or mode="mask")."""

    upper: float
    lower: float  # the band's lower end, or the metrics convention 1/upper
    band: bool
    band_lower: float | None  # from "lo_hi" (IcePop)
    truncate_lower: float | None  # rollout_is_threshold_lower with mode="truncate"

    @classmethod
    def parse(cls, threshold, lower_opt, mode) -> _ISSpec:
        band_lower, upper = parse_is_threshold(threshold)
        mode = parse_is_mode(mode)
        if lower_opt is not None:
            if band_lower is not None:
                raise ValueError("give the IS lower bound once: either rollout_is_threshold='lo_hi' or "
                                 "rollout_is_threshold_lower")  # fmt: skip
            if not 0 < lower_opt <= upper:
                raise ValueError(f"rollout_is_threshold_lower must be in (0, upper={upper}], got {lower_opt}")
        band = band_lower is not None or mode == "mask"
        lower = next(v for v in (band_lower, lower_opt, 1.0 / upper) if v is not None)
        return cls(upper, lower, band, band_lower, lower_opt if not band else None)


def _diagnostic_rows(roll, lr, lr64, seq_exact, rows):
    """Queue the per-row sums behind the 13 off-policy diagnostics; returns (S `[B]` fp64, exp(clamp(lr, +-20))
    `[B, T]` fp64 in lr64's buffer), reused by the IS weights and the k3 criterion.

    Fresh `[B, T]` buffers are kept few (reused in place): on CPU each is a malloc whose pages may fault in again.
    """
    rows.sum("roll", roll)  # (fp32 row sums are ample for the per-row mean log-prob)
    rows.add("lr", seq_exact)  # exact S_i: kl and the log-ppl differences, which cancel
    x64 = lr64.copy_(lr)  # from here on verl's view: the compute-dtype lr, in float64
    seq_log = x64.sum(-1)  # S_i as the sequence IS weight exp(S_i) sees it
    rows.add("seq_log", seq_log)
    # verl exponentiates lr unclamped; float64 with a 700 clamp equals it wherever it is finite. float64 also
    # keeps exp(x) - 1 - x exact for small x, where float32 loses ~all digits to cancellation.
    e = x64.clamp_(max=FLOAT64_EXP_BOUND).exp_()
    tmp = torch.sub(e, lr).sub_(1.0)  # exp(lr) - lr - 1: zero on padding (lr = 0)
    rows.sum("k3", tmp)
    e_c = e.clamp_(math.exp(-SAFETY_BOUND), math.exp(SAFETY_BOUND))  # = exp(clamp(lr, +-20)): exp is monotone
    rows.sum("chi2", torch.mul(e_c, e_c, out=tmp).sub_(1.0))  # exp(2x) - 1, zero on padding
    return seq_log, e_c


def _diagnostics(h, n):
    """The 13 always-present diagnostics (ALGORITHMS.md 5.3) from the fetched row sums, in float64."""
    L, den = h["len"], n + 1e-8
    rho = h["roll"] / (L + 1e-8)  # per-row mean log-prob under pi_rollout
    diff = -h["lr"] / (L + 1e-8)  # rho_i - ell_i = log(training_ppl_i / rollout_ppl_i)
    ell = rho - diff  # ... under pi_train

    def exp64(v):
        return np.exp(np.minimum(v, FLOAT64_EXP_BOUND))

    return {
        "training_ppl": exp64(-ell).mean(),
        "training_log_ppl": (-ell).mean(),
        "kl": -h["lr"].sum() / den,  # KL(pi_rollout || pi_train), k1 on rollout samples
        "k3_kl": h["k3"].sum() / den,
        "rollout_ppl": exp64(-rho).mean(),
        "rollout_log_ppl": (-rho).mean(),
        "log_ppl_diff": diff.mean(),
        "log_ppl_abs_diff": np.abs(diff).mean(),
        "log_ppl_diff_max": diff.max(),
        "log_ppl_diff_min": diff.min(),
        "ppl_ratio": exp64(diff).mean(),
        "chi2_token": (h["chi2"].sum() + n) / den - 1.0,  # masked_mean(exp(2x)) - 1
        "chi2_seq": np.exp(2.0 * np.clip(h["seq_log"], -SAFETY_BOUND, SAFETY_BOUND)).mean() - 1.0,
    }


def offpolicy_metrics(old_log_prob, rollout_log_prob, maskf, lr) -> dict[str, float]:
    """The 13 always-present diagnostics as floats. Inputs `[B, T]` must already be zero (finite) on padding."""
    rows = _Rows()
    rows.sum("len", maskf)
    lr64 = old_log_prob.double() - rollout_log_prob
    _diagnostic_rows(rollout_log_prob, lr, lr64, lr64.sum(-1), rows)
    h = rows.fetch()
    return {k: float(v) for k, v in _diagnostics(h, h["len"].sum()).items()}


def _is_weights(spec, level, seq_log, e_c, m, n, pad_big, scratch, rows):
    """IS weights `[B, T]` before batch norm (zero on padding); queues the row reductions of their metrics."""
    if level == "token":
        raw = e_c.to(m.dtype, copy=True).mul_(m)
        rows.sum("is_raw", raw)
        rows.sum("is_hi", _cmp(torch.gt, raw, spec.upper, out=scratch))  # raw is 0 on padding, never > upper
        rows.sum("is_lo", _cmp(torch.lt, raw, spec.lower, out=scratch).mul_(m))
    else:  # sequence weight = product of the token ratios = exp(sum of log-ratios), one value per row
        raw = seq_log.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().to(m.dtype)
        rows.add("is_raw", raw.clone())
    # Weights in raw's buffer: its reductions are queued.
    if spec.band:
        inside = _within(raw, spec.lower, spec.upper, scratch if level == "token" else torch.empty_like(raw))
        w = raw.mul_(inside)
        if level == "token":
            rows.sum("is_in", inside)
        else:
            rows.add("is_in", inside)
    elif spec.truncate_lower is not None:
        w = raw.clamp_(spec.truncate_lower, spec.upper)
    else:
        w = raw.clamp_(max=spec.upper)  # TIS: upper truncation only (verl; no implicit 1/upper floor)
    if level == "sequence":  # the metrics need only the row values
        rows.add("is_w", w)
        return w.unsqueeze(-1) * m
    if spec.truncate_lower is not None:
        w.mul_(m)
    w_rows = w.sum(-1)
    rows.add("is_w", w_rows)
    # The std from E[w^2] - E[w]^2 in fp32 loses everything to cancellation when the weights are close together;
    # centring on the batch mean first (a device scalar, no sync) keeps it: var = E[d^2] - E[d]^2, d = w - mean.
    centre = w_rows.sum() / n
    d = torch.sub(w, centre, out=scratch).mul_(m)
    rows.add("is_c", centre.expand_as(w_rows))  # merged pieces are re-centred on the batch mean (_merge_rows)
    rows.sum("is_d", d)
    rows.sum("is_d2", d.square_())
    rows.add("is_max", w.amax(-1))  # w >= 0 and padding is 0: the masked max of every non-empty row
    rows.add("is_min", torch.add(w, pad_big, out=scratch).amin(-1))
    return w


def _is_metrics(h, spec, level, n, metrics):
    """`rollout_is_*` metrics (ALGORITHMS.md 5.1) from the fetched rows; returns the batch-norm mean mu.

    The weights already lie in [0, upper] in every mode, so the spec's `clamp(w, 0, upper)` is w itself.
    """
    L, den, m = h["len"], n + 1e-8, metrics
    valid = L > 0
    if level == "token":
        w_sum, raw_sum = h["is_w"], h["is_raw"]
        var = h["is_d2"].sum() / n - (h["is_d"].sum() / n) ** 2  # d: w centred on its mean (see _is_weights)
    else:  # a row's weight is constant over its L tokens
        w_sum, raw_sum = h["is_w"] * L, h["is_raw"] * L
        var = ((h["is_w"] - w_sum.sum() / n) ** 2 * L).sum() / n
    mean = w_sum.sum() / den
    m["rollout_is_mean"] = mean
    if level == "token":
        m["rollout_is_ratio_fraction_high"] = h["is_hi"].sum() / den
        m["rollout_is_ratio_fraction_low"] = h["is_lo"].sum() / den
        m["rollout_is_max"], m["rollout_is_min"] = h["is_max"][valid].max(), h["is_min"][valid].min()
    else:
        # Extremes over *all* rows (an empty row has log-weight 0), from the unclamped sequence log-ratio.
        seq_log = h["seq_log"]
        m["rollout_is_max"] = math.exp(min(seq_log.max(), SAFETY_BOUND))
        m["rollout_is_min"] = math.exp(min(seq_log.min(), FLOAT64_EXP_BOUND))
        m["rollout_is_ratio_fraction_high"] = (seq_log > math.log(spec.upper)).mean()
        m["rollout_is_ratio_fraction_low"] = (seq_log < math.log(spec.lower)).mean()
    # Population std over the n valid tokens (n, not n + 1e-8, as in fp32 where the 1e-8 vanishes).
    m["rollout_is_std"] = math.sqrt(max(var, 0.0)) if n > 1 else 0.0
    # Normalised effective sample size in (0, 1]: 1 / E[(w / E w)^2]. All-zero weights give 0, not inf.
    second = (var + (w_sum.sum() / n) ** 2) * (n / den) / (mean + 1e-8) ** 2
    m["rollout_is_eff_sample_size"] = 1.0 / max(second, 1e-30) if second > 0 else 0.0
    q = w_sum / (L + 1e-8)  # per-row mean weight, all rows (empty -> 0)
    m["rollout_is_seq_mean"] = q.mean()
    m["rollout_is_seq_std"] = q.std(ddof=1) if q.size > 1 else 0.0
    m["rollout_is_seq_max"], m["rollout_is_seq_min"] = q.max(), q.min()
    m["rollout_is_seq_max_deviation"] = np.abs(q - 1.0).max()
    q_raw = raw_sum / (L + 1e-8)  # pre-truncation, so the high fraction is not dead under TIS
    m["rollout_is_seq_fraction_high"] = (q_raw > spec.upper).mean()
    m["rollout_is_seq_fraction_low"] = (q_raw < spec.lower).mean()
    if spec.band:
        inside = h["is_in"] if level == "token" else h["is_in"] * L
        m["rollout_is_oob_ratio"] = (n - inside.sum()) / den
        if spec.band_lower is None:  # the first vocabulary's name for mode="mask"
            m["rollout_is_masked_fraction"] = m["rollout_is_oob_ratio"]
    if level == "token":
        return mean
    return q[valid].sum() / max(valid.sum(), 1e-8)  # mean over non-empty rows of the row-mean weight


def _rs_token_statistic(option, x, e_c, cache):
    """Per-token statistic `[B, T]` of an RS option (zero on padding, where x = 0)."""
    if option in RATIO_MODES or option in SEQ_RATIO_BOUNDS:
        return x  # ratio options bound log(pi_train / pi_rollout)
    kind = option[-2:]
    if kind not in cache:  # k1 = -x, k2 = x^2/2, k3 = e^x - 1 - x (x clamped to +-20)
        if kind == "k1":
            cache[kind] = -x
        elif kind == "k2":
            cache[kind] = x.square().mul_(0.5)
        else:  # from the shared float64 exp: exact even where e^x - 1 - x cancels
            cache[kind] = torch.sub(e_c, x).sub_(1.0).to(x.dtype)
    return cache[kind]


def _log_bounds(option, lo, hi):
    """(lower, upper) in the statistic's own space: ratio options compare log ratios; k2/k3 their value."""
    if not is_ratio_statistic(option):
        return None, hi
    return (None if lo is None else math.log(lo)), math.log(hi)


def _rs_keep(lr, e_c, m, pad_big, scratch, options, bounds, rows):
    """Combined keep `[B, T]` or `[B, 1]` (0/1, not masked): every option must pass. Queues the metric rows.

    `scratch` holds the statistics that are only reduced."""
    x = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    cache: dict[str, torch.Tensor] = {}
    keep_all = None
    for option, (lo, hi) in zip(options, bounds):
        token = _rs_token_statistic(option, x, e_c, cache)
        lo_s, hi_s = _log_bounds(option, lo, hi)
        key = f"rs/{option}/"
        if option in TOKEN_LEVEL_RS_OPTIONS:
            keep = _within(token, lo_s, hi_s, scratch)
            rows.sum(key + "sum", token)
            rows.add(key + "max", torch.sub(token, pad_big, out=scratch).amax(-1))
            rows.add(key + "min", torch.add(token, pad_big, out=scratch).amin(-1))
            # token is 0 on padding, so f(token) there is f(0): the mask is needed only where f(0) != 0.
            rows.sum(key + "hi", _zero_padding(_cmp(torch.gt, token, hi_s, out=scratch), m, 0.0 > hi_s))
            if lo_s is not None:
                rows.sum(key + "lo", _zero_padding(_cmp(torch.lt, token, lo_s, out=scratch), m, 0.0 < lo_s))
            lo_val = lo_s if lo_s is not None else 0.0
            clamped = _zero_padding(torch.clamp(token, lo_val, hi_s, out=scratch), m, not lo_val <= 0.0 <= hi_s)
            rows.sum(key + "c", clamped)
            rows.sum(key + "c2", clamped.square_())
            rows.sum(key + "kept", torch.mul(keep, m, out=scratch))
        else:
            if option.startswith("seq_sum") or option == "sequence":
                seq = token.sum(-1)
            elif option.startswith("seq_mean") or option == "geometric":  # geometric: log geometric-mean ratio
                seq = token.sum(-1) / (m.sum(-1) + 1e-8)
            elif option == "seq_min_ratio":  # masked min; an empty row gets +_BIG, which no metric reads
                seq = torch.add(token, pad_big, out=scratch).amin(-1)
            else:  # masked max; an empty row gets -_BIG, which no metric reads
                seq = torch.sub(token, pad_big, out=scratch).amax(-1)
            keep_row = _within(seq, lo_s, hi_s, torch.empty_like(seq))
            rows.add(key + "seq", seq)
            rows.add(key + "keep", keep_row)
            keep = keep_row.unsqueeze(-1)
        keep_all = keep if keep_all is None else keep_all * keep
    rows.sum("rs/kept", torch.mul(keep_all, m, out=scratch))
    return keep_all


def _rs_option_metrics(p, h, key, lo, hi, n, m):
    """verl's per-option RS metrics `rollout_rs_<option>_*`; lo is None for upper-only (k2/k3) options.

    lo/hi are rounded to the compute dtype, so host comparisons of device values match device comparisons.
    """
    L, den = h["len"], n + 1e-8
    valid = L > 0
    if key + "seq" in h:  # a sequence option: one value per row, broadcast to its tokens (token-weighted mean)
        seq = np.where(valid, h[key + "seq"], 0.0)
        row_vals = seq[valid]
        m[f"{p}_mean"] = (seq * L).sum() / den
        m[f"{p}_max"], m[f"{p}_min"] = row_vals.max(), row_vals.min()
        m[f"{p}_fraction_high"] = (row_vals > hi).mean()
        m[f"{p}_fraction_low"] = (row_vals < lo).mean() if lo is not None else 0.0
        clamped = np.clip(seq, lo if lo is not None else (-np.inf if key.endswith("_ratio/") else 0.0), hi)
        c_sum, c2_sum = (clamped * L).sum(), (clamped**2 * L).sum()
        rejected = (1.0 - h[key + "keep"]) * L  # rejected valid tokens per row
    else:
        row_vals = (h[key + "sum"] / (L + 1e-8))[valid]
        m[f"{p}_mean"] = h[key + "sum"].sum() / den
        m[f"{p}_max"], m[f"{p}_min"] = h[key + "max"][valid].max(), h[key + "min"][valid].min()
        m[f"{p}_fraction_high"] = h[key + "hi"].sum() / den
        m[f"{p}_fraction_low"] = h[key + "lo"].sum() / den if lo is not None else 0.0
        c_sum, c2_sum = h[key + "c"].sum(), h[key + "c2"].sum()
        rejected = L - h[key + "kept"]
    m[f"{p}_std"] = math.sqrt(max(c2_sum / n - (c_sum / n) ** 2, 0.0)) if n > 1 else 0.0
    m[f"{p}_seq_mean"] = row_vals.mean()
    m[f"{p}_seq_std"] = row_vals.std(ddof=1) if row_vals.size > 1 else 0.0
    m[f"{p}_seq_max"], m[f"{p}_seq_min"] = row_vals.max(), row_vals.min()
    m[f"{p}_seq_max_deviation"] = np.abs(row_vals).max()
    m[f"{p}_seq_fraction_high"] = (row_vals > hi).mean()
    if lo is not None:
        m[f"{p}_seq_fraction_low"] = (row_vals < lo).mean()
    m[f"{p}_masked_fraction"] = rejected.sum() / den
    m[f"{p}_seq_masked_fraction"] = (rejected[valid] > 0).mean()


def _rs_metrics(h, options, bounds, dtype, n, metrics):
    """All `rollout_rs_*` metrics (ALGORITHMS.md 5.2) from the fetched rows."""
    def rounded(v):  # a Python float as the compute dtype rounds it in a tensor comparison
        return None if v is None else torch.tensor(v, dtype=dtype).item()

    for option, (lo, hi) in zip(options, bounds):
        lo_s, hi_s = _log_bounds(option, lo, hi)
        _rs_option_metrics(f"rollout_rs_{option}", h, f"rs/{option}/", rounded(lo_s), rounded(hi_s), n, metrics)
    rejected = h["len"] - h["rs/kept"]
    metrics["rollout_rs_masked_fraction"] = rejected.sum() / (n + 1e-8)
    metrics["rollout_rs_seq_masked_fraction"] = (rejected > 0).mean()  # over all rows, empty ones included


@dataclass
class CorrectionTerms:
    """What `RolloutCorrection.terms` computes on one batch (or one micro-batch of it).

    weights: IS weights `[B, T]` before batch normalization (None without IS); rs_mask: the loss mask after
    rejection sampling and the veto; rows: the per-row reductions every metric is derived from (host arrays
    `[B]`), which concatenate across micro-batches and ranks into those of the whole batch."""

    weights: torch.Tensor | None
    rs_mask: torch.Tensor
    rows: dict[str, np.ndarray]


class RolloutCorrection:
    """Rollout correction with its options parsed once: `terms` on the device per (micro-)batch, `metrics`
    on the host from the rows of any number of pieces. `__call__` does both on one batch (the public
    `rollout_correction` function).

    Splitting matters in bypass mode: the IS weights there are functions of pi_theta, known one micro-batch at
    a time during the update, while the batch normalizer and the metrics are batch quantities. Every metric
    is a function of per-row reductions, so the rows of all micro-batches (and DP ranks) give the batch's
    exact metrics and normalizer, wherever the terms were computed."""

    def __init__(self, *, rollout_is: str | None = None, rollout_is_threshold: float | str | None = 2.0,
                 rollout_is_batch_normalize: bool = False, rollout_rs: str | None = None,
                 rollout_rs_threshold: float | str | None = None, rollout_token_veto_threshold: float | None = None,
                 rollout_is_threshold_lower: float | None = None, rollout_is_mode: str = "truncate",
                 rollout_rs_threshold_lower: float | None = None):  # fmt: skip
        self.level = parse_is_level(rollout_is)
        self.options = parse_rs_options(rollout_rs)
        self.bounds = parse_rs_thresholds(self.options, rollout_rs_threshold, rollout_rs_threshold_lower) \
            if self.options else []  # fmt: skip
        if rollout_rs_threshold_lower is not None and not any(is_ratio_bounded(o) for o in self.options):
            warnings.warn("rollout_rs_threshold_lower is ignored: no ratio-bounded rollout_rs option (k1, token, "
                          "sequence, geometric, seq_*_ratio) is set", stacklevel=2)  # fmt: skip
        self.veto = parse_veto_threshold(rollout_token_veto_threshold)
        self.spec = None
        if self.level is not None and rollout_is_threshold is not None:
            self.spec = _ISSpec.parse(rollout_is_threshold, rollout_is_threshold_lower, rollout_is_mode)
        self.batch_normalize = bool(rollout_is_batch_normalize)
        self.dtype = torch.float32  # of the log-probs seen by `terms` (RS metrics round thresholds to it)

    @property
    def has_weights(self) -> bool:
        return self.spec is not None

    @property
    def rejects(self) -> bool:
        """True when rejection sampling or the veto can remove tokens from the loss mask."""
        return bool(self.options) or self.veto is not None

    def kept_counts(self, rows: dict[str, np.ndarray] | Sequence[dict[str, np.ndarray]],
                    agg_mode: str) -> tuple[float, float]:  # fmt: skip
        """(count before, count after) rejection of what `agg_mode` normalizes by: valid tokens for
        token-mean, non-empty responses for the seq-mean modes, nothing (1, 1) for token-sum."""
        h = _merge_rows(rows)
        kept = h["rs/kept"] if self.options else h["len"]
        if self.veto is not None:
            kept = kept * (h["veto"] == 0)
        if agg_mode == "token-mean":
            return float(h["len"].sum()), float(kept.sum())
        if agg_mode.startswith("seq-mean"):
            return float((h["len"] > 0).sum()), float((kept > 0).sum())
        return 1.0, 1.0

    @property
    def normalizes(self) -> bool:
        """True when the IS weights are rescaled by a batch quantity (rollout_is_batch_normalize)."""
        return self.spec is not None and self.batch_normalize

    @torch.no_grad()
    def terms(self, old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
              response_mask: torch.Tensor) -> CorrectionTerms:  # fmt: skip
        """IS weights (not yet batch-normalized), RS mask and metric rows of pi_train (`old_log_prob`) vs
        pi_rollout; inputs `[B, T]`. Two host syncs: the input check and one fetch of the rows."""
        if old_log_prob.shape != rollout_log_prob.shape or old_log_prob.shape != response_mask.shape:
            raise ValueError(
                f"shape mismatch: old_log_prob {tuple(old_log_prob.shape)}, rollout_log_prob "
                f"{tuple(rollout_log_prob.shape)}, response_mask {tuple(response_mask.shape)}"
            )
        dtype = old_log_prob.dtype if old_log_prob.dtype.is_floating_point else torch.float32
        self.dtype = dtype
        roll, lr, lr64, seq_exact, m, lengths, n = _prepare(old_log_prob, rollout_log_prob, response_mask, dtype)
        rows = _Rows()
        rows.add("len", lengths)
        seq_log, e_c = _diagnostic_rows(roll, lr, lr64, seq_exact, rows)
        scratch = roll if roll.dtype == lr.dtype else torch.empty_like(lr)  # roll's sums are queued: reuse it
        # Added to padding before a masked min, subtracted before a masked max.
        pad_big = (1.0 - m).mul_(_BIG) if self.level == "token" or self.options else None
        weights = None
        if self.spec is not None:
            weights = _is_weights(self.spec, self.level, seq_log, e_c, m, n, pad_big, scratch, rows)
        keep = _rs_keep(lr, e_c, m, pad_big, scratch, self.options, self.bounds, rows) if self.options else None
        if self.veto is not None:  # a response with any token ratio pi_train/pi_rollout < veto is rejected whole
            catastrophic = _cmp(torch.lt, lr, math.log(self.veto)).mul_(m).sum(-1)
            rows.add("veto", catastrophic)
            keep_row = _cmp(torch.eq, catastrophic, 0.0).unsqueeze(-1)
            keep = keep_row if keep is None else keep * keep_row
        rs_mask = response_mask.clone() if keep is None else (response_mask * keep).to(response_mask.dtype)
        return CorrectionTerms(weights, rs_mask, rows.fetch())

    def metrics(self, rows: dict[str, np.ndarray] | Sequence[dict[str, np.ndarray]]) -> tuple[dict[str, float], float]:
        """(metrics keyed `rollout_corr/...`, batch-norm factor) from the rows of one batch or of its pieces
        (micro-batches, ranks) in any order. The factor is 1.0 unless the weights are batch-normalized."""
        h = _merge_rows(rows)
        n = float(h["len"].sum())
        if n == 0:
            raise ValueError("rollout_correction: response_mask must contain at least one valid token")
        metrics: dict[str, float] = {}
        factor = 1.0
        if self.spec is not None:
            mu = _is_metrics(h, self.spec, self.level, n, metrics)
            if self.batch_normalize:
                factor = float(mu) if mu > 1e-8 else 1.0
                metrics["rollout_is_batch_norm_factor"] = factor
        if self.options:
            _rs_metrics(h, self.options, self.bounds, self.dtype, n, metrics)
        if self.veto is not None:
            metrics["rollout_is_veto_fraction"] = (h["veto"] > 0).mean()
            metrics["rollout_is_catastrophic_token_fraction"] = h["veto"].sum() / (n + 1e-8)
        metrics.update(_diagnostics(h, n))
        return {PREFIX + k: float(v) for k, v in metrics.items()}, factor

    def __call__(self, old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor):
        """`terms` + `metrics` on one batch, weights batch-normalized: (is_weights or None, rs_mask, metrics)."""
        t = self.terms(old_log_prob, rollout_log_prob, response_mask)
        metrics, factor = self.metrics(t.rows)
        if t.weights is not None and factor != 1.0:
            t.weights.div_(factor)
        return t.weights, t.rs_mask, metrics


def _merge_rows(rows: dict[str, np.ndarray] | Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate the row arrays of several pieces. Token-level IS rows hold sums of (w - c) and (w - c)^2
    around each piece's own centre c (`is_c`); they are re-centred on the merged mean, exactly, so the
    variance keeps its cancellation-free form."""
    if isinstance(rows, dict):
        return rows
    h = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    if "is_c" in h:
        n = h["len"].sum()
        shift = h["is_c"] - h["is_w"].sum() / max(n, 1e-30)  # old centre - new centre, per row
        d = h["is_d"]
        h["is_d2"] = h["is_d2"] + 2.0 * shift * d + h["len"] * shift**2
        h["is_d"] = d + h["len"] * shift
        h["is_c"] = h["is_c"] - shift
    return h


def rollout_correction(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    **options,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """IS weights, rejection mask and metrics for pi_train (`old_log_prob`) vs pi_rollout. Inputs `[B, T]`,
    response_mask `{0, 1}`. `options`: the keyword arguments of `RolloutCorrection` (rollout_is,
    rollout_is_threshold, rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold,
    rollout_rs_threshold_lower, rollout_token_veto_threshold, rollout_is_threshold_lower, rollout_is_mode).

    Returns (is_weights `[B, T]` fp32 detached or None, rs_mask `[B, T]` in response_mask's dtype, metrics
    with Python-float values, every key prefixed `rollout_corr/`). RS and veto never zero the IS weights:
    the trainer applies the mask as the loss mask. See README "Rollout correction" for every option.
    """
    return RolloutCorrection(**options)(old_log_prob, rollout_log_prob, response_mask)
