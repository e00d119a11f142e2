"""Typed per-stage config models and the TOML + command-line loader (no torch import here).

`load_config(path, overrides)` or `parse_args(argv)` gives a validated `Config`; `.resolved()`
fills the derived values. Every key, type, default and doc: `rlx config --help-config`.
"""

from rlx.config.fields import ConfigError
from rlx.config.loader import cli_main, help_config, load_config, parse_args, save_resolved
from rlx.config.root import Config
from rlx.config.sections import (
    REWARD_FNS, SAMPLER_TYPES, AdaptiveSamplerConfig, DataConfig, FilteredSamplerConfig, GeneratorConfig,
    JobConfig, ModelConfig, ParallelConfig, RewardConfig, SamplerConfig, TokenAdaptiveSamplerConfig,
)  # fmt: skip
from rlx.config.train_sections import (
    AlgorithmConfig, CheckpointConfig, LoggingConfig, LossConfig, OptimConfig, RolloutCorrectionConfig,
    SFTConfig, TrainConfig,
)  # fmt: skip

__all__ = [
    "Config", "ConfigError", "load_config", "parse_args", "save_resolved", "help_config", "cli_main",
    "JobConfig", "ModelConfig", "ParallelConfig", "DataConfig", "GeneratorConfig", "SamplerConfig",
    "AdaptiveSamplerConfig", "FilteredSamplerConfig", "TokenAdaptiveSamplerConfig", "RewardConfig",
    "AlgorithmConfig", "LossConfig", "RolloutCorrectionConfig", "OptimConfig", "TrainConfig",
    "CheckpointConfig", "LoggingConfig", "SFTConfig", "SAMPLER_TYPES", "REWARD_FNS",
]  # fmt: skip
