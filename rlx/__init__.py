"""rlx: reinforcement-learning post-training for large language models.

FSDP2 x TP trainer, colocated vLLM generator, pluggable sampler and loss stages, one TOML per run.
"""

__version__ = "0.1.0"
