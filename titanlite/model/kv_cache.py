"""The KV cache: keys and values of the tokens seen so far, so generation feeds one new token per step.

Generation only (titanlite/generate.py); the model knows nothing of it. While `cache.attached(model)`
holds, each block's attention function is the cache's: it writes the new tokens' keys and values
at positions `cache.length` on and attends over everything cached so far. The caller runs
`model(tokens, positions=cache.positions(new))` and then `cache.advance(new)`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from titanlite.config.settings import Model as ModelConfig


class KVCache:
    """Keys and values of every layer, for `batch` sequences of up to `max_len` tokens; `length` filled."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.dim // config.n_heads)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               mask=None) -> torch.Tensor:
        """q (batch, heads, new, head_dim); k, v (batch, kv_heads, new, head_dim) of the new tokens at
        positions length..length+new-1 -> attention output, q's shape. Stores k and v in the cache."""
        start, end = self.length, self.length + q.shape[2]
        if end > self.keys.shape[3]:
            raise ValueError(f"KV cache holds {self.keys.shape[3]} tokens; {end} needed")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        if start == 0 or q.shape[2] == 1:
            # From the start: plain causal. One new token: it sees every cached one, no mask at all.
            return F.scaled_dot_product_attention(q, keys, values, is_causal=start == 0, scale=scale, enable_gqa=True)
        # New token i (position start+i) sees cached position j <= start+i. SDPA's is_causal aligns
        # the mask to the top-left corner (query 0 sees key 0 only), which is wrong here.
        visible = torch.arange(end, device=q.device) <= torch.arange(start, end, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)

    def positions(self, new_tokens: int) -> torch.Tensor:
        """RoPE positions (1, new_tokens) of the next tokens: they continue the cached ones."""
        return torch.arange(self.length, self.length + new_tokens, device=self.keys.device)[None]

    def advance(self, new_tokens: int) -> None:
        """After a forward over `new_tokens` tokens: they are cached now."""
        self.length += new_tokens

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module):
        """While inside, `model`'s attention runs through this cache (its own functions come back after)."""
        blocks = list(model.layers.values())
        own = [block.attention.attention_fn for block in blocks]
        for layer, block in enumerate(blocks):
            block.attention.attention_fn = functools.partial(self.attend, layer)
        try:
            yield self
        finally:
            for block, attention_fn in zip(blocks, own):
                block.attention.attention_fn = attention_fn
