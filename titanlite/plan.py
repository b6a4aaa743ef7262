"""Plan a run before launching it: parameters, FLOPs, derived steps, per-GPU memory, time, warnings.

    python -m titanlite.plan --config 7b_4k.toml [--ngpu 64] [--peak-tflops 989] [--mfu 0.4]
    python -m titanlite.plan --config 7b_4k.toml --compare-layouts
    (any config key can be overridden: --training.micro_batch_size 2)

The memory per GPU comes from titanlite/parallel/memory.py; the throughput from the
measured costs of TP and activation checkpointing below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from titanlite.config.load import load_config
from titanlite.config.resolve import (Layout, Run, data_parallel_shape, resolve, uses_float8_all_gather)
from titanlite.config.settings import Config, ConfigError
from titanlite.model.size import count_parameters, flops_per_token
from titanlite.parallel.memory import (ESTIMATE_MARGIN, GIB, MemoryEstimate, estimate_memory, fits_gpu)

# Measured with titanlite on 4 x H100, the 7B shape (32 layers, micro-batch 4, selective AC): FSDP 4
# 11,435 tokens/s/GPU, FSDP 2 x TP 2 10,049 (bench/results/2026-11-27_vs_torchtitan_4xh100.json).
# Each doubling of TP is assumed to cost the same factor again (not measured beyond 2 at 32 layers).
TP_THROUGHPUT_PER_DOUBLING = 10_049 / 11_435
GPUS_PER_NODE = 8
# Throughput relative to no AC. Per-op selective AC recomputes only norms, RoPE and SwiGLU
# pointwise ops: measured 0.987 on an H100 (7B shape, 8 layers, compiled;
# bench/results/2026-11-27_vs_torchtitan_1xh100.json). Full AC re-runs each block's forward
# (8 instead of 6 FLOPs per parameter and token): 0.75, assumed, not measured.
AC_THROUGHPUT = {"none": 1.0, "selective": 0.99, "full": 0.75}


def float8_summary(config: Config, fsdp_shard: int) -> str:
    """How the plan treats float8: 'off', or the recipe and what it changes in the estimate."""
    if not config.float8.enable:
        return "off"
    gather = ", float8 all-gather" if uses_float8_all_gather(config.float8, fsdp_shard) else ""
    return (f"{config.float8.recipe}{gather} (blocks' linears; FLOPs and MFU still counted against the bf16 "
            "peak; memory as bf16 but the gathered weights)")


def relative_throughput(layout: Layout) -> float:
    """tokens/s/GPU relative to pure FSDP, from the measured TP cost (see TP_THROUGHPUT_PER_DOUBLING)."""
    return TP_THROUGHPUT_PER_DOUBLING ** math.log2(layout.tensor)


def expected_peak_lr(non_embedding_params: float) -> float:
    """The seed's LR for a model size: 3e-4 up to the 7B shape, then log-log down to 1.5e-4 at 13B.

    Anchors are the 7B and 13B recipe shapes' non-embedding parameter counts (the output head
    included); larger models continue the same slope ("larger model, smaller LR"). At other
    global batches, scale by sqrt(batch ratio) (the seed's chapter 5 rule).
    """
    small, large = 6_196_301_824, 11_667_133_440
    if non_embedding_params <= small:
        return 3.0e-4
    slope = math.log(1.5e-4 / 3.0e-4) / math.log(large / small)
    return 3.0e-4 * (non_embedding_params / small) ** slope


def check_warnings(config: Config, derived: Run | None, memory: MemoryEstimate, capacity_gib: float,
                   headroom_gib: float, derive_error: str | None) -> list[str]:
    """One line per problem, each naming the key to change."""
    warnings = []
    counts = count_parameters(config.model)
    lr = config.optimizer.lr
    if counts.non_embedding >= 1e9:
        expected = expected_peak_lr(counts.non_embedding)
        if lr > 1.5 * expected:
            warnings.append(
                f"optimizer.lr={lr:g} is high for {counts.non_embedding / 1e9:.1f}B non-embedding parameters: "
                f"the seed uses ~{expected:.2g} at this size (larger model, smaller LR; gotcha 1: a 3B LR on a 13B "
                "model diverges within hundreds of steps)")
        elif lr < expected / 1.5:
            warnings.append(
                f"optimizer.lr={lr:g} is low for {counts.non_embedding / 1e9:.1f}B non-embedding parameters: "
                f"the seed uses ~{expected:.2g} at this size (gotcha 1: a 13B LR on a 3B model learns very slowly)")
    usable = capacity_gib - headroom_gib
    if not fits_gpu(memory.peak, capacity_gib, headroom_gib):
        fix = ("set activation_checkpoint.mode=full" if config.activation_checkpoint.mode != "full"
               else "lower training.micro_batch_size (and keep global_batch_tokens divisible)")
        warnings.append(
            f"training.micro_batch_size={config.training.micro_batch_size} will not fit: estimated peak "
            f"{memory.peak / GIB:.1f} GiB per GPU (+{ESTIMATE_MARGIN - 1:.0%} margin) > {usable:.0f} GiB usable of "
            f"{capacity_gib:.0f}: {fix}")
    if memory.init_transient / GIB > usable:
        warnings.append(f"start-up: layout-independent init needs {memory.init_transient / GIB:.0f} GiB on each GPU "
                        "(the sharded parameters and one full parameter): start from a seed checkpoint "
                        "(checkpoint.initial_load_path)")
    if derive_error:
        warnings.append(derive_error)
    return warnings


def plan(config: Config, ngpu: int, peak_tflops: float = 989.0, mfu: float = 0.4, capacity_gib: float = 80.0,
         headroom_gib: float = 4.0) -> dict:
    """Everything the report prints, as a dict (tests and --json use it)."""
    counts = count_parameters(config.model)
    derive_error, derived = None, None
    try:
        derived = resolve(config, ngpu, config.model.vocab_size, device_type="cuda")  # plans GPU runs
    except ConfigError as error:
        derive_error = str(error)
    try:
        layout = data_parallel_shape(config.parallelism, ngpu)
    except ConfigError:
        tp = config.parallelism.tensor_parallel_degree
        layout = Layout(replicate=1, shard=max(1, ngpu // tp), tensor=tp)
    accum = derived.grad_accum_steps if derived else 1
    memory = estimate_memory(config, layout, accum)
    per_token = flops_per_token(config.model, config.training.seq_len)
    tokens_per_gpu_s = mfu * peak_tflops * 1e12 / per_token
    total_tokens = derived.total_tokens if derived else config.training.total_tokens
    wall_s = total_tokens / (tokens_per_gpu_s * ngpu)
    return {
        "config": {"ngpu": ngpu, "layout": layout.name, "micro_batch_size": config.training.micro_batch_size,
                   "seq_len": config.training.seq_len, "activation_checkpoint": config.activation_checkpoint.mode,
                   "compile": config.compile.enable, "cpu_offload": config.parallelism.fsdp_cpu_offload,
                   "optimizer": config.optimizer.name + (" (state on the host)" if config.optimizer.cpu_offload else ""),
                   "float8": float8_summary(config, layout.shard)},
        "parameters": dataclasses.asdict(counts),
        "flops_per_token": per_token,
        "derived": derived.derived() if derived else None,
        "memory_gib": memory.gib(),
        "time": {"mfu": mfu, "peak_tflops": peak_tflops, "tokens_per_s_per_gpu": round(tokens_per_gpu_s),
                 "wall_days": round(wall_s / 86400, 1), "gpu_hours": round(wall_s * ngpu / 3600)},
        "warnings": check_warnings(config, derived, memory, capacity_gib, headroom_gib, derive_error),
    }


def candidate_layouts(ngpu: int) -> list[Layout]:
    """TP 1/2/4/8 inside a node x FSDP over the rest, plus HSDP (shard inside a node, replicate across)."""
    layouts = []
    for tp in (1, 2, 4, 8):
        if tp > min(ngpu, GPUS_PER_NODE) or ngpu % tp:
            continue
        layouts.append(Layout(replicate=1, shard=ngpu // tp, tensor=tp))
        per_node = GPUS_PER_NODE // tp
        if ngpu > GPUS_PER_NODE and ngpu % GPUS_PER_NODE == 0 and per_node > 1:
            layouts.append(Layout(replicate=ngpu // GPUS_PER_NODE, shard=per_node, tensor=tp))
    return layouts


def compare_layouts(config: Config, ngpu: int, capacity_gib: float = 80.0, headroom_gib: float = 4.0) -> list[dict]:
    """Layouts x AC modes for `ngpu` at the config's micro-batch: usable ones first (fit, divisible
    global batch), by estimated throughput, then plain FSDP before HSDP, then memory. rows[0] is the pick."""
    rows = []
    for layout in candidate_layouts(ngpu):
        dp = layout.shard * layout.replicate
        per_pass = config.training.micro_batch_size * config.training.seq_len * dp
        divisible = config.training.global_batch_tokens % per_pass == 0
        for mode in ("none", "selective", "full"):
            variant = dataclasses.replace(config, activation_checkpoint=dataclasses.replace(
                config.activation_checkpoint, mode=mode, selective_blocks=0))
            memory = estimate_memory(variant, layout, max(1, config.training.global_batch_tokens // per_pass))
            fits = fits_gpu(memory.peak, capacity_gib, headroom_gib)
            rows.append({"layout": layout.name, "tp": layout.tensor, "shard": layout.shard,
                         "replicate": layout.replicate, "activation_checkpoint": mode,
                         "peak_gib": round(memory.peak / GIB, 1), "fits": fits, "divisible": divisible,
                         "grad_accum_steps": config.training.global_batch_tokens / per_pass,
                         "relative_throughput": round(relative_throughput(layout) * AC_THROUGHPUT[mode], 3)})
    rows.sort(key=lambda r: (not (r["fits"] and r["divisible"]), -r["relative_throughput"], r["replicate"] > 1,
                             r["peak_gib"]))
    return rows


def render_plan(result: dict) -> str:
    p, d, mem, t = result["parameters"], result["derived"], result["memory_gib"], result["time"]
    c = result["config"]
    lines = [f"layout: {c['layout']} on {c['ngpu']} GPUs; micro-batch {c['micro_batch_size']} x {c['seq_len']}, "
             f"AC {c['activation_checkpoint']}, compile {c['compile']}, CPU offload {c['cpu_offload']}, "
             f"optimizer {c['optimizer']}, float8 {c['float8']}",
             f"parameters: {p['total']:,} total, {p['embedding']:,} embedding, {p['non_embedding']:,} non-embedding",
             f"FLOPs per token (training): {result['flops_per_token']:,}"]
    if d:
        lines.append(f"derived: DP {d['data_parallel_degree']}, A = {d['grad_accum_steps']} grad-accum steps, "
                     f"{d['total_steps']:,} steps, {d['warmup_steps']:,} warmup steps, {d['total_tokens']:,} tokens")
    lines.append("memory per GPU (GiB): " + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" for k, v in mem.items() if k not in ("peak", "init_transient")))
    lines.append(f"  peak {mem['peak']:.1f} GiB (allocated; add ~4 GiB for context, NCCL and fragmentation); "
                 f"start-up init peak {mem['init_transient']:.1f} GiB")
    lines.append(f"time at {t['mfu']:.0%} MFU of {t['peak_tflops']:g} TFLOP/s: {t['tokens_per_s_per_gpu']:,} "
                 f"tokens/s/GPU, {t['wall_days']} days, {t['gpu_hours']:,} GPU-hours")
    lines += [f"WARNING: {w}" for w in result["warnings"]] or ["no warnings"]
    return "\n".join(lines)


def render_layouts(rows: list[dict]) -> str:
    lines = ["layout                 AC         peak GiB  fits  A                 rel. tokens/s/GPU"]
    for row in rows:
        accum = row["grad_accum_steps"]
        accum_text = f"{accum:g}" if row["divisible"] else f"{accum:.2f} indivisible"
        lines.append(f"{row['layout']:<22} {row['activation_checkpoint']:<10} {row['peak_gib']:>8.1f}  "
                     f"{'yes' if row['fits'] else 'no':<4}  {accum_text:<17} {row['relative_throughput']:.2f}")
    pick = rows[0] if rows and rows[0]["fits"] and rows[0]["divisible"] else None
    lines.append(
        f"pick: {pick['layout']} with activation_checkpoint.mode={pick['activation_checkpoint']} (fits; the fewest "
        f"TP ranks and the least recompute: TP costs throughput at these sizes, measured "
        f"{TP_THROUGHPUT_PER_DOUBLING:.2f}x at TP 2)" if pick
        else "pick: none fits: lower training.micro_batch_size")
    lines.append("(relative throughput: TP from the measured FSDP 4 vs FSDP 2 x TP 2 cost, compounded per doubling; "
                 f"AC factors {AC_THROUGHPUT}: selective measured on an H100, full assumed)")
    return "\n".join(lines)


def argument_problem(args: argparse.Namespace) -> str | None:
    """Why the command line's numbers cannot be planned with (None if they can). nan fails every test."""
    if args.ngpu is not None and args.ngpu < 1:  # 0 was taken for "not given", and -8 planned -159.5 days
        return f"--ngpu {args.ngpu}: must be >= 1"
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--gpu-memory-gib", args.gpu_memory_gib)):
        if not (math.isfinite(value) and value > 0):
            return f"{flag} {value}: must be a finite number > 0"
    if not 0 < args.mfu <= 1:
        return f"--mfu {args.mfu}: must be in (0, 1] (a fraction of the peak: 0.4 is 40%)"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titanlite.plan",
                                     description="Plan a titanlite run: memory, time and warnings.",
                                     epilog="Any config key can be overridden: --section.key value")
    parser.add_argument("--config", required=True, help="TOML file, or a name in train_configs/")
    parser.add_argument("--ngpu", type=int, default=None, help="GPUs (default: 64 for TP-8 recipes, else 1)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the time estimate")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--compare-layouts", action="store_true", help="rank TP x FSDP / HSDP layouts for --ngpu")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = parser.parse_known_args(argv)
    problem = argument_problem(args)
    if problem:
        print(f"titanlite.plan: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        config = load_config(args.config, overrides)
        ngpu = args.ngpu or (64 if config.parallelism.tensor_parallel_degree == 8 else
                             config.parallelism.tensor_parallel_degree)
        if config.model.vocab_size == 0:
            raise ConfigError("model.vocab_size=0: plan needs an explicit vocabulary size (--model.vocab_size N)")
        result = plan(config, ngpu, args.peak_tflops, args.mfu, args.gpu_memory_gib)
        if args.compare_layouts:
            result["layouts"] = compare_layouts(config, ngpu, args.gpu_memory_gib)
    except ConfigError as error:
        print(f"titanlite.plan: config error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(render_plan(result))
    if args.compare_layouts:
        print()
        print(render_layouts(result["layouts"]))


if __name__ == "__main__":
    main()
