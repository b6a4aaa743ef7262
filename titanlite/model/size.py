"""The model's size from its settings alone: parameter counts and training FLOPs per token.

One formula each, used by the training log, MFU (metrics), `titanlite.plan` and the memory
estimate (parallel/memory.py); tests check the count against the built module's parameters.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from titanlite.config.settings import Model


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int  # token embedding rows (a lookup, no matmul)
    non_embedding: int  # everything else, the output head included
    per_block: int
    output_group: int  # final norm + output head


def count_parameters(model: Model) -> ParameterCounts:
    """Parameters of model/transformer.py's Transformer for these settings (vocab_size resolved)."""
    head_dim = model.dim // model.n_heads
    attention = model.dim * model.n_heads * head_dim * 2 + model.dim * model.n_kv_heads * head_dim * 2  # wq, wo; wk, wv
    per_block = attention + 3 * model.dim * model.intermediate_size + 2 * model.dim  # w1, w2, w3; two RMSNorm gains
    embedding = model.vocab_size * model.dim
    output_group = model.vocab_size * model.dim + model.dim
    total = embedding + model.n_layers * per_block + output_group
    return ParameterCounts(total, embedding, total - embedding, per_block, output_group)


def largest_parameter(model: Model) -> int:
    """Elements of the model's largest parameter (the embedding or the head, or an FFN matrix)."""
    return max(model.vocab_size * model.dim, model.dim * model.intermediate_size, model.dim * model.dim)


def flops_per_token(model: Model, seq_len: int) -> int:
    """Training FLOPs per token: 6·N + 12·L·H·Q·T (PaLM appendix B convention).

    N counts every matmul weight: all parameters except the token embedding (a lookup, no
    matmul), the output head included; norms are counted but negligible. 12·L·H·Q·T is the
    attention score and value matmuls (forward + backward) with H heads of dimension Q over T
    tokens, counted without the causal half, as peers (PaLM, torchtitan, Megatron) do.
    """
    head_dim = model.dim // model.n_heads
    return 6 * count_parameters(model).non_embedding + 12 * model.n_layers * model.n_heads * head_dim * seq_len
