"""Config sections for the run, the model, parallelism, data, generation, sampling and rewards.

One dataclass per TOML table; every field has a default and a docstring. Field-level checks (type,
choice, range) come from the annotations and `ranged(...)`; `validate()` holds the rest.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Any, Literal

from rlx.config.fields import ConfigError, check_import_path, ranged

# Built-in registry names. The sampler and reward registries must use these names (config imports
# neither stage, so that loading a config never imports torch).
SAMPLER_TYPES: tuple[str, ...] = ("fixed", "adaptive", "filtered", "token_adaptive")
REWARD_FNS: tuple[str, ...] = ("math", "exact_match", "quickstart")


@dataclass
class JobConfig:
    """The run: its name, where it writes, its seed."""

    name: str = "rlx"
    """Run name. The run directory is <output_dir>/<name>."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Global seed (data order, sampling, init). Each rank derives its own stream from it."""
    description: str = ""
    """Free text saved with the run."""


@dataclass
class ModelConfig:
    """The policy model and its reference copy."""

    path: str = ""
    """HF model directory (config.json + safetensors) to train."""
    tokenizer_path: str = ""
    """HF tokenizer directory; empty means model.path."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the master weights held by the trainer."""
    ref_path: str = ""
    """Frozen reference model for the KL term (loss.kl_coef > 0); empty means model.path."""
    use_chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template."""


@dataclass
class ParallelConfig:
    """Trainer parallelism (FSDP2 x TP) and memory/speed knobs, applied TP -> AC -> compile -> FSDP."""

    dp_replicate: int = ranged(1, ge=1)
    """Data-parallel replicas (HSDP outer dimension). 1 means plain FSDP."""
    dp_shard: int = ranged(-1, ge=-1)
    """FSDP shard degree. -1 fills the world: world_size / (dp_replicate * tp)."""
    tp: int = ranged(1, ge=1)
    """Tensor-parallel degree. 1 means disabled."""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing mode for decoder layers."""
    ac_every: int = ranged(1, ge=1)
    """Selective AC: checkpoint every N-th layer."""
    compile: bool = False
    """torch.compile each decoder layer."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (saves memory, costs an all-gather in backward)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP mixed precision: dtype of gathered parameters for compute."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP mixed precision: dtype of gradient reduction."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto is nccl on CUDA, gloo on CPU."""

    def validate(self) -> None:
        if self.dp_shard == 0:
            raise ConfigError("must be >= 1, or -1 to fill the world, got 0", "dp_shard")


@dataclass
class DataConfig:
    """Prompt datasets for RL (JSONL, Parquet or HF datasets) and batch sizes."""

    train_files: list[str] = field(default_factory=list)
    """Training prompt files (.jsonl, .parquet) or HF dataset names."""
    val_files: list[str] = field(default_factory=list)
    """Validation prompt files; empty means no validation."""
    prompt_key: str = "prompt"
    """Record field holding the prompt (a string, or a list of chat messages)."""
    answer_key: str = "answer"
    """Record field holding the reference answer passed to the reward function."""
    max_prompt_length: int = ranged(512, ge=1)
    """Prompt token limit; longer prompts are dropped (and counted in the metrics)."""
    train_batch_size: int = ranged(8, ge=1)
    """Prompts per RL step, global across data-parallel ranks."""
    gen_batch_size: int = ranged(0, ge=0)
    """Prompts per generation batch for the filtered sampler; 0 means train_batch_size."""
    val_batch_size: int = ranged(64, ge=1)
    """Prompts per validation generation batch."""
    shuffle: bool = True
    """Shuffle training prompts every epoch (seeded by job.seed)."""
    val_max_samples: int = ranged(0, ge=0)
    """Validate on at most this many prompts; 0 means all."""


@dataclass
class GeneratorConfig:
    """The colocated rollout engine (vLLM or torch) and its sampling parameters."""

    backend: Literal["vllm", "torch"] = "vllm"
    """Generation engine: vllm (large models, GPU serving kernels, prefix cache) or torch (rlx's own model code with a static KV cache, no engine overhead: faster for CPU and small-model runs; tp = 1 only)."""
    tp: int = ranged(1, ge=1)
    """Generator tensor-parallel degree, independent of parallel.tp."""
    placement: Literal["colocated", "separate"] = "colocated"
    """colocated: an engine in every trainer process, generation and training take turns; separate: the last num_ranks ranks of the launch only generate, overlapped with training (train.max_staleness)."""
    num_ranks: int = ranged(1, ge=1)
    """placement = separate: generator ranks (the last ones of the torchrun world; the rest train)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Generator weight dtype; auto means model.dtype."""
    n: int = ranged(8, ge=1)
    """Rollouts per prompt (the group size) for the fixed and filtered samplers."""
    temperature: float = ranged(1.0, ge=0.0)
    """Sampling temperature for training rollouts."""
    top_p: float = ranged(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass. 1.0 means disabled."""
    top_k: int = ranged(-1, ge=-1)
    """Top-k sampling. -1 means disabled."""
    max_tokens: int = ranged(256, ge=1)
    """Response token limit."""
    min_tokens: int = ranged(0, ge=0)
    """Responses are at least this long: EOS and stop strings are ignored before it (0: off)."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the tokenizer's EOS always stops)."""
    seed: int = 0
    """Sampling seed, offset per rank."""
    max_model_len: int = ranged(0, ge=0)
    """Engine context length; 0 means data.max_prompt_length + max_tokens."""
    gpu_memory_utilization: float = ranged(0.5, gt=0.0, le=1.0)
    """vllm on GPU only: fraction of GPU memory the engine may take (weights + KV cache)."""
    enable_sleep_mode: bool = True
    """GPU only: release weights and KV cache while the trainer runs (torch backend: weights move to host memory)."""
    kv_cache_space_gib: float = ranged(1.0, gt=0.0)
    """vllm on CPU only: KV cache size in GiB (the torch backend allocates what each call needs)."""
    enforce_eager: bool = True
    """vllm only: disable CUDA graphs (faster start, slower decode)."""
    enable_prefix_caching: bool = True
    """vllm only: reuse KV of shared prompt prefixes (the torch backend always prefills a prompt once for its n rollouts)."""
    max_num_seqs: int = ranged(0, ge=0)
    """Most sequences the engine decodes at once; 0 means 1024 on CPU (one wave per RL step), vLLM's default on GPU; torch backend: 0 means all of a call."""
    max_num_batched_tokens: int = ranged(0, ge=0)
    """vllm only: most tokens per engine step; 0 means max(8192, max_model_len) on CPU, vLLM's default on GPU."""
    val_temperature: float = ranged(0.0, ge=0.0)
    """Sampling temperature for validation; 0 means greedy."""
    val_n: int = ranged(1, ge=1)
    """Rollouts per validation prompt."""

    def validate(self) -> None:
        if self.min_tokens > self.max_tokens:
            raise ConfigError(f"{self.min_tokens} exceeds max_tokens={self.max_tokens}", "min_tokens")
        if self.backend == "torch" and self.tp != 1:
            raise ConfigError(f"{self.tp}: the torch backend has no tensor parallelism, set generator.tp = 1", "tp")


@dataclass
class AdaptiveSamplerConfig:
    """Per prompt, generate until a positive rollout appears, up to max_n."""

    max_n: int = ranged(128, ge=1)
    """Most rollouts per prompt."""
    rollouts_per_batch: int = ranged(8, ge=1)
    """Rollouts generated (and scored together) per iteration."""
    positive_threshold: float = 0.5
    """A rollout with reward >= this is positive."""
    min_rollouts: int = ranged(2, ge=1)
    """Fewest rollouts per prompt, even after a positive (a group needs >= 2 for an advantage)."""

    def validate(self) -> None:
        if self.min_rollouts > self.max_n:
            raise ConfigError(f"{self.min_rollouts} exceeds max_n={self.max_n}", "min_rollouts")


@dataclass
class FilteredSamplerConfig:
    """DAPO dynamic sampling, keep groups whose metric varies."""

    metric: Literal["acc", "score", "seq_reward", "seq_final_reward"] = "acc"
    """Per-rollout value whose std within a group must be > 0 to keep the group."""
    max_num_gen_batches: int = ranged(10, ge=0)
    """Most generation batches per step before failing; 0 means unlimited."""


@dataclass
class TokenAdaptiveSamplerConfig:
    """Truncate at uncertain tokens and resample from the prefix."""

    uncertainty_threshold: float = ranged(0.7, gt=0.0, le=1.0)
    """A token whose max probability is below this is a failure point."""
    entropy_threshold: float = ranged(2.0, gt=0.0)
    """A token whose entropy (nats) is above this is a failure point."""
    min_prefix_length: int = ranged(15, ge=0)
    """Failure points before this token index are ignored."""
    max_resamples_per_prefix: int = ranged(3, ge=0)
    """Resamples per failure: attempts from the same failure prefix (resample_from = 'failure_prefix') or links of a chain of growing prefixes ('latest_piece')."""
    resample_from: Literal["failure_prefix", "latest_piece"] = "failure_prefix"
    """failure_prefix: every retry restarts from the original failure point (seed 003); latest_piece: from the previous retry's own truncation."""
    adaptive_temperature_scale: float = ranged(1.2, gt=0.0)
    """Temperature multiplier per resample retry."""
    target_rollouts: int = ranged(0, ge=0)
    """Complete (non-truncated) rollouts per prompt to aim for; 0 means generator.n."""


@dataclass
class SamplerConfig:
    """Which rollouts to generate and keep. Options of each type live in its sub-table."""

    type: str = "fixed"
    """fixed | adaptive | filtered | token_adaptive, or 'pkg.module:ClassName' for a user sampler."""
    adaptive: AdaptiveSamplerConfig = field(default_factory=AdaptiveSamplerConfig)
    """Options of the adaptive sampler."""
    filtered: FilteredSamplerConfig = field(default_factory=FilteredSamplerConfig)
    """Options of the filtered sampler."""
    token_adaptive: TokenAdaptiveSamplerConfig = field(default_factory=TokenAdaptiveSamplerConfig)
    """Options of the token_adaptive sampler."""

    def validate(self) -> None:
        check_import_path(self.type, "type", SAMPLER_TYPES, "sampler type")
        try:
            self.adaptive.validate()
        except ConfigError as e:
            raise ConfigError(e.message, f"adaptive.{e.key}") from None
        if self.type not in SAMPLER_TYPES:
            return  # a user sampler may read any sub-table
        for name in ("adaptive", "filtered", "token_adaptive"):
            table = getattr(self, name)
            changed = [f.name for f in dataclasses.fields(table) if getattr(table, f.name) != getattr(type(table)(), f.name)]
            if name != self.type and changed:
                raise ConfigError(f"is set, but sampler.type = {self.type!r}: options of an unselected sampler do "
                                  f"nothing. Remove [sampler.{name}] or set sampler.type = {name!r}",
                                  f"{name}.{changed[0]}")  # fmt: skip


@dataclass
class RewardConfig:
    """Reward function and where it runs."""

    fn: str = "math"
    """math | exact_match | quickstart, or 'pkg.module:function' (called as fn(response, answer, **kwargs))."""
    backend: Literal["process", "ray", "inline"] = "process"
    """Where scoring runs: a local process pool, a Ray cluster, or inline in the trainer."""
    num_workers: int = ranged(2, ge=1)
    """Scoring workers (processes or Ray tasks in flight)."""
    timeout_s: float = ranged(10.0, gt=0.0)
    """Per-rollout scoring timeout; a timed-out rollout gets reward 0."""
    ray_address: str = ""
    """Ray cluster address for backend=ray; empty starts a local Ray."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to the reward function."""
    max_failure_fraction: float = ranged(0.5, ge=0.0, le=1.0)
    """Stop the run when more than this fraction of a step's rollouts fail to score ..."""
    max_failed_steps: int = ranged(3, ge=1)
    """... for this many consecutive steps (the error names the function and its first failure)."""
    worker_memory_mb: int = ranged(0, ge=0)
    """process backend: address-space limit per scoring worker (RLIMIT_AS), MiB; 0 means no limit."""
    worker_cpu_seconds: int = ranged(0, ge=0)
    """process backend: CPU seconds one reward call may use in a worker (RLIMIT_CPU, re-armed per call; the call then counts as a timeout); 0 means no limit."""

    def validate(self) -> None:
        check_import_path(self.fn, "fn", REWARD_FNS, "reward function")
