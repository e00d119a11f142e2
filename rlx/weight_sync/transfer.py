"""Weights from trainer ranks to separate generator ranks, in buckets, without gathering the model.

Each trainer rank sends what it holds: the local shard of every parameter (FSDP and/or TP piece, or
the whole tensor when it is not sharded) with its place in the global tensor (DCP's chunk: offsets
and sizes, which also describe FSDP x TP strided shards). Shards are packed into flat buckets of
about `bucket_mb`; a header (JSON: version, flags, and per bucket the names, global shapes and
slices) precedes them. A generator rank receives every trainer rank's buckets into full tensors, in
a background thread (`ShardReceiver`), so the trainer's send completes while generation goes on;
the generator's loop takes whole versions from its queue between generation batches
(`ShardReceiver.get`) and loads them into its engine. No rank ever holds the whole model in one
message, and the trainer ranks never gather. Buckets travel over the channel's data group: gloo on
CPU, NCCL GPU to GPU when the job runs on GPUs (`rlx.placement.Channel`); versions are assembled on
the channel's device.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rlx.parallel.parallelize import local_slice
from rlx.placement import Channel, ChannelClosed

DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


def local_shards(model: nn.Module) -> list[tuple[str, torch.Tensor, list[list[int]], list[int]]]:
    """(HF name, local tensor, [[start, stop] per dim], global shape) of every distinct parameter;
    a tied output weight appears once, under the embedding's name."""
    seen: set[int] = set()
    out = []
    for name, param in model.state_dict(keep_vars=True).items():
        if id(param) in seen:
            continue
        seen.add(id(param))
        local, index = local_slice(param)
        out.append((name, local.detach(), [[s.start, s.stop] for s in index], list(param.shape)))
    return out


def send_weights(model: nn.Module, channel: Channel, generator_ranks: list[int], version: int, *,
                 flags: dict[str, Any] | None = None, bucket_mb: float = 64.0) -> dict[str, float]:  # fmt: skip
    """Send this trainer rank's shards of `model` to every generator rank; returns `weight_sync/*`."""
    start = time.perf_counter()
    shards = local_shards(model)
    buckets: list[list[int]] = [[]]
    size = 0
    for i, (_, tensor, _, _) in enumerate(shards):
        nbytes = tensor.numel() * tensor.element_size()
        if buckets[-1] and size + nbytes > bucket_mb * 2**20:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    header = {"version": version, **(flags or {}), "dtype": str(shards[0][1].dtype),
              "entries": [[name, shape, index] for name, _, index, shape in shards], "buckets": buckets}  # fmt: skip
    flats = [torch.cat([shards[i][1].reshape(-1) for i in bucket]) for bucket in buckets]
    num_bytes = 0
    for dst in generator_ranks:
        channel.send_object(header, dst)
        for flat in flats:
            channel.send_tensor(flat, dst)
            num_bytes += flat.numel() * flat.element_size()
    return {"weight_sync/seconds": time.perf_counter() - start, "weight_sync/bytes": float(num_bytes),
            "weight_sync/version": float(version), "weight_sync/num_buckets": float(len(flats))}  # fmt: skip


@dataclass
class Version:
    """One policy version as received: full tensors by HF name, and the trainer's flags."""

    version: int
    tensors: dict[str, torch.Tensor]
    flags: dict[str, Any] = field(default_factory=dict)


class ShardReceiver:
    """Background receiver of `send_weights` messages from every trainer rank (in rank order).

    `get()` returns the next version in order (blocking; the seconds spent waiting are added to
    `wait_seconds`); a trainer rank that stops is raised from `get()`. The thread ends after a
    version flagged `stop`."""

    def __init__(self, channel: Channel, trainer_ranks: list[int]):
        self.channel, self.trainer_ranks = channel, trainer_ranks
        self.queue: queue.Queue = queue.Queue()
        self.wait_seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="rlx-weight-receiver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        device = self.channel.device  # the GPU under NCCL: versions are assembled there
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            while True:
                tensors: dict[str, torch.Tensor] = {}
                header = None
                for src in self.trainer_ranks:
                    header = self.channel.recv_object(src)
                    dtype = DTYPES[header["dtype"]]
                    entries = header["entries"]
                    for name, shape, _ in entries:
                        if name not in tensors:
                            tensors[name] = torch.empty(shape, dtype=dtype, device=device)
                    for bucket in header["buckets"]:
                        numels = [_numel(entries[i][2]) for i in bucket]
                        flat = self.channel.recv_tensor(torch.empty(sum(numels), dtype=dtype, device=device), src)
                        for i, piece in zip(bucket, flat.split(numels)):
                            name, _, index = entries[i]
                            region = tuple(slice(a, b) for a, b in index)
                            tensors[name][region] = piece.view([b - a for a, b in index])
                if device.type == "cuda":  # NCCL's wait() only orders streams: finish before another thread reads
                    torch.cuda.current_stream(device).synchronize()
                flags = {k: v for k, v in header.items() if k not in ("version", "dtype", "entries", "buckets")}
                self.queue.put(Version(header["version"], tensors, flags))
                if flags.get("stop"):
                    return
        except ChannelClosed as e:
            self.queue.put(e)

    def get(self, timeout: float | None = None) -> Version:
        start = time.perf_counter()
        try:
            item = self.queue.get(timeout=timeout)
        finally:
            self.wait_seconds += time.perf_counter() - start
        if isinstance(item, Exception):
            raise item
        return item


def _numel(index: list[list[int]]) -> int:
    n = 1
    for a, b in index:
        n *= b - a
    return n
