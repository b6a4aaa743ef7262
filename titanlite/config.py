"""Configuration: nested dataclasses <- TOML file <- dotted command-line overrides.

Precedence is defaults < TOML < CLI (`--training.steps 20`). Every error in a config is a
`ConfigError` whose message names the key, the value and what is allowed; `main()` entry
points print it on one line and exit with status 2.

Derived values (data-parallel degree, gradient-accumulation steps, total and warmup steps)
are computed here, in `derive()`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "train_configs"


class ConfigError(ValueError):
    """A config value that cannot be used; the message is one line meant for a person."""


@dataclass
class Job:
    dump_folder: str = "./outputs/run"  # the run's output folder: logs, metrics, checkpoints
    description: str = ""  # free text, copied into the metrics stream


@dataclass
class Model:
    dim: int = 256  # hidden size d_model
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (GQA); must divide n_heads
    intermediate_size: int = 704  # SwiGLU hidden size, stated explicitly (SPEC: no rounding rule)
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary padded to tokenizer.vocab_multiple
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: str = "none"  # none | yarn | llama3 (Llama 3.1/3.2), as Hugging Face computes them
    rope_scaling_factor: float = 1.0  # YaRN, llama3: target context / original context
    rope_original_max_position: int = 4096  # YaRN, llama3: context the base RoPE was designed for
    rope_beta_fast: float = 32.0  # YaRN ramp: pairs up to the one turning this many times are not interpolated
    rope_beta_slow: float = 1.0  # YaRN ramp: pairs from the one turning this many times on are fully interpolated
    rope_low_freq_factor: float = 1.0  # llama3: pairs turning fewer times than this are fully interpolated
    rope_high_freq_factor: float = 4.0  # llama3: pairs turning more times than this are not interpolated
    attention: str = "sdpa"  # sdpa (causal, crosses documents) | flex (FlexAttention document mask)
    positions: str = "sequence"  # RoPE positions: sequence (0..seq_len-1) | document (restart per document)
    init_std: float = 0.02  # std of the input projections; output projections are depth-scaled
    attention_head_dim_padding: str = "auto"  # auto | none | N: zero-pad head_dim to N for a fast SDPA kernel


@dataclass
class Tokenizer:
    path: str = "default"  # default | tiktoken:<encoding name> | path to a tiktoken BPE file or an HF byte-level BPE tokenizer.json
    vocab_multiple: int = 128  # pad the model vocabulary up to a multiple of this


@dataclass
class Data:
    source: str = "default"  # default (generated corpus) | path to prepared shards
    num_workers: int = 0  # DataLoader worker processes per rank
    pin_memory: bool = True  # page-locked host batches for async host-to-device copies
    prefetch_factor: int = 2  # batches prefetched per worker (only with num_workers > 0)
    shuffle: bool = True  # shuffle rows by seed; each epoch reshuffles
    default_num_documents: int = 20000  # size of the generated default corpus
    loss_across_documents: bool = False  # also train the prediction of a document's first token from the EOS before it
    skip_bad_documents: bool = False  # raw sources: count and skip empty/invalid documents instead of stopping
    text_field: str = "text"  # raw sources: the column holding the text


@dataclass
class Optimizer:
    name: str = "adamw"  # adamw
    lr: float = 3e-4  # peak learning rate
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay (not on norms)
    implementation: str = "auto"  # auto | fused | foreach | for-loop


@dataclass
class LRSchedule:
    warmup_tokens: int = 0  # linear warmup from 0 to the peak LR over this many tokens
    decay: str = "cosine"  # cosine | linear | constant, from the peak to min_lr_ratio * lr
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak


@dataclass
class Training:
    seed: int = 0  # seed for init, data order and dropout-free RNG
    seq_len: int = 256  # tokens per sequence
    global_batch_tokens: int = 8192  # tokens per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward pass on one rank
    total_tokens: int = 0  # training budget in tokens; total steps derive from it
    steps: int = 0  # if > 0, overrides the steps derived from total_tokens
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    mixed_precision: str = "bf16"  # bf16 | fp32 (bf16 applies on CUDA only)
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1  # HSDP replicas
    data_parallel_shard_degree: int = -1  # FSDP shards; -1 = whatever the world size leaves
    tensor_parallel_degree: int = 1  # tensor-parallel group size (inside a node)
    fsdp_reshard_after_forward: str = "default"  # default | always | never
    fsdp_cpu_offload: bool = False  # keep sharded params, grads and optimizer state on the CPU


@dataclass
class ActivationCheckpoint:
    mode: str = "none"  # none | full | selective
    selective_option: str = "op"  # "op" (save matmuls and attention) or an int k: every k-th block


@dataclass
class Compile:
    enable: bool = False  # torch.compile each transformer block and the loss


@dataclass
class Checkpoint:
    enable: bool = False  # save checkpoints
    folder: str = "checkpoint"  # relative to job.dump_folder
    interval: int = 500  # steps between saves (the last step is always saved)
    keep_latest_k: int = 0  # retention; 0 keeps all (the newest complete one is never deleted)
    resume: str = "auto"  # auto (newest complete in folder) | never | path to a checkpoint
    async_mode: str = "disabled"  # disabled | async (staged in pinned host memory, written while training)
    write_threads: int = 8  # files each rank writes (and reads on load) in parallel
    initial_load_path: str = ""  # with nothing to resume: start from this checkpoint (seed, HF import)
    initial_load_model_only: bool = True  # take only the weights from initial_load_path (step 0)


@dataclass
class Metrics:
    log_freq: int = 10  # steps between log lines (each one costs a host sync)
    enable_tensorboard: bool = True  # write TensorBoard event files
    enable_jsonl: bool = True  # write metrics.jsonl in the dump folder
    peak_flops: float = 0.0  # peak dense bf16 FLOP/s per device for MFU; 0 = by device name
    data_wait_warn_fraction: float = 0.05  # warn when the loader takes more of a step than this


@dataclass
class Health:
    """Training-health detectors and their actions (titanlite/health.py). Windows count steps."""

    enable: bool = True  # run the detectors and their actions
    skip_nonfinite_steps: bool = True  # skip (on device) optimizer steps whose grad norm is inf/NaN
    spike_window: int = 128  # recent normal steps the spike trend is fitted on
    spike_min_history: int = 64  # steps of history before spikes are judged
    spike_sigma: float = 6.0  # spike: log(loss) this many robust sigmas above the log-log trend
    spike_sigma_early: float = 5.0  # the same within early_steps (the recipe: early spikes matter most)
    spike_min_ratio: float = 1.1  # and loss at least this multiple of the trend
    early_steps: int = 1000  # the early phase of the recipe's "first ~1k steps"
    fault_ratio: float = 10.0  # loss >= this x the largest of the first 100 steps: a hardware or data fault
    plateau_window: int = 5000  # the plateau fit spans at least this many steps...
    plateau_window_fraction: float = 0.25  # ...and at least this fraction of the steps done
    plateau_slope: float = 0.01  # plateau: loss falls less than this per e-fold (x2.718) of steps
    divergence_window: int = 100  # steps of the sustained-rise median and of the overflow count
    divergence_rise: float = 0.25  # diverged: that median this fraction above its best
    max_overflow_steps: int = 5  # diverged: more skipped (non-finite gradient) steps than this in the window
    grad_norm_factor: float = 10.0  # grad-norm watch: pre-clip norm above this x grad_clip...
    grad_norm_fraction: float = 0.5  # ...on more than this fraction of the window, after warmup
    grad_norm_window: int = 100  # steps of the grad-norm watch
    spike_action: str = "capture"  # log | capture (write the batch to spikes/) | stop | rollback
    plateau_action: str = "log"  # log | stop
    divergence_action: str = "rollback"  # log | capture | stop | rollback
    grad_norm_action: str = "log"  # log | stop | rollback
    rollback_lr_factor: float = 0.5  # each rollback multiplies the LR by this (the recipe: halve it)
    rollback_skip_data: bool = True  # after a rollback, skip the batches between the checkpoint and the failure
    max_rollbacks: int = 3  # then stop
    inject_nan_at_step: int = 0  # TESTING AID ONLY: make the loss NaN once at this step (0 = off)


@dataclass
class Profiling:
    """PyTorch profiler traces and CUDA memory snapshots (titanlite/profiling.py)."""

    enable_profiling: bool = False  # write Chrome traces per rank to <run>/profile_traces/
    profile_freq: int = 100  # one profiled window every this many steps
    profile_warmup: int = 3  # profiler warm-up steps inside each window (not recorded)
    profile_active: int = 2  # recorded steps per window
    record_memory_history: bool = False  # record allocation stacks for memory snapshots (slows allocation)
    memory_snapshot_step: int = 0  # write a memory snapshot after this step (0 = never); also on demand:
    # `touch <run>/dump_memory_snapshot` and the next log step writes one


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    profiling: Profiling = field(default_factory=Profiling)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Allowed values for the string options; validate() rejects anything else.
CHOICES = {
    "model.rope_scaling": ("none", "yarn", "llama3"),
    "model.attention": ("sdpa", "flex"),
    "model.positions": ("sequence", "document"),
    "data.source": None,  # free path
    "optimizer.name": ("adamw",),
    "optimizer.implementation": ("auto", "fused", "foreach", "for-loop"),
    "lr_schedule.decay": ("cosine", "linear", "constant"),
    "training.mixed_precision": ("bf16", "fp32"),
    "training.device": ("auto", "cpu", "cuda"),
    "parallelism.fsdp_reshard_after_forward": ("default", "always", "never"),
    "activation_checkpoint.mode": ("none", "full", "selective"),
    "checkpoint.async_mode": ("disabled", "async"),
    "health.spike_action": ("log", "capture", "stop", "rollback"),
    "health.plateau_action": ("log", "stop"),
    "health.divergence_action": ("log", "capture", "stop", "rollback"),
    "health.grad_norm_action": ("log", "stop", "rollback"),
}


def _convert(key: str, raw: Any, target: type, from_cli: bool) -> Any:
    """Coerce a CLI string or a typed TOML value to the field's type, or raise a ConfigError naming the key."""
    if from_cli and target is not str:
        text = raw.strip()
        try:
            if target is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            if target is int:
                return int(float(text)) if _is_integral(text) else int(text)
            if target is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected {target.__name__}") from None
    if target is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if target is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)  # 1e12 in TOML is a float; a whole number is fine for an int field
    if not isinstance(raw, target) or (target is int and isinstance(raw, bool)):
        raise ConfigError(f"{key}={raw!r}: expected {target.__name__}, got {type(raw).__name__}")
    return raw


def _is_integral(text: str) -> bool:
    try:
        return float(text).is_integer() and ("e" in text.lower() or "." in text)
    except ValueError:
        return False


def _set(config: Config, dotted: str, raw: Any, from_cli: bool = False) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections or not key:
        raise ConfigError(f"unknown config section {section_name!r}: valid sections are {sorted(sections)}")
    section = getattr(config, section_name)
    types = get_type_hints(type(section))
    if key not in types:
        raise ConfigError(f"unknown key {dotted!r}: valid keys in [{section_name}] are {sorted(types)}")
    setattr(section, key, _convert(dotted, raw, types[key], from_cli))


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, else a name looked up in train_configs/ (with or without .toml)."""
    candidates = [Path(name_or_path), CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {name_or_path!r} not found (looked in . and {CONFIG_DIR})")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `--section.key value` overrides."""
    config = Config()
    if path:
        toml_path = resolve_config_path(path)
        try:
            data = tomllib.loads(toml_path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{toml_path}: invalid TOML: {error}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{toml_path}: top-level key {section!r} must be a [section] table")
            for key, value in values.items():
                _set(config, f"{section}.{key}", value)
    for dotted, value in _pairs(overrides or []):
        _set(config, dotted, value, from_cli=True)
    validate(config)
    return config


def _pairs(overrides: list[str]) -> list[tuple[str, str]]:
    """['--a.b', '1', '--c.d=2'] -> [('a.b', '1'), ('c.d', '2')]."""
    pairs, index = [], 0
    while index < len(overrides):
        flag = overrides[index]
        if not flag.startswith("--") or "." not in flag:
            raise ConfigError(f"unexpected argument {flag!r}: overrides look like --section.key value")
        if "=" in flag:
            dotted, value = flag[2:].split("=", 1)
            index += 1
        elif index + 1 < len(overrides):
            dotted, value = flag[2:], overrides[index + 1]
            index += 2
        else:
            raise ConfigError(f"override {flag} has no value")
        pairs.append((dotted, value))
    return pairs


def validate(config: Config) -> None:
    """Reject values that cannot work, before any process group or model exists."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{dotted}={value!r}: allowed values are {list(allowed)}")
    positive = [
        "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.intermediate_size",
        "training.seq_len", "training.global_batch_tokens", "training.micro_batch_size",
        "optimizer.lr", "metrics.log_freq", "checkpoint.interval", "tokenizer.vocab_multiple",
        "parallelism.tensor_parallel_degree", "parallelism.data_parallel_replicate_degree",
        "model.rope_theta", "model.norm_eps", "data.prefetch_factor", "checkpoint.write_threads",
        "model.rope_original_max_position",
    ]
    non_negative = [
        "training.total_tokens", "training.steps", "training.grad_clip", "optimizer.weight_decay",
        "optimizer.eps", "lr_schedule.warmup_tokens", "model.vocab_size", "data.num_workers",
        "checkpoint.keep_latest_k", "metrics.peak_flops", "model.init_std",
    ]
    for dotted in positive + non_negative:
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value < 0 or (dotted in positive and value == 0):
            bound = "> 0" if dotted in positive else ">= 0"
            raise ConfigError(f"{dotted}={value}: must be {bound}")
    for dotted in ("optimizer.beta1", "optimizer.beta2", "lr_schedule.min_lr_ratio"):
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{dotted}={value}: must be in [0, 1]")
    model = config.model
    if model.dim % model.n_heads:
        raise ConfigError(f"model.dim={model.dim}: must be divisible by model.n_heads={model.n_heads}")
    if (model.dim // model.n_heads) % 2:
        raise ConfigError(f"model.dim/model.n_heads={model.dim // model.n_heads}: RoPE needs an even head dim")
    if model.n_heads % model.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={model.n_kv_heads}: must divide model.n_heads={model.n_heads}")
    _validate_tensor_parallel(config)
    padding = model.attention_head_dim_padding
    if padding not in ("auto", "none") and not (padding.isdigit() and int(padding) >= model.dim // model.n_heads):
        raise ConfigError(f"model.attention_head_dim_padding={padding!r}: allowed are auto, none or an int >= "
                          f"head_dim {model.dim // model.n_heads}")
    if model.rope_scaling != "none" and model.rope_scaling_factor < 1.0:
        raise ConfigError(f"model.rope_scaling_factor={model.rope_scaling_factor}: {model.rope_scaling} needs >= 1")
    if model.rope_scaling == "yarn" and not 0 < model.rope_beta_slow < model.rope_beta_fast:
        raise ConfigError(f"model.rope_beta_slow={model.rope_beta_slow}, model.rope_beta_fast={model.rope_beta_fast}: "
                          "YaRN needs 0 < rope_beta_slow < rope_beta_fast")
    if model.rope_scaling == "llama3" and not 0 < model.rope_low_freq_factor < model.rope_high_freq_factor:
        raise ConfigError(f"model.rope_low_freq_factor={model.rope_low_freq_factor}, model.rope_high_freq_factor="
                          f"{model.rope_high_freq_factor}: llama3 needs 0 < rope_low_freq_factor < rope_high_freq_factor")
    if config.parallelism.data_parallel_shard_degree == 0 or config.parallelism.data_parallel_shard_degree < -1:
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree={config.parallelism.data_parallel_shard_degree}: "
            "must be -1 (use the rest of the world) or >= 1")
    option = config.activation_checkpoint.selective_option
    if option != "op" and not (option.isdigit() and int(option) >= 1):
        raise ConfigError(f"activation_checkpoint.selective_option={option!r}: allowed are 'op' or an int >= 1")
    if config.training.total_tokens == 0 and config.training.steps == 0:
        raise ConfigError("training.total_tokens=0 and training.steps=0: set one of them")
    _validate_health(config.health, config.profiling)


def _validate_health(health: Health, profiling: Profiling) -> None:
    positive = ["spike_window", "spike_min_history", "spike_sigma", "spike_sigma_early", "spike_min_ratio",
                "fault_ratio", "plateau_window", "plateau_slope", "divergence_window", "divergence_rise",
                "grad_norm_factor", "grad_norm_window", "rollback_lr_factor"]
    for key in positive:
        if getattr(health, key) <= 0:
            raise ConfigError(f"health.{key}={getattr(health, key)}: must be > 0")
    for key in ("early_steps", "max_overflow_steps", "max_rollbacks", "inject_nan_at_step"):
        if getattr(health, key) < 0:
            raise ConfigError(f"health.{key}={getattr(health, key)}: must be >= 0")
    for key in ("plateau_window_fraction", "grad_norm_fraction", "rollback_lr_factor"):
        if not 0.0 <= getattr(health, key) <= 1.0:
            raise ConfigError(f"health.{key}={getattr(health, key)}: must be in [0, 1]")
    if health.spike_min_history > health.spike_window:
        raise ConfigError(f"health.spike_min_history={health.spike_min_history}: must be <= health.spike_window="
                          f"{health.spike_window}")
    if profiling.profile_freq <= profiling.profile_warmup + profiling.profile_active or profiling.profile_active < 1:
        raise ConfigError(f"profiling.profile_freq={profiling.profile_freq}: must exceed profile_warmup "
                          f"{profiling.profile_warmup} + profile_active {profiling.profile_active} (and active >= 1)")
    if profiling.profile_warmup < 0 or profiling.memory_snapshot_step < 0:
        raise ConfigError("profiling.profile_warmup and profiling.memory_snapshot_step must be >= 0")


def _validate_tensor_parallel(config: Config) -> None:
    """Refuse a model that tensor_parallel_degree cannot split evenly (heads, FFN, vocabulary, sequence)."""
    tp, model = config.parallelism.tensor_parallel_degree, config.model
    vocab_key, vocab = ("model.vocab_size", model.vocab_size) if model.vocab_size else (
        "tokenizer.vocab_multiple", config.tokenizer.vocab_multiple)
    splits = [("model.n_heads", model.n_heads, "query heads"), ("model.n_kv_heads", model.n_kv_heads, "KV heads"),
              ("model.intermediate_size", model.intermediate_size, "FFN columns"),
              (vocab_key, vocab, "vocabulary rows"), ("training.seq_len", config.training.seq_len,
                                                      "sequence-parallel positions")]
    for key, value, what in splits:
        if value % tp:
            raise ConfigError(f"{key}={value}: tensor_parallel_degree={tp} must divide it (TP splits the {what}); "
                              f"use a TP degree that divides {value}")


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config and the world size; computed once, printed at start."""

    world_size: int
    data_parallel_degree: int  # replicate x shard: ranks that read different data
    tokens_per_micro_batch: int  # per rank
    grad_accum_steps: int  # A = global_batch_tokens / (micro_batch x seq_len x DP)
    tokens_per_step: int  # = global_batch_tokens
    total_steps: int
    warmup_steps: int
    total_tokens: int  # tokens the run will consume: total_steps x tokens_per_step


def data_parallel_shape(config: Config, world_size: int) -> tuple[int, int, int]:
    """(replicate, shard, tensor) degrees for `world_size` processes; ConfigError if they don't fit."""
    par = config.parallelism
    tp, replicate, shard = par.tensor_parallel_degree, par.data_parallel_replicate_degree, par.data_parallel_shard_degree
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
    """Steps that consume `tokens`, rounded to the nearest step (SPEC: 1T / 2,097,152 = 476,837;
    3B / 4,194,304 = 715; 2B / 2,097,152 = 954). Integer arithmetic: exact for any budget."""
    return (tokens + tokens_per_step // 2) // tokens_per_step


def derive(config: Config, world_size: int) -> Derived:
    replicate, shard, _ = data_parallel_shape(config, world_size)
    dp = replicate * shard
    train = config.training
    tokens_per_micro_batch = train.micro_batch_size * train.seq_len
    per_pass = tokens_per_micro_batch * dp
    if train.global_batch_tokens % per_pass:
        raise ConfigError(
            f"training.global_batch_tokens={train.global_batch_tokens}: must be a multiple of "
            f"micro_batch_size {train.micro_batch_size} x seq_len {train.seq_len} x data-parallel degree {dp} "
            f"= {per_pass}")
    grad_accum_steps = train.global_batch_tokens // per_pass
    total_steps = train.steps or max(1, steps_for_tokens(train.total_tokens, train.global_batch_tokens))
    warmup_steps = steps_for_tokens(config.lr_schedule.warmup_tokens, train.global_batch_tokens)
    return Derived(
        world_size=world_size, data_parallel_degree=dp, tokens_per_micro_batch=tokens_per_micro_batch,
        grad_accum_steps=grad_accum_steps, tokens_per_step=train.global_batch_tokens,
        total_steps=total_steps, warmup_steps=warmup_steps,
        total_tokens=total_steps * train.global_batch_tokens)


def render(config: Config, derived: Derived | None) -> str:
    """The resolved config as TOML-like text, then the derived values as comments."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    if derived is not None:
        lines.append("# derived")
        lines += [f"# {key} = {value:,}" for key, value in dataclasses.asdict(derived).items()]
    return "\n".join(lines)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
