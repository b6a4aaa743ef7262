"""What a training step keeps alive on each GPU, in bytes: the memory model behind `titanlite.plan`.

It follows what titanlite's code keeps alive (model/, train.py, parallel/), in bytes per
GPU, as `torch.cuda.max_memory_allocated` counts them (not the CUDA context, NCCL
buffers or allocator fragmentation, which `headroom_gib` stands for):
  - sharded state over TP x FSDP-shard ranks: fp32 parameters (4 B/param), fp32 gradients (4),
    optimizer state (`optimizer_state_bytes_per_parameter`: AdamW 8, adamw8bit ~2.03, 0 on the GPU
    with optimizer.cpu_offload); all 0 on the GPU with parallelism.fsdp_cpu_offload;
  - FSDP2 buffers: bf16 gathered weights of the current and the prefetched block, their bf16 and
    fp32 gradients before the reduce-scatter, and the [norm, output] group kept gathered from
    forward to backward; without FSDP, autocast's bf16 weight copies saved for the backward (step
    weights, parallel/step_weights.py: the block linears' copies and gradients kept between steps);
  - activations saved per block (`_block_bytes_per_token`), by AC mode, for the micro-batch;
  - logits and loss: the fp32 upcast, log-softmax output and its gradient, 12 B per logit
    (vocabulary sharded over TP by loss_parallel); 6 B with the compiled loss (no TP); with the
    chunked head (training.loss_chunk_tokens, no TP): one chunk's 4 B per logit plus the head's
    fp32 weight gradient (and its bf16 copy without FSDP);
  - the backward of one block: its recomputed activations (AC) and gradient temporaries.
  - float8 (`float8.enable`) changes one term: with float8 all-gather FSDP gathers the block weights
    in 1 byte instead of 2. Activations are estimated as for bf16 (not measured with float8); the
    float8 copies of weights, inputs and gradients live for one matmul each.
Start-up: layout-independent init draws one full parameter at a time on the GPU next to the
sharded state: `INIT_TEMPORARIES` x the largest parameter in fp32.
bench/bench_memory.py measures the same configurations on a GPU; the README states the error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from titanlite.config.resolve import (Layout, compute_dtype_of, uses_chunked_loss, uses_float8_all_gather,
                                      uses_step_weights)
from titanlite.config.settings import Config
from titanlite.model.size import count_parameters, largest_parameter

GIB = 2**30
ESTIMATE_MARGIN = 1.10  # a plan fits only with 10% to spare: the estimate is an estimate (README: measured error)
# Start-up init: the full fp32 parameter plus what torch's trunc_normal_ allocates beside it (its
# rejection sampling: a second sample, the where() result, two masks): 4.25 x the parameter, measured
# on CPU with torch 2.13 (tests/test_parallelize.py::test_init_peak_is_one_parameter_not_the_model).
INIT_TEMPORARIES = 4.25
ADAMW8BIT_BLOCK = 256  # torchao AdamW8bit: one fp32 scale per 256 8-bit values, per moment


def optimizer_state_bytes_per_parameter(config: Config) -> tuple[float, float]:
    """(bytes on the GPU, bytes in host memory) of optimizer state per parameter.

    AdamW: exp_avg and exp_avg_sq in fp32, 8 B. adamw8bit: each moment in 8 bits plus an fp32
    scale per block of 256, 2 x (1 + 4/256) = 2.03 B (torchao keeps fp32 moments for tensors
    under 4,096 elements: the norm gains, negligible). optimizer.cpu_offload: nothing on the GPU;
    the host holds an fp32 copy of each parameter and of its gradient (pinned) and the fp32
    moments, 16 B.
    """
    if config.optimizer.name == "adamw8bit":
        return 2 * (1 + 4 / ADAMW8BIT_BLOCK), 0.0
    if config.optimizer.cpu_offload:
        return 0.0, 16.0
    return 8.0, 0.0


def fits_gpu(peak_bytes: float, capacity_gib: float, headroom_gib: float) -> bool:
    """Peak estimate plus its margin within the GPU less the headroom (CUDA context, NCCL, fragmentation)."""
    return peak_bytes * ESTIMATE_MARGIN / GIB <= capacity_gib - headroom_gib


def _block_bytes_per_token(config: Config, tp: int, mode: str) -> float:
    """Bytes one block keeps for its backward per token of the micro-batch, on one GPU.

    With TP, sequence parallel shards the norms and the residual stream over the sequence (/tp);
    the all-gathered norm outputs that q/k/v and w1/w3 read are full size on every TP rank; heads
    and FFN columns are split (/tp). Eager terms follow the autograd graph of model.py; compiled
    blocks fuse RMSNorm, RoPE and SwiGLU and keep only their bf16 inputs.
    """
    m = config.model
    d, heads, head_dim = m.dim, m.n_heads, m.dim // m.n_heads
    kv, ffn = m.n_kv_heads * head_dim, m.intermediate_size
    padded = m.attention_head_dim or head_dim
    pad_ratio = padded / head_dim
    if mode == "full":
        return 2 * d / tp  # the block input only
    gathered = 2 * (2 * d) if tp > 1 else 0  # all-gathered normed inputs of attention and FFN
    if config.compile.enable:
        norms = 2 * (2 * d + 4) / tp + (0 if tp > 1 else 2 * 2 * d)
        rope = 2 * (d + kv) / tp
        attention = (2 * kv + 2 * d * pad_ratio + 4 * heads) / tp  # v, output, logsumexp
        swiglu = 4 * ffn / tp
    else:
        # RMSNorm in fp32: two fp32 copies of x (pow, mul), the bf16 normed value, and its output.
        norms = 2 * (10 * d / tp + (0 if tp > 1 else 2 * d))
        rope = 4 * (d + kv) / tp  # the fp32 q and k the rotation reads
        attention = (2 * (d + 2 * kv + d) * pad_ratio + 4 * heads) / tp  # q, k, v, output, logsumexp
        swiglu = 8 * ffn / tp  # w1 out, silu out, w3 out, product
    if padded != head_dim:
        attention += 2 * d / tp  # the contiguous copy of the sliced output that wo reads
    if mode == "selective":  # per-op: keep matmul, attention and reduce-scatter outputs, recompute the rest
        matmuls = 2 * (d + 2 * kv) / tp + 2 * ffn * 2 / tp + 2 * 2 * d  # q k v, w1 w3, wo and w2 (full rows)
        scattered = 2 * 2 * d / tp if tp > 1 else 0
        return 2 * d / tp + matmuls + scattered + (2 * d * pad_ratio + 4 * heads) / tp
    return gathered + norms + rope + attention + swiglu


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU; `peak` is the largest sum that is alive at one time."""

    parameters: float
    gradients: float
    optimizer_state: float
    fsdp_buffers: float
    activations: float
    logits_and_loss: float
    backward_transient: float
    peak: float
    host_offloaded: float  # bytes per GPU held in host memory by CPU offload
    init_transient: float  # start-up peak: the sharded parameters and one full parameter being drawn

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in dataclasses.asdict(self).items()}


def estimate_memory(config: Config, layout: Layout, grad_accum_steps: int = 1) -> MemoryEstimate:
    """Peak allocated bytes per GPU of a training step (see the module docstring for the terms)."""
    counts = count_parameters(config.model)
    tp, shard = layout.tensor, layout.shard
    fsdp = layout.shard * layout.replicate > 1
    state_shards = tp * (shard if fsdp else 1)
    offload = fsdp and config.parallelism.fsdp_cpu_offload
    optimizer_bytes, optimizer_host_bytes = optimizer_state_bytes_per_parameter(config)
    parameters, gradients, optimizer = (b * counts.total / state_shards for b in (4, 4, optimizer_bytes))
    host = optimizer_host_bytes * counts.total / state_shards
    if offload:
        host = parameters + gradients + 8 * counts.total / state_shards  # FSDP2 offloads AdamW's state too
        parameters = gradients = optimizer = 0.0
    mode = config.activation_checkpoint.mode
    layers = config.model.n_layers
    compute_dtype = compute_dtype_of(config.training, "cuda")  # the plan is for a GPU
    step_weights = uses_step_weights(config.training, config.float8, layout, compute_dtype, grad_accum_steps)
    if mode == "selective" and config.activation_checkpoint.selective_blocks:
        mode = "selective-k"
    if fsdp:
        # Current + prefetched block: bf16 weights (float8 with float8 all-gather), bf16 gradient, its
        # fp32 copy for the reduce-scatter.
        gathered = 1 if uses_float8_all_gather(config.float8, layout.shard) else 2
        buffers = 2 * (gathered + 2 + 4) * counts.per_block / tp + 2 * counts.output_group / tp
    elif step_weights and mode == "full":
        buffers = 2 * layers * counts.per_block  # the block linears' bf16 copies, kept between steps
    else:
        # autocast saves the bf16 copy of each matmul weight for the backward (not inside full AC); step
        # weights keep the same copies of the block linears.
        buffers = 0.0 if mode == "full" else 2 * counts.non_embedding / tp
    tokens = config.training.micro_batch_size * config.training.seq_len
    if mode == "selective-k":
        every = config.activation_checkpoint.selective_blocks
        checkpointed = math.ceil(layers / every)
        per_token = (checkpointed * _block_bytes_per_token(config, tp, "full")
                     + (layers - checkpointed) * _block_bytes_per_token(config, tp, "none"))
    else:
        per_token = layers * _block_bytes_per_token(config, tp, mode)
    final_norm_input = 2 * config.model.dim * (1 if tp == 1 else 2)  # norm output, gathered for the head
    activations = tokens * (per_token + final_norm_input)
    # Eager: fp32 upcast + log-softmax + its gradient, 12 B per logit. The compiled loss (compile
    # without TP) fuses those away and keeps the bf16 logits and their bf16 gradient: 6 B, which
    # took the estimate of the compiled configurations from 13-16% over to within 1% on an H100.
    vocab = config.model.vocab_size
    if uses_chunked_loss(config.training, layout):
        # The chunked head + loss (model/loss.py): one chunk's bf16 logits and their bf16 gradient, the
        # head's fp32 weight gradient from its forward to its backward, and (no FSDP) its bf16 weight copy.
        chunk = min(config.training.loss_chunk_tokens, tokens)
        logits = 4.0 * chunk * vocab + (4.0 + (0.0 if fsdp else 2.0)) * vocab * config.model.dim
    else:
        bytes_per_logit = 6.0 if config.compile.enable and tp == 1 else 12.0
        logits = bytes_per_logit * tokens * vocab / tp
    one_block = tokens * _block_bytes_per_token(config, tp, "none")
    transient = (one_block if mode != "none" else 0.0) + tokens * 4 * config.model.intermediate_size / tp
    if mode == "full" and not fsdp and not step_weights:
        transient += 2 * counts.per_block / tp  # the recomputed block's bf16 weight copies
    static = parameters + optimizer + buffers
    # The gradients of earlier micro-batches (step weights' never-freed buffers too: they need A > 1).
    grads_during_forward = gradients if grad_accum_steps > 1 else 0.0
    peak = max(static + grads_during_forward + activations + max(logits, transient),
               static + gradients + transient)
    init = parameters + INIT_TEMPORARIES * 4 * largest_parameter(config.model)  # the shard + one full parameter
    return MemoryEstimate(parameters, gradients, optimizer, buffers, activations, logits, transient, peak, host, init)


def memory_verdict(estimate: MemoryEstimate, available_bytes: float, where: str) -> tuple[str, str] | None:
    """Before allocating: ("refuse", line) when the estimated peak exceeds what `where` has by more than
    the estimate's margin, ("warn", line) when it fits only within the margin, else None."""
    peak = max(estimate.peak, estimate.init_transient)
    if peak * ESTIMATE_MARGIN <= available_bytes:
        return None
    line = (f"the estimated peak is {peak / GIB:.1f} GiB per process and {where} has {available_bytes / GIB:.1f} GiB "
            "available; `python -m titanlite.plan --config <this config>` shows the terms and what would fit "
            "(activation_checkpoint.mode, training.micro_batch_size, optimizer.name=adamw8bit, more processes)")
    return ("refuse", line) if peak > available_bytes * ESTIMATE_MARGIN else ("warn", line)
