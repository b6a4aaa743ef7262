"""Peak GPU memory of real titanlite training steps against `titanlite.plan`'s estimate.

Each configuration runs in a fresh process: the recipe's model shape (fewer layers, so that one
GPU holds it), parallelize() as train.py calls it, layout-independent init, then the peak is
reset and `--steps` optimizer steps of train.py's `train_step` run on random tokens (AdamW state
is created in step 1, as in training). The measured `torch.cuda.max_memory_allocated` is compared
with memory_estimate.estimate_memory() for the same config and layout. Writes JSON.

One GPU:   python bench/bench_memory.py --out bench/results/memory_h100.json
Several:   torchrun --standalone --nproc_per_node 4 bench/bench_memory.py --out bench/results/memory_4gpu.json
           (FSDP over the GPUs; add --tp 2 for FSDP x TP)
CPU smoke: python bench/bench_memory.py --device cpu --tiny --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite import train as trainer  # noqa: E402
from titanlite.config.load import load_config  # noqa: E402
from titanlite.config.resolve import (
    optimizer_update,  # noqa: E402
    resolve,  # noqa: E402
)
from titanlite.model.loss import cross_entropy_per_sample  # noqa: E402
from titanlite.model.transformer import build_model  # noqa: E402
from titanlite.optim.optimizer import build_optimizer  # noqa: E402
from titanlite.parallel.compile import compile_loss  # noqa: E402
from titanlite.parallel.init import init_weights_layout_independent  # noqa: E402
from titanlite.parallel.memory import GIB, estimate_memory  # noqa: E402
from titanlite.parallel.mesh import ParallelDims  # noqa: E402
from titanlite.parallel.parallelize import parallelize  # noqa: E402
from titanlite.parallel.tensor_parallel import loss_context  # noqa: E402

# (name, recipe, overrides): shapes of the recipes, layers cut so one 80 GB GPU holds the fp32
# weights, gradients and AdamW state. Covers AC none / full / selective, compile on and off,
# micro-batch 1-4, 4k and 8k (YaRN), head_dim 100 and 128, and A = 2 (gradients alive in the forward).
CONFIGS = [
    ("7b_l8_mb2_none_eager", "7b_4k", ["--model.n_layers", "8", "--training.micro_batch_size", "2",
                                        "--activation_checkpoint.mode", "none", "--compile.enable", "false"]),
    ("7b_l8_mb4_full_eager_A2", "7b_4k", ["--model.n_layers", "8", "--training.micro_batch_size", "4",
                                           "--activation_checkpoint.mode", "full", "--compile.enable", "false",
                                           "--training.global_batch_tokens", "A2"]),
    ("3b_l8_mb4_selective_eager", "3b_4k", ["--model.n_layers", "8", "--training.micro_batch_size", "4",
                                             "--activation_checkpoint.mode", "selective", "--compile.enable", "false"]),
    ("13b_l4_mb1_8k_none_compiled", "13b_8k", ["--model.n_layers", "4", "--training.micro_batch_size", "1",
                                                "--activation_checkpoint.mode", "none", "--compile.enable", "true"]),
    ("7b_l8_mb2_none_compiled", "7b_4k", ["--model.n_layers", "8", "--training.micro_batch_size", "2",
                                           "--activation_checkpoint.mode", "none", "--compile.enable", "true"]),
]
TINY = ["--model.dim", "256", "--model.n_heads", "4", "--model.n_kv_heads", "2", "--model.intermediate_size", "512",
        "--model.vocab_size", "1024", "--training.seq_len", "256", "--model.n_layers", "2"]


def measure(recipe: str, overrides: list[str], device_name: str, steps: int, tp: int) -> dict:
    """Run `steps` training steps of the config; return measured and estimated peak bytes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name, int(os.environ.get("LOCAL_RANK", "0")) if device_name == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # "--training.global_batch_tokens A2" means two micro-batches per step; otherwise one (A = 1).
    accum = 2 if "A2" in overrides else 1
    overrides = [o for o in overrides if o != "A2" and o != "--training.global_batch_tokens"]
    config = load_config(f"{recipe}.toml", overrides + [
        "--tokenizer.path", "default", "--parallelism.tensor_parallel_degree", str(tp),
        "--training.steps", str(steps)])
    config.training.global_batch_tokens = (accum * config.training.micro_batch_size * config.training.seq_len
                                           * (world_size // tp))
    use_bf16 = device.type == "cuda"
    run = resolve(config, world_size, config.model.vocab_size, device.type, trainer.attention_head_dim_probe(device))
    config, train, layout = run.config, run.config.training, run.layout
    dims = ParallelDims.build(layout, device.type)
    model = build_model(config.model, train.seq_len, device="meta")
    parallelize(model, dims, config.parallelism, config.activation_checkpoint, config.compile.enable, config.float8,
                torch.bfloat16 if use_bf16 else torch.float32, run.float8_all_gather, run.step_weights)
    init_weights_layout_independent(model, device, train.seed)
    optimizer = build_optimizer(model, config.optimizer, optimizer_update(config, device.type), config.compile.enable)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 and not layout.fsdp_enabled
                else contextlib.nullcontext())
    extra = {"loss_fn": compile_loss(cross_entropy_per_sample, config.compile.enable, layout.tp_enabled),
             "loss_context": loss_context(layout.tp_enabled)}
    generator = torch.Generator().manual_seed(dims.data_parallel_rank)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)  # after init: its full fp32 copy is a start-up cost
    step_peaks = []
    for _ in range(steps):
        batches = []
        for _ in range(accum):
            tokens = torch.randint(0, config.model.vocab_size, (train.micro_batch_size, train.seq_len + 1),
                                   generator=generator)
            batches.append({"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)})
        valid = torch.tensor(float(accum * train.micro_batch_size * train.seq_len * layout.data_parallel_degree),
                             device=device)
        trainer.train_step(model, optimizer, batches, valid, train.grad_clip, autocast, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()  # host sync: benchmark measurement
            step_peaks.append(torch.cuda.max_memory_allocated(device))
    estimate = estimate_memory(config, layout, accum)
    measured = max(step_peaks) if step_peaks else 0
    return {"recipe": recipe, "overrides": overrides, "world_size": world_size, "layout": layout.name,
            "grad_accum_steps": accum, "micro_batch_size": train.micro_batch_size, "seq_len": train.seq_len,
            "activation_checkpoint": config.activation_checkpoint.mode, "compile": config.compile.enable,
            "attention_head_dim": config.model.attention_head_dim,
            "measured_peak_gib": round(measured / GIB, 3), "step_peaks_gib": [round(p / GIB, 3) for p in step_peaks],
            "max_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3) if device.type == "cuda" else 0,
            "estimated_peak_gib": round(estimate.peak / GIB, 3), "estimate_gib": estimate.gib(),
            "error_percent": round(100 * (estimate.peak - measured) / measured, 1) if measured else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="names from CONFIGS to run (default: all)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: run one config
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args()
    configs = {name: (recipe, overrides + (TINY if args.tiny else [])) for name, recipe, overrides in CONFIGS}
    if args.one:
        recipe, overrides = configs[args.one]
        row = measure(recipe, overrides, args.device, args.steps, args.tp)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps({"name": args.one, **row}), flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    results = {"command": " ".join(sys.argv), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "rows": []}
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for name in args.only or list(configs):
        if distributed:  # under torchrun every rank runs each config in this process
            recipe, overrides = configs[name]
            torch._dynamo.reset()
            row = {"name": name, **measure(recipe, overrides, args.device, args.steps, args.tp)}
            if args.device == "cuda":
                torch.cuda.empty_cache()
        else:  # a fresh process per config: no cached allocator blocks or compiled graphs carry over
            command = [sys.executable, __file__, "--one", name, "--device", args.device, "--steps", str(args.steps),
                       "--tp", str(args.tp)] + (["--tiny"] if args.tiny else [])
            done = subprocess.run(command, capture_output=True, text=True)
            rows = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            row = rows[0] if rows else {"name": name, "error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    errors = [abs(r["error_percent"]) for r in results["rows"] if r.get("error_percent") is not None]
    results["max_abs_error_percent"] = max(errors) if errors else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}; max |error| {results['max_abs_error_percent']}%")


if __name__ == "__main__":
    main()
