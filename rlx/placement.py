"""Where the generator runs: colocated in the trainer's processes, or on separate ranks of the same launch.

`generator.placement = "separate"` splits one torchrun world by config: ranks [0, T) train (their own
default process group: the FSDP x TP mesh is built inside it exactly as in a colocated run), ranks
[T, T + G) generate (their own default group: vLLM's external launcher sees a world of G ranks, as a
colocated engine sees the trainer's world). G = `generator.num_ranks`, T = world - G. Both groups come
from one rendezvous store (torchrun's), under different prefixes, so neither side has to take part in
the other's collectives.

Trainer and generator ranks talk over two more gloo groups spanning the whole world, built straight
from the store (never registered as torch.distributed groups, so no rank has to join their creation):
`rollouts` (generator -> trainer batches and validation results; trainer -> generator start messages)
and `weights` (trainer -> generator weight shards, received on the generator by a background thread,
so a trainer's send never waits for a generation batch to finish). Messages are JSON (data, never
code) or flat tensors. On GPU (the role backend resolves to nccl) the `weights` channel's tensors go
over a raw NCCL group of the whole world instead, GPU to GPU; its JSON headers stay on gloo.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlx.errors import PeerStopped, UserError

ROLES = ("trainer", "generator")
_TAG_SIZE, _TAG_DATA = 0, 1


class ChannelClosed(PeerStopped):
    """The rank on the other side of a channel stopped (exited, crashed or was killed)."""


class Channel:
    """Point-to-point messages between global ranks over one raw gloo process group (all ranks).

    Objects always travel over `pg` (gloo, CPU). Tensors travel over `data_pg` when given (a raw NCCL
    group: tensors are moved to `device`, this rank's GPU), else over `pg` on the CPU."""

    def __init__(self, pg: dist.ProcessGroup, name: str, *, data_pg: dist.ProcessGroup | None = None,
                 device: torch.device | None = None):  # fmt: skip
        self.pg, self.name = pg, name
        self.data_pg = data_pg if data_pg is not None else pg
        self.device = device if device is not None else torch.device("cpu")

    def _run(self, op, tensor: torch.Tensor, peer: int, tag: int, what: str) -> None:
        """`op` (the group's send or recv) of one tensor, waited for; a gone peer is ChannelClosed."""
        try:
            op([tensor], peer, tag).wait()
        except RuntimeError as e:
            reason = "connection closed" if "closed" in str(e).lower() else str(e).splitlines()[0][:200]
            raise ChannelClosed(f"rank {peer} of this job stopped ({reason} while {what} on the {self.name} "
                                f"channel); its own log says why") from None

    def send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        """Send `tensor` (moved to this channel's device); returns once it may be reused or freed."""
        self._run(self.data_pg.send, tensor.to(self.device).contiguous(), dst, _TAG_DATA, "sending to it")

    def recv_tensor(self, out: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into `out`, which must live on this channel's device (see `device`)."""
        self._run(self.data_pg.recv, out, src, _TAG_DATA, "receiving from it")
        return out

    def send_object(self, obj: Any, dst: int) -> None:
        """A JSON-serializable object (tuples become lists; see `encode`)."""
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        self._run(self.pg.send, torch.tensor([data.numel()], dtype=torch.long), dst, _TAG_SIZE, "sending to it")
        self._run(self.pg.send, data, dst, _TAG_DATA, "sending to it")

    def recv_object(self, src: int) -> Any:
        size = torch.zeros(1, dtype=torch.long)
        self._run(self.pg.recv, size, src, _TAG_SIZE, "receiving from it")
        data = torch.empty(int(size), dtype=torch.uint8)
        self._run(self.pg.recv, data, src, _TAG_DATA, "receiving from it")
        return json.loads(data.numpy().tobytes().decode())


@dataclass
class Placement:
    """This process's role in a separate-placement run and its channels."""

    role: str
    global_rank: int
    world_size: int
    num_trainers: int
    num_generators: int
    rollouts: Channel
    weights: Channel

    @property
    def trainer_ranks(self) -> list[int]:
        return list(range(self.num_trainers))

    @property
    def generator_ranks(self) -> list[int]:
        return list(range(self.num_trainers, self.world_size))

    @property
    def role_rank(self) -> int:
        """This rank's index within its role's own process group."""
        return self.global_rank - (0 if self.role == "trainer" else self.num_trainers)


def split_world(num_generators: int, backend: str, timeout_s: float = 1800.0) -> Placement:
    """Rendezvous with torchrun, initialize this role's default process group and the two channels.

    Must run before anything else touches torch.distributed (rlx.distributed.init_distributed then
    finds the role's group initialized). RANK / WORLD_SIZE are rewritten to the role's own values, so
    code that reads them (vLLM's external launcher, rank-0 logging) sees its role's world."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("generator.placement = 'separate' needs several ranks from one launch: run under torchrun "
                        "(launch/torchrun.sh, launch/slurm.sbatch) with generator.num_ranks generator ranks "
                        "plus at least one trainer rank")  # fmt: skip
    world = int(os.environ["WORLD_SIZE"])
    if not 1 <= num_generators < world:
        raise UserError(f"generator.placement = 'separate' with generator.num_ranks = {num_generators} needs a "
                        f"world of at least {num_generators + 1} ranks (torchrun --nproc_per_node x nodes), got "
                        f"{world}")  # fmt: skip
    if dist.is_initialized():
        raise RuntimeError("split_world must run before the default process group is initialized")
    store, rank, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    trainers = world - num_generators
    role = "trainer" if rank < trainers else "generator"
    role_rank, role_size = (rank, trainers) if role == "trainer" else (rank - trainers, num_generators)
    from rlx.distributed import rank_device, resolve_backend

    timeout = datetime.timedelta(seconds=timeout_s)
    backend = resolve_backend(backend)
    dist.init_process_group(backend, store=dist.PrefixStore(f"rlx/{role}", store), rank=role_rank,
                            world_size=role_size, timeout=timeout)  # fmt: skip
    gloo = {name: dist.ProcessGroupGloo(dist.PrefixStore(f"rlx/{name}", store), rank, world, timeout)
            for name in ("rollouts", "weights")}  # fmt: skip
    rollouts = Channel(gloo["rollouts"], "rollouts")
    if backend == "nccl":
        weights = Channel(gloo["weights"], "weights", data_pg=_nccl_group(store, rank, world, timeout),
                          device=rank_device(backend))  # fmt: skip
    else:
        weights = Channel(gloo["weights"], "weights")
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(role_size), RLX_ROLE=role)
    return Placement(role, rank, world, trainers, num_generators, rollouts, weights)


def _nccl_group(store: dist.Store, rank: int, world: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A raw NCCL group of the whole world for the weights' tensors (GPU to GPU). Like the gloo channels
    it is built from the store, never registered, so no rank joins a collective to create it; NCCL makes
    a communicator per trainer-generator pair at their first send."""
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(dist.PrefixStore("rlx/weights-nccl", store), rank, world, opts)
