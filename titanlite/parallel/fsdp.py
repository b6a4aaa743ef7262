"""FSDP2: fully_shard the embedding, each block, [norm, output] together, then the root."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: str,
               cpu_offload: bool) -> None:
    """fully_shard the embedding, each block, [norm, output] together, then the root.

    Parameters are gathered in `param_dtype` (bf16 on GPU) and gradients reduced in fp32.
    Gradients are summed, not averaged, over the DP ranks: the loss is already divided by the
    global token count (see train_step), so FSDP's division is switched off.
    reshard_after_forward "default": free gathered weights after forward except for the last
    group ([norm, output]), whose backward starts right away.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    reshard = {"always": True, "never": False, "default": True}[reshard_after_forward]
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=policy, offload_policy=offload)
    shard(model.tok_embeddings, reshard_after_forward=reshard)
    for block in model.layers.values():
        shard(block, reshard_after_forward=reshard)
    shard([model.norm, model.output], reshard_after_forward=reshard and reshard_after_forward != "default")
    shard(model, reshard_after_forward=reshard)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling.
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
