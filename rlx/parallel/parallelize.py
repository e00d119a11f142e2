"""Parallelism applied to an rlx `Transformer` from outside: TP, activation checkpointing, compile,
FSDP2, then HF weights loaded straight into each rank's shards.

Order (build_parallel_model): meta init -> TP -> AC -> compile -> FSDP -> to_empty -> load -> rope.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from rlx.models import ModelArgs, Transformer, build_model, read_hf_config
from rlx.models.hf_io import TIED_HEAD, check_hf_shapes, expected_hf_shapes, hf_tensor_shapes, iter_hf_tensors
from rlx.parallel.dims import ParallelDims

log = logging.getLogger(__name__)

AC_MODES = ("none", "full", "selective")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Prefixes that wrappers insert into parameter FQNs (checkpoint_wrapper, torch.compile(module)).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def hf_name(fqn: str) -> str:
    """The HF parameter name of a (possibly wrapped) module's parameter FQN."""
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


# ---- tensor parallel -------------------------------------------------------------------------


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP over `tp_mesh`, in place (works on the meta device).

    Plan, chosen so that every module outside attention/MLP sees full, replicated activations:
    - q/k/v and gate/up: ColwiseParallel (each rank owns whole heads / a slice of the MLP width);
      o_proj and down_proj: RowwiseParallel (partial sums all-reduced into a replicated output).
      Attention reads its local head counts from the projection outputs.
    - q_norm/k_norm (Qwen3): one [head_dim] weight shared by all heads while each rank sees only its
      heads, so each rank's weight gradient is a partial sum. SequenceParallel over the heads axis
      (dim 2 of [B, T, heads, D]) keeps the weight Replicate and makes DTensor all-reduce that grad.
    - embed_tokens: RowwiseParallel with replicated token ids: each rank owns a vocabulary slice,
      looks up the ids it owns and the partial embeddings are all-reduced (Replicate output).
    - lm_head: ColwiseParallel with Replicate output: each rank computes its vocabulary slice of the
      logits, then they are all-gathered, so losses see the full [B, T, V] logits. Hidden states
      (return_hidden=True) are replicated already.
    - A value model's `score` head ([1, H]) is not parallelized: it reads the replicated hidden states, so
      every TP rank holds the same weight and computes the same values and gradient.
    - RMSNorms outside attention act on replicated activations, so their weights stay plain tensors
      with identical gradients on every TP rank (no sequence parallelism).
    Tied embeddings: both plans shard the one matrix on dim 0 (vocab), so after parallelizing the
    shared Parameter is re-tied.
    """
    root_plan: dict[str, Any] = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    if isinstance(getattr(model, "lm_head", None), nn.Linear):  # (a ValueModel's [1, H] head stays replicated)
        root_plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, tp_mesh, root_plan)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    layer_plan: dict[str, Any] = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if model.args.qk_norm:
        heads_dim = 2
        layer_plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=heads_dim, use_local_output=True)
        layer_plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=heads_dim, use_local_output=True)
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, layer_plan)


# ---- activation checkpointing, compile ---------------------------------------------------------


def apply_ac(model: Transformer, mode: str, every: int = 1) -> None:
    """Activation checkpointing of decoder layers, in place: "none"; "full" (every layer);
    "selective" (every `every`-th layer: layers 0, every, 2*every, ...)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint '{mode}' is not one of {', '.join(AC_MODES)}")
    if mode == "none":
        return
    step = 1 if mode == "full" else every
    layers = model.model.layers
    for i in range(0, len(layers), step):
        # Non-reentrant checkpointing; the wrapper's state_dict hooks keep HF names in state dicts.
        layers.register_module(str(i), checkpoint_wrapper(layers[i], preserve_rng_state=False))


def apply_compile(model: Transformer) -> None:
    """torch.compile each decoder layer in place (module structure and names unchanged)."""
    for layer in model.model.layers:
        layer.compile(fullgraph=False)


# ---- FSDP2 -------------------------------------------------------------------------------------


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head).

    Gradients are reduced as plain sums (no averaging over ranks): the train step divides the loss
    by the global token count instead. This also avoids ReduceOp.PREMUL_SUM, which gloo lacks."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


# ---- weights -----------------------------------------------------------------------------------


def local_slice(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor of `param`, the index of that shard in the global tensor)."""
    if not isinstance(param, DTensor):
        return param, tuple(slice(0, n) for n in param.shape)
    (chunk,) = param.__create_chunk_list__()  # what DCP uses: handles FSDP x TP strided shards
    index = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))
    return param.to_local(), index


@torch.no_grad()
def load_hf_weights_sharded(model: Transformer, path: str | os.PathLike) -> None:
    """Copy an HF directory's tensors into the (possibly sharded) parameters of `model`.

    Each rank reads only the slices it owns (safetensors slice reads), so no rank ever holds a
    full copy of the model. Names and global shapes are checked before the first copy."""
    tied = model.args.tie_word_embeddings
    check_hf_shapes(expected_hf_shapes(model), hf_tensor_shapes(path), tied=tied, where=str(path))
    params = model.state_dict(keep_vars=True)  # HF names (wrapper prefixes are stripped by hooks)
    for name, handle in iter_hf_tensors(path, lazy=True):
        if tied and name == TIED_HEAD:
            continue
        local, index = local_slice(params[name])
        if local.numel():
            local.copy_(handle[index])


# ---- the whole recipe --------------------------------------------------------------------------


def build_parallel_model(
    path: str | os.PathLike,
    dims: ParallelDims,
    cfg: Any,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    reference: bool = False,
    value_head_seed: int | None = None,
) -> Transformer:
    """The model of HF directory `path`, parallelized over `dims` (mesh already built) and loaded.

    `cfg` is a `ParallelConfig`-like object (activation_checkpoint, ac_every, compile,
    reshard_after_forward, param_dtype, reduce_dtype). `dtype` is the master-weight dtype.
    reference=True builds the frozen reference model: same sharding, no grad, eval mode, no AC.
    value_head_seed builds a `ValueModel` (the critic) instead, its head initialized from that seed
    when `path` has none (rlx.models.value)."""
    from rlx.models.value import ValueModel, load_value_weights, value_model_args

    critic = value_head_seed is not None
    config = read_hf_config(path)
    args = value_model_args(config) if critic else ModelArgs.from_hf_config(config)
    dims.validate_model(args)
    model = ValueModel(args, device="meta", dtype=dtype) if critic else build_model(args, device="meta", dtype=dtype)
    if dims.tp_enabled:
        apply_tp(model, dims.get_mesh("tp"))
    if not reference:
        apply_ac(model, cfg.activation_checkpoint, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    param_dtype, reduce_dtype = DTYPES[cfg.param_dtype], DTYPES[cfg.reduce_dtype]
    if dims.fsdp_enabled or param_dtype != dtype:
        apply_fsdp(
            model,
            dims.get_mesh("fsdp"),
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=cfg.reshard_after_forward,
        )
    model.to_empty(device=device)
    if critic:
        load_value_weights(model, path, seed=value_head_seed)
    else:
        load_hf_weights_sharded(model, path)
    model.init_rope()
    if reference:
        model.requires_grad_(False)
        model.eval()
    return model


def num_params(model: nn.Module) -> int:
    """Global parameter count (DTensor shapes are global; tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
