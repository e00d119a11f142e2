"""Option names and threshold parsing for rollout correction (IS weights, rejection sampling).

Stdlib only: the TOML config loader validates with it at load time, and rlx.algorithms uses it at run time.

Two vocabularies coexist in `rollout_rs` (they are plain option names in one list):

* verl 0.9.1's divergence criteria: `token_k1..3`, `seq_sum_k1..3`, `seq_mean_k1..3`, `seq_max_k2/k3`.
  k1 criteria bound the ratio pi_rollout/pi_train by `"lo_hi"`; k2/k3 take one upper bound.
* the first vocabulary's ratio modes: `token` (per-token ratio), `sequence` (product of the ratios
  over the response) and `geometric` (their geometric mean), all with the ratio pi_train/pi_rollout
  kept inside [lower, upper].
* one-sided sequence bounds on the token ratio w_t = pi_train/pi_rollout, for the second vocabulary's
  prose formulas: `seq_max_ratio` keeps a response when max_t w_t <= u, `seq_min_ratio` when
  min_t w_t >= l (each takes one number). Together, "seq_min_ratio,seq_max_ratio" with "l,u" rejects
  every response that has a token ratio outside [l, u].

Every ratio-bounded option (k1 and the three ratio modes) accepts `"lo_hi"` or one value `u`,
which means [1/u, u] unless `rollout_rs_threshold_lower` gives the lower bound explicitly.
"""

from __future__ import annotations

import math

K_CRITERIA: tuple[str, ...] = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip
RATIO_MODES: tuple[str, ...] = ("token", "sequence", "geometric")
SEQ_RATIO_BOUNDS: tuple[str, ...] = ("seq_max_ratio", "seq_min_ratio")
RS_OPTIONS: tuple[str, ...] = K_CRITERIA + RATIO_MODES + SEQ_RATIO_BOUNDS
TOKEN_LEVEL_RS_OPTIONS: frozenset[str] = frozenset({"token_k1", "token_k2", "token_k3", "token"})
IS_LEVELS: tuple[str, ...] = ("token", "sequence")
IS_MODES: tuple[str, ...] = ("truncate", "mask")
# TOML has no null: "none"/"null"/"" switch an option off (DESIGN.md section 3).
_DISABLED = frozenset({"", "none", "null"})


def is_ratio_bounded(option: str) -> bool:
    """True for options that keep a ratio inside [lower, upper] (k1 criteria and the ratio modes)."""
    return option.endswith("k1") or option in RATIO_MODES


def is_ratio_statistic(option: str) -> bool:
    """True for options whose bounds are ratios compared in log space (k1, ratio modes, seq_*_ratio)."""
    return is_ratio_bounded(option) or option in SEQ_RATIO_BOUNDS


def _as_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{what}: {text!r} must be finite")
    return value


def _reject_bool(value: object, what: str) -> None:
    # bool is an int subclass: `true` in TOML would otherwise silently mean 1.0.
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a string, got the boolean {value!r}")


def normalize_optional(value: str | None) -> str | None:
    """Map TOML's spellings of 'off' ("none", "null", "") to None; keep other strings stripped."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string option or None, got {value!r}")
    stripped = value.strip()
    return None if stripped.lower() in _DISABLED else stripped


def parse_is_level(value: str | None) -> str | None:
    """Validate `rollout_is` (token | sequence | None)."""
    level = normalize_optional(value)
    if level is not None and level not in IS_LEVELS:
        raise ValueError(f"rollout_is={value!r} is not valid; choose one of {list(IS_LEVELS)} or 'none'")
    return level


def parse_is_mode(value: str) -> str:
    """Validate `rollout_is_mode` (truncate | mask)."""
    if value not in IS_MODES:
        raise ValueError(f"rollout_is_mode={value!r} is not valid; choose one of {list(IS_MODES)}")
    return value


def parse_is_threshold(value: float | str) -> tuple[float | None, float]:
    """Parse `rollout_is_threshold` into (lower or None, upper).

    A number or number string is TIS (upper bound only, lower None); `"lo_hi"` is IcePop, which
    needs 0 < lo <= hi.
    """
    _reject_bool(value, "rollout_is_threshold")
    if isinstance(value, (int, float)):
        lower, upper = None, float(value)
    elif isinstance(value, str):
        text = value.strip()
        if "_" in text:
            lo_text, hi_text = text.split("_", 1)
            lower = _as_float(lo_text, "rollout_is_threshold lower bound")
            upper = _as_float(hi_text, "rollout_is_threshold upper bound")
        else:
            lower, upper = None, _as_float(text, "rollout_is_threshold")
    else:
        raise ValueError(f"rollout_is_threshold must be a number or a 'lo_hi' string, got {value!r}")
    if not upper > 0:
        raise ValueError(f"rollout_is_threshold upper bound must be > 0, got {upper}")
    if lower is not None:
        if not lower > 0:
            raise ValueError(f"rollout_is_threshold lower bound must be > 0, got {lower}")
        if lower > upper:
            raise ValueError(f"rollout_is_threshold lower bound {lower} must be <= upper bound {upper}")
    return lower, upper


def parse_rs_options(value: str | None) -> list[str]:
    """Split `rollout_rs` on commas, strip, drop duplicates (keeping order), validate each name."""
    text = normalize_optional(value)
    if text is None:
        return []
    options: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in RS_OPTIONS:
            raise ValueError(f"rollout_rs option {name!r} is not valid; choose from {list(RS_OPTIONS)}")
        if name not in options:
            options.append(name)
    if not options:
        raise ValueError(f"rollout_rs={value!r} names no option; choose from {list(RS_OPTIONS)}")
    return options


def parse_rs_thresholds(
    options: list[str], threshold: float | str | None, lower: float | None = None
) -> list[tuple[float | None, float]]:
    """Per-option (lower, upper) bounds for `rollout_rs_threshold`, in the order of `options`.

    One entry is shared by every option; otherwise there must be exactly one per option. Ratio-bounded
    options get (lo, hi) as ratios: `"lo_hi"`, or `u` -> (lower or 1/u, u). k2/k3 options get (None, u).
    """
    if threshold is None:
        raise ValueError(f"rollout_rs_threshold is required when rollout_rs={','.join(options)!r} is set")
    _reject_bool(threshold, "rollout_rs_threshold")
    if isinstance(threshold, (int, float)):
        specs = [repr(float(threshold))]
    elif isinstance(threshold, str):
        specs = [s.strip() for s in threshold.split(",") if s.strip()]
    else:
        raise ValueError(f"rollout_rs_threshold must be a number or a string, got {threshold!r}")
    if len(specs) == 1:
        specs = specs * len(options)
    if len(specs) != len(options):
        raise ValueError(
            f"rollout_rs_threshold={threshold!r} has {len(specs)} entries; give one shared entry or exactly "
            f"{len(options)} (one per option of {options})"
        )
    if lower is not None:
        _reject_bool(lower, "rollout_rs_threshold_lower")
        if not lower > 0:
            raise ValueError(f"rollout_rs_threshold_lower must be > 0, got {lower}")
    bounds: list[tuple[float | None, float]] = []
    for option, spec in zip(options, specs):
        what = f"rollout_rs_threshold for {option!r}"
        if is_ratio_bounded(option):
            if "_" in spec:
                lo_text, hi_text = spec.split("_", 1)
                lo, hi = _as_float(lo_text, what), _as_float(hi_text, what)
            else:
                hi = _as_float(spec, what)
                if not hi > 0:
                    raise ValueError(f"{what} must be > 0, got {spec!r}")
                lo = float(lower) if lower is not None else 1.0 / hi  # the reciprocal rule
            if not (lo > 0 and hi > 0):
                raise ValueError(f"{what} bounds must be > 0, got {spec!r}")
            if lo > hi:
                raise ValueError(f"{what}: lower {lo} must be <= upper {hi} (from {spec!r})")
            bounds.append((lo, hi))
        elif option in SEQ_RATIO_BOUNDS:
            if "_" in spec:
                raise ValueError(f"{what} takes one ratio, not a 'lo_hi' pair: {spec!r}")
            value = _as_float(spec, what)
            if not value > 0:
                raise ValueError(f"{what} must be > 0, got {spec!r}")
            bounds.append((None, value) if option == "seq_max_ratio" else (value, math.inf))
        else:
            if "_" in spec:
                raise ValueError(f"{what} takes a single upper bound, not a 'lo_hi' pair: {spec!r}")
            hi = _as_float(spec, what)
            if not hi > 0:
                raise ValueError(f"{what} must be > 0, got {spec!r}")
            bounds.append((None, hi))
    return bounds


def parse_veto_threshold(value: float | None) -> float | None:
    """Validate `rollout_token_veto_threshold` (a ratio in (0, 1) in practice; must be > 0)."""
    if value is None:
        return None
    _reject_bool(value, "rollout_token_veto_threshold")
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"rollout_token_veto_threshold must be a number > 0 (e.g. 1e-4), got {value!r}")
    return float(value)
