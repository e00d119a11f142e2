"""The sampler stage: which rollouts to generate and keep (fixed, adaptive, filtered, token_adaptive).

`build_sampler(cfg.sampler, ...)` picks a class from `SAMPLERS` by `cfg.type`; semantics and metric
names follow DESIGN.md section 5, each module's docstring states its own contract.

User samplers: set `[sampler] type = "my_pkg.my_module:MySampler"`. The class must subclass
`rlx.sampler.Sampler`; it is constructed like the built-ins,
`MySampler(cfg, n=..., temperature=..., train_batch_size=..., gen_batch_size=..., max_tokens=...)`
with `cfg` the `[sampler]` section, and must implement `sample(prompts, ctx) -> (RolloutBatch,
metrics)` (see `rlx.sampler.base`).
"""

from __future__ import annotations

import importlib

from rlx.sampler.adaptive import AdaptiveSampler
from rlx.sampler.base import Sampler, SamplerContext
from rlx.sampler.filtered import FilteredSampler, TooManyGenBatchesError
from rlx.sampler.fixed import FixedSampler
from rlx.sampler.token_adaptive import TokenAdaptiveSampler

SAMPLERS: dict[str, type[Sampler]] = {
    "fixed": FixedSampler,
    "adaptive": AdaptiveSampler,
    "filtered": FilteredSampler,
    "token_adaptive": TokenAdaptiveSampler,
}


def resolve_sampler_class(name: str) -> type[Sampler]:
    """A registered sampler name, or `pkg.module:ClassName` for a user sampler."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    if ":" not in name:
        raise ValueError(f"unknown sampler type {name!r}; valid: {sorted(SAMPLERS)} "
                         "or an import path 'pkg.module:ClassName'")
    module_name, _, class_name = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"sampler type {name!r}: cannot import {class_name} from {module_name}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise ValueError(f"sampler type {name!r} must name a subclass of rlx.sampler.Sampler, got {cls!r}")
    return cls


def build_sampler(
    cfg,
    *,
    n: int,
    temperature: float,
    train_batch_size: int,
    gen_batch_size: int | None = None,
    max_tokens: int | None = None,
) -> Sampler:
    """Construct the sampler named by `cfg.type` from the `[sampler]` section.

    `n` and `temperature` are the generator's; `train_batch_size` / `gen_batch_size` are this
    rank's prompt counts (gen defaults to train; only `filtered` uses it); `max_tokens` is the
    response-length limit (token_adaptive shortens continuations by their prefix).
    """
    cls = resolve_sampler_class(str(cfg.type))
    return cls(cfg, n=n, temperature=temperature, train_batch_size=train_batch_size,
               gen_batch_size=gen_batch_size, max_tokens=max_tokens)


__all__ = [
    "SAMPLERS",
    "AdaptiveSampler",
    "FilteredSampler",
    "FixedSampler",
    "Sampler",
    "SamplerContext",
    "TokenAdaptiveSampler",
    "TooManyGenBatchesError",
    "build_sampler",
    "resolve_sampler_class",
]
