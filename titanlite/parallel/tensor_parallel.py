"""Tensor parallel: Megatron-style column/row-wise linears, sequence-parallel norms, vocab-parallel loss."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel, loss_parallel,
                                               parallelize_module)

from titanlite.config.settings import Float8
from titanlite.parallel.float8 import tensor_parallel_styles


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, float8: Float8) -> None:
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
        style = tensor_parallel_styles(block, float8)
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


def loss_context(tp_enabled: bool):
    """A factory of context managers for the loss and its backward: `loss_parallel` under TP."""
    return loss_parallel if tp_enabled else contextlib.nullcontext
