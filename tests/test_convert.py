"""HF Llama export/import against transformers (logits, greedy tokens, tokenizer), seed checkpoints."""

import base64
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from titanlite.checkpoint.weights import load_model_weights, save_model_checkpoint
from titanlite.config.load import config_from_dict, load_config
from titanlite.convert import ConvertError, export_to_hf, import_from_hf, main
from titanlite.data.hf_tokenizer import write_hf_tokenizer
from titanlite.data.tokenizer import build_tokenizer
from titanlite.model.transformer import build_model

transformers = pytest.importorskip("transformers")

TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.intermediate_size", "96", "--model.vocab_size", "2048", "--training.seq_len", "16",
        "--model.rope_theta", "500000"]
YARN = ["--model.rope_scaling", "yarn", "--model.rope_scaling_factor", "2", "--model.rope_original_max_position", "64"]
LLAMA3 = ["--model.rope_scaling", "llama3", "--model.rope_scaling_factor", "8", "--model.rope_original_max_position",
          "64", "--model.rope_low_freq_factor", "1", "--model.rope_high_freq_factor", "4"]
MULTILINGUAL = ("def f(x):\n    return {'a': x ** 2}  # 平方\n\n\n\tif x:\r\n        pass  "
                "日本語のテキスト、中文。한국어 emoji 🦙🔥 👩‍👩‍👧 🇫🇷 tabs\t\tand     spaces   \n\n  "
                "Ünïcödé ½ 𝔘 I'll 1234567 العربية हिन्दी  ")




def titanlite_model(checkpoint, max_seq_len):
    """The model a checkpoint holds, in float32 on the CPU, with RoPE tables for max_seq_len positions."""
    weights, meta = load_model_weights(checkpoint)
    config = config_from_dict(meta["config"])
    model = build_model(config.model, max_seq_len, "cpu")
    model.load_state_dict(weights)
    model.init_rope()
    return model.eval(), config


def compare_logits(ours: torch.Tensor, theirs: torch.Tensor, bound: float = 1e-4) -> None:
    """max |delta logit| <= bound, and the greedy token is the same at every position."""
    delta = (ours - theirs).abs().max().item()
    assert delta <= bound, f"max |delta logit| = {delta:.3g}"
    differ = (ours.argmax(-1) != theirs.argmax(-1)).sum().item()
    assert differ == 0, f"greedy tokens differ at {differ} of {ours.shape[:-1].numel()} positions"


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


# --- export ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rope", [[], YARN, LLAMA3], ids=["plain", "yarn", "llama3"])
def test_round_trip_is_bitwise_exact(tmp_path, rope):
    config = load_config(None, TINY + rope)
    model = build_model(config.model, 16, "cpu")
    model.init_weights(seed=3)
    path = save_model_checkpoint(model.state_dict(), tmp_path / "ckpt", 5, config)
    main(["to-hf", str(path), str(tmp_path / "hf")])
    assert "model.layers.1.self_attn.q_proj.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    back = import_from_hf(tmp_path / "hf", tmp_path / "back", load_config(None))
    original, _ = load_model_weights(path)
    restored, meta = load_model_weights(back)
    assert meta["model_only"] and original.keys() == restored.keys()
    assert all(torch.equal(original[name], restored[name]) for name in original)
    assert meta["config"]["model"] == config.to_dict()["model"]  # every [model] field, RoPE scaling included
    assert meta["config"]["tokenizer"]["path"] == str((tmp_path / "hf" / "tokenizer.json").resolve())
    # Sharded: several files and an index, the same tensors.
    export_to_hf(path, tmp_path / "sharded", max_shard_bytes=100_000)
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
        gated = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + gated @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_export_computes_what_hf_llama_computes_in_float64(checkpoint, tmp_path):
    path, _ = checkpoint
    export_to_hf(path, tmp_path / "hf")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    model, _ = titanlite_model(path, 64)
    model.double().init_rope()  # float64 tables, rotation and norms: no float32 rounding left
    tokens = torch.randint(0, 2048, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_llama_reference(hf, hf_config, tokens), rtol=1e-10, atol=1e-10)


def test_export_is_complete_for_transformers(checkpoint, tmp_path):
    path, _ = checkpoint
    export_to_hf(path, tmp_path / "hf")
    tokenizer = build_tokenizer("default")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert hf_model.generation_config.eos_token_id == tokenizer.eos_id
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
    ids = tokenizer.encode(MULTILINGUAL)
    assert hf_tokenizer(MULTILINGUAL)["input_ids"] == ids  # no BOS added: as titanlite's documents
    assert hf_tokenizer.decode(ids) == MULTILINGUAL
    assert hf_tokenizer.decode([tokenizer.eos_id]) == "<|end_of_text|>"


def test_exported_llama3_style_tokenizer_loads_in_autotokenizer(tmp_path):
    special_tokens = 256
    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b" x", "日本".encode(), b"\n\n"]
    bpe_file = tmp_path / "tokenizer.model"
    bpe_file.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(ranks)))
    tokenizer = build_tokenizer(str(bpe_file), num_special_tokens=special_tokens)
    write_hf_tokenizer(tokenizer.byte_pair_encoding(), tmp_path / "hf", model_max_length=4096)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(hf_tokenizer) == tokenizer.vocab_size == 261 + special_tokens
    for text in (MULTILINGUAL, "abc ab x 日本\n\n\n"):
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.convert_tokens_to_ids("<|eot_id|>") == 261 + 9


@pytest.fixture(scope="module")
def trained_debug_checkpoint(tmp_path_factory):
    """The debug model (dim 256, 4 layers, 8 heads over 4 KV heads, default tokenizer) after 12 steps."""
    from titanlite.train import train

    folder = tmp_path_factory.mktemp("debug")
    config = load_config("debug_model", [
        "--training.steps", "12", "--job.dump_folder", str(folder), "--checkpoint.enable", "true",
        "--metrics.enable_tensorboard", "false", "--data.default_num_documents", "500", "--training.seq_len", "128",
        "--training.micro_batch_size", "2", "--training.global_batch_tokens", "256",
        "--lr_schedule.warmup_tokens", "768"])
    records = train(config)
    assert records[-1]["loss"] < records[0]["loss"] - 2  # trained: far from the uniform 7.6
    return folder / "checkpoint" / "step-00000012"


@pytest.mark.slow
@pytest.mark.parametrize("rope", [{}, {"rope_scaling": "yarn", "rope_scaling_factor": 2.0,
                                       "rope_original_max_position": 4096}], ids=["plain", "yarn"])
def test_trained_debug_model_runs_the_same_in_transformers(trained_debug_checkpoint, tmp_path, rope):
    """Issue 11 (a): logits within 1e-4 in float32 and equal greedy tokens at positions 0..8191."""
    weights, meta = load_model_weights(trained_debug_checkpoint)
    config = load_config("debug_model", ["--model.vocab_size", str(meta["config"]["model"]["vocab_size"])])
    for key, value in rope.items():
        setattr(config.model, key, value)
    checkpoint = save_model_checkpoint(weights, tmp_path / "ckpt", 12, config)
    export_to_hf(checkpoint, tmp_path / "hf")
    model, _ = titanlite_model(checkpoint, 8192)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.tensor([build_tokenizer("default").encode(MULTILINGUAL * 80)[:8192]])
    assert tokens.shape == (1, 8192)
    with torch.no_grad():
        compare_logits(model(tokens), hf_model(tokens).logits)


# --- import ----------------------------------------------------------------------------------

def old_layout(hf: dict, type_key: str = "rope_type") -> dict:
    """config.json as transformers < 5 wrote it: rope_theta and rope_scaling at the top level."""
    hf = dict(hf)
    params = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    hf["rope_scaling"] = None if kind == "default" else {type_key: kind, **params}
    return hf


HF_CASES = {
    "theta-500k": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                  "original_max_position_embeddings": 32, "beta_fast": 16.0, "beta_slow": 2.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0}),
    "tied": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True),
}


@pytest.mark.parametrize("layout", ["transformers-5", "transformers-4"])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_import_random_hf_llama_computes_what_transformers_computes(tmp_path, case, layout):
    """Issue 11 (b): both config layouts; positions past the original context, so scaling matters."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                                         max_position_embeddings=256, initializer_range=0.05, **HF_CASES[case])
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # sharded: several files and an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    if layout == "transformers-4":
        path = tmp_path / "hf" / "config.json"
        path.write_text(json.dumps(old_layout(json.loads(path.read_text()), "type" if case == "yarn" else "rope_type")))
    imported = import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None))
    model, config = titanlite_model(imported, 256)
    kind = HF_CASES[case]["rope_parameters"]["rope_type"]
    assert config.model.rope_scaling == {"default": "none"}.get(kind, kind)
    assert config.model.rope_theta == HF_CASES[case]["rope_parameters"]["rope_theta"]
    tokens = torch.randint(0, 2048, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compare_logits(model(tokens), hf_model(tokens).logits)


def test_import_takes_the_folders_tokenizer_or_refuses_it(tmp_path, capsys):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=2048)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None))
    assert "has no tokenizer.json; the checkpoint records tokenizer.path=default" in capsys.readouterr().err
    write_hf_tokenizer(build_tokenizer("default").byte_pair_encoding(), tmp_path / "hf", model_max_length=64)
    _, meta = load_model_weights(import_from_hf(tmp_path / "hf", tmp_path / "out2", load_config(None)))
    assert meta["config"]["tokenizer"]["path"] == str((tmp_path / "hf" / "tokenizer.json").resolve())
    tokenizer_json = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    tokenizer_json["normalizer"] = {"type": "NFC"}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(ConvertError, match="tokenizer.json: normalizer 'NFC'.*pass --tokenizer.path"):
        import_from_hf(tmp_path / "hf", tmp_path / "out3", load_config(None))


def test_bad_hf_input_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    export_to_hf(path, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**good, "attention_bias": True}))
    with pytest.raises(SystemExit) as exit_info:
        main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("titanlite.convert: " + str(config_path) + ": attention_bias=True: titanlite's "
                                       "Llama computes attention_bias=False only\n")
    config_path.write_text(json.dumps({**good, "num_hidden_layers": 3}))
    with pytest.raises(ConvertError, match="no tensor 'model.layers.2.self_attn.q_proj.weight'"):
        import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None))
    config_path.write_text(json.dumps({**good, "intermediate_size": 128}))
    with pytest.raises(ConvertError, match=r"gate_proj.weight has shape \[96, 64\], config.json implies \[128, 64\]"):
        import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None))
    config_path.write_text(json.dumps(good))
    # config.json itself is fine, but not with this command's TP degree: refused before anything is written
    with pytest.raises(ConvertError, match=rf"^{re.escape(str(config_path))}: model.n_kv_heads=2: "
                                           r"tensor_parallel_degree=4 must divide it"):
        import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None, ["--parallelism.tensor_parallel_degree", "4"]))
    assert not (tmp_path / "out").exists()
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ConvertError, match="model.safetensors: not a readable safetensors file"):
        import_from_hf(tmp_path / "hf", tmp_path / "out", load_config(None))
    assert not (tmp_path / "out").exists()  # nothing written


def test_to_hf_refuses_arguments_it_does_not_take(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["to-hf", str(path), str(tmp_path / "hf"), "--tokenizer.path", "other.json"])
    assert exit_info.value.code == 2
    assert "to-hf: unrecognized arguments: --tokenizer.path other.json" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_export_names_a_missing_tokenizer(tmp_path):
    config = load_config(None, TINY + ["--tokenizer.path", str(tmp_path / "gone.tiktoken")])
    model = build_model(config.model, 16, "cpu")
    model.init_weights(seed=0)
    path = save_model_checkpoint(model.state_dict(), tmp_path / "ckpt", 1, config)
    with pytest.raises(ConvertError, match="gone.tiktoken does not exist.*to-hf --tokenizer PATH"):
        export_to_hf(path, tmp_path / "hf")
    export_to_hf(path, tmp_path / "hf", tokenizer_path="default")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_seed_checkpoint_holds_the_initial_weights(tmp_path, capsys):
    main(["seed", str(tmp_path / "seed"), *TINY, "--training.seed", "11"])
    assert "step-00000000" in capsys.readouterr().out
    weights, meta = load_model_weights(tmp_path / "seed" / "step-00000000")
    assert meta["model_only"] and meta["step"] == 0
    model = build_model(load_config(None, TINY).model, 16, "cpu")
    model.init_weights(seed=11)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[n], t) for n, t in model.state_dict().items())


def test_to_hf_loads_a_checkpoint_without_checksums_only_with_load_unverified(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    meta = json.loads((path / "meta.json").read_text())
    del meta["crc32"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        main(["to-hf", str(path), str(tmp_path / "hf")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and "--load-unverified" in error
    assert not (tmp_path / "hf").exists()
    main(["to-hf", str(path), str(tmp_path / "hf"), "--load-unverified"])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_seed_and_import_refuse_to_replace_a_checkpoint_unless_overwrite(checkpoint, tmp_path, capsys):
    main(["seed", str(tmp_path / "seed"), *TINY, "--training.seed", "1"])
    first, _ = load_model_weights(tmp_path / "seed" / "step-00000000")
    with pytest.raises(SystemExit) as exit_info:
        main(["seed", str(tmp_path / "seed"), *TINY, "--training.seed", "2"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error == (f"titanlite.convert: {tmp_path / 'seed' / 'step-00000000'} already "
                                                   "exists: pass --overwrite to replace it, or choose another "
                                                   "OUT_FOLDER\n")
    assert all(torch.equal(t, load_model_weights(tmp_path / "seed" / "step-00000000")[0][n]) for n, t in first.items())
    main(["seed", str(tmp_path / "seed"), *TINY, "--training.seed", "2", "--overwrite"])
    second, _ = load_model_weights(tmp_path / "seed" / "step-00000000")
    assert not torch.equal(first["output.weight"], second["output.weight"])
    path, _ = checkpoint
    export_to_hf(path, tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "seed")])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "seed"), "--overwrite"])
    imported, _ = load_model_weights(tmp_path / "seed" / "step-00000000")
    assert torch.equal(imported["output.weight"], load_model_weights(path)[0]["output.weight"])


def read_only_below(folder, monkeypatch):
    """Storage mounted read-only at `folder` (tests run as root, which file modes do not stop)."""
    import errno
    from pathlib import Path

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == folder or folder in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("command", ["to-hf", "seed"])
def test_unusable_output_paths_are_one_line(checkpoint, tmp_path, capsys, monkeypatch, command):
    path, _ = checkpoint
    (tmp_path / "a_file").write_text("keep me")
    head = ["to-hf", str(path)] if command == "to-hf" else ["seed"]
    tail = [] if command == "to-hf" else TINY
    key = "OUT_DIR" if command == "to-hf" else "OUT_FOLDER"
    for out, words in ((tmp_path / "a_file", "is a file, not a folder"),
                       (tmp_path / "ro" / "out", "is not writable (Read-only file system)")):
        read_only_below(tmp_path / "ro", monkeypatch)
        with pytest.raises(SystemExit) as exit_info:
            main([*head, str(out), *tail])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith(f"titanlite.convert: {key} {out} {words}"), error
        assert error.count("\n") == 1
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_to_hf_on_a_full_disk_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):  # what safetensors raises when the disk fills up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    path, _ = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["to-hf", str(path), str(tmp_path / "hf")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"titanlite.convert: cannot write the export to {tmp_path / 'hf'} (No space left on "
                            "device (os error 28))"), error


def test_seed_on_a_full_disk_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    import errno
    from contextlib import contextmanager

    from torch.distributed.checkpoint import filesystem

    class FullDisk:  # a file whose every write fails as on a full disk
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

    original = filesystem.FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        with original(self, path, mode) as stream:
            yield FullDisk(stream) if "w" in mode else stream

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)
    with pytest.raises(SystemExit) as exit_info:
        main(["seed", str(tmp_path / "seed"), *TINY])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"titanlite.convert: cannot write checkpoint {tmp_path / 'seed' / 'step-00000000'}: No "
                            "space left on device"), error
    assert list((tmp_path / "seed").iterdir()) == []  # the partial folder's space is given back


def test_exported_files_get_the_normal_permissions(checkpoint, tmp_path):
    import os
    import stat

    path, _ = checkpoint
    old = os.umask(0o022)
    try:
        export_to_hf(path, tmp_path / "hf", max_shard_bytes=2**20)  # sharded: every shard, the index too
    finally:
        os.umask(old)
    files = sorted((tmp_path / "hf").iterdir())
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}


# --- training on from an import ------------------------------------------------------------------

def test_training_from_an_import_refuses_other_rope_and_eps_then_computes_the_hf_model(tmp_path):
    """Issue 21 item 7: an imported Llama (rope_theta 500000, llama3 scaling, norm_eps 1e-6) given as
    initial_load_path to a run with the default RoPE and eps trained silently as another model (logits off by
    3e-2). Now it is refused in one line naming each setting; the overrides it names give HF's logits."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                                         max_position_embeddings=64, rms_norm_eps=1e-6,
                                         **HF_CASES["llama3"])
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "imported")])
    from titanlite.config.settings import ConfigError
    from titanlite.train import train

    start = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
             "--model.intermediate_size", "96", "--model.vocab_size", "2048", "--training.seq_len", "64",
             "--training.micro_batch_size", "2", "--training.global_batch_tokens", "128", "--training.steps", "1",
             "--training.device", "cpu", "--training.mixed_precision", "fp32", "--metrics.enable_tensorboard",
             "false", "--lr_schedule.warmup_tokens", "0", "--data.default_num_documents", "50",
             "--checkpoint.initial_load_path", str(tmp_path / "imported" / "step-00000000")]
    with pytest.raises(ConfigError) as refused:
        train(load_config(None, [*start, "--job.dump_folder", str(tmp_path / "refused")]))
    message = str(refused.value)
    assert "\n" not in message
    for setting in ("model.norm_eps=1e-06 (this run: 1e-05)", "model.rope_theta=500000.0 (this run: 10000.0)",
                    "model.rope_scaling=llama3 (this run: none)", "model.rope_scaling_factor=8.0 (this run: 1.0)",
                    "model.rope_original_max_position=32 (this run: 4096)"):
        assert setting in message
    assert "rope_low_freq_factor" not in message  # 1.0 and 4.0 on both sides: nothing to name

    # the overrides the line names, pasted: the run computes the HF model (lr ~0 keeps the weights bitwise)
    pasted = re.search(r"pass (.*?) \(or set them", message).group(1).split()
    run = tmp_path / "pasted"
    train(load_config(None, [*start, *pasted, "--job.dump_folder", str(run), "--optimizer.lr", "1e-30",
                             "--checkpoint.enable", "true"]))
    model, config = titanlite_model(run / "checkpoint" / "step-00000001", 64)
    assert (config.model.rope_theta, config.model.norm_eps, config.model.rope_scaling) == (500000.0, 1e-6, "llama3")
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compare_logits(model(tokens), hf_model(tokens).logits, bound=1e-5)

    # a longer context's RoPE, on purpose: the run's settings apply and are recorded
    changed = tmp_path / "changed"
    train(load_config(None, [*start, "--job.dump_folder", str(changed), "--checkpoint.initial_load_change_model",
                             "true", "--checkpoint.enable", "true"]))
    _, meta = load_model_weights(changed / "checkpoint" / "step-00000001")
    assert meta["config"]["model"]["rope_theta"] == 10000.0
