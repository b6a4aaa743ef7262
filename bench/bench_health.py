"""Health and profiling on a GPU: hot-path cost, no host sync, the fused skip, OOM report, traces.

On one GPU, with the recipe's 7B shape cut to a few layers (or --tiny), measures and checks:
  1. step time of train.py's train_step without the guard and the health recording, and with
     both (record every step, check every --log-freq steps): the overhead in ms and %;
  2. that the hot path (train_step + HealthMonitor.record) makes no host sync: it runs under
     torch.cuda.set_sync_debug_mode("error"), which raises on any synchronizing call;
  3. that a non-finite gradient with fused AdamW on CUDA leaves weights, moments and step as they were;
  4. that the PyTorch profiler writes a Chrome trace with CUDA kernels in it;
  5. that a real CUDA OOM in the forward becomes an OutOfMemory naming step and phase, with the
     memory summary and a snapshot on disk.
Writes JSON (command, GPU, torch version, date, results).

GPU:       python bench/bench_health.py --out bench/results/health_h100.json
CPU smoke: python bench/bench_health.py --device cpu --tiny --out /tmp/health.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite.config.load import load_config  # noqa: E402
from titanlite.config.resolve import optimizer_update  # noqa: E402
from titanlite.health.monitor import HealthMonitor  # noqa: E402
from titanlite.metrics.profiling import OutOfMemory, TrainingProfiler, report_oom  # noqa: E402
from titanlite.model.transformer import build_model  # noqa: E402
from titanlite.optim.optimizer import build_optimizer  # noqa: E402
from titanlite.train import train_step  # noqa: E402

TINY = ["--model.dim", "128", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.intermediate_size", "256", "--model.vocab_size", "1024", "--training.seq_len", "128",
        "--training.micro_batch_size", "2"]
SHAPE = ["--model.n_layers", "4", "--model.vocab_size", "32000", "--training.micro_batch_size", "2"]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(config, device, generator_seed: int) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(generator_seed)
    tokens = torch.randint(0, config.model.vocab_size, (config.training.micro_batch_size, config.training.seq_len + 1),
                           generator=generator).to(device)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def time_steps(model, optimizer, config, device, autocast, steps: int, monitor=None, log_freq: int = 10,
               check_syncs: bool = False) -> dict:
    """Median ms per step over `steps` (after 3 warm-up steps); with `monitor`, record + periodic check."""
    batches = [random_batch(config, device, seed) for seed in range(4)]
    valid = torch.tensor(float(batches[0]["labels"].numel()), device=device)
    times, sync_error = [], None
    for step in range(1, steps + 4):
        batch = batches[step % len(batches)]
        synchronize(device)
        start = time.perf_counter()
        if check_syncs and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            result = train_step(model, optimizer, [batch], valid, config.training.grad_clip, autocast,
                                skip_nonfinite=monitor is not None)
            if monitor is not None:
                monitor.record(step, result, [batch], [batch], 1e-4)
        except RuntimeError as error:  # the sync debug mode raises RuntimeError on a sync
            sync_error = sync_error or str(error).splitlines()[0]
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        if monitor is not None and (step % log_freq == 0 or len(monitor.pending) == monitor.capacity):
            monitor.check()  # the log step's one sync, outside the sync-checked region
        synchronize(device)
        if step > 3:
            times.append((time.perf_counter() - start) * 1e3)
    if monitor is not None:
        monitor.check()
    return {"median_ms": statistics.median(times), "min_ms": min(times), "host_sync_error": sync_error}


def check_fused_skip(model, optimizer, config, device, autocast) -> dict:
    batch = random_batch(config, device, 99)
    valid = torch.tensor(float(batch["labels"].numel()), device=device)
    parameter = next(p for p in model.parameters() if p.ndim >= 2)
    before = parameter.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[parameter].items()}
    handle = parameter.register_hook(lambda grad: grad * math.inf)
    result = train_step(model, optimizer, [batch], valid, config.training.grad_clip, autocast)
    handle.remove()
    unchanged = torch.equal(before, parameter.detach()) and all(
        torch.equal(v, optimizer.state[parameter][k]) for k, v in state.items())
    return {"skipped_flag": float(result["skipped"].item()), "weights_and_state_unchanged": bool(unchanged),
            "fused": all(group.get("fused") for group in optimizer.param_groups)}


def check_profiler(model, optimizer, config, device, autocast, folder: Path) -> dict:
    profiler_config = load_config(None, ["--training.steps", "1", "--profiling.enable_profiling", "true",
                                         "--profiling.profile_freq", "4", "--profiling.profile_warmup", "1",
                                         "--profiling.profile_active", "2"])
    profiler = TrainingProfiler(profiler_config, folder, 0, device)
    batch = random_batch(config, device, 7)
    valid = torch.tensor(float(batch["labels"].numel()), device=device)
    for step in range(1, 5):
        train_step(model, optimizer, [batch], valid, config.training.grad_clip, autocast)
        profiler.step(step)
    profiler.close()
    traces = sorted(folder.glob("profile_traces/*/rank0_trace.json"))
    if not traces:
        return {"trace": None}
    events = json.loads(traces[0].read_text())["traceEvents"]
    kernels = sum(1 for event in events if event.get("cat") == "kernel")
    return {"trace": str(traces[0]), "trace_bytes": traces[0].stat().st_size, "cuda_kernel_events": kernels}


def check_oom(config, device, folder: Path) -> dict:
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    free, _ = torch.cuda.mem_get_info(device)
    model = build_model(config.model, 8192, device)
    tokens = torch.zeros(1, 8192, dtype=torch.long, device=device)
    batch_size = max(1, int(free // (8192 * config.model.vocab_size * 4)) + 1)  # logits alone overflow the GPU
    message, files = None, []
    try:
        with report_oom(42, folder, 0, device):
            model(tokens.expand(batch_size, -1))
    except OutOfMemory as error:
        message = str(error)
        files = sorted(path.name for path in (folder / "oom").iterdir())
    del model
    torch.cuda.empty_cache()
    return {"message": message, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-freq", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = load_config("7b_4k" if not args.tiny else "debug_model",
                         (TINY if args.tiny else SHAPE) + ["--training.steps", "1", "--metrics.log_freq",
                                                            str(args.log_freq), "--training.device", device.type])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fresh():
        model = build_model(config.model, config.training.seq_len, device)
        model.init_weights(seed=0)
        return model, build_optimizer(model, config.optimizer, optimizer_update(config, device.type))

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        model, optimizer = fresh()
        results["plain"] = time_steps(model, optimizer, config, device, autocast, args.steps)
        monitor = HealthMonitor(config.health, config.training.grad_clip, 0, config.metrics.log_freq, Path(folder), 0,
                                device)
        results["health"] = time_steps(model, optimizer, config, device, autocast, args.steps, monitor,
                                       args.log_freq, check_syncs=True)
        results["overhead_ms"] = results["health"]["median_ms"] - results["plain"]["median_ms"]
        results["overhead_percent"] = 100 * results["overhead_ms"] / results["plain"]["median_ms"]
        results["fused_skip"] = check_fused_skip(model, optimizer, config, device, autocast)
        results["profiler"] = check_profiler(model, optimizer, config, device, autocast, Path(folder))
        del model, optimizer
        results["oom"] = check_oom(config, device, Path(folder))
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "config": {"dim": config.model.dim, "n_layers": config.model.n_layers,
                         "micro_batch": config.training.micro_batch_size, "seq_len": config.training.seq_len},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
