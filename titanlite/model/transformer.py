"""The LLaMA-style decoder: embedding, pre-norm blocks (GQA attention + SwiGLU), RMSNorm, untied head.

No parallelism code lives here. Activations are reshaped with `view(batch, seq, -1, head_dim)`
so that tensor parallelism can shard heads without the model noticing, and blocks sit in a
`ModuleDict` keyed by their index so parameter names stay stable in checkpoints.

Initialization (LLaMA / GPT-2 style, as torchtitan does it):
  - token embedding: normal(0, 1): RMSNorm rescales its output anyway;
  - q/k/v, w1, w3: truncated normal(0, init_std);
  - residual-stream writers (attention wo, FFN w2): truncated normal(0, init_std / sqrt(2 n_layers)),
    so the variance of the residual stream does not grow with depth;
  - output head: truncated normal(0, dim^-0.5), logits start at unit scale;
  - RMSNorm weights: ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from titanlite.config.settings import Model as ModelConfig
from titanlite.model.attention import build_attention
from titanlite.model.loss import head_cross_entropy
from titanlite.model.rope import attention_softmax_scale, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm normalizes in fp32 (or wider: the mean of squares of bf16 activations
        # loses precision), multiplies by the gain and rounds to x's dtype once; one fused kernel.
        # The gain in x's dtype: bf16 under autocast, as FSDP's bf16 parameters give it (and a
        # dtype mismatch would keep torch off its fused kernel).
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (batch, seq, heads, head_dim) in fp32 (or wider).

    cos, sin: (seq, head_dim/2) or (batch, seq, head_dim/2), already in fp32 (or wider).
    """
    # bf16 has 8 mantissa bits: rotating in bf16 garbles large-angle positions, so rotate in fp32.
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.dim // config.n_heads
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.softmax_scale: float | None = attention_softmax_scale(config)  # None = 1/sqrt(head_dim)
        # Causal SDPA or document-masked FlexAttention, maybe padded; generation swaps in a KV cache (kv_cache.py).
        self.attention_fn = build_attention(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds only its share of heads.
        q = apply_rope(self.wq(x).view(batch, seq, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(batch, seq, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        out = self.attention_fn(q, k, v, self.softmax_scale, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(dim, intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(dim, intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(intermediate_size, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.intermediate_size)

    def forward(self, x, cos, sin, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class OutputHead(nn.Linear):
    """The untied output projection (an nn.Linear: TP, FSDP and checkpoints see `output.weight`).

    Given labels it returns the loss instead of the logits, computed `chunk_tokens` at a time
    (loss.head_cross_entropy), so the logits of the whole micro-batch never exist. It runs inside
    this module's forward so that FSDP's hooks gather and reduce its weight as for the logits.
    """

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, chunk_tokens: int = 0):
        if labels is None:
            return super().forward(x)
        return head_cross_entropy(x, self.weight, labels, chunk_tokens)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, max_seq_len: int):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("model.vocab_size is 0: build the model from config.resolve()'s Run.config")
        self.config, self.max_seq_len = config, max_seq_len
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = OutputHead(config.dim, config.vocab_size, bias=False)
        # Not persistent: rebuilt from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", torch.empty(max_seq_len, config.dim // config.n_heads // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)
        self.init_rope()

    def init_rope(self) -> None:
        if self.rope_cos.is_meta:
            return
        # In the buffers' dtype: fp32, or float64 after model.double() (then call init_rope() again).
        cos, sin = rope_tables(self.config, self.max_seq_len, self.rope_cos.device, self.rope_cos.dtype)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """LLaMA-style init (see module docstring); also fills the RoPE tables after `to_empty()`."""
        if seed is not None:
            torch.manual_seed(seed)
        for name, init in self.init_plan():
            init(self.get_parameter(name))
        self.init_rope()

    def init_plan(self) -> list[tuple[str, Callable[[torch.Tensor], object]]]:
        """(parameter name, in-place init) for every parameter, in the order the init draws random numbers.

        The order is a contract: parallelize.init_weights_layout_independent replays it one full
        parameter at a time with the same seed, so every layout starts from these exact values.
        """
        config = self.config

        def normal(std: float):
            return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)

        def truncated(std: float):  # cut at 3 standard deviations
            return lambda weight: nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)

        residual_std = config.init_std / math.sqrt(2 * config.n_layers)
        plan = [("tok_embeddings.weight", normal(1.0))]
        for key in self.layers:
            block = f"layers.{key}."
            plan += [(block + name, truncated(config.init_std)) for name in (
                "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                "feed_forward.w3.weight")]
            plan += [(block + name, truncated(residual_std)) for name in ("attention.wo.weight", "feed_forward.w2.weight")]
            plan += [(block + "attention_norm.weight", nn.init.ones_), (block + "ffn_norm.weight", nn.init.ones_)]
        return plan + [("norm.weight", nn.init.ones_), ("output.weight", truncated(config.dim ** -0.5))]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask=None,
                labels: torch.Tensor | None = None, loss_chunk_tokens: int = 0):
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab); with labels (batch, seq): the loss
        instead, (summed token losses, per-sample sums (batch,)), `loss_chunk_tokens` tokens at a time
        (0: all at once).

        positions (batch, seq): RoPE position of each token (restarting per document if the data
        says so); None = 0..seq-1. mask: a FlexAttention BlockMask (attention.document_mask) shared
        by every layer, or None for plain causal attention.
        """
        if positions is None:
            seq = tokens.shape[1]
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h, cos, sin, mask)
        if labels is None:
            return self.output(self.norm(h))
        return self.output(self.norm(h), labels, loss_chunk_tokens)


def build_model(config: ModelConfig, max_seq_len: int, device: torch.device | str = "meta") -> Transformer:
    """The model on `device` (default meta: no memory until `to_empty()` and `init_weights()`)."""
    with torch.device(device):
        return Transformer(config, max_seq_len)
