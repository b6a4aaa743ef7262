"""Parallelize the model, in order: float8 linears, tensor parallel or step weights, activation checkpointing,
compile, FSDP2.

Any world size maps onto a (dp_replicate, dp_shard, tp) mesh (parallel/mesh.py): TP inside a
node, FSDP2 (or HSDP when dp_replicate > 1) over the rest. The model knows nothing of this:
`parallelize()` swaps its weights for DTensors and wraps its blocks, and keeps every parameter
name unchanged. Build the model on the meta device, parallelize it, then give it its weights
with `init_weights_layout_independent()` (parallel/init.py).
"""

from __future__ import annotations

import torch
from torch import nn

from titanlite.config.settings import ActivationCheckpoint, Float8, Parallelism
from titanlite.parallel.activation_checkpoint import apply_activation_checkpointing
from titanlite.parallel.compile import apply_compile
from titanlite.parallel.float8 import apply_float8
from titanlite.parallel.fsdp import apply_fsdp
from titanlite.parallel.mesh import ParallelDims
from titanlite.parallel.step_weights import apply_step_weights
from titanlite.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, dims: ParallelDims, parallelism: Parallelism,
                activation_checkpoint: ActivationCheckpoint, compile: bool, float8: Float8,
                param_dtype: torch.dtype, float8_all_gather: bool = False, step_weights: bool = False) -> nn.Module:
    """Apply, in order: float8 linears, tensor parallel or step weights, activation checkpointing, compile,
    FSDP2. Mutates `model` (on the meta device) and returns it.

    param_dtype: what FSDP gathers parameters in (the run's compute dtype); float8_all_gather: FSDP
    gathers the float8 linears' weights in float8 (Run.float8_all_gather); step_weights: the other
    block linears compute with a bf16 copy cast once per step (Run.step_weights, one GPU only).
    """
    layout = dims.layout
    if float8.enable:
        apply_float8(model, float8, layout.tensor, float8_all_gather)
    if layout.tp_enabled:
        apply_tensor_parallel(model, dims.tensor_parallel_mesh, float8)
    if step_weights:
        apply_step_weights(model, param_dtype)
    if activation_checkpoint.mode != "none":
        apply_activation_checkpointing(model, activation_checkpoint.mode, activation_checkpoint.selective_blocks)
    if compile:
        apply_compile(model)
    if layout.fsdp_enabled:
        apply_fsdp(model, dims.fsdp_mesh, param_dtype, parallelism.fsdp_reshard_after_forward,
                   parallelism.fsdp_cpu_offload)
    return model
