"""Document masking for packed rows: FlexAttention with a block-causal document mask.

A packed row holds several documents; plain causal attention (model.attention = "sdpa") lets a
token attend to the documents before it in the row. With model.attention = "flex", token q
attends to token k only if k <= q and both belong to the same document. The data loader yields
`document_ids` (batch, seq) (0, 1, ... within a row); `build_document_mask` turns them into a
FlexAttention BlockMask once per micro-batch, shared by every layer.

FlexAttention is fast only when compiled: on CUDA the attention function calls a compiled
`flex_attention` (the whole block is compiled anyway under compile.enable); on CPU (tests) it
runs eagerly, and where gradients are needed (FlexAttention has no CPU backward) the same mask
goes, materialized, through SDPA.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention


def build_document_mask(document_ids: torch.Tensor) -> BlockMask:
    """document_ids (batch, seq) int64 on the model's device -> BlockMask (batch, 1 head group, seq, seq).

    The mask is the same for all heads (H=None); blocks entirely outside every document are skipped.
    """
    def same_document_causal(batch, head, q_index, kv_index):
        same_document = document_ids[batch, q_index] == document_ids[batch, kv_index]
        return same_document & (kv_index <= q_index)

    batch, seq = document_ids.shape
    return create_block_mask(same_document_causal, batch, None, seq, seq, device=document_ids.device)


@functools.cache
def _compiled_flex_attention():
    # Compiling once per process: FlexAttention's fused kernel only exists through torch.compile.
    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(q, k, v, scale, mask: BlockMask | None = None):
    """(batch, heads, seq, head_dim) -> same. Attention within documents (`mask` from
    build_document_mask); K/V heads broadcast over query groups (GQA). mask=None: plain causal."""
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and q.requires_grad:
            # FlexAttention has no CPU backward: the same mask, materialized, through SDPA.
            dense = create_mask(mask.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale,
                                                                    enable_gqa=True)
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    return attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)

