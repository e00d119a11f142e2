"""Push the trainer's weights into the colocated generator, one decoder layer at a time.

Data path of `WeightSync.push(model, version)`, for each bucket of `layers_per_call` decoder
layers (default 1), then one bucket with everything else (embeddings, final norm, lm_head):

  1. gather   every rank calls `param.full_tensor()` on each DTensor parameter of the bucket, in
              the same order (all-gathers over the FSDP `dp_shard` and `tp` mesh dims); plain
              tensors are used as they are. Every rank takes part, whatever its generator rank.
  2. cast     to the engine dtype (a no-op view when the dtypes already match).
  3. reload   `generator.reload_weights(bucket)` -> vLLM `collective_rpc("reload_weights",
              is_checkpoint_format=True)` on this rank's own worker (in-process). vLLM restores
              the layer's checkpoint-format parameters, runs each weight loader (which fuses
              q/k/v and gate/up and keeps this rank's generator-TP shard), repacks the weights
              for its kernels (on CPU: oneDNN / SGL packing) and copies the result into the
              engine's original storage. A layer is repacked once all of its parts have arrived
              in the same call, so q/k/v and gate/up of one layer are never split.
  4. free     the bucket's gathered tensors are dropped before the next bucket, so extra memory
              is about one layer (the embedding bucket is the largest).

Tied embeddings: vLLM keeps a separately packed output projection, so `lm_head.weight` is always
sent (it is the embedding tensor). Finally the prefix cache is reset: cached KV blocks were
computed with the old weights.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rlx.parallel import hf_name  # strips the prefixes that compile / AC wrappers insert

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# vLLM logs one warning per untouched module on every partial reload ("Failed to load weights"),
# which is expected here: each call carries one layer.
_NOISY_VLLM_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)


def layer_buckets(
    model: nn.Module, layers_per_call: int = 1, *, tie_word_embeddings: bool = False
) -> list[list[tuple[str, torch.Tensor]]]:
    """Parameters grouped into push buckets: decoder layers in order, then all the rest.

    Tied weights are listed under every name (`remove_duplicate=False`); for a tied engine,
    `lm_head.weight` is added from the embedding when the model does not name it."""
    layers: dict[int, list[tuple[str, torch.Tensor]]] = {}
    rest: list[tuple[str, torch.Tensor]] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        name = hf_name(name)
        match = _LAYER.match(name)
        (layers.setdefault(int(match.group(1)), []) if match else rest).append((name, param))
    names = {n for n, _ in rest}
    if tie_word_embeddings and "lm_head.weight" not in names:
        embed = dict(rest)["model.embed_tokens.weight"]
        rest.append(("lm_head.weight", embed))
    ordered = [layers[i] for i in sorted(layers)]
    buckets = [sum(ordered[i : i + layers_per_call], []) for i in range(0, len(ordered), layers_per_call)]
    return buckets + [rest]


def gather_full(param: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a parameter: all-gathers a DTensor (collective), else detaches."""
    from torch.distributed.tensor import DTensor

    tensor = param.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def _quiet_vllm_reload() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _NOISY_VLLM_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class WeightSync:
    """Streams a trainer model's weights into a generator that has `reload_weights`.

    The generator needs `reload_weights(list[(hf_name, full_tensor)])`, `reset_prefix_cache()`,
    `engine_dtype` and `tie_word_embeddings` (VLLMGenerator has them). It must be awake."""

    def __init__(self, generator: Any, *, layers_per_call: int = 1):
        if layers_per_call < 1:
            raise ValueError(f"layers_per_call must be >= 1, got {layers_per_call}")
        self.generator = generator
        self.layers_per_call = layers_per_call

    @torch.no_grad()
    def push(self, model: nn.Module, version: int) -> dict[str, float]:
        """Copy `model`'s current weights into the engine; every trainer rank must call it.

        Returns `weight_sync/{seconds,bytes,version}` and the time split
        `weight_sync/{gather,reload}_seconds` (cast is counted in gather)."""
        if getattr(self.generator, "is_sleeping", False):
            raise RuntimeError("wake the generator up before pushing weights into it")
        dtype = self.generator.engine_dtype
        start = time.perf_counter()
        gather_s = reload_s = 0.0
        num_bytes = 0
        buckets = layer_buckets(
            model, self.layers_per_call, tie_word_embeddings=self.generator.tie_word_embeddings
        )
        with _quiet_vllm_reload():
            for bucket in buckets:
                t0 = time.perf_counter()
                full: dict[int, torch.Tensor] = {}  # tied weights are gathered and cast once
                for _, p in bucket:
                    if id(p) not in full:
                        full[id(p)] = gather_full(p).to(dtype)
                tensors = [(name, full[id(p)]) for name, p in bucket]
                t1 = time.perf_counter()
                self.generator.reload_weights(tensors)
                reload_s += time.perf_counter() - t1
                gather_s += t1 - t0
                num_bytes += sum(t.numel() * t.element_size() for _, t in tensors)
                del tensors, full
        self.generator.reset_prefix_cache()
        return {
            "weight_sync/seconds": time.perf_counter() - start,
            "weight_sync/bytes": float(num_bytes),
            "weight_sync/version": float(version),
            "weight_sync/gather_seconds": gather_s,
            "weight_sync/reload_seconds": reload_s,
        }
