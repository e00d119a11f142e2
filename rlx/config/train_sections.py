"""Config sections for the learning side: advantages, loss, rollout correction, optimizer, loop,
checkpoints, logging and the SFT warm start. Same conventions as `sections.py`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from rlx.config.fields import ConfigError, ranged

@dataclass
class KLControlConfig:
    """The coefficient of the KL penalty in the reward (algorithm.use_kl_in_reward)."""

    type: Literal["fixed", "adaptive"] = "fixed"
    """fixed: beta = kl_coef forever; adaptive: beta *= 1 + clip(kl / target_kl - 1, -0.2, 0.2) * B / horizon per step."""
    kl_coef: float = ranged(0.001, ge=0.0)
    """The (initial) beta: token reward = score - beta * KL."""
    target_kl: float = ranged(0.1, gt=0.0)
    """adaptive: the KL the controller steers towards."""
    horizon: float = ranged(10000.0, gt=0.0)
    """adaptive: responses over which beta moves by the clipped proportional error."""


@dataclass
class AlgorithmConfig:
    """Advantage estimation, and the KL penalty in the reward."""

    adv_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"] = "grpo"
    """Advantage estimator. dr_grpo is grpo without the std normalization; gae trains a critic ([critic])."""
    norm_adv_by_std: bool = True
    """grpo: divide group-centred rewards by the group std."""
    gamma: float = ranged(1.0, ge=0.0, le=1.0)
    """Discount for reinforce_pp returns and for gae."""
    lam: float = ranged(1.0, ge=0.0, le=1.0)
    """gae: the lambda of generalized advantage estimation (1 = Monte-Carlo returns minus the values)."""
    use_kl_in_reward: bool = False
    """Subtract beta * KL(policy || reference) from every response token's reward (needs the reference model)."""
    kl_penalty: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"] = "kl"
    """use_kl_in_reward: the per-token KL estimator of the penalty."""
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    """use_kl_in_reward: the penalty's coefficient (fixed or adaptive)."""

    def validate(self) -> None:
        changed = [f for f in ("type", "kl_coef", "target_kl", "horizon")
                   if getattr(self.kl_ctrl, f) != getattr(KLControlConfig(), f)]  # fmt: skip
        if changed and not self.use_kl_in_reward:
            raise ConfigError("is set, but algorithm.use_kl_in_reward = false: the KL controller does nothing. "
                              "Set use_kl_in_reward = true or remove [algorithm.kl_ctrl]", f"kl_ctrl.{changed[0]}")
        if self.kl_penalty != "kl" and not self.use_kl_in_reward:
            raise ConfigError("is set, but algorithm.use_kl_in_reward = false (the KL loss term's estimator is "
                              "loss.kl_estimator)", "kl_penalty")


@dataclass
class LossConfig:
    """Policy loss, KL and entropy terms, PPO epochs and batching."""

    type: Literal["ppo_clip", "gspo", "cispo", "reinforce"] = "ppo_clip"
    """Policy loss. ppo_clip is verl's 'vanilla' clipped surrogate (with dual clip)."""
    agg_mode: Literal["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"] = "token-mean"  # fmt: skip
    """How per-token losses reduce to a scalar (verl's loss_agg_mode)."""
    clip_ratio_low: float = ranged(0.2, ge=0.0)
    """PPO clip: the ratio is kept >= 1 - clip_ratio_low."""
    clip_ratio_high: float = ranged(0.2, ge=0.0)
    """PPO clip: the ratio is kept <= 1 + clip_ratio_high (DAPO clip-higher uses 0.28)."""
    clip_ratio_c: float = ranged(3.0, gt=1.0)
    """Dual-clip bound for negative advantages; must be > 1."""
    loss_scale_factor: float | None = ranged(None, gt=0.0)
    """seq-mean-token-sum-norm divisor; none means the response length limit (verl's default)."""
    kl_coef: float = ranged(0.0, ge=0.0)
    """Weight of the KL(policy || reference) loss term; 0 disables it and the reference model."""
    kl_estimator: Literal["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl",
                          "k1+", "kl+", "abs+", "k2+", "mse+", "k3+", "low_var_kl+"] = "low_var_kl"  # fmt: skip
    """KL estimator; a trailing '+' uses the straight-through gradient form."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (the loss subtracts entropy_coef * entropy)."""
    ppo_epochs: int = ranged(1, ge=1)
    """Passes over each rollout batch."""
    mini_batch_size: int = ranged(0, ge=0)
    """Rollout groups per optimizer step; 0 means the whole batch (one step per epoch)."""
    micro_batch_tokens: int = ranged(8192, ge=1)
    """Packed tokens per forward/backward micro-batch on each rank."""
    logprob_chunk_size: int = ranged(1024, ge=1)
    """Tokens per chunk when computing logprobs/entropy from hidden states."""
    logprob_backend: Literal["auto", "naive", "torch", "triton"] = "auto"
    """Logprob/entropy kernel (rlx.algorithms.LOGPROB_BACKENDS): auto picks per device (triton on CUDA, torch on CPU)."""


@dataclass
class RolloutCorrectionConfig:
    """Off-policy correction between the rollout engine and the trainer: IS weights, rejection sampling."""

    rollout_is: Literal["token", "sequence"] | None = None
    """IS weight level: token or sequence; none disables IS weights."""
    rollout_is_threshold: float | str = 2.0
    """IS upper bound: a number truncates above it (TIS); 'lo_hi' zeroes weights outside the band (IcePop)."""
    rollout_is_threshold_lower: float | None = ranged(None, gt=0.0)
    """IS lower bound. truncate: none clamps above the upper bound only (verl's TIS), a value clamps into [lower, upper]; mask: none means 1 / upper."""
    rollout_is_mode: Literal["truncate", "mask"] = "truncate"
    """Numeric threshold: truncate clamps the weights (see rollout_is_threshold_lower); mask zeroes them outside [lower, upper]."""
    rollout_is_batch_normalize: bool = False
    """Rescale IS weights to mean 1 over the batch."""
    rollout_rs: str | None = None
    """Rejection sampling criteria, comma-separated (token_k1, seq_max_k2, token, sequence, geometric, seq_max_ratio, ...)."""
    rollout_rs_threshold: float | str | None = None
    """RS bounds: one shared entry or one per criterion, comma-separated; k1/ratio modes take 'lo_hi' or u."""
    rollout_rs_threshold_lower: float | None = None
    """RS lower bound for criteria given a single u; none means 1 / u."""
    rollout_token_veto_threshold: float | None = None
    """Reject a whole sequence if any token ratio is below this; none disables the veto."""
    bypass_mode: bool = False
    """Use the rollout logprobs as old logprobs (no old-logprob forward pass)."""
    loss_type: Literal["ppo_clip", "reinforce"] = "ppo_clip"
    """Bypass-mode policy loss: ppo_clip (clipped ratio to the rollout policy) or reinforce (IS-weighted)."""

    def validate(self) -> None:
        # Imported here: the option vocabulary is shared with rlx.algorithms and owned there.
        from rlx.config import rollout_correction_options as options

        def check(key: str, parse, *args) -> object:
            try:
                return parse(*args)
            except ValueError as e:
                raise ConfigError(str(e), key) from None

        check("rollout_is_threshold", options.parse_is_threshold, self.rollout_is_threshold)
        criteria = check("rollout_rs", options.parse_rs_options, self.rollout_rs)
        if criteria:
            check("rollout_rs_threshold", options.parse_rs_thresholds,
                  criteria, self.rollout_rs_threshold, self.rollout_rs_threshold_lower)  # fmt: skip
        else:
            for name in ("rollout_rs_threshold", "rollout_rs_threshold_lower"):
                if getattr(self, name) is not None:
                    warnings.warn(f"rollout_correction.{name} is ignored: rollout_correction.rollout_rs is not set",
                                  stacklevel=2)  # fmt: skip
        check("rollout_token_veto_threshold", options.parse_veto_threshold, self.rollout_token_veto_threshold)
        if not self.bypass_mode and self.loss_type != "ppo_clip":
            warnings.warn("rollout_correction.loss_type is ignored unless rollout_correction.bypass_mode = true; "
                          "the policy loss is loss.type", stacklevel=2)  # fmt: skip


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (shared by RL and SFT)."""

    name: Literal["adamw"] = "adamw"
    """Optimizer."""
    lr: float = ranged(1e-6, ge=0.0)
    """Peak learning rate."""
    weight_decay: float = ranged(0.0, ge=0.0)
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam (beta1, beta2)."""
    eps: float = ranged(1e-8, gt=0.0)
    """Adam epsilon."""
    grad_clip: float = ranged(1.0, ge=0.0)
    """Clip the global gradient norm to this; 0 means off."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Schedule after warmup."""
    warmup_steps: int = ranged(0, ge=0)
    """Linear warmup steps from 0 to lr."""
    min_lr_ratio: float = ranged(0.0, ge=0.0, le=1.0)
    """cosine: final lr as a fraction of the peak."""

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"must be two numbers in [0, 1), got {self.betas}", "betas")


@dataclass
class CriticConfig:
    """The value model of PPO with a critic (algorithm.adv_estimator = "gae"); unused otherwise.

    Built like the policy (the same [parallel] mesh, AC and compile) from the policy's architecture
    with a scalar head in place of lm_head, trained by the same micro-batch loop on verl's clipped
    value loss, saved in the policy's checkpoints (`rlx export --critic` writes it as an HF directory)."""

    path: str = ""
    """HF directory of the value model: an `rlx export --critic` output, or a causal LM of the policy's family (its lm_head is dropped, a scalar head initialized); empty means the initial policy."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """The critic's own AdamW and LR schedule (verl's critic default lr 1e-5)."""
    ppo_epochs: int = ranged(0, ge=0)
    """Passes over each rollout batch; 0 means loss.ppo_epochs."""
    mini_batch_size: int | None = ranged(None, ge=0)
    """Rollout groups per critic optimizer step (0 = the whole batch); none means loss.mini_batch_size."""
    micro_batch_tokens: int = ranged(0, ge=0)
    """Packed tokens per forward/backward micro-batch on each rank; 0 means loss.micro_batch_tokens."""
    cliprange_value: float = ranged(0.5, ge=0.0)
    """Value clipping: predictions more than this away from the pre-update values get no gradient further out."""
    loss_agg_mode: Literal["", "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm"] = ""  # fmt: skip
    """How per-token value losses reduce to a scalar; empty means loss.agg_mode."""
    warmup: int = ranged(0, ge=0)
    """critic_warmup (verl's trainer.critic_warmup): the policy first updates at step `warmup`; before it only the critic trains."""


@dataclass
class TrainConfig:
    """The RL loop."""

    steps: int = ranged(100, ge=0)
    """RL steps (one rollout batch each)."""
    val_every: int = ranged(10, ge=0)
    """Validate every N steps; 0 means never."""
    val_before_train: bool = True
    """Validate once before the first step."""
    log_every: int = ranged(1, ge=1)
    """Emit metrics every N steps."""
    max_staleness: int = ranged(0, ge=0)
    """generator.placement = separate: step t trains on rollouts of policy version t - 1 - max_staleness (0: the synchronous schedule; 1: generation of step t + 1 overlaps training of step t)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (DCP): saving, retention, resuming, warm starts."""

    enable: bool = True
    """Save checkpoints."""
    interval: int = ranged(50, ge=1)
    """Save every N steps (and at the last step)."""
    keep_last: int = ranged(3, ge=0)
    """Keep the newest N checkpoints; 0 keeps all."""
    async_save: bool = False
    """Save in the background while training continues."""
    dir: str = ""
    """Checkpoint directory; empty means <run dir>/checkpoints."""
    resume: str = "auto"
    """auto (latest checkpoint in dir, if any), none (start fresh), or a checkpoint path."""
    init_from: str = ""
    """Warm-start weights from an HF directory or a DCP checkpoint (weights only, step 0)."""
    save_on_signal: bool = True
    """On SIGTERM/SIGINT, finish the current step and save a checkpoint before exiting (when enable)."""


@dataclass
class LoggingConfig:
    """Metric sinks."""

    console: bool = True
    """Print a metrics line per logged step."""
    progress_bar: bool = True
    """Show a progress bar (console only, rank 0)."""
    jsonl: bool = True
    """Write <run dir>/metrics.jsonl."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_project: str = "rlx"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (team or user); empty means your default."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode."""
    tensorboard: bool = False
    """Write TensorBoard event files under <run dir>/tb."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning (the RL warm start). Uses [model], [parallel], [optim], [checkpoint]."""

    train_files: list[str] = field(default_factory=list)
    """SFT files: prompt/response records or chat messages."""
    val_files: list[str] = field(default_factory=list)
    """Validation files; empty means hold out val_fraction of the training records."""
    prompt_key: str = "prompt"
    """Record field holding the prompt."""
    response_key: str = "response"
    """Record field holding the target response."""
    messages_key: str = "messages"
    """Record field holding chat messages (used instead of prompt/response when present)."""
    max_seq_len: int = ranged(512, ge=1)
    """Token limit per example; longer ones are truncated."""
    batch_tokens: int = ranged(4096, ge=1)
    """Packed tokens per optimizer step on each rank."""
    steps: int = ranged(200, ge=0)
    """Most optimizer steps; training stops at steps or after epochs, whichever comes first."""
    epochs: int = ranged(1, ge=1)
    """Most passes over the training data."""
    val_every: int = ranged(50, ge=0)
    """Validate every N steps; 0 means never."""
    val_fraction: float = ranged(0.05, ge=0.0, lt=1.0)
    """Held-out fraction of the training records when val_files is empty."""


def check_critic(algorithm: AlgorithmConfig, critic: CriticConfig) -> None:
    """[critic] only means something with a critic: its options under another estimator are an error."""
    if algorithm.adv_estimator == "gae":
        return
    default = CriticConfig()
    changed = [f for f in ("path", "ppo_epochs", "mini_batch_size", "micro_batch_tokens", "cliprange_value",
                           "loss_agg_mode", "warmup") if getattr(critic, f) != getattr(default, f)]  # fmt: skip
    changed += [f"optim.{f}" for f in vars(default.optim) if getattr(critic.optim, f) != getattr(default.optim, f)]
    if changed:
        raise ConfigError(f"is set, but algorithm.adv_estimator = {algorithm.adv_estimator!r} trains no critic. "
                          "Set adv_estimator = \"gae\" or remove [critic]", f"critic.{changed[0]}")


def warn_cross_section(loss: LossConfig, correction: RolloutCorrectionConfig) -> None:
    """Warnings that need two sections: bypass mode with several PPO epochs."""
    if correction.bypass_mode and loss.ppo_epochs > 1:
        warnings.warn(
            f"rollout_correction.bypass_mode = true with loss.ppo_epochs = {loss.ppo_epochs}: bypass mode skips the "
            "old-logprob forward and uses the rollout engine's logprobs as pi_old, i.e. the behaviour policy, not the "
            "trainer's policy at the start of the step. That approximation is meant for one pass over the batch: with "
            "more epochs the ratio pi_theta / pi_rollout mixes the policy's own updates with the rollout/trainer "
            "mismatch, so the IS truncation and rejection thresholds (set for the mismatch) also cut the policy "
            "update, and loss_type = reinforce has nothing bounding how far later epochs move. Use "
            "loss.ppo_epochs = 1 with bypass mode, or bypass_mode = false so the trainer recomputes old logprobs.",
            stacklevel=3,
        )
