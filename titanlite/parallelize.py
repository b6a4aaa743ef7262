"""Device mesh and model parallelization: float8 -> TP -> activation checkpointing -> compile -> FSDP2.

Any world size maps onto a (dp_replicate, dp_shard, tp) mesh: TP inside a node, FSDP2 (or HSDP
when dp_replicate > 1) over the rest. The model knows nothing of this: `parallelize()` swaps its
weights for DTensors and wraps its blocks, and keeps every parameter name unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel, loss_parallel,
                                               parallelize_module)
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from titanlite.float8 import apply_float8, tensor_parallel_styles
from titanlite.resolve import Run
from titanlite.settings import Config

logger = logging.getLogger("titanlite")


@dataclass
class ParallelDims:
    """Owns the mesh; nothing else computes ranks by hand."""

    replicate: int
    shard: int
    tensor: int
    world_size: int
    mesh: DeviceMesh | None = None
    dp_mesh: DeviceMesh | None = None  # (dp_replicate, dp_shard) flattened: ranks that read different data

    @classmethod
    def from_run(cls, run: Run) -> "ParallelDims":
        return cls(run.replicate, run.shard, run.tensor, run.world_size)

    @property
    def data_parallel_degree(self) -> int:
        return self.replicate * self.shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.data_parallel_degree > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tensor > 1

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        self.mesh = init_device_mesh(device_type, (self.replicate, self.shard, self.tensor),
                                     mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        self.dp_mesh = self.mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        return self.mesh

    @property
    def data_parallel_rank(self) -> int:
        """This rank's index among the ranks that read different data (TP peers share it)."""
        return 0 if self.dp_mesh is None else self.dp_mesh.get_local_rank()

    @property
    def data_parallel_mesh(self) -> DeviceMesh | None:
        """The mesh over which losses and token counts are summed."""
        return self.dp_mesh

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """1-D (dp_shard) for FSDP, 2-D (dp_replicate, dp_shard) for HSDP."""
        return self.mesh[("dp_replicate", "dp_shard")] if self.replicate > 1 else self.mesh["dp_shard"]


def parallelize(model: nn.Module, dims: ParallelDims, config: Config, param_dtype: torch.dtype) -> nn.Module:
    """Apply, in order: float8 linears, tensor parallel, activation checkpointing, compile, FSDP2.
    Mutates `model`.

    Call on the meta-device model, then `init_weights_layout_independent()`.
    """
    if config.float8.enable:
        apply_float8(model, config, dims.tensor, dims.shard)
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims.mesh["tp"], config)
    if config.activation_checkpoint.mode != "none":
        apply_activation_checkpointing(model, config.activation_checkpoint.mode,
                                       config.activation_checkpoint.selective_blocks)
    if config.compile.enable:
        # Module.compile() compiles in place: parameter names keep no `_orig_mod.` prefix.
        for block in model.layers.values():
            block.compile(fullgraph=True)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims.fsdp_mesh, param_dtype, config.parallelism.fsdp_reshard_after_forward,
                   config.parallelism.fsdp_cpu_offload)
    return model


# --- tensor parallel

def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, config: Config) -> None:
    """Megatron-style TP with sequence parallel norms; heads and vocabulary split over `tp_mesh`.

    Between blocks the residual stream is a DTensor sharded on the sequence (Shard(1)); each
    attention / FFN all-gathers it, runs column-wise q/k/v (w1/w3) on its heads (hidden slice)
    as plain local tensors, and reduce-scatters the row-wise wo (w2) back onto the sequence.
    (The stream stays a DTensor rather than a local tensor: a compiled block whose input is the
    local result of a collective broke the backward.) The RoPE tables and the mask pass through
    untouched (layout None). Logits stay vocab-sharded (Shard(-1)) for `loss_parallel`, so the
    full logits are never gathered. float8 tensorwise linears take torchao's float8 styles
    (float8.tensor_parallel_styles), which all-gather the block inputs in float8.
    """
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    for block in model.layers.values():
        style = tensor_parallel_styles(block, config)
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": style["attention"](input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": style["attention.wq"](),
            "attention.wk": style["attention.wk"](),
            "attention.wv": style["attention.wv"](),
            "attention.wo": style["attention.wo"](output_layouts=Shard(1), use_local_output=False),
            "ffn_norm": SequenceParallel(),
            "feed_forward": style["feed_forward"](input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": style["feed_forward.w1"](),
            "feed_forward.w3": style["feed_forward.w3"](),
            "feed_forward.w2": style["feed_forward.w2"](output_layouts=Shard(1), use_local_output=False),
        })


def loss_context(dims: ParallelDims):
    """A factory of context managers for the loss and its backward: `loss_parallel` under TP."""
    return loss_parallel if dims.tp_enabled else contextlib.nullcontext


# --- activation checkpointing

# Outputs kept by per-op selective AC: the matmuls and attention (expensive to recompute) and
# TP's reduce-scatter (recomputing it would repeat communication). Pointwise ops, norms and
# RoPE are recomputed: cheap in FLOPs, large in memory. float8 matmuls are `_scaled_mm`; the
# absolute maxima that set their scales (`max`, one number per tensor) are kept too, so the
# recomputed casts do not reduce over their inputs again.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,
    torch.ops.aten.max.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}
if hasattr(torch.ops.higher_order, "flex_attention"):  # the document-masked kernel, when compiled
    _SAVED_OPS.add(torch.ops.higher_order.flex_attention)


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_op_context():
    """The `context_fn` of per-op selective AC (torch.utils.checkpoint's selective API)."""
    return create_selective_checkpoint_contexts(_save_matmuls_and_attention)


def apply_activation_checkpointing(model: nn.Module, mode: str, selective_blocks: int = 0) -> None:
    """full: every block whole; selective with selective_blocks = k > 0: every k-th block whole
    (0, k, 2k, ...); selective with 0: every block per op, keeping matmul / attention outputs and
    recomputing the rest."""
    for index, block in enumerate(model.layers.values()):
        if mode == "full" or (mode == "selective" and selective_blocks and index % selective_blocks == 0):
            _checkpoint_forward(block, context_fn=None)
        elif mode == "selective" and not selective_blocks:
            _checkpoint_forward(block, context_fn=selective_op_context)


def _checkpoint_forward(block: nn.Module, context_fn) -> None:
    # Replace the instance's forward rather than wrapping the module: a wrapper would rename
    # every parameter (`_checkpoint_wrapped_module.`) and break checkpoint keys.
    forward = block.forward
    extra = {} if context_fn is None else {"context_fn": context_fn}

    @functools.wraps(forward)
    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    block.forward = checkpointed_forward


# --- FSDP2

def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: str,
               cpu_offload: bool) -> None:
    """fully_shard the embedding, each block, [norm, output] together, then the root.

    Parameters are gathered in `param_dtype` (bf16 on GPU) and gradients reduced in fp32.
    Gradients are summed, not averaged, over the DP ranks: the loss is already divided by the
    global token count (see train_step), so FSDP's division is switched off.
    reshard_after_forward "default": free gathered weights after forward except for the last
    group ([norm, output]), whose backward starts right away.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

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


# --- initialization

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


# --- gradient norm

def _copies(grad: torch.Tensor, world_size: int) -> int:
    """How many ranks hold each element of `grad`: its replicated mesh dims, times the meshes beside its own."""
    if not isinstance(grad, DTensor):
        return world_size
    mesh = grad.device_mesh
    replicated = 1
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            replicated *= mesh.size(dim)
    return replicated * world_size // mesh.size()


@torch.no_grad()
def global_grad_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of every gradient, over all ranks (0-dim fp32 on device, no host sync).

    One all-reduce over all ranks: each rank sums the squared norms of its local shards (an element
    held by k ranks counts 1/k on each), in float64, and the sum is reduced once. So every rank,
    under any FSDP x TP layout, gets the same number (a per-mesh-dimension reduction, as DTensor's
    full_tensor() does it, sums in another order on every layout) and clips by the same factor
    (optim.step_unless_nonfinite clips).
    A gradient left Partial (under TP, the sequence-parallel norms' gains) is summed here once and
    put back as the parameter's gradient, so the optimizer does not sum it again.
    """
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and any(q.is_partial() for q in grad.placements):
            param.grad = grad.redistribute(placements=[Replicate() if q.is_partial() else q for q in grad.placements])
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    by_copies: dict[int, list[torch.Tensor]] = {}  # divided by Python numbers: no host-to-device copy, no sync
    for param in parameters:
        if param.grad is not None:
            local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            by_copies.setdefault(_copies(param.grad, world_size), []).append(local)
    squared = sum(torch.stack(torch._foreach_norm(group)).double().square().sum() / copies
                  for copies, group in sorted(by_copies.items()))
    if world_size > 1:
        if squared.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            squared = squared.cuda()  # FSDP's CPU offload keeps the gradients on the host; NCCL reduces on the GPU
        torch.distributed.all_reduce(squared)
    return squared.sqrt().float()


def compile_loss(loss_fn, dims: ParallelDims, config: Config):
    """torch.compile the loss so the fp32 upcast of the logits fuses into the cross-entropy.

    Not under TP: the vocab-sharded loss_parallel path is already sharded and stays eager.
    """
    if config.compile.enable and not dims.tp_enabled:
        return torch.compile(loss_fn)
    return loss_fn
