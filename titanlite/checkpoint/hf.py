"""Hugging Face Llama weights: parameter names, and the RoPE layout of wq and wk, both ways.

RoPE layout: titanlite rotates interleaved pairs (x[2i], x[2i+1]) (the original LLaMA code);
HF's LlamaAttention rotates halves (x[i], x[i + head_dim/2]). Attention scores are unchanged if
the rows of wq and wk are permuted within each head: pair i component j moves to row
j * head_dim/2 + i. The permutation only moves values, so a round trip is bitwise exact.
The HF config.json is checkpoint/hf_config.py; the tokenizer data/hf_tokenizer.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from titanlite.model.transformer import build_model

# titanlite name -> HF name; {i} is the block index.
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file and the problem."""


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads * head_dim, dim): pair i component j -> row j * head_dim/2 + i, per head."""
    rows, columns = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def halves_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, columns = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def name_map(n_layers: int) -> dict[str, str]:
    """Every titanlite parameter name -> its HF name."""
    mapping = {}
    for ours, theirs in HF_NAMES.items():
        for i in range(n_layers) if "{i}" in ours else [None]:
            mapping[ours.format(i=i)] = theirs.format(i=i)
    return mapping


def to_hf_state(weights: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    mapping = name_map(model.n_layers)
    if set(weights) != set(mapping):
        raise ConvertError(f"checkpoint parameters do not match model.n_layers={model.n_layers}: unexpected "
                           f"{sorted(set(weights) - set(mapping))[:3]}, missing {sorted(set(mapping) - set(weights))[:3]}")
    state = {}
    for ours, theirs in mapping.items():
        tensor = weights[ours]
        if ours.endswith("attention.wq.weight"):
            tensor = interleaved_to_halves(tensor, model.n_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = interleaved_to_halves(tensor, model.n_kv_heads)
        state[theirs] = tensor.contiguous()
    return state


def from_hf_state(hf: dict[str, torch.Tensor], model, tied: bool, source: Path) -> dict[str, torch.Tensor]:
    """titanlite weights from HF tensors; `tied`: the head is the embedding (HF ignores a stored lm_head then)."""
    hf = dict(hf)
    if tied and "model.embed_tokens.weight" in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    shapes = {name: tensor.shape for name, tensor in build_model(model, 1).state_dict().items()}  # meta: no memory
    weights = {}
    for ours, theirs in name_map(model.n_layers).items():
        if theirs not in hf:
            raise ConvertError(f"{source}: no tensor {theirs!r} (needed for {ours})")
        tensor = hf.pop(theirs)
        if tensor.shape != shapes[ours]:
            raise ConvertError(f"{source}: {theirs} has shape {list(tensor.shape)}, config.json implies "
                               f"{list(shapes[ours])}")
        if ours.endswith("attention.wq.weight"):
            tensor = halves_to_interleaved(tensor, model.n_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = halves_to_interleaved(tensor, model.n_kv_heads)
        weights[ours] = tensor.clone(memory_format=torch.contiguous_format)  # tied: its own copy
    leftovers = [name for name in hf if not name.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ConvertError(f"{source}: tensors titanlite has no place for (biases? another architecture?): "
                           f"{leftovers[:5]}")
    return weights
