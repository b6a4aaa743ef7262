"""The resolved run: every value derived from the config, the world size, the tokenizer and the device, once.

`resolve()` turns a loaded config into a `Run`: the layout of the ranks, gradient accumulation,
total and warmup steps, vocabulary size, attention head dim, compute dtype, and each decision
that depends on several settings at once (float8 all-gather, the AdamW update, the batch
fields). Nothing downstream recomputes them. The loaded config is never changed: `Run.config`
is a copy whose model fields are all concrete, and `Run.to_dict()` is what the run folder's
config.json and every checkpoint's meta.json record. Like load.py, no torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from titanlite.config.load import validate
from titanlite.config.settings import Config, ConfigError, Float8, Model, Parallelism, Training

# (model settings, TP degree, compute dtype name) -> the head dim attention runs at; on CUDA the
# start-up kernel probe (model/attention.py), which needs torch and a device, so it is passed in.
HeadDimProbe = Callable[[Model, int, str], int]
# A step's micro-batches are fetched before it runs: beyond this, host memory, not the config, is the limit.
MAX_GRAD_ACCUM_STEPS = 65536


@dataclass(frozen=True)
class Layout:
    """How the ranks split the work: HSDP replicas x FSDP shards x TP ranks (TP innermost, inside a node)."""

    replicate: int
    shard: int
    tensor: int

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard * self.tensor

    @property
    def data_parallel_degree(self) -> int:
        """Ranks that read different data (TP peers share theirs)."""
        return self.replicate * self.shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.data_parallel_degree > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tensor > 1

    @property
    def name(self) -> str:
        prefix = f"HSDP {self.replicate}x{self.shard}" if self.replicate > 1 else f"FSDP {self.shard}"
        return prefix if self.tensor == 1 else f"{prefix} x TP {self.tensor}"


@dataclass(frozen=True)
class Run:
    """The run as it will execute: the config with every 'auto' made concrete, and the derived values.

    Computed once by `resolve()`; printed at start, written to <run>/config.json and every checkpoint.
    """

    config: Config  # a resolved copy: model.vocab_size > 0 and model.attention_head_dim >= the head dim
    layout: Layout
    tokens_per_micro_batch: int  # per rank
    grad_accum_steps: int  # A = global_batch_tokens / (micro_batch x seq_len x DP)
    tokens_per_step: int  # = global_batch_tokens
    total_steps: int
    warmup_steps: int
    total_tokens: int  # tokens the run will consume: total_steps x tokens_per_step
    device_type: str  # cpu | cuda
    compute_dtype: str  # bfloat16 | float32: what matmuls and attention run in
    float8_all_gather: bool  # FSDP gathers the float8 weights in float8
    step_weights: bool  # the block linears keep their step's bf16 weights (parallel/step_weights.py)
    chunked_loss: bool  # the head and the loss run training.loss_chunk_tokens at a time (model/loss.py)
    optimizer_update: str  # adamw8bit | cpu_offload | AdamW's update: compiled, fused, foreach, for-loop
    document_ids: bool  # batches carry document ids: the attention masks across documents
    document_positions: bool  # batches carry RoPE positions restarting at each document

    def derived(self) -> dict[str, Any]:
        values = {key: value for key, value in dataclasses.asdict(self).items() if key not in ("config", "layout")}
        layout = self.layout
        return {"world_size": layout.world_size, "replicate": layout.replicate, "shard": layout.shard,
                "tensor": layout.tensor, "data_parallel_degree": layout.data_parallel_degree, **values}

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "derived": self.derived()}


def data_parallel_shape(parallelism: Parallelism, world_size: int) -> Layout:
    """The layout of `world_size` processes; ConfigError if the degrees don't fit."""
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
    return Layout(replicate=replicate, shard=shard, tensor=tp)


def gradient_accumulation_steps(train: Training, layout: Layout) -> int:
    """Micro-batches per rank per step; ConfigError if the global batch does not split into them."""
    dp = layout.data_parallel_degree
    tokens_per_micro_batch = train.micro_batch_size * train.seq_len
    if train.global_batch_tokens % (tokens_per_micro_batch * dp):
        raise ConfigError(
            f"training.global_batch_tokens={train.global_batch_tokens}: must be a multiple of "
            f"micro_batch_size {train.micro_batch_size} x seq_len {train.seq_len} x data-parallel degree {dp} "
            f"= {tokens_per_micro_batch * dp}")
    grad_accum_steps = train.global_batch_tokens // (tokens_per_micro_batch * dp)
    if grad_accum_steps > MAX_GRAD_ACCUM_STEPS:
        raise ConfigError(
            f"training.global_batch_tokens={train.global_batch_tokens:,} is {grad_accum_steps:,} micro-batches per "
            f"rank per step (at most {MAX_GRAD_ACCUM_STEPS:,}; each is held in host memory): lower "
            "global_batch_tokens (Llama 3 used 16M tokens), or raise training.micro_batch_size or the number of processes")
    return grad_accum_steps


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Steps that consume `tokens`, rounded to the nearest step (1T / 2,097,152 = 476,837;
    3B / 4,194,304 = 715; 2B / 2,097,152 = 954). Integer arithmetic: exact for any budget."""
    return (tokens + tokens_per_step // 2) // tokens_per_step


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple (embedding rows; TP needs it divisible)."""
    return -(-vocab_size // multiple) * multiple


def concrete_config(config: Config, tokenizer_vocab_size: int, attention_head_dim: int | None = None) -> Config:
    """A validated copy of `config` with model.vocab_size and model.attention_head_dim made concrete.

    tokenizer_vocab_size: ids the tokenizer can produce (model.vocab_size = 0 pads it to a multiple
    of tokenizer.vocab_multiple). attention_head_dim: what the start-up kernel probe chose; None
    keeps model.attention_head_dim, 0 = the true head dim.
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


def uses_float8_all_gather(float8: Float8, fsdp_shard: int) -> bool:
    """FSDP gathers weights in float8: tensorwise recipe, the setting on, and weights sharded (FSDP shard > 1)."""
    return float8.enable and float8.recipe == "tensorwise" and float8.fsdp_float8_all_gather and fsdp_shard > 1


def optimizer_update(config: Config, device_type: str) -> str:
    """What updates the weights: adamw8bit, cpu_offload, or AdamW's implementation with "auto" chosen.

    On an H200 (7B shape) the compiled AdamW update takes 17.4 ms where torch's fused one takes 23.5
    (bench/bench_optimizer.py). Fused without compile, and with float8, whose FSDP weights are
    torchao tensor subclasses (measured with fused). foreach is the fast CPU path.
    """
    settings = config.optimizer
    if settings.name == "adamw8bit":
        return "adamw8bit"
    if settings.cpu_offload:
        return "cpu_offload"
    if settings.implementation != "auto":
        return settings.implementation
    if device_type != "cuda":
        return "foreach"
    return "compiled" if config.compile.enable and not config.float8.enable else "fused"


def compute_dtype_of(train: Training, device_type: str) -> str:
    """bfloat16 on CUDA when training.mixed_precision is bf16; float32 otherwise (CPU runs are for tests)."""
    return "bfloat16" if device_type == "cuda" and train.mixed_precision == "bf16" else "float32"


def uses_chunked_loss(train: Training, layout: Layout) -> bool:
    """The head and the loss run a chunk of tokens at a time (model/loss.py); under TP the head's weight is a
    vocab-sharded DTensor and loss_parallel takes the logits instead."""
    return train.loss_chunk_tokens > 0 and not layout.tp_enabled


def uses_step_weights(train: Training, float8: Float8, layout: Layout, compute_dtype: str,
                      grad_accum_steps: int) -> bool:
    """The block linears keep their step's bf16 weights (parallel/step_weights.py): bf16 without FSDP, TP or
    float8, over more than one micro-batch. With one micro-batch there is no cast to share and the kept fp32
    gradient buffers cost memory for nothing (+2.6 GiB, +0.3% tokens/s on an H100: bench/NOTES.md)."""
    return (train.bf16_step_weights and compute_dtype == "bfloat16" and not float8.enable
            and not layout.fsdp_enabled and not layout.tp_enabled and grad_accum_steps > 1)


def check_device_features(config: Config, world_size: int, device_type: str, float8_all_gather: bool) -> None:
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
    if config.optimizer.name == "adamw8bit" and float8_all_gather:
        # torchao's compiled 8-bit update crashes (SIGSEGV) on the float8 all-gather's weight wrapper
        # (measured on CPU, torch 2.13, torchao 0.18); with bf16 all-gathers the two work together.
        raise ConfigError("optimizer.name=adamw8bit cannot update the float8 all-gather's weights: set "
                          "float8.fsdp_float8_all_gather=false (or optimizer.name=adamw)")
    if float8.enable and not config.compile.enable:
        logging.getLogger("titanlite").warning(
            "float8.enable=true without compile.enable: float8 casts run as separate eager kernels, slower than "
            "bf16; set compile.enable=true")


def resolve(config: Config, world_size: int, tokenizer_vocab_size: int, device_type: str = "cpu",
            probe_head_dim: HeadDimProbe | None = None) -> Run:
    """Every derived value of the run, computed once; `config` itself is left unchanged.

    tokenizer_vocab_size: see concrete_config. probe_head_dim: chooses the attention head dim (on
    CUDA, the kernel probe); None keeps model.attention_head_dim (0 = the true head dim).
    """
    layout = data_parallel_shape(config.parallelism, world_size)
    train = config.training
    tokens_per_micro_batch = train.micro_batch_size * train.seq_len
    grad_accum_steps = gradient_accumulation_steps(train, layout)
    if train.total_tokens == 0 and train.steps == 0:
        raise ConfigError("training.total_tokens=0 and training.steps=0: set one of them")
    float8_all_gather = uses_float8_all_gather(config.float8, layout.shard)
    check_device_features(config, world_size, device_type, float8_all_gather)
    compute_dtype = compute_dtype_of(train, device_type)
    head_dim = probe_head_dim(config.model, layout.tensor, compute_dtype) if probe_head_dim else None
    resolved = concrete_config(config, tokenizer_vocab_size, head_dim)
    total_steps = train.steps or max(1, steps_for_tokens(train.total_tokens, train.global_batch_tokens))
    return Run(
        config=resolved, layout=layout, tokens_per_micro_batch=tokens_per_micro_batch,
        grad_accum_steps=grad_accum_steps,
        tokens_per_step=train.global_batch_tokens, total_steps=total_steps,
        warmup_steps=steps_for_tokens(config.lr_schedule.warmup_tokens, train.global_batch_tokens),
        total_tokens=total_steps * train.global_batch_tokens, device_type=device_type, compute_dtype=compute_dtype,
        float8_all_gather=float8_all_gather,
        step_weights=uses_step_weights(train, config.float8, layout, compute_dtype, grad_accum_steps),
        chunked_loss=uses_chunked_loss(train, layout),
        optimizer_update=optimizer_update(config, device_type),
        document_ids=config.model.attention != "sdpa", document_positions=config.model.positions == "document")


def render(run: Run) -> str:
    """The resolved config as TOML, then the derived values as comments."""
    lines = []
    for section, values in run.config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    lines.append("# derived")
    lines += [f"# {key} = {value:,}" if isinstance(value, int) and not isinstance(value, bool) else
              f"# {key} = {value}" for key, value in run.derived().items()]
    return "\n".join(lines)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
