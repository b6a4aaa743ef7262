"""The device mesh: (dp_replicate, dp_shard, tp), built once from the run's layout, and its named views.

Nothing else computes ranks by hand: the loader asks for the data-parallel rank, the loss and
the token counts are summed over the data-parallel mesh, FSDP shards over its mesh and TP over
the "tp" dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titanlite.config.resolve import Layout


@dataclass
class ParallelDims:
    """The run's layout and, on more than one process, the mesh over it."""

    layout: Layout
    mesh: DeviceMesh | None = None
    dp_mesh: DeviceMesh | None = None  # (dp_replicate, dp_shard) flattened: ranks that read different data

    @classmethod
    def build(cls, layout: Layout, device_type: str) -> "ParallelDims":
        """The mesh of `layout` on `device_type` (none for one process); call on every rank."""
        if layout.world_size == 1:
            return cls(layout)
        mesh = init_device_mesh(device_type, (layout.replicate, layout.shard, layout.tensor),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        return cls(layout, mesh, mesh[("dp_replicate", "dp_shard")]._flatten("dp"))

    @property
    def data_parallel_rank(self) -> int:
        """This rank's index among the ranks that read different data (TP peers share it)."""
        return 0 if self.dp_mesh is None else self.dp_mesh.get_local_rank()

    @property
    def data_parallel_group(self):
        """The process group over which losses and token counts are summed (None in one process)."""
        return None if self.dp_mesh is None else self.dp_mesh.get_group()

    @property
    def tensor_parallel_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """1-D (dp_shard) for FSDP, 2-D (dp_replicate, dp_shard) for HSDP."""
        return self.mesh[("dp_replicate", "dp_shard")] if self.layout.replicate > 1 else self.mesh["dp_shard"]
