"""Device mesh and model parallelization: TP -> activation checkpointing -> compile -> FSDP2.

Walking-skeleton version: single process, or FSDP2 over all ranks. Tensor parallelism and
activation checkpointing arrive with the parallelism work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titanlite.config import Config, data_parallel_shape


@dataclass
class ParallelDims:
    """Owns the mesh; nothing else computes ranks by hand."""

    replicate: int
    shard: int
    tensor: int
    world_size: int
    mesh: DeviceMesh | None = None

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> "ParallelDims":
        replicate, shard, tensor = data_parallel_shape(config, world_size)
        return cls(replicate, shard, tensor, world_size)

    @property
    def data_parallel_degree(self) -> int:
        return self.replicate * self.shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.data_parallel_degree > 1

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        self.mesh = init_device_mesh(device_type, (self.replicate, self.shard, self.tensor),
                                     mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        self.mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        return self.mesh

    @property
    def data_parallel_rank(self) -> int:
        """This rank's index among the ranks that read different data (TP peers share it)."""
        return 0 if self.mesh is None else self.mesh["dp"].get_local_rank()

    @property
    def data_parallel_mesh(self) -> DeviceMesh | None:
        """The mesh over which losses and token counts are summed."""
        return None if self.mesh is None else self.mesh["dp"]


def parallelize(model: nn.Module, dims: ParallelDims, config: Config, param_dtype: torch.dtype) -> nn.Module:
    """Apply, in order: tensor parallel, activation checkpointing, compile, FSDP2. Mutates `model`."""
    if config.compile.enable:
        for name, block in model.layers.named_children():
            model.layers.register_module(name, torch.compile(block, fullgraph=True))
    if dims.fsdp_enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = dims.mesh["dp"]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
