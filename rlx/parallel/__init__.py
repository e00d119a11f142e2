"""Trainer parallelism: ParallelDims (the named DeviceMesh) and the TP / AC / compile / FSDP2
transforms applied to a model from outside, in that order (build_parallel_model)."""

from rlx.parallel.dims import ParallelDims
from rlx.parallel.parallelize import (
    apply_ac,
    apply_compile,
    apply_fsdp,
    apply_tp,
    build_parallel_model,
    hf_name,
    load_hf_weights_sharded,
    local_slice,
    num_params,
)

__all__ = [
    "ParallelDims",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "build_parallel_model",
    "hf_name",
    "load_hf_weights_sharded",
    "local_slice",
    "num_params",
]
