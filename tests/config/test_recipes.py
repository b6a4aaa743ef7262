"""The six recipe files hold every value of the seed's Tables A and B (SPEC), and their
comments state the values titanlite derives at 64 GPUs."""

import re

import pytest

from titanlite.config.load import CONFIG_DIR, load_config
from titanlite.config.resolve import resolve

# Table A (4k) per model size; Table B changes only what TABLE_B lists.
TABLE_A = {
    "3b": dict(dim=3200, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=8640,
               global_batch_tokens=2_097_152, micro_batch_size=8, lr=3.0e-4, warmup_tokens=2_000_000_000,
               activation_checkpointing=False),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=11008,
               global_batch_tokens=4_194_304, micro_batch_size=4, lr=3.0e-4, warmup_tokens=3_000_000_000,
               activation_checkpointing=True),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, intermediate_size=13824,
                global_batch_tokens=4_194_304, micro_batch_size=2, lr=1.5e-4, warmup_tokens=3_000_000_000,
                activation_checkpointing=True),
}
TABLE_B = {"3b": dict(micro_batch_size=4, activation_checkpointing=True),
           "7b": dict(micro_batch_size=2, activation_checkpointing=True),
           "13b": dict(micro_batch_size=1, activation_checkpointing=True)}
MICRO_BATCH_TOKENS = {"3b": 32_768, "7b": 16_384, "13b": 8_192}  # mu_tok, the same in both tables
ACCUM_AT_64_GPUS = {"3b": 8, "7b": 32, "13b": 64}  # SPEC's corrected A = GB_tok / (mu_tok x DP 8)
RECIPES = [(size, context) for size in TABLE_A for context in ("4k", "8k")]


def expected(size, context):
    values = dict(TABLE_A[size])
    if context == "8k":
        values.update(TABLE_B[size])
    return values


@pytest.mark.parametrize("size,context", RECIPES)
def test_recipe_holds_every_table_value(size, context):
    config = load_config(f"{size}_{context}.toml")
    table = expected(size, context)
    model, train, opt = config.model, config.training, config.optimizer
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size"):
        assert getattr(model, key) == table[key], key
    assert model.vocab_size == 128_256 and config.tokenizer.path == "tokenizer.model"
    assert train.seq_len == {"4k": 4096, "8k": 8192}[context]
    assert train.total_tokens == 1_000_000_000_000 and train.steps == 0
    assert train.global_batch_tokens == table["global_batch_tokens"]
    assert train.micro_batch_size == table["micro_batch_size"]
    assert train.micro_batch_size * train.seq_len == MICRO_BATCH_TOKENS[size]
    assert (opt.name, opt.beta1, opt.beta2, opt.eps) == ("adamw", 0.9, 0.95, 1e-8)
    assert opt.lr == table["lr"] and opt.weight_decay == 0.1
    assert config.lr_schedule.min_lr_ratio == 0.1 and config.lr_schedule.decay == "cosine"
    assert config.lr_schedule.warmup_tokens == table["warmup_tokens"]
    assert train.grad_clip == 1.0 and train.mixed_precision == "bf16"
    assert (config.activation_checkpoint.mode != "none") == table["activation_checkpointing"]
    par = config.parallelism
    assert (par.tensor_parallel_degree, par.data_parallel_shard_degree, par.data_parallel_replicate_degree) == (8, -1, 1)
    if context == "8k":
        assert (model.rope_scaling, model.rope_scaling_factor, model.rope_original_max_position) == ("yarn", 2.0, 4096)
        assert (model.rope_beta_fast, model.rope_beta_slow) == (32.0, 1.0)  # the YaRN paper's LLaMA values
    else:
        assert model.rope_scaling == "none"


@pytest.mark.parametrize("size,context", RECIPES)
def test_derived_values_at_64_gpus_and_the_comments_that_state_them(size, context):
    config = load_config(f"{size}_{context}.toml")
    derived = resolve(config, 64, 128256)
    gb = config.training.global_batch_tokens
    assert derived.layout.data_parallel_degree == 8
    assert derived.grad_accum_steps == ACCUM_AT_64_GPUS[size]
    # 1T / GB_tok = 476,837.16 (3B) or 238,418.58 (7B, 13B): SPEC's steps, to the nearest step.
    assert derived.total_steps == {"3b": 476_837, "7b": 238_419, "13b": 238_419}[size] == round(1e12 / gb)
    # 2B / 2,097,152 = 953.67 and 3B / 4,194,304 = 715.26: SPEC's 954 and 715.
    assert derived.warmup_steps == {"3b": 954, "7b": 715, "13b": 715}[size]
    text = (CONFIG_DIR / f"{size}_{context}.toml").read_text()
    assert f"= {derived.grad_accum_steps}\n" in text
    assert re.search(rf"total steps = .* = {derived.total_steps:,}\n", text)
    assert re.search(rf"warmup steps = .* = {derived.warmup_steps:,}\n", text)


def test_recipes_need_the_64_gpu_mesh():
    # TP 8 needs a multiple of 8 processes, and GB_tok must divide over the data-parallel ranks.
    config = load_config("7b_4k.toml")
    assert resolve(config, 8, 128256).grad_accum_steps == 256  # one node: DP 1
    with pytest.raises(Exception, match="tensor_parallel_degree=8"):
        resolve(config, 12, 128256)
