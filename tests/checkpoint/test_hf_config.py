"""config.json -> [model]: both RoPE layouts read as transformers reads them; the rest refused."""

import math

import pytest

from titanlite.checkpoint.hf_config import HFConfigError, apply_hf_config, hf_config
from titanlite.config.load import load_config

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "use_cache": True}
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}


def imported(**changes):
    config = load_config(None, ["--training.steps", "1"])
    apply_hf_config({**BASE, **changes}, config)
    return config.model


def test_both_layouts_read_the_same_model():
    new = imported(rope_parameters={**YARN, "rope_theta": 500000.0, "beta_fast": 16, "beta_slow": 2})
    old = imported(rope_theta=500000.0, rope_scaling={"type": "yarn", "factor": 2.0, "beta_fast": 16, "beta_slow": 2,
                                                      "original_max_position_embeddings": 4096})
    assert new == old
    assert (new.rope_theta, new.rope_scaling, new.rope_scaling_factor, new.rope_original_max_position) == (
        500000.0, "yarn", 2.0, 4096)
    assert (new.rope_beta_fast, new.rope_beta_slow, new.n_kv_heads, new.norm_eps) == (16.0, 2.0, 2, 1e-5)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    assert imported(rope_parameters={**llama3, "rope_theta": 500000.0}) == imported(rope_theta=500000.0,
                                                                                     rope_scaling=llama3)
    model = imported(rope_scaling=llama3)
    assert (model.rope_scaling, model.rope_low_freq_factor, model.rope_high_freq_factor) == ("llama3", 1.0, 4.0)
    assert imported().rope_theta == 10000.0 and imported().rope_scaling == "none"  # transformers' defaults


def test_transformers_defaults_and_precedence():
    # yarn without a factor: the ratio of the contexts; a top-level original_max_position_embeddings wins
    model = imported(rope_scaling={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 2048})
    assert model.rope_scaling_factor == 4.0
    model = imported(original_max_position_embeddings=1024, rope_scaling=YARN)
    assert model.rope_original_max_position == 1024
    model = imported(rope_scaling={"rope_type": "yarn", "factor": 2.0})  # original defaults to max_position_embeddings
    assert model.rope_original_max_position == 8192
    default_factor = 0.1 * math.log(2.0) + 1  # stated explicitly: the same as leaving it out
    model = imported(rope_scaling={**YARN, "beta_fast": None, "truncate": True, "attention_factor": default_factor})
    assert model.rope_beta_fast == 32.0  # transformers: `beta_fast or 32`
    assert imported(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_theta=1e6).rope_theta == 1e6


def test_export_then_import_is_the_same_model():
    for overrides in ([], ["--model.rope_scaling", "yarn", "--model.rope_scaling_factor", "4"],
                      ["--model.rope_scaling", "llama3", "--model.rope_scaling_factor", "8"]):
        config = load_config(None, ["--training.steps", "1", "--model.vocab_size", "512", *overrides])
        hf = hf_config(config, 1, 2, "float32")
        assert hf["rope_scaling"] == ({k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
                                      if overrides else None)
        back = load_config(None, ["--training.steps", "1"])
        apply_hf_config(hf, back)
        assert back.model == config.model


def test_yarn_export_states_the_context_its_factor_is_read_back_from():
    """transformers 4.4x-4.5x read YaRN's factor as max_position_embeddings / original_max_position_embeddings
    when the scaling states the latter: that ratio must be the factor, whatever seq_len was trained."""
    yarn = ["--model.rope_scaling", "yarn", "--model.rope_original_max_position", "4096"]
    config = load_config(None, ["--training.seq_len", "16384", "--model.rope_scaling_factor", "2", *yarn])
    hf = hf_config(config, 1, 2, "float32")
    assert hf["max_position_embeddings"] / hf["rope_scaling"]["original_max_position_embeddings"] == 2.0
    config = load_config(None, ["--model.rope_scaling_factor", "2.5", "--model.rope_original_max_position", "4097",
                                "--model.rope_scaling", "yarn"])
    with pytest.raises(HFConfigError, match=r"rope_scaling_factor=2.5 x rope_original_max_position=4097 is not a "
                                            r"whole context"):
        hf_config(config, 1, 2, "float32")


@pytest.mark.parametrize("changes,message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear': titanlite computes default, yarn"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}, "rope type 'longrope'"),
    ({"attention_bias": True}, "attention_bias=True: titanlite's Llama computes attention_bias=False only"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"head_dim": 32}, "head_dim=32 != hidden_size / num_attention_heads = 16"),
    ({"layer_norm_eps": 1e-5}, "key 'layer_norm_eps' .* is unknown to titanlite's converter and may change"),
    ({"quantization_config": {"quant_method": "fp8"}}, "key 'quantization_config'"),
    ({"sliding_window": 4096}, "key 'sliding_window'"),
    ({"model_type": "mistral"}, "model_type='mistral'.*only LlamaForCausalLM converts"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "only LlamaForCausalLM converts"),
    ({"rope_scaling": {**YARN, "truncate": False}}, "yarn truncate=False: titanlite rounds the ramp's bounds"),
    ({"rope_scaling": {**YARN, "attention_factor": 1.5}}, "yarn attention factor 1.5 .*0.1 ln\\(factor\\) \\+ 1"),
    ({"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}, "yarn attention factor 1.0 "),
    ({"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
     "rope_theta has several values"),
    ({"rope_scaling": YARN, "rope_parameters": {"rope_type": "default"}}, "disagree: transformers 4 and 5"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}},
     "one entry per layer type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3' without 'low_freq_factor'"),
])
def test_what_titanlite_cannot_compute_is_refused(changes, message):
    with pytest.raises(HFConfigError, match=message):
        imported(**changes)


def test_a_missing_size_is_named():
    config = load_config(None, ["--training.steps", "1"])
    with pytest.raises(HFConfigError, match="no 'hidden_size'"):
        apply_hf_config({key: value for key, value in BASE.items() if key != "hidden_size"}, config)
