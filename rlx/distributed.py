"""Process-group setup and teardown for the trainer, from torchrun's environment.

gloo on CPU, nccl on CUDA. A plain `python` run (no torchrun) becomes a world of one, so every
code path (DeviceMesh, DCP) sees an initialized process group.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from rlx.errors import UserError

BACKENDS = ("auto", "nccl", "gloo")


def resolve_backend(backend: str = "auto") -> str:
    """'auto' -> nccl when CUDA is available, else gloo. nccl without CUDA is a user error."""
    if backend not in BACKENDS:
        raise UserError(f"parallel.backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("parallel.backend = 'nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
    return backend


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Initialize the default process group (idempotent) and return this rank's device.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as set by torchrun. Without
    them this process is rank 0 of a world of 1 that listens on no network interface: an in-process
    store instead of a TCP rendezvous, and the backend's sockets on loopback."""
    backend = resolve_backend(backend)
    single = "RANK" not in os.environ
    if single:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = rank_device(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if single:
            _use_loopback()
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def rank_device(backend: str) -> torch.device:
    """This rank's device under a resolved backend: cuda:LOCAL_RANK with nccl, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _use_loopback() -> None:
    """gloo / NCCL sockets on the loopback interface (Linux), unless the user chose an interface."""
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def teardown_distributed() -> None:
    """Destroy the default process group if one exists (call once, at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_now(code: int = 0) -> None:
    """Flush stdout/stderr and end the process without interpreter finalization (`os._exit`), after a
    torchrun worker's own cleanup is done. With gloo, a worker thread of a process group can still be
    dropping a finished collective's work (tensors that hold Python objects) when the interpreter
    finalizes; it then cannot take the GIL and the process aborts ("terminate called without an
    active exception", exit -6) after all its work succeeded: seen with TP under load (torch 2.13).
    The parity scripts under tests/distributed end with this. Not for a process that holds a vLLM
    engine: vLLM CPU's shared-memory segments are removed at finalization, and a stale
    /dev/shm/*cpushm* segment makes the next TP engine fail (EEXIST)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (the rank that prints and writes run-level files)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
