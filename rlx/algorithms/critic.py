"""PPO-with-a-critic algorithm pieces: GAE, the clipped value loss, the KL-in-reward penalty and its controllers.

Pure functions on `[B, T]` tensors with a response mask, reproducing verl 0.9.1's numbers and metric keys.

verl quirks rlx keeps (read from verl 0.9.1 `trainer/ppo/core_algos.py`: `compute_gae_advantage_return`,
`compute_value_loss`, `AdaptiveKLController`, `FixedKLController`, `get_kl_controller`; `trainer/ppo/ray_trainer.py`:
`apply_kl_penalty`; `utils/torch_functional.py`: `masked_whiten`, `clip_by_value`):

* GAE walks the *valid* tokens only. At a masked position the running value and advantage are carried through
  unchanged, so a gap in the mask (a tool observation, or the `[0, 0, 1, 1]` prefix of a token-adaptive
  continuation) is skipped: the token before the gap bootstraps from the first valid token after it, with one
  factor of gamma, not one per position. Rewards and values written at masked positions are ignored.
* GAE's returns are `A + V` *before* whitening, at every position; the advantages are `masked_whiten(A, m)` and are
  **not** multiplied by the mask afterwards: padding holds the whitened carried value (leading padding that of the
  first valid token, trailing padding that of 0). Consumers must read them under the mask only.
* Whitening takes mean and unbiased variance over all valid tokens of the batch, so it raises for fewer than 2.
* The value loss is `0.5 * agg(max((v - R)^2, (clip(v, V - c, V + c) - R)^2))` (the pessimistic, clipped form);
  `critic/vf_clipfrac` counts tokens where the clipped error is *strictly* larger, i.e. where the clip sets the
  loss (and the gradient is 0), not every token whose prediction was clipped.
* The KL penalty uses the *old* (training-engine) log-probs against the reference, `r = score - beta * kl * m`;
  the logged `actor/reward_kl_penalty` is the per-response masked mean of kl averaged over *all* B rows, so an
  empty response counts as 0 KL. That same number, with n_steps = B (responses, not optimizer steps), drives the
  adaptive controller: `beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * B / horizon`.

Where rlx differs (only where verl's result would be non-finite or lost): the KL is masked with `where`, so
NaN/inf log-probs in padding cannot leak into the rewards (verl's `kld * mask` gives NaN there, which GAE then
propagates); controller updates reject a non-finite KL (verl would set beta to NaN); controllers have
`state_dict()` so a resumed run keeps its adapted beta (verl restarts from `kl_coef`).
"""

from __future__ import annotations

import math
import warnings

import torch

from rlx.algorithms.core import masked_mean, masked_whiten, to_floats
from rlx.algorithms.kl import kl_penalty as kl_estimate
from rlx.algorithms.losses import agg_loss

# verl's adaptive controller limits the proportional error to +-20% per update (Ziegler et al. 2019).
KL_ERROR_CLIP = 0.2
KL_CONTROLLERS = ("adaptive", "fixed")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected [B, T] tensors of one shape, got {shapes}")


@torch.no_grad()
def gae_advantages(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), verl's `compute_gae_advantage_return`.

    rewards, values (the critic's V(s_t) from before this step's update), mask: `[B, T]`.
    Backward over the valid tokens of each response, with V_next = A_next = 0 past the end:
        delta_t = r_t + gamma * V_next - V_t;   A_t = delta_t + gamma * lam * A_next
    and at a masked t both V_next and A_next are carried through unchanged (the position is skipped).
    Returns (advantages = masked_whiten(A, m), returns = A + V), both `[B, T]`; the returns are the value
    targets. gamma = lam = 1 gives A_t = (sum of future valid rewards) - V_t.
    """
    _check_same_shape(token_level_rewards=token_level_rewards, values=values, response_mask=response_mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"GAE needs 0 <= gamma <= 1 and 0 <= lam <= 1, got gamma={gamma}, lam={lam}")
    valid = response_mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    last_adv = torch.zeros_like(values[:, 0])
    decay = gamma * lam  # a Python float, multiplied in the same order as verl for identical fp32 rounding
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + decay * last_adv
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        last_adv = torch.where(valid[:, t], adv_t, last_adv)
        advantages[:, t] = last_adv
    returns = advantages + values
    # The mask goes in as given, as in verl: its dtype sets the dtype of the token count, hence the rounding.
    return masked_whiten(advantages, response_mask), returns


def value_loss(
    vpreds: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    **global_batch_info,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss, verl's `compute_value_loss` (note rlx's argument order: values before returns).

    vpreds: `[B, T]` the critic's current predictions (with grad); values: `[B, T]` the predictions made before
    the update (the ones GAE used); returns: `[B, T]` GAE's targets. With c = cliprange_value:
        v_clip = clip(vpreds, values - c, values + c)
        loss   = 0.5 * agg(max((vpreds - R)^2, (v_clip - R)^2), m)
    The max keeps the pessimistic error, so a prediction that moved more than c away from `values` gets no
    gradient pulling it further. `global_batch_info` (dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor) goes to `agg_loss`. Metrics: `critic/vf_loss` (this call's loss), `critic/vf_clipfrac`
    (masked mean of [clipped error > unclipped error]) and `critic/vpred_mean` (masked mean of vpreds).
    """
    _check_same_shape(vpreds=vpreds, values=values, returns=returns, response_mask=response_mask)
    if not cliprange_value >= 0:
        raise ValueError(f"cliprange_value must be >= 0 (a large value disables clipping), got {cliprange_value}")
    vpred_clipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    unclipped_error = (vpreds - returns) ** 2
    clipped_error = (vpred_clipped - returns) ** 2
    per_token = torch.max(unclipped_error, clipped_error)
    loss = 0.5 * agg_loss(per_token, response_mask, loss_agg_mode, **global_batch_info)
    with torch.no_grad():
        metrics = {
            "critic/vf_loss": loss,
            "critic/vf_clipfrac": masked_mean((clipped_error > unclipped_error).float(), response_mask),
            "critic/vpred_mean": masked_mean(vpreds, response_mask),
        }
    return loss, to_floats(metrics)


@torch.no_grad()
def apply_kl_penalty(
    token_level_scores: torch.Tensor,
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_penalty: str = "kl",
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-in-reward (verl's `apply_kl_penalty`): `rewards = scores - kl_coef * kl * m`, a new `[B, T]` tensor.

    scores: `[B, T]` the reward function's token-level scores; log_prob: `[B, T]` the old (pre-update) policy's
    log-probs; ref_log_prob: `[B, T]` the reference policy's; kl = `kl_penalty(log_prob, ref_log_prob, estimator)`
    per token (any rlx KL estimator: kl/k1, abs, mse/k2, low_var_kl/k3; a `+` form gives its value, since no
    gradient flows here). Metrics: `actor/reward_kl_penalty` = mean over all B rows of each row's masked mean KL
    (an empty row gives 0) -- the `current_kl` to feed the controller -- and `actor/reward_kl_penalty_coeff`
    = the kl_coef used.
    """
    _check_same_shape(scores=token_level_scores, log_prob=log_prob, ref_log_prob=ref_log_prob, mask=response_mask)
    kl = kl_estimate(log_prob, ref_log_prob, kl_penalty)
    kl = torch.where(response_mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    token_level_rewards = token_level_scores - kl_coef * kl
    current_kl = masked_mean(kl, response_mask, dim=-1).mean()
    metrics = {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": float(kl_coef)}
    return token_level_rewards, to_floats(metrics)


class FixedKLController:
    """A constant KL coefficient: `.value` is `kl_coef` forever, `update` does nothing."""

    type = "fixed"

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the signature matches AdaptiveKLController.update)."""

    def state_dict(self) -> dict:
        return {"type": self.type, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Keeps the configured coefficient: a fixed beta belongs to the config, so a changed one wins on resume."""
        if _matching_type(self, state) and state["value"] != self.value:
            warnings.warn(f"fixed KL coefficient changed on resume: checkpoint {state['value']}, using the "
                          f"configured {self.value}", stacklevel=2)  # fmt: skip


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (verl's `AdaptiveKLController`).

    After each batch: `e = clip(current_kl / target_kl - 1, -0.2, 0.2)`, `value *= 1 + e * n_steps / horizon`,
    so beta grows while the measured KL is above target and shrinks below it, by at most 20% * n/horizon.
    """

    type = "adaptive"

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        if not init_kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {init_kl_coef}")
        if not target_kl > 0:
            raise ValueError(f"the adaptive KL controller needs target_kl > 0, got {target_kl}")
        if not horizon > 0:
            raise ValueError(f"the adaptive KL controller needs horizon > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = target_kl
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale `.value` by the clipped proportional error; n_steps is the number of responses in the batch."""
        if not math.isfinite(current_kl):
            raise ValueError(f"adaptive KL controller got a non-finite KL ({current_kl}); beta would become NaN")
        error = min(max(current_kl / self.target - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"type": self.type, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restores the adapted beta (target_kl and horizon stay as configured)."""
        if _matching_type(self, state):
            self.value = float(state["value"])


def _matching_type(controller, state: dict) -> bool:
    if "value" not in state or "type" not in state:
        raise ValueError(f"not a KL controller state (needs 'type' and 'value'): {state!r}")
    if state["type"] != controller.type:
        warnings.warn(f"KL controller type changed on resume ({state['type']!r} -> {controller.type!r}): "
                      f"ignoring the saved beta, starting from {controller.value}", stacklevel=3)  # fmt: skip
        return False
    return True


KLController = FixedKLController | AdaptiveKLController


def build_kl_controller(
    type: str, kl_coef: float = 0.001, target_kl: float = 0.1, horizon: float = 10000
) -> KLController:
    """A KL controller by type (`fixed` ignores target_kl and horizon); defaults are verl's KLControlConfig."""
    if type == "fixed":
        return FixedKLController(kl_coef)
    if type == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown kl controller type {type!r}; valid types: {list(KL_CONTROLLERS)}")
