"""rlx.algorithms: the loss stage as pure tensor functions on `[B, T]` batches with a response mask.

Advantages, policy losses (incl. bypass mode), KL/entropy, log-probs from hidden states, rollout correction and
the critic pieces (GAE, value loss, KL-in-reward and its controllers),
reproducing verl 0.9.1's numbers and metric keys (docs: shared ALGORITHMS.md; rlx extras documented inline).
"""

from rlx.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from rlx.algorithms.core import masked_mean, masked_sum, masked_var, masked_whiten
from rlx.algorithms.critic import (
    KL_CONTROLLERS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    build_kl_controller,
    gae_advantages,
    value_loss,
)
from rlx.algorithms.kl import KL_ESTIMATORS, kl_penalty
from rlx.algorithms.logprobs import (
    LOGPROB_BACKENDS,
    entropy_from_logits,
    logprobs_from_hidden,
    logprobs_from_logits,
)
from rlx.algorithms.losses import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    bypass_policy_loss,
    entropy_loss,
    policy_loss,
)
from rlx.algorithms.rollout_correction import (
    CorrectionTerms,
    RolloutCorrection,
    offpolicy_metrics,
    rollout_correction,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "LOGPROB_BACKENDS",
    "LOSS_AGG_MODES",
    "CorrectionTerms",
    "RolloutCorrection",
    "POLICY_LOSSES",
    "agg_loss",
    "apply_kl_penalty",
    "build_kl_controller",
    "bypass_policy_loss",
    "compute_advantages",
    "entropy_from_logits",
    "entropy_loss",
    "gae_advantages",
    "grpo_advantages",
    "kl_penalty",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "offpolicy_metrics",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "rollout_correction",
    "value_loss",
]
