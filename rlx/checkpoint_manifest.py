"""Checkpoint integrity and safe reading: a manifest of per-file digests written before COMPLETE,
its verification on load, DCP metadata read without arbitrary unpickling, and a non-finite check.

DCP stores its `.metadata` (and non-tensor values such as optimizer hyper-parameters) with pickle,
so loading an untrusted checkpoint directory with stock DCP runs code. Here `.metadata` goes
through an unpickler that admits only DCP's metadata classes, and non-tensor values through
`torch.load(weights_only=True)`. Anything else is refused with one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from rlx import distributed
from rlx.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
_NOT_LISTED = ("COMPLETE", MANIFEST)  # written after the manifest
_CHUNK = 16 * 1024 * 1024
_DCP_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_RNG_FILE = re.compile(r"^rng/rank-(\d+)\.pt$")
_MAX_SHOWN = 5


# ---- the manifest ------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(root: Path) -> list[str]:
    """Relative paths (POSIX) of the regular files of a checkpoint directory, sorted."""
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in _NOT_LISTED:
                files.append(rel)
    return sorted(files)


def _writer_rank(rel: str, world: int) -> int:
    """The rank that hashes a file at save time: the rank that wrote it (its bytes are likely still
    in that node's page cache), else rank 0."""
    match = _DCP_SHARD.match(rel) or _RNG_FILE.match(rel)
    return int(match.group(1)) % world if match else 0


def write_manifest(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Hash every file of a checkpoint directory and write MANIFEST.json (rank 0). Collective:
    each rank hashes the files it wrote. Call after every rank's files are written, before COMPLETE."""
    root = Path(root)
    rank, world = distributed.rank(), distributed.world_size()
    files = _listed_files(root)
    mine = {rel: _entry(root / rel) for rel in files if _writer_rank(rel, world) == rank}
    entries = _merge_from_ranks(mine)
    if distributed.is_main():
        for rel in files:  # a file whose writer rank did not see it (no shared file system view)
            entries.setdefault(rel, _entry(root / rel))
        manifest = {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
        tmp = root / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(root / MANIFEST)
    return entries


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def _merge_from_ranks(mine: dict) -> dict:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(mine)
    pieces: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, mine)
    return {k: v for piece in pieces for k, v in piece.items()}


def read_manifest(root: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The manifest's file entries; None when the checkpoint has none (saved by an older rlx).
    A manifest that does not parse raises a CheckpointError."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})".replace(" ()", "")) from None
    return files


def verify_files(root: str | os.PathLike) -> bool:
    """Check this rank's share of the manifest's files (size, then sha256); every rank agrees on
    the result. Raises a CheckpointError naming the first bad files; returns False when there is no
    manifest (nothing to verify), True when verified. Collective."""
    root = Path(root)
    try:
        entries = read_manifest(root)
        problem = None
    except CheckpointError as e:
        entries, problem = None, str(e)
    if problem is None and entries is not None:
        rank, world = distributed.rank(), distributed.world_size()
        bad = [_check_entry(root, rel, entry) for i, (rel, entry) in enumerate(sorted(entries.items()))
               if i % world == rank]  # fmt: skip
        bad = [b for b in bad if b]
        if bad:
            more = f" (and {len(bad) - _MAX_SHOWN} more)" if len(bad) > _MAX_SHOWN else ""
            problem = f"checkpoint {root} failed verification: " + "; ".join(bad[:_MAX_SHOWN]) + more
    problem = agree(problem)
    if problem:
        raise CheckpointError(problem)
    return entries is not None


def _check_entry(root: Path, rel: str, entry: dict) -> str | None:
    path = root / rel
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{rel} has {size} bytes, {entry['size']} when saved (truncated or overwritten)"
    if file_digest(path) != entry["sha256"]:
        return f"{rel} changed since it was saved (sha256 mismatch: corrupted on disk or edited)"
    return None


def agree(problem: str | None) -> str | None:
    """The first rank's problem, on every rank (None when no rank has one). Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    pieces: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, problem)
    return next((p for p in pieces if p), None)


# ---- safe DCP reading --------------------------------------------------------------------------

# Everything a DCP `.metadata` pickle of torch 2.x refers to. torch dtypes are admitted by type.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex")  # fmt: skip
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint._extension", "StreamTransformExtension"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (a function, `os.system`, ...) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' (not a DCP metadata type)")


def load_dcp_metadata(path: str | os.PathLike, name: str = ".metadata") -> Metadata:
    """DCP's metadata file, unpickled with only DCP's metadata classes allowed."""
    file = Path(path) / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {name} (DCP metadata): it is damaged")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: {e}; this checkpoint may be crafted to run code and was not loaded") from None
    except Exception as e:  # truncated or garbage bytes
        raise CheckpointError(f"{file} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata is read by `load_dcp_metadata` (restricted unpickling)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = load_dcp_metadata(self.path, ".metadata" if rank is None else f"__{rank}.metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads the checkpoint's non-tensor values (optimizer hyper-parameters) with
    `torch.load(weights_only=True)`: plain numbers, strings, tuples, never arbitrary objects."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"value '{read_item.dest_index.fqn}' is not a plain value ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); refused to unpickle it") from None  # fmt: skip
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state: dict[str, Any], path: str | os.PathLike, *, no_dist: bool) -> None:
    """`dcp.load` with the restricted reader and planner; a damaged file raises a CheckpointError
    (on every rank: DCP gathers the ranks' exceptions)."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {path} could not be read ({_first_line(e)}): it is damaged") from None


def _first_line(e: BaseException) -> str:
    """A one-line description of a (possibly nested, multi-line) DCP exception."""
    inner = e
    failures = getattr(e, "failures", None)  # CheckpointException: rank -> exception or traceback
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple):  # (exception, traceback) pairs in some torch versions
            inner = inner[0]
    if isinstance(inner, CheckpointError):
        return str(inner)
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[-1] if text else ''}".rstrip(": ")


# ---- non-finite values -------------------------------------------------------------------------


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold NaN or inf (this
    rank's shards of DTensors)."""
    bad = []
    if isinstance(state, dict):
        for key, value in state.items():
            bad += nonfinite_tensors(value, f"{prefix}{key}.")
    elif isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
            bad.append(prefix.rstrip("."))
    return bad


def check_finite(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise a CheckpointError (on every rank) when a loaded tensor holds NaN or inf. Collective."""
    bad = nonfinite_tensors(state)
    problem = None
    if bad:
        shown = ", ".join(bad[:_MAX_SHOWN]) + (f", ... ({len(bad) - _MAX_SHOWN} more)" if len(bad) > _MAX_SHOWN else "")
        problem = f"checkpoint {path} holds NaN/inf values in {shown}: it was saved from a diverged run or is damaged"
    problem = agree(problem)
    if problem:
        raise CheckpointError(problem)
