"""HF-format model directories: config.json + safetensors (sharded or not), read and written.

Weights go through safetensors only (never pickle); name/shape problems fail before any copy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlx.errors import UserError
from rlx.models.args import ModelArgs
from rlx.models.transformer import Transformer, build_model

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
TIED_HEAD = "lm_head.weight"
_MAX_NAMES = 10


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of an HF model directory."""
    if not os.fspath(path):
        raise UserError("no model directory given (an empty path): set model.path to an HF model directory "
                        "(config.json + *.safetensors)")  # fmt: skip
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path} is not an HF model directory: no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} holds a {type(config).__name__}, not a JSON object")
    return config


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a model directory: from the shard index when there is one."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (ValueError, AttributeError, AssertionError, UnicodeDecodeError):
            raise UserError(f"{index} is damaged (not a JSON object with a 'weight_map' of file names)") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UserError(f"{index} lists shard files that do not exist: {_names(absent)}")
        return files
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in {path} (rlx reads safetensors only, never .bin/.pt)")
    return files


def iter_hf_tensors(path: str | os.PathLike, *, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) for every tensor of a model directory, one at a time.

    With lazy=True the value is a safetensors slice handle instead: `h.get_shape()` is free and
    `h[a:b]` reads only that slice of dim 0 (how a sharded trainer loads straight into shards).
    Handles are valid only until the iterator advances to the next file."""
    for file in safetensors_files(path):
        with _open_safetensors(file) as f:
            for name in f.keys():
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


def _open_safetensors(file: Path):
    """`safe_open`, with a damaged file (truncated download, garbage) as a one-line UserError."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError (header) or OSError (I/O)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file} is not a valid safetensors file ({reason}): it is truncated or damaged; "
                        "download or export it again") from None


def hf_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a directory, reading headers only."""
    return {name: tuple(h.get_shape()) for name, h in iter_hf_tensors(path, lazy=True)}


def expected_hf_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """name -> shape a checkpoint must provide for `model` (no lm_head when tied)."""
    shapes = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    if model.args.tie_word_embeddings:
        shapes.pop(TIED_HEAD, None)
    return shapes


def check_hf_shapes(expected: dict[str, tuple], found: dict[str, tuple], *, tied: bool, where: str) -> None:
    """Raise a `UserError` naming missing, unexpected and mis-shaped tensors (up to 10 each)."""
    found = {k: v for k, v in found.items() if not (tied and k == TIED_HEAD)}
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [f"{k} {list(found[k])} (expected {list(v)})" for k, v in expected.items() if k in found and found[k] != v]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected: {_names(extra)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_names(wrong)}")
    if problems:
        raise UserError(f"checkpoint {where} does not match its config.json: " + "; ".join(problems))


@torch.no_grad()
def load_hf_weights(model: Transformer, path: str | os.PathLike) -> None:
    """Copy a directory's tensors into `model` in place (any device, e.g. after `to_empty`).

    Every name and shape is checked before the first copy. For a tied model a checkpoint
    `lm_head.weight` is ignored (as HF does), with a warning if it differs from the embedding."""
    tied = model.args.tie_word_embeddings
    check_hf_shapes(expected_hf_shapes(model), hf_tensor_shapes(path), tied=tied, where=str(path))
    model.tie_weights()
    params = model.state_dict(keep_vars=True)
    stale_head = None
    for name, tensor in iter_hf_tensors(path):
        if tied and name == TIED_HEAD:
            stale_head = tensor
            continue
        params[name].copy_(tensor)
    if stale_head is not None and not torch.equal(stale_head.to(model.output_weight()), model.output_weight()):
        log.warning("%s: tied model's checkpoint lm_head.weight differs from embed_tokens; ignored", path)


def from_pretrained(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Transformer:
    """Build the model of an HF directory (config.json + safetensors) and load its weights."""
    args = ModelArgs.from_hf_config(read_hf_config(path))
    model = build_model(args, device="meta", dtype=dtype)
    model.to_empty(device=device)
    load_hf_weights(model, path)
    return model


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write config.json + safetensors that HF transformers and vLLM load; see save_hf_state_dict."""
    state = dict(model.state_dict())
    if model.args.tie_word_embeddings:
        state.pop(TIED_HEAD, None)  # HF stores the tied matrix once, as embed_tokens
    return save_hf_state_dict(state, model.args, path, dtype, max_shard_bytes=max_shard_bytes)


def save_hf_state_dict(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write full (unsharded, local) tensors under HF names to `path`.

    Files: model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    once the total exceeds max_shard_bytes. Earlier model*.safetensors and index files in
    `path` are removed first so that a stale index cannot shadow the new weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: _to_saveable(v, dtype) for k, v in state.items()}
    if not tensors:
        raise ValueError("save_hf_state_dict: empty state dict")
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    for stale in [*path.glob("model*.safetensors"), path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    shards = _split_shards(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_NAME, metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(args.to_hf_config(dtype_name), indent=2) + "\n")
    return path


def _to_saveable(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    assert type(t) is torch.Tensor, f"save_hf_state_dict needs full local tensors, got {type(t).__name__}"
    t = t.to(device="cpu", dtype=dtype or t.dtype)
    # safetensors refuses views into shared storage; a contiguous copy is cheap at save time.
    return t.contiguous().clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.contiguous()


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f", ... ({len(items) - _MAX_NAMES} more)" if len(items) > _MAX_NAMES else "")
