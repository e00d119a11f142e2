"""Data stage: prompt datasets from JSONL / Parquet / HF datasets and the resumable training stream.

The trainer calls `load_train_set(cfg.data, encode)` (before building models: data errors fail
fast), `make_stream(dataset, cfg.data, dp_rank=..., dp_size=...)` and `build_val_data(cfg.data, encode)`;
`build_train_data` does the first two at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlx.data.prompts import (
    Encode,
    PromptDataset,
    PromptStream,
    batches,
    get_field,
    load_prompts,
    read_records,
    shard,
)
from rlx.errors import UserError

__all__ = [
    "Encode",
    "PromptDataset",
    "PromptStream",
    "batches",
    "build_train_data",
    "build_val_data",
    "get_field",
    "load_prompts",
    "load_train_set",
    "make_stream",
    "read_records",
    "shard",
]


def build_train_data(
    cfg: Any, encode: Encode, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, decode: Callable | None = None
) -> tuple[PromptDataset, PromptStream]:
    """The training dataset and this rank's stream; a step's batch per rank is
    `train_batch_size // dp_size` prompts (`take(k)` draws other amounts, e.g. gen batches)."""
    dataset = load_train_set(cfg, encode, decode=decode)
    return dataset, make_stream(dataset, cfg, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


def load_train_set(cfg: Any, encode: Encode, *, decode: Callable | None = None) -> PromptDataset:
    """The training prompts, checked: every record valid (errors name file and line) and at least
    one batch of them (`train_batch_size`, `gen_batch_size`). Needs no process group: load it
    before building models, so that data mistakes fail in seconds."""
    dataset = load_prompts(
        cfg.train_files, encode, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key,
        max_prompt_length=cfg.max_prompt_length, decode=decode,
    )
    _check_covers_a_batch(dataset, cfg)
    return dataset


def make_stream(dataset: PromptDataset, cfg: Any, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 0) -> PromptStream:
    """This data-parallel rank's resumable stream over `dataset` (`train_batch_size // dp_size` per step)."""
    if cfg.train_batch_size % dp_size:
        raise UserError(f"data.train_batch_size={cfg.train_batch_size} is not divisible by the data-parallel size {dp_size}")
    return PromptStream(dataset, cfg.train_batch_size // dp_size, dp_rank, dp_size, seed, cfg.shuffle)


def _check_covers_a_batch(dataset: PromptDataset, cfg: Any) -> None:
    """One draw of the stream must fit in the dataset, or a step holds a prompt twice and its two
    groups merge (wrong advantages, fewer groups than asked). Refused here, before any model is built."""
    for key in ("train_batch_size", "gen_batch_size"):
        size = int(getattr(cfg, key, 0) or 0)
        if size > len(dataset):
            dropped = f", after dropping {dataset.num_filtered} over max_prompt_length" if dataset.num_filtered else ""
            files = ", ".join([cfg.train_files] if isinstance(cfg.train_files, str) else cfg.train_files)
            raise UserError(f"data.{key}={size} is larger than the training set ({len(dataset)} prompts in {files}"
                            f"{dropped}): a step would repeat prompts and merge their groups; lower data.{key} or "
                            "add prompts")  # fmt: skip


def build_val_data(cfg: Any, encode: Encode, *, decode: Callable | None = None) -> PromptDataset | None:
    """The validation prompts in file order, at most `val_max_samples` (0 = all); None without val_files.
    Shard with `shard(dataset, dp_rank, dp_size)` and iterate with `batches(..., val_batch_size)`."""
    if not cfg.val_files:
        return None
    return load_prompts(
        cfg.val_files, encode, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key,
        max_prompt_length=cfg.max_prompt_length, max_samples=cfg.val_max_samples, decode=decode,
    )
