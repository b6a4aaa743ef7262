"""Checkpoint benchmark: save and load time of the 7B shape (fewer layers), sync vs async.

One process, one GPU, the real Checkpointer: a 7B-shaped model (dim 4096, 32 heads, 8 KV heads,
SwiGLU 11008, vocab 128256) with `--layers` blocks, fp32 weights + AdamW state (12 bytes per
parameter on disk), trained with bf16 autocast on random tokens. Measures:
  - baseline step time (median);
  - synchronous save (everything, to `--folder`), and its GB/s;
  - load of that checkpoint into the live model and optimizer;
  - async saves (the first allocates the pinned staging buffers, later ones reuse them): the
    time `maybe_save` blocks, the time until the checkpoint is complete, and the training stall
    = extra time of the steps that ran while it was written, against the baseline, split into
    blocking + the optimizer step waiting for the device-to-host copy (staging) + the slowdown
    of the other steps while the writer threads ran (CPU, GIL, memory bandwidth).
Each checkpoint is deleted after its phase (one 7B-shape checkpoint of 4 layers is ~21 GB), and
the folder is removed at the end, also on failure. About 2-3 minutes on one H100.

GPU:  python bench/bench_checkpoint.py --layers 4 --folder /tmp/titanlite_ckpt_bench \
          --out bench/results/checkpoint_h100.json
CPU smoke test: python bench/bench_checkpoint.py --tiny --out /tmp/checkpoint_tiny.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite.checkpoint import Checkpointer, TrainState  # noqa: E402
from titanlite.config import derive, load_config  # noqa: E402
from titanlite.model import build_model  # noqa: E402
from titanlite.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from titanlite.parallelize import ParallelDims  # noqa: E402
from titanlite.train import count_valid_tokens, train_step  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the 7B shape")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/titanlite_ckpt_bench"))
    parser.add_argument("--async-saves", type=int, default=2, help="async saves to time (the first pins memory)")
    parser.add_argument("--max-steps-during-save", type=int, default=200, help="then wait for the write")
    parser.add_argument("--write-threads", type=int, default=None, help="checkpoint.write_threads (default: config)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/checkpoint.json"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shape = (["--model.dim", "64", "--model.n_heads", "4", "--model.n_kv_heads", "2", "--model.intermediate_size",
              "128", "--model.vocab_size", "512"] if args.tiny else [])
    seq_len = 32 if args.tiny else args.seq_len
    config = load_config("7b_4k", [
        *shape, "--model.n_layers", str(args.layers), "--training.seq_len", str(seq_len),
        "--training.micro_batch_size", "1", "--training.global_batch_tokens", str(seq_len),
        "--training.steps", "100000", "--parallelism.tensor_parallel_degree", "1",
        "--checkpoint.enable", "true", "--checkpoint.folder", str(args.folder.resolve()),
        "--checkpoint.interval", "1000000", "--job.dump_folder", str(args.folder.resolve()),
        *(["--checkpoint.write_threads", str(args.write_threads)] if args.write_threads else [])])
    dims = ParallelDims.from_config(config, 1)
    model = build_model(config.model, seq_len, device="meta")
    model.to_empty(device=device)
    model.init_weights(seed=0)
    optimizer = build_optimizer(model, config, device.type)
    scheduler = build_lr_scheduler(optimizer, config, derive(config, 1))
    train_state = TrainState()
    states = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler, "train_state": train_state}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> float:
        tokens = torch.randint(0, config.model.vocab_size, (1, seq_len + 1), device=device, generator=generator)
        batches = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, batches, count_valid_tokens(batches, dims), 1.0, autocast)
        scheduler.step()
        train_state.step += 1
        synchronize(device)  # bench only: time each step
        return time.perf_counter() - start

    try:
        run(args, config, dims, model, states, train_state, device, step)
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)


def run(args, config, dims, model, states, train_state, device, step) -> None:
    seq_len = config.training.seq_len
    for _ in range(3):
        step()
    baseline = statistics.median(step() for _ in range(10))
    result = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch_version": torch.__version__, "layers": args.layers, "seq_len": seq_len,
              "parameters": model.num_params(), "write_threads": config.checkpoint.write_threads,
              "baseline_step_s": baseline}
    print(f"{model.num_params():,} parameters, baseline step {baseline * 1e3:.1f} ms", flush=True)

    # --- synchronous save, then load
    shutil.rmtree(args.folder, ignore_errors=True)
    config.checkpoint.async_mode = "disabled"
    checkpointer = Checkpointer(config, dims, args.folder, states)
    synchronize(device)
    start = time.perf_counter()
    checkpointer.maybe_save(train_state.step, force=True)
    result["sync_save_s"] = time.perf_counter() - start
    path = checkpointer.latest_complete()
    result["checkpoint_bytes"] = folder_bytes(path)
    result["sync_save_GBps"] = result["checkpoint_bytes"] / result["sync_save_s"] / 1e9
    saved_step = train_state.step
    step()  # move the state on, so the load has something to undo
    synchronize(device)
    start = time.perf_counter()
    loaded = checkpointer.load(path)
    synchronize(device)
    result["load_s"] = time.perf_counter() - start
    result["load_GBps"] = result["checkpoint_bytes"] / result["load_s"] / 1e9
    assert loaded == saved_step, (loaded, saved_step)
    checkpointer.close()
    print(f"sync save {result['sync_save_s']:.2f} s ({result['sync_save_GBps']:.2f} GB/s of "
          f"{result['checkpoint_bytes'] / 1e9:.2f} GB), load {result['load_s']:.2f} s", flush=True)

    # --- asynchronous saves: blocking time, time to complete, training stall
    shutil.rmtree(args.folder, ignore_errors=True)
    config.checkpoint.async_mode = "async"
    checkpointer = Checkpointer(config, dims, args.folder, states)
    result["async"] = []
    for index in range(args.async_saves):
        step()
        synchronize(device)
        start = time.perf_counter()
        checkpointer.maybe_save(train_state.step, force=True)
        blocking = time.perf_counter() - start
        step_times = []
        while checkpointer.save_in_flight() and len(step_times) < args.max_steps_during_save:
            step_times.append(step())
        checkpointer.wait()
        total = time.perf_counter() - start
        timings = dict(checkpointer.async_timings)
        stall = blocking + sum(max(0.0, t - baseline) for t in step_times)
        contention = max(0.0, stall - blocking - timings["staging_wait_s"])
        median = statistics.median(step_times) if step_times else baseline
        result["async"].append({"blocking_s": blocking, "complete_after_s": total, "steps_during_save": len(step_times),
                                "stall_s": stall, "staging_s": timings["staging_s"],
                                "staging_wait_s": timings["staging_wait_s"], "write_s": timings["write_s"],
                                "contention_stall_s": contention, "max_step_s": max(step_times, default=0.0),
                                "median_step_during_save_s": median})
        print(f"async save {index + 1}{' (pins buffers)' if index == 0 else ' (reuses buffers)'}: blocks "
              f"{blocking:.2f} s, staged after {timings['staging_s']:.2f} s, written after {timings['write_s']:.2f} s, "
              f"{len(step_times)} steps meanwhile; stall {stall:.2f} s = blocking {blocking:.2f} + waiting for "
              f"staging {timings['staging_wait_s']:.2f} + slower steps {contention:.2f} (median step "
              f"{median * 1e3:.1f} ms vs {baseline * 1e3:.1f})", flush=True)
        shutil.rmtree(checkpointer.latest_complete(), ignore_errors=True)
    checkpointer.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    last = result["async"][-1] if result["async"] else {}
    print(f"SUMMARY checkpoint {result['checkpoint_bytes'] / 1e9:.1f} GB, {result['write_threads']} threads: "
          f"sync save {result['sync_save_s']:.1f} s ({result['sync_save_GBps']:.2f} GB/s), load "
          f"{result['load_s']:.1f} s ({result['load_GBps']:.2f} GB/s); async (reused buffers) blocks "
          f"{last.get('blocking_s', 0):.2f} s, written in {last.get('write_s', 0):.1f} s, training stall "
          f"{last.get('stall_s', 0):.2f} s over {last.get('steps_during_save', 0)} steps")


if __name__ == "__main__":
    main()
