"""Hugging Face Llama `config.json` <-> titanlite's [model] config, refusing what titanlite cannot compute.

Reading takes both RoPE layouts: transformers < 5 writes `rope_theta` and `rope_scaling` at the
top level; transformers >= 5 writes `rope_parameters` (with `rope_theta` inside). Reading mirrors
transformers' own precedence and defaults (`standardize_rope_params`, `_compute_yarn_parameters`,
`_compute_llama3_parameters`). Every key of config.json is either interpreted, known not to change
what the model computes (metadata, generation and cache settings), or refused: an unknown key
might change the math, and a silently different model is worse than an error.

Writing emits both RoPE layouts with the same content, so transformers 4 and 5 (and tools that
read `rope_scaling`, such as vLLM) all run the same frequencies; for YaRN, max_position_embeddings
is exactly factor x original_max_position_embeddings, the ratio some transformers versions read
the factor from.
"""

from __future__ import annotations

import math

from titanlite.config.settings import Config, Model
from titanlite.model.rope import yarn_attention_factor


class HFConfigError(ValueError):
    """A config.json titanlite cannot express; the message names the key and the value."""


# Keys that play no part in the forward pass of LlamaForCausalLM (or only its rounding, as
# pretraining_tp's split matmuls): metadata, token ids, generation and output settings.
INERT_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict",
    "torchscript", "id2label", "label2id", "problem_type", "tokenizer_class", "finetuning_task", "prefix",
    "task_specific_params", "chunk_size_feed_forward", "tf_legacy_loss", "use_bfloat16", "is_encoder_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# Keys read below; each is either mapped onto the [model] config or checked to be neutral.
INTERPRETED_KEYS = frozenset({
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "attention_dropout", "rope_theta", "rope_scaling", "rope_parameters",
    "partial_rotary_factor", "original_max_position_embeddings", "max_position_embeddings", "initializer_range",
    # neutral at their default values, refused otherwise
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "cross_attention_hidden_size",
})
NEUTRAL_DEFAULTS = {"is_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False,
                    "pruned_heads": {}, "cross_attention_hidden_size": None, "attention_bias": False,
                    "mlp_bias": False, "attention_dropout": 0.0, "partial_rotary_factor": 1.0, "hidden_act": "silu"}


def hf_config(config: Config, bos_id: int | None, eos_id: int | None, dtype_name: str) -> dict:
    """config.json of a LlamaForCausalLM that computes what titanlite's model computes."""
    model = config.model
    context = config.training.seq_len
    scaled_context = model.rope_scaling_factor * model.rope_original_max_position
    if model.rope_scaling == "yarn":
        # transformers 4.4x-4.5x take YaRN's factor as max_position_embeddings / original whenever the
        # scaling names original_max_position_embeddings: the context must be exactly factor x original.
        if scaled_context != round(scaled_context):
            raise HFConfigError(f"model.rope_scaling_factor={model.rope_scaling_factor} x rope_original_max_position="
                                f"{model.rope_original_max_position} is not a whole context, which transformers reads "
                                "back as another YaRN factor: export a factor for which it is")
        context = round(scaled_context)
    elif model.rope_scaling == "llama3":  # the context the scaling is for, as HF configs state it
        context = max(context, round(scaled_context))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": model.dim,
          "intermediate_size": model.intermediate_size, "num_hidden_layers": model.n_layers,
          "num_attention_heads": model.n_heads, "num_key_value_heads": model.n_kv_heads,
          "head_dim": model.dim // model.n_heads, "hidden_act": "silu", "rms_norm_eps": model.norm_eps,
          "vocab_size": model.vocab_size, "tie_word_embeddings": False, "attention_bias": False,
          "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": model.init_std,
          "max_position_embeddings": context,
          "bos_token_id": bos_id, "eos_token_id": eos_id,
          "dtype": dtype_name, "torch_dtype": dtype_name}  # transformers >= 4.56 reads dtype, older torch_dtype
    scaling = None
    if model.rope_scaling == "yarn":
        scaling = {"rope_type": "yarn", "factor": model.rope_scaling_factor,
                   "original_max_position_embeddings": model.rope_original_max_position,
                   "beta_fast": model.rope_beta_fast, "beta_slow": model.rope_beta_slow, "truncate": True}
    elif model.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                   "original_max_position_embeddings": model.rope_original_max_position,
                   "low_freq_factor": model.rope_low_freq_factor, "high_freq_factor": model.rope_high_freq_factor}
    hf["rope_theta"], hf["rope_scaling"] = model.rope_theta, scaling  # transformers < 5
    hf["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": model.rope_theta}  # >= 5
    return hf


def _rope_parameters(hf: dict) -> dict:
    """One flat dict (rope_type, rope_theta, scaling keys) from either layout; refuses conflicts."""
    new, old = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if not isinstance(new, dict) or not isinstance(old, dict):
        raise HFConfigError(f"rope_parameters={new!r} / rope_scaling={old!r}: expected a JSON object")
    if any(isinstance(value, dict) for value in new.values()):
        raise HFConfigError(f"rope_parameters has one entry per layer type ({sorted(new)}): a Llama has one RoPE")

    def normalized(params: dict) -> dict:
        params = {key: value for key, value in params.items() if key != "rope_theta"}
        params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
        return params

    if new and old and normalized(new) != normalized(old):
        raise HFConfigError(f"rope_scaling={old} and rope_parameters={new} disagree: transformers 4 and 5 would "
                            "run different models; keep one of them")
    params = normalized(old or new)
    thetas = {value for value in (new.get("rope_theta"), old.get("rope_theta"), hf.get("rope_theta"))
              if value is not None}
    if len(thetas) > 1:
        raise HFConfigError(f"rope_theta has several values {sorted(thetas)} (top level and rope_parameters): "
                            "keep one")
    params["rope_theta"] = float(thetas.pop()) if thetas else 10000.0
    return params


def _original_context(hf: dict, params: dict) -> int:
    """transformers' precedence: a top-level original_max_position_embeddings, then the scaling dict's."""
    value = (hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
             or hf.get("max_position_embeddings"))
    if not value:
        raise HFConfigError(f"rope type {params['rope_type']!r} without original_max_position_embeddings")
    return int(value)


def _apply_rope(hf: dict, model: Model) -> None:
    params = _rope_parameters(hf)
    model.rope_theta, kind = params["rope_theta"], params["rope_type"]
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFConfigError(f"partial_rotary_factor={params['partial_rotary_factor']}: titanlite rotates the "
                            "whole head")
    model.rope_scaling = "none"
    if kind == "default":
        return
    if kind not in ("yarn", "llama3"):
        raise HFConfigError(f"rope type {kind!r}: titanlite computes default, yarn and llama3 RoPE only")
    original = _original_context(hf, params)
    factor = params.get("factor")
    if factor is None and kind == "yarn" and hf.get("max_position_embeddings"):  # transformers: the contexts' ratio
        factor = hf["max_position_embeddings"] / original
    if factor is None:
        raise HFConfigError(f"rope type {kind!r} without 'factor'")
    model.rope_scaling, model.rope_scaling_factor = kind, float(factor)
    model.rope_original_max_position = original
    if kind == "llama3":
        missing = [key for key in ("low_freq_factor", "high_freq_factor") if params.get(key) is None]
        if missing:
            raise HFConfigError(f"rope type 'llama3' without {missing[0]!r}")
        model.rope_low_freq_factor = float(params["low_freq_factor"])
        model.rope_high_freq_factor = float(params["high_freq_factor"])
        return
    model.rope_beta_fast = float(params.get("beta_fast") or 32.0)  # transformers' `or`: 0 means the default
    model.rope_beta_slow = float(params.get("beta_slow") or 1.0)
    if params.get("truncate", True) is not True:
        raise HFConfigError(f"yarn truncate={params['truncate']}: titanlite rounds the ramp's bounds (truncate=true)")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:  # transformers' get_mscale, with DeepSeek's mscale / mscale_all_dim ratio
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else get_mscale(factor))
    if not math.isclose(attention_factor, yarn_attention_factor(factor), rel_tol=1e-12):
        raise HFConfigError(f"yarn attention factor {attention_factor} (attention_factor/mscale keys): titanlite "
                            f"uses 0.1 ln(factor) + 1 = {yarn_attention_factor(factor)}")


def apply_hf_config(hf: dict, config: Config) -> None:
    """Set config.model from an HF Llama config.json; HFConfigError for anything titanlite cannot express."""
    unknown = sorted(set(hf) - INERT_KEYS - INTERPRETED_KEYS)
    if unknown:
        raise HFConfigError(f"key {unknown[0]!r} (= {hf[unknown[0]]!r}) is unknown to titanlite's converter and may "
                            "change what the model computes; remove it if you know it does not")
    if hf.get("model_type") != "llama" or hf.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        raise HFConfigError(f"model_type={hf.get('model_type')!r}, architectures={hf.get('architectures')}: "
                            "only LlamaForCausalLM converts")
    for key, neutral in NEUTRAL_DEFAULTS.items():
        if hf.get(key, neutral) != neutral:
            raise HFConfigError(f"{key}={hf[key]!r}: titanlite's Llama computes {key}={neutral!r} only")
    model = config.model
    try:
        model.dim, model.n_layers = hf["hidden_size"], hf["num_hidden_layers"]
        model.n_heads, model.intermediate_size = hf["num_attention_heads"], hf["intermediate_size"]
        model.vocab_size = hf["vocab_size"]
    except KeyError as error:
        raise HFConfigError(f"no {error.args[0]!r}") from None
    model.n_kv_heads = hf.get("num_key_value_heads") or model.n_heads
    model.norm_eps = hf.get("rms_norm_eps", 1e-6)
    model.init_std = hf.get("initializer_range", model.init_std)
    if hf.get("head_dim") not in (None, model.dim // model.n_heads):
        raise HFConfigError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = "
                            f"{model.dim // model.n_heads}: titanlite derives head_dim")
    _apply_rope(hf, model)
