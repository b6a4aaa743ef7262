"""What can be set: every config field, declared once, with `setting(default, help, choices=..., ge=...)`.

Each field's type (the annotation), default, allowed values or bounds and help text live here and
nowhere else. titanlite/config/load.py reads TOML and the command line into these dataclasses and checks
the values against the declarations; `--help` and the README's reference table are generated from them.
No torch, no I/O here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A config value that cannot be used; the message is one line meant for a person."""


def setting(default, help: str, *, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A config field: default, one-line help, and the allowed values (choices) or bounds."""
    return field(default=default, metadata={"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt})


@dataclass
class Job:
    dump_folder: str = setting("./outputs/run", "the run's output folder: logs, metrics, checkpoints")
    description: str = setting("", "free text, copied into the metrics stream")
    collective_timeout_s: float = setting(600.0, "no step finished on some rank for this long ends the job (exit 5), "
                                                 "naming the ranks that stopped; raise it above the longest save, "
                                                 "load or first compile", gt=0)


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
    enable: bool = setting(False, "evaluate the loss on held-out data (titanlite/metrics/validation.py)")
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
    # torch's AdamW refuses beta = 1 (the bias correction divides by 1 - beta^t)
    beta1: float = setting(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon", ge=0)
    weight_decay: float = setting(0.1, "decoupled weight decay (not on norms)", ge=0)
    implementation: str = setting("auto", "auto: on CUDA compiled (one compiled kernel per parameter, "
                                          "titanlite/optim/adamw.py), fused without compile or with float8; on CPU "
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
    seed: int = setting(0, "seed for init and data order", ge=0)
    seq_len: int = setting(256, "tokens per sequence", gt=0)
    global_batch_tokens: int = setting(8192, "tokens per optimizer step, over all data-parallel ranks", gt=0)
    micro_batch_size: int = setting(4, "sequences per forward pass on one rank", gt=0)
    total_tokens: int = setting(0, "training budget in tokens; total steps derive from it", ge=0)
    steps: int = setting(0, "if > 0, overrides the steps derived from total_tokens", ge=0)
    grad_clip: float = setting(1.0, "max global grad norm; 0 disables clipping", ge=0)
    loss_chunk_tokens: int = setting(4096, "the output head and the loss run this many tokens at a time, never "
                                           "building the whole micro-batch's logits; 0: whole logits, then the "
                                           "loss (always so under tensor parallelism)", ge=0)
    mixed_precision: str = setting("bf16", "bf16 applies on CUDA only", choices=("bf16", "fp32"))
    bf16_step_weights: bool = setting(True, "bf16 on one GPU without FSDP, TP or float8, with gradient "
                                            "accumulation: cast the block linears' weights once per step and add "
                                            "their gradients into fp32 inside the matmul (+2 bytes per parameter); "
                                            "false: autocast casts every micro-batch")
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
    """float8 matmuls through torchao (titanlite/parallel/float8.py): the blocks' linears, never the output head."""

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
    keep_latest_k: int = setting(0, "retention; 0 keeps all (the one just saved is never deleted)", ge=0)
    resume: str = setting("auto", "auto (newest complete in folder) | never (fresh; refuses a folder holding checkpoints) | path to a checkpoint")
    async_mode: str = setting("disabled", "async: staged in pinned host memory, written while training",
                              choices=("disabled", "async"))
    write_threads: int = setting(8, "files each rank writes (and reads on load) in parallel", gt=0)
    initial_load_path: str = setting("", "with nothing to resume: start from this checkpoint (seed, HF import)")
    initial_load_model_only: bool = setting(True, "take only the weights from initial_load_path (step 0)")
    initial_load_change_model: bool = setting(False, "train initial_load_path's weights under this config's norm_eps "
                                                     "and RoPE where they differ from the checkpoint's (a longer "
                                                     "context, on purpose); off: such a difference is refused")
    load_unverified: bool = setting(False, "load a checkpoint whose meta.json has no checksums (crc32), its data "
                                           "unverified; off: such a checkpoint is refused")


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
    """Training-health detectors and their actions (titanlite/health/monitor.py). Windows count steps."""

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
    """PyTorch profiler traces and CUDA memory snapshots (titanlite/metrics/profiling.py)."""

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
