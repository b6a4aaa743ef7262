"""The KV cache: keys and values of the tokens seen so far, so generation feeds one new token per step.

Generation only (titanlite/generate.py); training never builds one. `Transformer.forward(tokens,
cache=cache)` runs `tokens` as the continuation of the `cache.length` cached tokens: RoPE
positions start at `cache.length`, each layer's attention writes the new keys and values into the
cache and attends over everything cached so far, and `cache.length` grows by the tokens' count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titanlite.settings import Model as ModelConfig


@dataclass
class LayerKVCache:
    """One layer's view of the cache: keys, values (batch, kv_heads, max_len, head_dim); `start` filled."""

    keys: torch.Tensor
    values: torch.Tensor
    start: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q (batch, heads, new, head_dim); k, v (batch, kv_heads, new, head_dim) of the new tokens at
        positions start..start+new-1 -> attention output, q's shape. Stores k and v in the cache."""
        end = self.start + q.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} tokens; {end} needed")
        self.keys[:, :, self.start:end] = k
        self.values[:, :, self.start:end] = v
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        if self.start == 0 or q.shape[2] == 1:
            # From the start: plain causal. One new token: it sees every cached one, no mask at all.
            return F.scaled_dot_product_attention(q, keys, values, is_causal=self.start == 0, scale=scale,
                                                  enable_gqa=True)
        # New token i (position start+i) sees cached position j <= start+i. SDPA's is_causal aligns
        # the mask to the top-left corner (query 0 sees key 0 only), which is wrong here.
        visible = torch.arange(end, device=q.device) <= torch.arange(self.start, end, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)


class KVCache:
    """Keys and values of every layer, for `batch` sequences of up to `max_len` tokens; `length` filled."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.dim // config.n_heads)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def layer(self, index: int) -> LayerKVCache:
        return LayerKVCache(self.keys[index], self.values[index], self.length)
