"""Prompt datasets (JSONL, Parquet, HF datasets) and the deterministic, DP-sharded, resumable stream.

Records hold a prompt (a string or a list of chat messages) and a ground truth, found by
(dotted) keys, e.g. verl's parquet format: `prompt_key="prompt"`, `answer_key="reward_model.ground_truth"`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

from rlx.errors import UserError
from rlx.types import Prompt

logger = logging.getLogger(__name__)

Encode = Callable[[Any], list[int]]
"""Prompt (str or chat messages) -> token ids with the chat template applied."""

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Reading records


def read_records(path: str) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) from a .jsonl/.json file, a .parquet file, `hf://name[#split]` or a
    `datasets.save_to_disk` directory; the location ("line 3", "row 7") is for error messages."""
    if path.startswith("hf://"):
        yield from _read_hf(path)
        return
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist")
    if os.path.isdir(path):
        yield from _read_hf(path)
    elif path.endswith((".jsonl", ".json")):
        yield from _read_json(path)
    elif path.endswith(".parquet"):
        yield from _read_parquet(path)
    else:
        raise UserError(f"data file {path}: unknown format; use .jsonl, .json, .parquet, hf://name or a saved dataset dir")


def _read_json(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        first = f.read(4).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        f.seek(0)
        if first == b"[":  # a .json file holding one list of records
            records = _parse_json_file(path, f.read())
            for i, record in enumerate(records):
                yield f"record {i}", _check_record(record, path, f"record {i}")
            return
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: invalid JSON ({e}); each line must be one JSON object") from None
            yield f"line {lineno}", _check_record(record, path, f"line {lineno}")


def _decode_line(raw: bytes, path: str, lineno: int) -> str:
    """One line as text: UTF-8 (a byte-order mark on line 1 is skipped); anything else names the
    line and the byte, since a mis-encoded prompt would silently become other tokens."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None  # fmt: skip


def _parse_json_file(path: str, data: bytes) -> list:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path} line {lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _read_parquet(path: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"reading {path} needs pyarrow: pip install 'rlx[hf]'") from e
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"row {row}", record
                row += 1
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid / ArrowIOError: not Parquet, truncated
        raise UserError(f"{path} row {row}: not a readable Parquet file ({str(e).strip().splitlines()[0]})") from None


def _read_hf(path: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"reading {path} needs the datasets package: pip install 'rlx[hf]'") from e
    try:
        if path.startswith("hf://"):
            name, _, split = path[len("hf://") :].partition("#")
            dataset = datasets.load_dataset(name, split=split or "train")
        else:
            dataset = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"data {path}: cannot load the dataset ({type(e).__name__}: {reason[:300]})") from None
    if not path.startswith("hf://"):
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise UserError(f"{path} is a DatasetDict without a 'train' split (splits: {list(dataset)})")
            dataset = dataset["train"]
    for row, record in enumerate(dataset):
        yield f"row {row}", record


def _check_record(record, path: str, location: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{path} {location}: expected a JSON object, got {type(record).__name__}")
    return record


def get_field(record: dict, key: str, path: str, location: str):
    """`record[key]`, where a dotted key walks nested dicts (`reward_model.ground_truth`).
    A missing key raises a UserError naming the file, the line/row and the available keys."""
    value = record
    for depth, part in enumerate(key.split(".")):
        found = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if found is _MISSING:
            where = ".".join(key.split(".")[:depth]) or "the record"
            keys = sorted(map(str, value)) if isinstance(value, dict) else f"none ({type(value).__name__})"
            raise UserError(f"{path} {location}: no key '{key}' (available keys in {where}: {keys})")
        value = found
    return value


# ---------------------------------------------------------------------------------------------
# Datasets


class PromptDataset:
    """Tokenized prompts (`rlx.types.Prompt`), uid = the record's index across the files in order
    (stable: it does not change when other records are filtered out). `num_filtered` counts the
    prompts dropped for being longer than `max_prompt_length` tokens."""

    def __init__(self, prompts: list[Prompt], num_filtered: int = 0):
        self.prompts = prompts
        self.num_filtered = num_filtered

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def metrics(self) -> dict[str, float]:
        return {"data/filtered_prompts": float(self.num_filtered)}


def load_prompts(
    files: str | list[str],
    encode: Encode,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    max_prompt_length: int = 512,
    max_samples: int = 0,
    decode: Callable[[list[int]], str] | None = None,
) -> PromptDataset:
    """Read, tokenize (`encode` applies the chat template) and length-filter prompts from files.

    A prompt is a string or a list of chat messages (`[{"role": ..., "content": ...}]`).
    `Prompt.text` is `decode(prompt_ids)` when `decode` is given (the text after the template),
    else the prompt string or the last message's content. `max_samples` > 0 keeps the first
    that many prompts (after filtering). Over-long prompts are dropped and counted, with one warning.
    """
    files = [files] if isinstance(files, str) else list(files)
    if not files:
        raise UserError("no data files given")
    prompts, num_filtered, index = [], 0, 0
    for path in files:
        for location, record in read_records(path):
            raw = get_field(record, prompt_key, path, location)
            answer = get_field(record, answer_key, path, location)
            uid, index = index, index + 1
            _check_prompt(raw, prompt_key, path, location)
            ids = list(encode(raw))
            if not ids:
                raise UserError(f"{path} {location}: '{prompt_key}' encodes to no tokens; give it some text or drop the record")
            if len(ids) > max_prompt_length:
                num_filtered += 1
                continue
            text = decode(ids) if decode is not None else _prompt_text(raw)
            prompts.append(Prompt(prompt_ids=ids, uid=uid, ground_truth=answer, text=text, data=record))
            if max_samples and len(prompts) >= max_samples:
                break
        if max_samples and len(prompts) >= max_samples:
            break
    if num_filtered:
        logger.warning(
            "dropped %d of %d prompts longer than max_prompt_length=%d tokens (%s)",
            num_filtered, num_filtered + len(prompts), max_prompt_length, ", ".join(files),
        )
    if not prompts:
        raise UserError(f"no prompts left in {', '.join(files)} (read {index}, {num_filtered} over max_prompt_length)")
    return PromptDataset(prompts, num_filtered)


def _check_prompt(raw, prompt_key: str, path: str, location: str) -> None:
    """A prompt is a non-blank string or a non-empty list of {"role", "content"} messages with some
    text; anything else is a UserError naming the file and line (found at load time, not at the
    step that draws it)."""
    where = f"{path} {location}: '{prompt_key}'"
    if isinstance(raw, str):
        if not raw.strip():
            raise UserError(f"{where} is empty; give every record a prompt or drop the record")
        return
    if not isinstance(raw, list):
        raise UserError(f"{where} must be a string or a list of chat messages, got {type(raw).__name__}")
    for i, message in enumerate(raw):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), (str, list))):  # fmt: skip
            raise UserError(f"{where} message {i} must be an object with a string 'role' and a 'content', got {message!r:.80}")
    if all(isinstance(m["content"], str) and not m["content"].strip() for m in raw):  # also: no messages
        raise UserError(f"{where} has no message with text; give every record a prompt or drop the record")


def _prompt_text(raw: str | list) -> str:
    if isinstance(raw, str):
        return raw
    return str(raw[-1].get("content", "")) if raw and isinstance(raw[-1], dict) else ""


# ---------------------------------------------------------------------------------------------
# The training stream


class PromptStream:
    """An endless, deterministic, DP-sharded and resumable sequence of training prompts.

    Conceptually one global sequence: epoch e is a permutation of the dataset (shuffled with
    `random.Random(seed + e)`, or in order), epochs concatenated. Rank r takes global positions
    r, r + dp_size, r + 2*dp_size, ...: ranks drawing the same amounts in lockstep get disjoint
    prompts and, together, every prompt at most once per epoch.

    A draw never spans two epochs, so it never holds a prompt twice (a repeated prompt would merge
    two groups of one step): when the rest of an epoch is shorter than the draw, the draw starts
    the next epoch and that rest is skipped (like a data loader's drop_last; each epoch skips other
    prompts). A draw larger than the whole dataset cannot avoid repeats: it wraps, with a warning
    (`build_train_data` refuses a dataset smaller than one batch up front).
    `state_dict()` stores the global position, so a resumed stream (even at another dp_size)
    continues with exactly the prompts an uninterrupted one would have produced.
    """

    def __init__(self, dataset, batch_size_per_rank: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        if len(dataset) == 0:
            raise UserError("the prompt dataset is empty")
        self.dataset = dataset
        self.batch_size_per_rank = batch_size_per_rank
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.position = 0
        """Global prompts consumed by all ranks together (this rank's draws x dp_size, plus skipped epoch ends)."""
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) cache
        self._warned_wrap = False

    @property
    def epoch(self) -> int:
        return self.position // len(self.dataset)

    def next_batch(self) -> list[Prompt]:
        """This rank's next `batch_size_per_rank` prompts."""
        return self.take(self.batch_size_per_rank)

    def take(self, k: int) -> list[Prompt]:
        """This rank's next k prompts (every rank must take the same k to stay in lockstep)."""
        n, span = len(self.dataset), k * self.dp_size
        offset = self.position % n
        if span > n:
            if not self._warned_wrap:
                logger.warning("drawing %d prompts from a dataset of %d: prompts repeat within the draw", span, n)
                self._warned_wrap = True
        elif offset + span > n:  # the epoch's rest is too short for this draw: start the next epoch
            self.position += n - offset
        batch = [self.dataset[self._index_at(self.position + j * self.dp_size + self.dp_rank)] for j in range(k)]
        self.position += span
        return batch

    def _index_at(self, global_position: int) -> int:
        epoch, offset = divmod(global_position, len(self.dataset))
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1][offset]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "shuffle": self.shuffle, "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["shuffle"], state["num_prompts"]) != (self.seed, self.shuffle, len(self.dataset)):
            logger.warning(
                "resuming the prompt stream with a different seed/shuffle/dataset size (%s vs %s): the order will differ",
                (state["seed"], state["shuffle"], state["num_prompts"]), (self.seed, self.shuffle, len(self.dataset)),
            )
        self.position = int(state["position"])


def shard(prompts, dp_rank: int, dp_size: int) -> list[Prompt]:
    """This rank's share of a fixed prompt list (validation): every dp_size-th from dp_rank."""
    return list(prompts)[dp_rank::dp_size]


def batches(prompts, batch_size: int) -> Iterator[list[Prompt]]:
    """Consecutive batches of at most `batch_size` prompts, in order (the last may be short)."""
    prompts = list(prompts)
    for start in range(0, len(prompts), batch_size):
        yield prompts[start : start + batch_size]
