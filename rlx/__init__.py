"""rlx: reinforcement-learning post-training for large language models.

FSDP2 x TP trainer, colocated vLLM generator, pluggable sampler and loss stages, one TOML per run.
"""

import os as _os
import sys as _sys

# OpenMP threads (torch's intra-op pool, vLLM's CPU kernels) spin after each parallel region by
# default. On a shared machine a spinning thread burns the slice its sibling needs to reach the
# barrier: one busy process beside an RL step made it 3.0x slower (1.5x with PASSIVE; idle: within
# noise, benchmarks/e2e_step.py). The runtime reads this once, when torch is first imported, so it
# is set here, before any torch import; a user's own setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
