"""HF Llama export/import (names, RoPE layout, safetensors), seed checkpoints."""

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

from titanlite.checkpoint import load_model_weights, save_model_checkpoint
from titanlite.config import load_config
from titanlite.convert import (ConvertError, export_to_hf, import_from_hf, load_safetensors, main,
                               save_safetensors)
from titanlite.model import build_model

TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.intermediate_size", "96", "--model.vocab_size", "256", "--training.seq_len", "16",
        "--training.steps", "1", "--model.rope_theta", "500000"]


@pytest.fixture()
def checkpoint(tmp_path):
    """A model-only checkpoint of a tiny randomly initialised model, and its config."""
    config = load_config(None, TINY)
    model = build_model(config.model, config.training.seq_len, "cpu")
    model.init_weights(seed=3)
    with torch.no_grad():  # norms are ones after init: make them distinguishable
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return save_model_checkpoint(model.state_dict(), tmp_path / "ckpt", 5, config), config


def test_safetensors_layout_is_the_documented_one(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
               "c": torch.tensor(7, dtype=torch.int64), "d": torch.tensor([True, False]), "e": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path, {"format": "pt"})
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_size])
    assert header_size % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"]["dtype"] == "BF16" and header["c"]["shape"] == [] and header["d"]["dtype"] == "BOOL"
    data = raw[8 + header_size:]
    assert data[0:24] == struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    start, end = header["b"]["data_offsets"]
    assert data[start:end] == bytes([0xC0, 0x3F, 0x00, 0xC0])  # bf16 1.5 = 0x3FC0, -2.0 = 0xC000, little-endian
    assert len(data) == header["e"]["data_offsets"][1]  # no gaps, nothing after the last tensor
    loaded = load_safetensors(path)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_truncated_safetensors_is_rejected(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConvertError, match="x.safetensors: tensor w points outside the file"):
        load_safetensors(path)


def test_round_trip_is_bitwise_exact(checkpoint, tmp_path):
    path, config = checkpoint
    main(["to-hf", str(path), str(tmp_path / "hf")])
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["num_key_value_heads"] == 2 and hf_config["rope_theta"] == 500000
    assert "model.layers.1.self_attn.q_proj.weight" in load_safetensors(tmp_path / "hf" / "model.safetensors")
    imported = import_from_hf(tmp_path / "hf", tmp_path / "back", load_config(None))
    original, _ = load_model_weights(path)
    restored, meta = load_model_weights(imported)
    assert meta["model_only"] and meta["config"]["model"]["n_kv_heads"] == 2
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    # Sharded: several files and an index, the same tensors.
    export_to_hf(path, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    resharded = import_from_hf(tmp_path / "sharded", tmp_path / "back2", load_config(None))
    assert all(torch.equal(original[n], t) for n, t in load_model_weights(resharded)[0].items())


def hf_llama_reference(hf: dict[str, torch.Tensor], config: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of HF's Llama written from its equations, float64: rotate-half RoPE, GQA by repetition."""
    w = {name: tensor.double() for name, tensor in hf.items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps = config["head_dim"], config["rms_norm_eps"]
    seq = tokens.shape[1]
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def norm(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rotate(x):
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return x * cos + torch.cat([-second, first], -1) * sin

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(1, seq, heads, head_dim).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(1, seq, kv_heads, head_dim).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(1, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        attention = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, seq, -1)
        x = x + attention @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_export_computes_what_hf_llama_computes(checkpoint, tmp_path):
    path, config = checkpoint
    export_to_hf(path, tmp_path / "hf")
    hf = load_safetensors(tmp_path / "hf" / "model.safetensors")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    model = build_model(config.model, config.training.seq_len, "cpu")
    model.load_state_dict(load_model_weights(path)[0])
    model.init_rope()
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.double()(tokens)
    reference = hf_llama_reference(hf, hf_config, tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)  # fp32 RoPE tables in ours


def test_transformers_llama_gives_the_same_logits(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, config = checkpoint
    export_to_hf(path, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    model = build_model(config.model, config.training.seq_len, "cpu")
    model.load_state_dict(load_model_weights(path)[0])
    model.init_rope()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_bad_hf_input_is_rejected(checkpoint, tmp_path):
    path, _ = checkpoint
    export_to_hf(path, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    hf_config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**hf_config, "attention_bias": True}))
    with pytest.raises(ConvertError, match="attention_bias=true"):
        import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None))
    config_path.write_text(json.dumps({**hf_config, "num_hidden_layers": 3}))
    with pytest.raises(ConvertError, match="no tensor 'model.layers.2.self_attn.q_proj.weight'"):
        import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_seed_checkpoint_holds_the_initial_weights(tmp_path, capsys):
    main(["seed", str(tmp_path / "seed"), *TINY, "--training.seed", "11"])
    assert "step-00000000" in capsys.readouterr().out
    weights, meta = load_model_weights(tmp_path / "seed" / "step-00000000")
    assert meta["model_only"] and meta["step"] == 0
    model = build_model(load_config(None, TINY).model, 16, "cpu")
    model.init_weights(seed=11)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[n], t) for n, t in model.state_dict().items())
