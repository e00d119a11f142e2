"""ParallelDims: the parallel degrees of a run and the one named DeviceMesh built from them.

Nobody else computes ranks: callers ask for `get_mesh("tp")`, `dp_rank`, `dp_size`, `tp_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from rlx.errors import UserError

# Mesh axes, outermost first: replicas of a shard group, FSDP shards, tensor-parallel ranks.
# TP innermost keeps its (bandwidth-hungry) collectives on neighbouring ranks, i.e. within a node.
AXES = ("dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    """Degrees of HSDP (dp_replicate x dp_shard) x TP over `world_size` ranks.

    dp_shard = -1 fills the world: world_size / (dp_replicate * tp)."""

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _dp_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in AXES:
            value = getattr(self, name)
            if value < 1 and not (name == "dp_shard" and value == -1):
                raise UserError(f"parallel: {name} must be >= 1 (dp_shard may be -1 to fill the world), got {value}")
        if self.dp_shard == -1:
            rest = self.dp_replicate * self.tp
            if self.world_size % rest:
                raise UserError(
                    f"parallel: dp_replicate*tp = {self.dp_replicate}*{self.tp} = {rest} does not divide "
                    f"world size {self.world_size}, so dp_shard = -1 cannot fill it"
                )
            self.dp_shard = self.world_size // rest
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise UserError(
                f"parallel: dp_replicate*dp_shard*tp = {self.dp_replicate}*{self.dp_shard}*{self.tp} = {product} "
                f"does not equal world size {self.world_size}; set dp_shard = -1 to fill the world"
            )

    @classmethod
    def from_config(cls, cfg: Any, world_size: int) -> ParallelDims:
        """From a `ParallelConfig`-like object (dp_replicate, dp_shard, tp)."""
        return cls(cfg.dp_replicate, cfg.dp_shard, cfg.tp, world_size)

    def validate_model(self, args: Any) -> None:
        """Check that TP divides what it shards: heads (q and k/v), MLP width, vocabulary.

        `args` is a `ModelArgs`-like object."""
        if self.tp == 1:
            return
        sharded = {
            "num_attention_heads": args.num_attention_heads,
            "num_key_value_heads": args.num_key_value_heads,
            "intermediate_size": args.intermediate_size,
            "vocab_size": args.vocab_size,
        }
        bad = [f"{name}={value}" for name, value in sharded.items() if value % self.tp]
        if bad:
            raise UserError(f"parallel: tp={self.tp} must divide the model's {', '.join(bad)}; choose a tp that does")

    # ---- degrees -----------------------------------------------------------------------------

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (replicas x shards): how many different batches are processed."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    # ---- mesh --------------------------------------------------------------------------------

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the 3-D mesh (dp_replicate, dp_shard, tp) plus the flattened "dp" axis.

        Needs an initialized default process group (rlx.distributed.init_distributed)."""
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=AXES)
        # One 1-D group over all data-parallel ranks: token counts and metrics are reduced on it.
        # (Kept here: slicing a flattened dim from the root mesh is deprecated.)
        self._dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self._mesh = mesh
        return mesh

    @property
    def mesh(self) -> DeviceMesh:
        assert self._mesh is not None, "call ParallelDims.build_mesh(device_type) first"
        return self._mesh

    def get_mesh(self, name: str) -> DeviceMesh:
        """A sub-mesh by name: "dp_replicate", "dp_shard", "tp", "dp" (replicate x shard, flat),
        or "fsdp" (the mesh fully_shard uses: 2-D (dp_replicate, dp_shard) for HSDP, else dp_shard)."""
        if name == "fsdp":
            return self.mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else self.mesh["dp_shard"]
        if name == "dp":
            assert self._dp_mesh is not None, "call ParallelDims.build_mesh(device_type) first"
            return self._dp_mesh
        if name not in AXES:
            raise ValueError(f"unknown mesh axis '{name}'; valid: {', '.join((*AXES, 'dp', 'fsdp'))}")
        return self.mesh[name]

    @property
    def dp_rank(self) -> int:
        """This rank's index among data-parallel ranks (which slice of the global batch it takes)."""
        return self.get_mesh("dp").get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.get_mesh("tp").get_local_rank()
