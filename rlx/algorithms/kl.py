"""KL-penalty estimators between the policy and a reference policy (k1, abs, k2, k3 and straight-through forms).

Elementwise on `[B, T]` log-probs, no mask: the caller aggregates (verl 0.9.1 `kl_penalty`).
"""

from __future__ import annotations

import torch

from rlx.algorithms.core import SAFETY_BOUND

# verl bounds the k3 estimate to [-10, 10] after the +-20 log-ratio clamp.
K3_BOUND = 10.0
_ALIASES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
KL_ESTIMATORS = tuple(sorted(_ALIASES)) + tuple(sorted(f"{name}+" for name in _ALIASES))


def _forward(d: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "k1":
        return d  # unbiased but high variance, can be negative per token
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d.square()  # low variance, biased; its gradient is d
    # k3 (Schulman): with x = log(pi_ref/pi), exp(x) - x - 1 >= 0 and unbiased for KL(pi || pi_ref).
    x = torch.clamp(-d, -SAFETY_BOUND, SAFETY_BOUND)
    return torch.clamp(torch.exp(x) - x - 1, -K3_BOUND, K3_BOUND)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate `[B, T]` from d = log_prob - ref_log_prob.

    k1/kl: d;  abs: |d|;  k2/mse: d^2/2;  k3/low_var_kl: clamp(e^x - x - 1, +-10) with x = clamp(-d, +-20).
    `<kind>+` is straight-through: the value of <kind> with the gradient of k2 (= d), i.e.
    `k2 - sg(k2) + sg(kind)`; the unbiased gradient of KL comes from k2 while the logged value is <kind>.
    `full` (the exact full-vocabulary KL) raises NotImplementedError, as in verl 0.9.1.
    """
    if estimator == "full":
        raise NotImplementedError("kl estimator 'full' needs full-vocabulary log-probs and is not supported")
    straight_through = estimator.endswith("+")
    kind = _ALIASES.get(estimator[:-1] if straight_through else estimator)
    if kind is None:
        raise ValueError(f"unknown kl estimator {estimator!r}; valid: {list(KL_ESTIMATORS)}")
    d = log_prob - ref_log_prob
    value = _forward(d, kind)
    if not straight_through or kind == "k2":
        return value
    k2 = 0.5 * d.square()
    return k2 - k2.detach() + value.detach()
