"""The resolved run: every value derived from the config, the world size, the tokenizer and the device, once.

`resolve()` turns a loaded config into a `Run`: the mesh shape, gradient accumulation, total and
warmup steps, vocabulary size, attention head dim and dtype. The loaded config is never changed:
`Run.config` is a copy whose model fields are all concrete, and `Run.to_dict()` is what the run
folder's config.json and every checkpoint's meta.json record. Like config.py, no torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from titanlite.config import validate
from titanlite.settings import Config, ConfigError, Parallelism


@dataclass(frozen=True)
class Run:
    """The run as it will execute: the config with every 'auto' made concrete, and the derived values.

    Computed once by `resolve()`; printed at start, written to <run>/config.json and every checkpoint.
    """

    config: Config  # a resolved copy: model.vocab_size > 0 and model.attention_head_dim >= the head dim
    world_size: int
    replicate: int  # HSDP replicas
    shard: int  # FSDP shards
    tensor: int  # TP degree
    data_parallel_degree: int  # replicate x shard: ranks that read different data
    tokens_per_micro_batch: int  # per rank
    grad_accum_steps: int  # A = global_batch_tokens / (micro_batch x seq_len x DP)
    tokens_per_step: int  # = global_batch_tokens
    total_steps: int
    warmup_steps: int
    total_tokens: int  # tokens the run will consume: total_steps x tokens_per_step
    device_type: str  # cpu | cuda
    compute_dtype: str  # bfloat16 | float32: what matmuls and attention run in

    def derived(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "config"}

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "derived": self.derived()}


def data_parallel_shape(parallelism: Parallelism, world_size: int) -> tuple[int, int, int]:
    """(replicate, shard, tensor) degrees for `world_size` processes; ConfigError if they don't fit."""
    tp, replicate = parallelism.tensor_parallel_degree, parallelism.data_parallel_replicate_degree
    shard = parallelism.data_parallel_shard_degree
    if shard == -1:
        if world_size % (tp * replicate):
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_parallel_degree={tp} x "
                f"data_parallel_replicate_degree={replicate}: launch a multiple of {tp * replicate} processes")
        shard = world_size // (tp * replicate)
    if replicate * shard * tp != world_size:
        raise ConfigError(
            f"parallelism: replicate {replicate} x shard {shard} x tensor {tp} = {replicate * shard * tp} "
            f"!= world size {world_size}: set parallelism.data_parallel_shard_degree=-1 or launch "
            f"{replicate * shard * tp} processes")
    return replicate, shard, tp


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Steps that consume `tokens`, rounded to the nearest step (1T / 2,097,152 = 476,837;
    3B / 4,194,304 = 715; 2B / 2,097,152 = 954). Integer arithmetic: exact for any budget."""
    return (tokens + tokens_per_step // 2) // tokens_per_step


def compute_dtype(config: Config, device_type: str) -> str:
    """bfloat16 on CUDA when training.mixed_precision is bf16; float32 otherwise (CPU runs are for tests)."""
    return "bfloat16" if device_type == "cuda" and config.training.mixed_precision == "bf16" else "float32"


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple (embedding rows; TP needs it divisible)."""
    return -(-vocab_size // multiple) * multiple


def concrete_config(config: Config, tokenizer_vocab_size: int, attention_head_dim: int | None = None) -> Config:
    """A validated copy of `config` with model.vocab_size and model.attention_head_dim made concrete.

    tokenizer_vocab_size: ids the tokenizer can produce (model.vocab_size = 0 pads it to a multiple
    of tokenizer.vocab_multiple). attention_head_dim: what the start-up kernel probe chose
    (attention.choose_attention_head_dim); None keeps model.attention_head_dim, 0 = the true head dim.
    """
    model = config.model
    vocab_size = model.vocab_size or padded_vocab_size(tokenizer_vocab_size, config.tokenizer.vocab_multiple)
    if vocab_size < tokenizer_vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab_size} ids: set model.vocab_size=0 to derive it")
    head_dim = attention_head_dim if attention_head_dim is not None else model.attention_head_dim
    resolved = copy.deepcopy(config)
    resolved.model.vocab_size = vocab_size
    resolved.model.attention_head_dim = head_dim or model.dim // model.n_heads
    validate(resolved)
    return resolved


def uses_float8_all_gather(config: Config, fsdp_shard: int) -> bool:
    """FSDP gathers weights in float8: tensorwise recipe, the setting on, and weights sharded (FSDP shard > 1)."""
    settings = config.float8
    return settings.enable and settings.recipe == "tensorwise" and settings.fsdp_float8_all_gather and fsdp_shard > 1


def check_device_features(config: Config, world_size: int, device_type: str, shard: int = 1) -> None:
    """What the device, the number of ranks and the FSDP shard degree decide: CPU-offloaded AdamW, float8."""
    if config.optimizer.cpu_offload and world_size > 1:
        raise ConfigError(f"optimizer.cpu_offload=true is for one GPU (torchao's CPUOffloadOptimizer), not "
                          f"{world_size} ranks: use parallelism.fsdp_cpu_offload=true instead")
    if config.optimizer.cpu_offload and device_type != "cuda":
        raise ConfigError("optimizer.cpu_offload=true needs a CUDA device (it offloads GPU state to the host): "
                          "set optimizer.cpu_offload=false")
    float8 = config.float8
    if float8.enable and device_type != "cuda" and not float8.emulate:
        raise ConfigError(f"float8.enable=true needs a CUDA GPU (H100 or newer); on {device_type} set "
                          "float8.enable=false (float8.emulate=true only for tests)")
    if config.optimizer.name == "adamw8bit" and uses_float8_all_gather(config, shard):
        # torchao's compiled 8-bit update crashes (SIGSEGV) on the float8 all-gather's weight wrapper
        # (measured on CPU, torch 2.13, torchao 0.18); with bf16 all-gathers the two work together.
        raise ConfigError("optimizer.name=adamw8bit cannot update the float8 all-gather's weights: set "
                          "float8.fsdp_float8_all_gather=false (or optimizer.name=adamw)")
    if float8.enable and not config.compile.enable:
        logging.getLogger("titanlite").warning(
            "float8.enable=true without compile.enable: float8 casts run as separate eager kernels, slower than "
            "bf16; set compile.enable=true")


def resolve(config: Config, world_size: int, tokenizer_vocab_size: int, device_type: str = "cpu",
            attention_head_dim: int | None = None) -> Run:
    """Every derived value of the run, computed once; `config` itself is left unchanged.
    tokenizer_vocab_size and attention_head_dim: see concrete_config."""
    replicate, shard, tensor = data_parallel_shape(config.parallelism, world_size)
    dp, train = replicate * shard, config.training
    tokens_per_micro_batch = train.micro_batch_size * train.seq_len
    if train.global_batch_tokens % (tokens_per_micro_batch * dp):
        raise ConfigError(
            f"training.global_batch_tokens={train.global_batch_tokens}: must be a multiple of "
            f"micro_batch_size {train.micro_batch_size} x seq_len {train.seq_len} x data-parallel degree {dp} "
            f"= {tokens_per_micro_batch * dp}")
    if train.total_tokens == 0 and train.steps == 0:
        raise ConfigError("training.total_tokens=0 and training.steps=0: set one of them")
    check_device_features(config, world_size, device_type, shard)
    resolved = concrete_config(config, tokenizer_vocab_size, attention_head_dim)
    total_steps = train.steps or max(1, steps_for_tokens(train.total_tokens, train.global_batch_tokens))
    return Run(
        config=resolved, world_size=world_size, replicate=replicate, shard=shard, tensor=tensor,
        data_parallel_degree=dp, tokens_per_micro_batch=tokens_per_micro_batch,
        grad_accum_steps=train.global_batch_tokens // (tokens_per_micro_batch * dp),
        tokens_per_step=train.global_batch_tokens, total_steps=total_steps,
        warmup_steps=steps_for_tokens(config.lr_schedule.warmup_tokens, train.global_batch_tokens),
        total_tokens=total_steps * train.global_batch_tokens, device_type=device_type,
        compute_dtype=compute_dtype(config, device_type))


def render(run: Run) -> str:
    """The resolved config as TOML, then the derived values as comments."""
    lines = []
    for section, values in run.config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    lines.append("# derived")
    lines += [f"# {key} = {value:,}" if isinstance(value, int) else f"# {key} = {value}"
              for key, value in run.derived().items()]
    return "\n".join(lines)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
