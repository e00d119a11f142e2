"""rlx.kernels: logprob of the target token and entropy straight from hidden states and the lm_head
weight, in chunks and vocabulary-parallel, never as full fp32 logits (torch reference + Triton).

`fused_logprobs` / `fused_token_stats` take an implementation name from `IMPLS`; rlx.algorithms
registers them as `LOGPROB_BACKENDS` ("torch", "triton") and picks one per device for "auto".
"""

from rlx.kernels.fused import IMPLS, fused_logprobs, fused_token_stats, triton_available
from rlx.kernels.vocab_parallel import Stats, all_reduce_slices, local_shard, merge_slices

__all__ = [
    "IMPLS",
    "Stats",
    "all_reduce_slices",
    "fused_logprobs",
    "fused_token_stats",
    "local_shard",
    "merge_slices",
    "triton_available",
]
