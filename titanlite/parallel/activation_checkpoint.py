"""Activation checkpointing: whole blocks (full, every k-th), or per op (keep matmuls and attention)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts)

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
