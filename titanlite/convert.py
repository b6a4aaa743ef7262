"""Checkpoint conversion: to and from Hugging Face Llama format, and seed checkpoints.

    python -m titanlite.convert to-hf   CHECKPOINT OUT_DIR [--dtype bfloat16]
    python -m titanlite.convert from-hf HF_DIR OUT_FOLDER [--config NAME] [--section.key value ...]
    python -m titanlite.convert seed    OUT_FOLDER --config NAME [--section.key value ...]

to-hf writes config.json + safetensors (sharded with model.safetensors.index.json when large)
with HF parameter names. from-hf and seed write a model-only titanlite checkpoint
OUT_FOLDER/step-00000000 for `checkpoint.initial_load_path`. A seed checkpoint is initialized by
one process on the CPU, so every parallel layout starts from the same weights.

RoPE layout: titanlite rotates interleaved pairs (x[2i], x[2i+1]) (the original LLaMA code);
HF's LlamaAttention rotates halves (x[i], x[i + head_dim/2]). Attention scores are unchanged if
the rows of wq and wk are permuted within each head: pair i component j moves to row
j * head_dim/2 + i. The permutation only moves values, so a round trip is bitwise exact.

Safetensors is written and read here (8-byte little-endian header length, a JSON header,
raw little-endian bytes): the format is small and documented, and `safetensors` is not a
dependency of titanlite.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

from titanlite.checkpoint import CheckpointError, load_model_weights, save_model_checkpoint
from titanlite.config import Config, ConfigError, load_config

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
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


# --- safetensors -------------------------------------------------------------------------------

def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device; contiguous copies are made) to one .safetensors file."""
    if sys.byteorder != "little":
        raise ConvertError("safetensors stores little-endian bytes; this machine is big-endian")
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for tensor in tensors.values():
            file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
            data = bytearray(file.read())
    except (OSError, struct.error, ValueError) as error:
        raise ConvertError(f"{path}: not a readable safetensors file ({error})") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        dtype, shape = TORCH_DTYPES.get(entry["dtype"]), entry["shape"]
        if dtype is None:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        numel = 1
        for size in shape:
            numel *= size
        if end > len(data) or end - start != numel * torch.empty((), dtype=dtype).element_size():
            raise ConvertError(f"{path}: tensor {name} points outside the file or has the wrong size (truncated?)")
        flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=start) if numel else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(shape)
    return tensors


# --- RoPE layout and names -------------------------------------------------------------------

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
        raise ConvertError(f"checkpoint parameters do not match model.n_layers={model.n_layers}: "
                           f"unexpected {sorted(set(weights) - set(mapping))[:3]}, missing {sorted(set(mapping) - set(weights))[:3]}")
    state = {}
    for ours, theirs in mapping.items():
        tensor = weights[ours]
        if ours.endswith("attention.wq.weight"):
            tensor = interleaved_to_halves(tensor, model.n_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = interleaved_to_halves(tensor, model.n_kv_heads)
        state[theirs] = tensor.contiguous()
    return state


def from_hf_state(hf: dict[str, torch.Tensor], model, source: Path) -> dict[str, torch.Tensor]:
    hf = dict(hf)
    if "lm_head.weight" not in hf and "model.embed_tokens.weight" in hf:  # tied embeddings: untie
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
    weights = {}
    for ours, theirs in name_map(model.n_layers).items():
        if theirs not in hf:
            raise ConvertError(f"{source}: no tensor {theirs!r} (needed for {ours})")
        tensor = hf.pop(theirs)
        if ours.endswith("attention.wq.weight"):
            tensor = halves_to_interleaved(tensor, model.n_heads)
        elif ours.endswith("attention.wk.weight"):
            tensor = halves_to_interleaved(tensor, model.n_kv_heads)
        weights[ours] = tensor.clone(memory_format=torch.contiguous_format)  # off the file buffer
    leftovers = [name for name in hf if not name.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ConvertError(f"{source}: tensors titanlite has no place for (biases? another architecture?): {leftovers[:5]}")
    return weights


# --- config.json -----------------------------------------------------------------------------

def hf_config(config: Config, dtype: torch.dtype) -> dict:
    model = config.model
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": model.dim,
          "intermediate_size": model.intermediate_size, "num_hidden_layers": model.n_layers,
          "num_attention_heads": model.n_heads, "num_key_value_heads": model.n_kv_heads,
          "head_dim": model.dim // model.n_heads, "hidden_act": "silu", "rms_norm_eps": model.norm_eps,
          "rope_theta": model.rope_theta, "vocab_size": model.vocab_size, "tie_word_embeddings": False,
          "attention_bias": False, "mlp_bias": False, "initializer_range": model.init_std,
          "max_position_embeddings": config.training.seq_len, "torch_dtype": str(dtype).removeprefix("torch.")}
    if model.rope_scaling == "yarn":
        hf["rope_scaling"] = {"rope_type": "yarn", "factor": model.rope_scaling_factor,
                              "original_max_position_embeddings": model.rope_original_max_position,
                              "beta_fast": model.rope_beta_fast, "beta_slow": model.rope_beta_slow}
    return hf


def apply_hf_config(hf: dict, config: Config, source: Path) -> None:
    """Set config.model from an HF Llama config.json; ConvertError for what titanlite cannot express."""
    if hf.get("model_type") not in ("llama", None):
        raise ConvertError(f"{source}: model_type={hf.get('model_type')!r}, only 'llama' converts")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConvertError(f"{source}: {key}=true; titanlite's Llama has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{source}: hidden_act={hf['hidden_act']!r}; titanlite uses SwiGLU (silu)")
    model = config.model
    model.dim, model.n_layers = hf["hidden_size"], hf["num_hidden_layers"]
    model.n_heads = hf["num_attention_heads"]
    model.n_kv_heads = hf.get("num_key_value_heads") or model.n_heads
    model.intermediate_size, model.vocab_size = hf["intermediate_size"], hf["vocab_size"]
    model.norm_eps, model.rope_theta = hf.get("rms_norm_eps", 1e-6), hf.get("rope_theta", 10000.0)
    if hf.get("head_dim", model.dim // model.n_heads) != model.dim // model.n_heads:
        raise ConvertError(f"{source}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads")
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "yarn":
        model.rope_scaling, model.rope_scaling_factor = "yarn", float(scaling["factor"])
        model.rope_original_max_position = int(scaling.get("original_max_position_embeddings",
                                                            hf.get("max_position_embeddings", 4096)))
        model.rope_beta_fast = float(scaling.get("beta_fast", 32.0))
        model.rope_beta_slow = float(scaling.get("beta_slow", 1.0))
    elif kind != "default":
        raise ConvertError(f"{source}: rope_scaling type {kind!r} is not supported (none or yarn)")


# --- commands --------------------------------------------------------------------------------

def export_to_hf(checkpoint: Path, out_dir: Path, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `checkpoint` (any complete titanlite checkpoint) as an HF Llama folder; returns it."""
    weights, meta = load_model_weights(checkpoint)
    config = load_config(None, ["--training.steps", "1"])
    for key, value in meta["config"]["model"].items():
        setattr(config.model, key, value)
    config.training.seq_len = meta["config"]["training"]["seq_len"]
    state = to_hf_state(weights, config.model)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, current_bytes = [], {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name], current_bytes = tensor, current_bytes + size
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_safetensors(shard, out_dir / name, {"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    exported_dtype = dtype or next(iter(state.values())).dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config(config, exported_dtype), indent=2))
    return out_dir


def read_hf_folder(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    hf_dir = Path(hf_dir)
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ConvertError(f"{hf_dir / 'config.json'}: cannot read it ({error})") from None
    index = hf_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise ConvertError(f"{hf_dir / name}: missing (only safetensors checkpoints convert)")
        tensors.update(load_safetensors(hf_dir / name))
    return hf, tensors


def import_from_hf(hf_dir: Path, out_folder: Path, config: Config) -> Path:
    """A model-only titanlite checkpoint out_folder/step-00000000 from an HF Llama folder."""
    hf, tensors = read_hf_folder(hf_dir)
    apply_hf_config(hf, config, Path(hf_dir) / "config.json")
    weights = from_hf_state(tensors, config.model, Path(hf_dir))
    return save_model_checkpoint(weights, out_folder, 0, config)


def write_seed_checkpoint(config: Config, out_folder: Path) -> Path:
    """Initialize the full model on the CPU in this one process and save it as step 0 (model only)."""
    from titanlite.model import build_model
    from titanlite.tokenizer import build_tokenizer_for_model

    if config.model.vocab_size == 0:
        build_tokenizer_for_model(config)  # fills model.vocab_size from the tokenizer
    model = build_model(config.model, config.training.seq_len, device="cpu")
    model.init_weights(seed=config.training.seed)
    return save_model_checkpoint(model.state_dict(), out_folder, 0, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titanlite.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="titanlite checkpoint -> HF Llama folder")
    to_hf.add_argument("checkpoint", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="cast the weights (default: keep the checkpoint's dtype, a bitwise export)")
    from_hf = commands.add_parser("from-hf", help="HF Llama folder -> model-only titanlite checkpoint")
    from_hf.add_argument("hf_dir", type=Path)
    from_hf.add_argument("out_folder", type=Path)
    seed = commands.add_parser("seed", help="seed checkpoint: the initial weights, made by one process")
    seed.add_argument("out_folder", type=Path)
    for command in (from_hf, seed):
        command.add_argument("--config", default=None, help="TOML file or name in train_configs/")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.command == "to-hf":
            out = export_to_hf(args.checkpoint, args.out_dir, getattr(torch, args.dtype) if args.dtype else None)
        else:
            # The step count plays no part in a conversion; a config without one must still load.
            config = load_config(args.config, ["--training.steps", "1", *overrides])
            out = (import_from_hf(args.hf_dir, args.out_folder, config) if args.command == "from-hf"
                   else write_seed_checkpoint(config, args.out_folder))
        print(f"wrote {out}")
    except (ConvertError, CheckpointError, ConfigError) as error:
        print(f"titanlite.convert: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
