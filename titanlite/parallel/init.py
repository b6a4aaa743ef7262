"""Initial weights that do not depend on the layout: every rank draws each full parameter, keeps its shard."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

logger = logging.getLogger("titanlite")


@torch.no_grad()
def init_weights_layout_independent(model: nn.Module, device: torch.device | str, seed: int,
                                    params_on_cpu: bool = False) -> None:
    """Give the (meta, parallelized) `model` exactly the weights of `model.init_weights(seed)` unsharded.

    Replays the model's `init_plan()` (its parameters in the order the init draws random
    numbers) with the same seed: each full parameter is drawn on `device` in the default dtype,
    this rank keeps its shard (a local slice, no communication), and the full tensor is freed
    before the next one. So the initial weights are bitwise the same for every layout (1
    process, FSDP, TP, HSDP), which the parity tests rely on, and the start-up peak is the
    sharded model plus one full parameter (plus the temporaries torch's init of that one
    parameter makes: trunc_normal_ allocates ~3 more of its size on torch 2.13), not the model.
    `params_on_cpu`: FSDP CPU offload keeps the sharded parameters on the host.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the start-up peak reported below is the init's alone
    model.to_empty(device="cpu" if params_on_cpu else device)
    for module in model.modules():  # the RoPE tables are used on the compute device even when offloading
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    plan = model.init_plan()
    names = [name for name, _ in model.named_parameters()]
    if sorted(names) != sorted(name for name, _ in plan):
        raise RuntimeError(f"init_plan() does not cover the parameters exactly: {sorted(set(names) ^ set(dict(plan)))}")
    torch.manual_seed(seed)
    for name, init in plan:
        param = model.get_parameter(name)
        full = torch.empty(param.shape, dtype=torch.get_default_dtype(), device=device)
        init(full)
        full = full.to(param.dtype)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank drew the same full tensor and slices it locally.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(shard)
            del shard
        else:
            param.copy_(full)
        del full
    model.init_rope()
    if torch.device(device).type == "cuda":
        logger.info("init: start-up peak %.2f GiB allocated (this rank's shard of the model and one full parameter "
                    "being drawn)", torch.cuda.max_memory_allocated(device) / 2**30)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # the transient full parameters are not training memory
