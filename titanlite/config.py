"""Configuration: nested dataclasses <- TOML file <- dotted command-line overrides, then `resolve()`.

Every field is declared once, with `setting(default, help, choices=..., ge=..., gt=..., le=...)`:
its type (the annotation), default, allowed values or bounds and help text. Validation, `--help`
and the README's reference table are all generated from those declarations.

Precedence is defaults < TOML < CLI (`--training.steps 20`; `--compile.enable` alone means true).
Every error is a `ConfigError` whose message names the key, the value and what is allowed; the
entry points print it on one line and exit with status 2. This module imports no torch, so a
config can be checked in a fraction of a second before any process starts.

titanlite/resolve.py turns a loaded config into the run it describes (every derived value, once).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "train_configs"  # where a wheel ships the recipes (pyproject.toml)
if not CONFIG_DIR.is_dir():  # a checkout or an editable install: the repository's train_configs/
    CONFIG_DIR = CONFIG_DIR.parent.parent / "train_configs"


class ConfigError(ValueError):
    """A config value that cannot be used; the message is one line meant for a person."""


def setting(default, help: str, *, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None):
    """A config field: default, one-line help, and the allowed values (choices) or bounds."""
    return field(default=default, metadata={"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le})


@dataclass
class Job:
    dump_folder: str = setting("./outputs/run", "the run's output folder: logs, metrics, checkpoints")
    description: str = setting("", "free text, copied into the metrics stream")


@dataclass
class Model:
    dim: int = setting(256, "hidden size d_model", gt=0)
    n_layers: int = setting(4, "transformer blocks", gt=0)
    n_heads: int = setting(8, "query heads", gt=0)
    n_kv_heads: int = setting(4, "key/value heads (GQA); must divide n_heads", gt=0)
    intermediate_size: int = setting(704, "SwiGLU hidden size, stated explicitly (no rounding rule)", gt=0)
    vocab_size: int = setting(0, "0 = the tokenizer's vocabulary padded to tokenizer.vocab_multiple", ge=0)
    norm_eps: float = setting(1e-5, "RMSNorm epsilon", gt=0)
    rope_theta: float = setting(10000.0, "RoPE base", gt=0)
    rope_scaling: str = setting("none", "RoPE scaling for a longer context: yarn, or llama3 (Llama 3.1/3.2), as "
                                        "Hugging Face computes them", choices=("none", "yarn", "llama3"))
    rope_scaling_factor: float = setting(1.0, "YaRN, llama3: target context / original context", ge=1)
    rope_original_max_position: int = setting(4096, "YaRN, llama3: context the base RoPE was designed for", gt=0)
    rope_beta_fast: float = setting(32.0, "YaRN ramp: pairs up to the one turning this many times are not "
                                          "interpolated", gt=0)
    rope_beta_slow: float = setting(1.0, "YaRN ramp: pairs from the one turning this many times on are fully "
                                         "interpolated", gt=0)
    rope_low_freq_factor: float = setting(1.0, "llama3: pairs turning fewer times than this are fully "
                                               "interpolated", gt=0)
    rope_high_freq_factor: float = setting(4.0, "llama3: pairs turning more times than this are not interpolated",
                                           gt=0)
    attention: str = setting("sdpa", "sdpa: causal, crosses documents; flex: FlexAttention document mask",
                             choices=("sdpa", "flex"))
    positions: str = setting("sequence", "RoPE positions: 0..seq_len-1, or restarting at each document",
                             choices=("sequence", "document"))
    init_std: float = setting(0.02, "std of the input projections; output projections are depth-scaled", ge=0)
    attention_head_dim: int = setting(0, "head dim the attention kernel runs at (q, k, v zero-padded): 0 = auto, "
                                         "the fastest kernel found at start-up; else >= dim / n_heads", ge=0)


@dataclass
class Tokenizer:
    path: str = setting("default", "default | tiktoken:<encoding name> | path to a tiktoken BPE file or an HF "
                                   "byte-level BPE tokenizer.json")
    vocab_multiple: int = setting(128, "pad the model vocabulary up to a multiple of this", gt=0)


@dataclass
class Data:
    source: str = setting("default", "default (generated corpus) | path to prepared shards | raw text")
    num_workers: int = setting(0, "DataLoader worker processes per rank", ge=0)
    pin_memory: bool = setting(True, "page-locked host batches for async host-to-device copies")
    prefetch_factor: int = setting(2, "batches prefetched per worker (only with num_workers > 0)", gt=0)
    shuffle: bool = setting(True, "shuffle rows by seed; each epoch reshuffles")
    default_num_documents: int = setting(20000, "size of the generated default corpus", gt=0)
    loss_across_documents: bool = setting(False, "also train the prediction of a document's first token "
                                                 "from the EOS before it")
    skip_bad_documents: bool = setting(False, "raw sources: count and skip empty/invalid documents")
    text_field: str = setting("text", "raw sources: the column holding the text")


@dataclass
class Validation:
    enable: bool = setting(False, "evaluate the loss on held-out data (titanlite/validation.py)")
    source: str = setting("default", "default (held-out generated documents) | path to prepared held-out shards")
    interval: int = setting(100, "steps between evaluations (0: only at the end); the last step is always evaluated",
                            ge=0)
    steps: int = setting(10, "global batches per evaluation (training.global_batch_tokens each): the same tokens on "
                             "every layout", gt=0)


@dataclass
class Optimizer:
    name: str = setting("adamw", "adamw (torch), or adamw8bit: torchao's AdamW with 8-bit moments (~2 instead of "
                                 "8 bytes of state per parameter)", choices=("adamw", "adamw8bit"))
    lr: float = setting(3e-4, "peak learning rate", gt=0)
    beta1: float = setting(0.9, "AdamW beta1", ge=0, le=1)
    beta2: float = setting(0.95, "AdamW beta2", ge=0, le=1)
    eps: float = setting(1e-8, "AdamW epsilon", ge=0)
    weight_decay: float = setting(0.1, "decoupled weight decay (not on norms)", ge=0)
    implementation: str = setting("auto", "auto: on CUDA compiled (one compiled kernel per parameter, "
                                          "titanlite/adamw.py), fused without compile or with float8; on CPU "
                                          "foreach (adamw only)",
                                  choices=("auto", "fused", "compiled", "foreach", "for-loop"))
    cpu_offload: bool = setting(False, "one GPU: AdamW state and its update on the host (torchao "
                                       "CPUOffloadOptimizer); with FSDP use parallelism.fsdp_cpu_offload")


@dataclass
class LRSchedule:
    warmup_tokens: int = setting(0, "linear warmup from 0 to the peak LR over this many tokens", ge=0)
    decay: str = setting("cosine", "from the peak to min_lr_ratio * lr", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = setting(0.1, "final LR as a fraction of the peak", ge=0, le=1)


@dataclass
class Training:
    seed: int = setting(0, "seed for init and data order")
    seq_len: int = setting(256, "tokens per sequence", gt=0)
    global_batch_tokens: int = setting(8192, "tokens per optimizer step, over all data-parallel ranks", gt=0)
    micro_batch_size: int = setting(4, "sequences per forward pass on one rank", gt=0)
    total_tokens: int = setting(0, "training budget in tokens; total steps derive from it", ge=0)
    steps: int = setting(0, "if > 0, overrides the steps derived from total_tokens", ge=0)
    grad_clip: float = setting(1.0, "max global grad norm; 0 disables clipping", ge=0)
    mixed_precision: str = setting("bf16", "bf16 applies on CUDA only", choices=("bf16", "fp32"))
    device: str = setting("auto", "auto: CUDA if visible", choices=("auto", "cpu", "cuda"))


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = setting(1, "HSDP replicas", gt=0)
    data_parallel_shard_degree: int = setting(-1, "FSDP shards; -1 = whatever the world size leaves", ge=-1)
    tensor_parallel_degree: int = setting(1, "tensor-parallel group size (inside a node)", gt=0)
    fsdp_reshard_after_forward: str = setting("default", "default: all but the output head",
                                              choices=("default", "always", "never"))
    fsdp_cpu_offload: bool = setting(False, "keep sharded params, grads and optimizer state on the CPU")


@dataclass
class ActivationCheckpoint:
    mode: str = setting("none", "what the backward recomputes", choices=("none", "full", "selective"))
    selective_blocks: int = setting(0, "selective: 0 = per op (keep matmul and attention outputs, recompute the "
                                       "rest); k = recompute every k-th block whole", ge=0)


@dataclass
class Compile:
    enable: bool = setting(False, "torch.compile each transformer block and the loss")


@dataclass
class Float8:
    """float8 matmuls through torchao (titanlite/float8.py): the blocks' linears, never the output head."""

    enable: bool = setting(False, "float8 matmuls in the transformer blocks' linears (H100/H200 or newer)")
    recipe: str = setting("tensorwise", "tensorwise: one scale per tensor (fastest); rowwise: one per row "
                                        "(more accurate, slower)", choices=("tensorwise", "rowwise"))
    fsdp_float8_all_gather: bool = setting(True, "tensorwise with FSDP: all-gather weights in float8, their "
                                                 "scales computed in one all-reduce after the optimizer step")
    exclude: str = setting("", "comma-separated module-name fragments kept in bf16, e.g. 'attention.wk,"
                               "attention.wv' (linears whose dims are not multiples of 16 always are)")
    emulate: bool = setting(False, "TESTING AID ONLY: emulate the float8 matmuls (runs on CPU; slow)")


@dataclass
class Checkpoint:
    enable: bool = setting(False, "save checkpoints")
    folder: str = setting("checkpoint", "relative to job.dump_folder")
    interval: int = setting(500, "steps between saves (the last step is always saved)", gt=0)
    keep_latest_k: int = setting(0, "retention; 0 keeps all (the newest complete one is never deleted)", ge=0)
    resume: str = setting("auto", "auto (newest complete in folder) | never | path to a checkpoint")
    async_mode: str = setting("disabled", "async: staged in pinned host memory, written while training",
                              choices=("disabled", "async"))
    write_threads: int = setting(8, "files each rank writes (and reads on load) in parallel", gt=0)
    initial_load_path: str = setting("", "with nothing to resume: start from this checkpoint (seed, HF import)")
    initial_load_model_only: bool = setting(True, "take only the weights from initial_load_path (step 0)")


@dataclass
class Metrics:
    log_freq: int = setting(10, "steps between log lines (each one costs a host sync)", gt=0)
    enable_tensorboard: bool = setting(True, "write TensorBoard event files")
    enable_jsonl: bool = setting(True, "write metrics.jsonl in the dump folder")
    peak_flops: float = setting(0.0, "peak dense bf16 FLOP/s per device for MFU; 0 = by device name", ge=0)
    data_wait_warn_fraction: float = setting(0.05, "warn when the loader takes more of a step than this", ge=0, le=1)
    enable_wandb: bool = setting(False, "also log to Weights & Biases (pip install 'titanlite[wandb]'; "
                                        "WANDB_MODE=offline needs no network)")
    wandb_project: str = setting("titanlite", "W&B project; the run is named after job.dump_folder")


@dataclass
class Health:
    """Training-health detectors and their actions (titanlite/health.py). Windows count steps."""

    enable: bool = setting(True, "run the detectors and their actions")
    skip_nonfinite_steps: bool = setting(True, "skip (on device) optimizer steps whose grad norm is inf/NaN")
    spike_window: int = setting(128, "recent normal steps the spike trend is fitted on", gt=0)
    spike_min_history: int = setting(64, "steps of history before spikes are judged", gt=0)
    spike_sigma: float = setting(6.0, "spike: log(loss) this many robust sigmas above the log-log trend", gt=0)
    spike_sigma_early: float = setting(5.0, "the same within early_steps (early spikes matter most)", gt=0)
    spike_min_ratio: float = setting(1.1, "and loss at least this multiple of the trend", gt=0)
    early_steps: int = setting(1000, "the early phase of the recipe's 'first ~1k steps'", ge=0)
    fault_ratio: float = setting(10.0, "loss >= this x the largest of the first 100 steps: a fault", gt=0)
    plateau_window: int = setting(5000, "the plateau fit spans at least this many steps...", gt=0)
    plateau_window_fraction: float = setting(0.25, "...and at least this fraction of the steps done", ge=0, le=1)
    plateau_slope: float = setting(0.01, "plateau: loss falls less than this per e-fold of steps", gt=0)
    divergence_window: int = setting(100, "steps of the sustained-rise median and of the overflow count", gt=0)
    divergence_rise: float = setting(0.25, "diverged: that median this fraction above its best", gt=0)
    max_overflow_steps: int = setting(5, "diverged: more skipped (non-finite) steps than this in the window", ge=0)
    grad_norm_factor: float = setting(10.0, "grad-norm watch: pre-clip norm above this x grad_clip...", gt=0)
    grad_norm_fraction: float = setting(0.5, "...on more than this fraction of the window, after warmup", ge=0, le=1)
    grad_norm_window: int = setting(100, "steps of the grad-norm watch", gt=0)
    spike_action: str = setting("capture", "capture writes the batch to spikes/",
                                choices=("log", "capture", "stop", "rollback"))
    plateau_action: str = setting("log", "what a plateau does", choices=("log", "stop"))
    divergence_action: str = setting("rollback", "what a divergence does", choices=("log", "capture", "stop", "rollback"))
    grad_norm_action: str = setting("log", "what the grad-norm watch does", choices=("log", "stop", "rollback"))
    rollback_lr_factor: float = setting(0.5, "each rollback multiplies the LR by this (the recipe: halve it)",
                                        gt=0, le=1)
    rollback_skip_data: bool = setting(True, "after a rollback, skip the batches up to the failure")
    max_rollbacks: int = setting(3, "then stop", ge=0)
    inject_nan_at_step: int = setting(0, "TESTING AID ONLY: make the loss NaN once at this step (0 = off)", ge=0)


@dataclass
class Profiling:
    """PyTorch profiler traces and CUDA memory snapshots (titanlite/profiling.py)."""

    enable_profiling: bool = setting(False, "write Chrome traces per rank to <run>/profile_traces/")
    profile_freq: int = setting(100, "one profiled window every this many steps", gt=0)
    profile_warmup: int = setting(3, "profiler warm-up steps inside each window (not recorded)", ge=0)
    profile_active: int = setting(2, "recorded steps per window", gt=0)
    record_memory_history: bool = setting(False, "record allocation stacks for memory snapshots (slower)")
    memory_snapshot_step: int = setting(0, "write a memory snapshot after this step (0 = never; also on "
                                           "demand: touch <run>/dump_memory_snapshot)", ge=0)


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    data: Data = field(default_factory=Data)
    validation: Validation = field(default_factory=Validation)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    profiling: Profiling = field(default_factory=Profiling)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def declared_fields():
    """(dotted key, dataclasses.Field, type) of every setting, in declaration order."""
    for section in dataclasses.fields(Config):
        types = get_type_hints(section.default_factory)
        for item in dataclasses.fields(section.default_factory):
            yield f"{section.name}.{item.name}", item, types[item.name]


# Keys a torchtitan or Megatron user may reach for first, with where the setting lives here.
FAMILIAR_KEYS = {
    "training.local_batch_size": "training.micro_batch_size",
    "training.global_batch_size": "training.global_batch_tokens (tokens, not sequences)",
    "training.max_norm": "training.grad_clip",
    "training.dataset": "data.source",
    "lr_scheduler.warmup_steps": "lr_schedule.warmup_tokens (tokens, not steps)",
    "lr_scheduler.decay_type": "lr_schedule.decay",
    "lr_scheduler.min_lr_factor": "lr_schedule.min_lr_ratio",
    "job.config_file": "--config FILE",
    "model.flavor": "the model fields of [model] (or a recipe: --config 7b_4k)",
    "activation_checkpoint.selective_ac_option": "activation_checkpoint.selective_blocks (0 = per op)",
    "parallelism.data_parallel_shard_degree": "parallelism.data_parallel_shard_degree",
}


def _unknown_key(dotted: str) -> ConfigError:
    known = [key for key, _, _ in declared_fields()]
    hint = FAMILIAR_KEYS.get(dotted) or next(iter(difflib.get_close_matches(dotted, known, n=1, cutoff=0.75)), None)
    section = dotted.partition(".")[0]
    sections = sorted({key.partition(".")[0] for key in known})
    if hint:
        return ConfigError(f"unknown key {dotted!r}: did you mean {hint}?")
    if section not in sections:
        return ConfigError(f"unknown config section {section!r}: valid sections are {sections}")
    keys = sorted(key.partition(".")[2] for key in known if key.startswith(section + "."))
    return ConfigError(f"unknown key {dotted!r}: valid keys in [{section}] are {keys}")


def _convert(key: str, raw: Any, target: type, from_cli: bool) -> Any:
    """Coerce a CLI string or a typed TOML value to the field's type, or raise a ConfigError naming the key."""
    if from_cli and target is not str:
        text = raw.strip()
        try:
            if target is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            if target is int:  # "1e9" and "4096.0" are whole numbers; "1.5" is not
                return int(float(text)) if any(c in text.lower() for c in ".e") and float(text).is_integer() \
                    else int(text)
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


def _set(config: Config, dotted: str, raw: Any, from_cli: bool = False) -> None:
    section_name, _, key = dotted.partition(".")
    section = getattr(config, section_name, None) if key else None
    types = get_type_hints(type(section)) if dataclasses.is_dataclass(section) else {}
    if key not in types:
        raise _unknown_key(dotted)
    setattr(section, key, _convert(dotted, raw, types[key], from_cli))


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, else a name looked up in train_configs/ (with or without .toml)."""
    candidates = [Path(name_or_path), CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {name_or_path!r} not found (looked in . and {CONFIG_DIR})")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `--section.key value` overrides; validated."""
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
    for dotted, value in parse_overrides(overrides or []):
        _set(config, dotted, value, from_cli=True)
    validate(config)
    return config


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """['--a.b', '1', '--c.d=2', '--e.f'] -> [('a.b', '1'), ('c.d', '2'), ('e.f', 'true')].

    A flag with no value (the last argument, or followed by another --flag) is a boolean set to true.
    """
    pairs, index = [], 0
    while index < len(overrides):
        flag = overrides[index]
        if not flag.startswith("--") or "." not in flag:
            raise ConfigError(f"unexpected argument {flag!r}: overrides look like --section.key value")
        if "=" in flag:
            dotted, value = flag[2:].split("=", 1)
            index += 1
        elif index + 1 < len(overrides) and not overrides[index + 1].startswith("--"):
            dotted, value = flag[2:], overrides[index + 1]
            index += 2
        else:
            dotted, value = flag[2:], None
            index += 1
        if value is None:
            kind = next((kind for key, _, kind in declared_fields() if key == dotted), None)
            if kind is not bool:
                raise ConfigError(f"override {flag} has no value" if kind else str(_unknown_key(dotted)))
            value = "true"
        pairs.append((dotted, value))
    return pairs


def validate(config: Config) -> None:
    """Reject values that cannot work, before any process group or model exists."""
    for dotted, item, kind in declared_fields():
        section, key = dotted.split(".")
        value, rules = getattr(getattr(config, section), key), item.metadata
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{dotted}={value}: must be a finite number")
        if rules["choices"] is not None and value not in rules["choices"]:
            raise ConfigError(f"{dotted}={value!r}: allowed values are {list(rules['choices'])}")
        for bound, fails, words in (("gt", lambda v, b: v <= b, "> {}"), ("ge", lambda v, b: v < b, ">= {}"),
                                    ("le", lambda v, b: v > b, "<= {}")):
            if rules[bound] is not None and fails(value, rules[bound]):
                raise ConfigError(f"{dotted}={value}: must be {words.format(rules[bound])}")
    model = config.model
    head_dim = model.dim // model.n_heads
    if model.dim % model.n_heads:
        raise ConfigError(f"model.dim={model.dim}: must be divisible by model.n_heads={model.n_heads}")
    if head_dim % 2:
        raise ConfigError(f"model.dim/model.n_heads={head_dim}: RoPE needs an even head dim")
    if model.n_heads % model.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={model.n_kv_heads}: must divide model.n_heads={model.n_heads}")
    if model.rope_scaling == "yarn" and not model.rope_beta_slow < model.rope_beta_fast:
        raise ConfigError(f"model.rope_beta_slow={model.rope_beta_slow}, model.rope_beta_fast={model.rope_beta_fast}: "
                          "YaRN needs rope_beta_slow < rope_beta_fast")
    if model.rope_scaling == "llama3" and not model.rope_low_freq_factor < model.rope_high_freq_factor:
        raise ConfigError(f"model.rope_low_freq_factor={model.rope_low_freq_factor}, model.rope_high_freq_factor="
                          f"{model.rope_high_freq_factor}: llama3 needs rope_low_freq_factor < rope_high_freq_factor")
    if 0 < model.attention_head_dim < head_dim:
        raise ConfigError(f"model.attention_head_dim={model.attention_head_dim}: must be 0 (auto) or >= the head "
                          f"dim {head_dim}")
    _validate_tensor_parallel(config)
    if config.metrics.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("metrics.enable_wandb=true but wandb is not installed: pip install 'titanlite[wandb]' "
                          "or set metrics.enable_wandb=false")
    _validate_optimizer_and_float8(config)
    health, profiling = config.health, config.profiling
    if health.spike_min_history > health.spike_window:
        raise ConfigError(f"health.spike_min_history={health.spike_min_history}: must be <= health.spike_window="
                          f"{health.spike_window}")
    if profiling.profile_freq <= profiling.profile_warmup + profiling.profile_active:
        raise ConfigError(f"profiling.profile_freq={profiling.profile_freq}: must exceed profile_warmup "
                          f"{profiling.profile_warmup} + profile_active {profiling.profile_active}")


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


def _validate_optimizer_and_float8(config: Config) -> None:
    """Combinations of [optimizer], [parallelism] and [float8] that cannot work, whatever the device."""
    opt = config.optimizer
    if opt.name != "adamw" and opt.implementation != "auto":
        raise ConfigError(f"optimizer.implementation={opt.implementation!r} applies to adamw only: remove it for "
                          f"optimizer.name={opt.name!r}")
    if opt.cpu_offload and opt.name != "adamw":
        raise ConfigError(f"optimizer.cpu_offload=true offloads torch's AdamW: set optimizer.name=adamw (or "
                          f"cpu_offload=false to keep {opt.name} on the GPU)")
    if opt.cpu_offload and config.parallelism.fsdp_cpu_offload:
        raise ConfigError("optimizer.cpu_offload and parallelism.fsdp_cpu_offload are both true: use one (FSDP's "
                          "offloads parameters and gradients too)")
    if any(not part.strip() for part in config.float8.exclude.split(",")) and config.float8.exclude.strip():
        raise ConfigError(f"float8.exclude={config.float8.exclude!r}: an empty name fragment between commas")


def config_from_dict(record: dict) -> Config:
    """The Config a run folder's config.json or a checkpoint's meta.json recorded (Config.to_dict() or
    Run.to_dict()); settings added since keep today's defaults, settings since removed are ignored."""
    config = Config()
    for section in dataclasses.fields(Config):
        values = getattr(config, section.name)
        for key, value in record.get(section.name, {}).items():
            if key in values.__dataclass_fields__:
                setattr(values, key, value)
    validate(config)
    return config


def config_differences(saved: dict, current: dict) -> list[str]:
    """'section.key: saved -> current' for every setting that differs between two config dicts
    (Config.to_dict() or Run.to_dict()); keys one side lacks are listed too. Derived values are left
    out: they follow from the settings."""
    differences = []
    for section in sorted(set(saved) | set(current)):
        if section == "derived" or not isinstance(saved.get(section, {}), dict):
            continue
        before, after = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key, "<unset>") != after.get(key, "<unset>"):
                differences.append(f"{section}.{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    return differences


def settings_help() -> str:
    """Every setting with its type, default and help: the body of `--help`."""
    lines, section = [], None
    for dotted, item, kind in declared_fields():
        if dotted.partition(".")[0] != section:
            section = dotted.partition(".")[0]
            lines.append(f"\n[{section}]")
        allowed = f" ({' | '.join(map(str, item.metadata['choices']))})" if item.metadata["choices"] else ""
        lines.append(f"  --{dotted} {kind.__name__.upper()}  default {item.default!r}{allowed}: {item.metadata['help']}")
    return "\n".join(lines)
