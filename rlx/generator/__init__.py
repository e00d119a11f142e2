"""Generator stage: `build_generator(cfg.generator, ...)` returns a colocated rollout engine.

The engine lives in the trainer's own processes (one per rank): vLLM (vllm_backend.py) or rlx's
own model decoding with a static KV cache (torch_backend.py).
"""

from __future__ import annotations

from typing import Any

from rlx.errors import UserError
from rlx.generator.base import GeneratorLayout

__all__ = ["GeneratorLayout", "build_generator", "BACKENDS"]


def _build_vllm(cfg: Any, model_path: str, *, max_prompt_length: int, layout: GeneratorLayout):
    from rlx.generator.vllm_backend import VLLMGenerator  # imports vllm lazily

    return VLLMGenerator(cfg, model_path, max_prompt_length=max_prompt_length, layout=layout)


def _build_torch(cfg: Any, model_path: str, *, max_prompt_length: int, layout: GeneratorLayout):
    from rlx.generator.torch_backend import TorchGenerator

    return TorchGenerator(cfg, model_path, max_prompt_length=max_prompt_length, layout=layout)


BACKENDS = {"vllm": _build_vllm, "torch": _build_torch}


def build_generator(
    cfg: Any,
    model_path: str,
    *,
    max_prompt_length: int,
    layout: GeneratorLayout | None = None,
):
    """Build the generator named by `cfg.backend` for the model at `model_path` (HF directory).

    `layout` defaults to torch.distributed's default group (one rank when not initialized) with
    `cfg.tp` ranks per engine. Callers shard prompts with `generator.layout.shard(...)` so that
    ranks of one TP group submit identical requests. Creating the engine leaves the caller's RNG
    state (torch CPU/CUDA, python, numpy) untouched.
    """
    if cfg.backend not in BACKENDS:
        raise UserError(f"generator.backend={cfg.backend!r} is unknown; valid: {sorted(BACKENDS)}")
    if layout is None:
        layout = GeneratorLayout.from_process_group(cfg.tp)
    return BACKENDS[cfg.backend](cfg, model_path, max_prompt_length=max_prompt_length, layout=layout)
