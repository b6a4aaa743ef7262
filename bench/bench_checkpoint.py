"""Checkpoint benchmark: save and load time with and without checksums, sync and async.

One process, the real Checkpointer, timed from outside: a 7B-shaped model (dim 4096, 32 heads,
8 KV heads, SwiGLU 11008, vocab 128256) with `--layers` blocks, fp32 weights + AdamW state
(12 bytes per parameter on disk), trained with bf16 autocast (on CUDA) on random tokens. Any
config override (`--model.dim 1024`) changes the shape. For each variant in `--variants`
(crc32: as titanlite runs; none: the CRC-32 replaced by a constant, so the difference is the
cost of hashing and verifying) it measures:
  - synchronous save (median of `--repeats`, to `--folder`) and its GB/s;
  - load of that checkpoint into the live model and optimizer (checksums verified);
  - async saves (the first allocates the pinned staging buffers, later ones reuse them): the
    time `maybe_save` blocks, the time until the checkpoint is complete, and the training stall
    = extra time of the steps that ran while it was written, against the baseline step, split
    into blocking + the optimizer step waiting for the device-to-host copy + slower steps.
Each checkpoint is deleted after its phase (a 7B-shape checkpoint of 4 layers is ~21 GB); the
folder is removed at the end, also on failure. The last line is `SUMMARY {json}`.

GPU (both variants, ~5 min on one H100/H200):
    python bench/bench_checkpoint.py --layers 4 --folder /tmp/titanlite_ckpt_bench --out checkpoint.json
CPU (a 155M-parameter model, 1.9 GB checkpoint):
    python bench/bench_checkpoint.py --device cpu --layers 8 --seq-len 128 --async-saves 0 --model.dim 1024 \
        --model.n_heads 16 --model.n_kv_heads 4 --model.intermediate_size 2816 --model.vocab_size 32000
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite.checkpoint import storage  # noqa: E402
from titanlite.checkpoint.checkpointer import Checkpointer  # noqa: E402
from titanlite.checkpoint.states import TrainState  # noqa: E402
from titanlite.config.load import load_config  # noqa: E402
from titanlite.config.resolve import optimizer_update, resolve  # noqa: E402
from titanlite.model.transformer import build_model  # noqa: E402
from titanlite.optim.optimizer import build_optimizer  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextmanager
def checksums(variant: str):
    """variant "none": every CRC-32 is 0, so saving hashes nothing and loading verifies nothing."""
    original = storage.zlib
    if variant == "none":
        storage.zlib = types.SimpleNamespace(crc32=lambda data, value=0: 0)
    try:
        yield
    finally:
        storage.zlib = original


@contextmanager
def async_save_timed(record: dict):
    """Note when each dcp.async_save's staging (device-to-host copy) and upload (files written) end."""
    original = dcp.async_save

    def timed(*args, **kwargs):
        response = original(*args, **kwargs)
        upload = getattr(response, "upload_completion", response)
        for future, key in ((getattr(response, "staging_completion", None), "staged_at"), (upload, "written_at")):
            if future is not None:
                future.add_done_callback(lambda _, key=key: record.__setitem__(key, time.perf_counter()))
        return response

    dcp.async_save = timed
    try:
        yield
    finally:
        dcp.async_save = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the 7B shape")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="crc32,none", help="comma-separated: crc32 (titanlite), none")
    parser.add_argument("--repeats", type=int, default=2, help="synchronous saves and loads per variant")
    parser.add_argument("--async-saves", type=int, default=2, help="async saves per variant (the first pins memory)")
    parser.add_argument("--max-steps-during-save", type=int, default=200, help="then wait for the write")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/titanlite_ckpt_bench"))
    parser.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    args, overrides = parser.parse_known_args()

    device = torch.device(args.device)
    config = load_config("7b_4k", [
        "--model.n_layers", str(args.layers), "--training.seq_len", str(args.seq_len),
        "--training.micro_batch_size", "1", "--training.global_batch_tokens", str(args.seq_len),
        "--training.steps", "100000", "--parallelism.tensor_parallel_degree", "1",
        "--checkpoint.enable", "true", "--checkpoint.folder", str(args.folder.resolve()),
        "--checkpoint.interval", "1000000", "--job.dump_folder", str(args.folder.resolve()), *overrides])
    run = resolve(config, 1, config.model.vocab_size)
    model = build_model(config.model, args.seq_len, device="meta")
    model.to_empty(device=device)
    model.init_weights(seed=0)
    optimizer = build_optimizer(model, config.optimizer, optimizer_update(config, device.type))
    train_state = TrainState()
    states = {"model": model, "optimizer": optimizer, "train_state": train_state}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> float:
        tokens = torch.randint(0, config.model.vocab_size, (1, args.seq_len + 1), device=device, generator=generator)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_state.step += 1
        synchronize(device)  # bench only: time each step
        return time.perf_counter() - start

    try:
        for _ in range(2):
            step()
        baseline = statistics.median(step() for _ in range(5))
        result = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch_version": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
                  "write_threads": config.checkpoint.write_threads, "baseline_step_s": baseline, "variants": {}}
        print(f"{result['parameters']:,} parameters, baseline step {baseline * 1e3:.1f} ms", flush=True)
        for variant in args.variants.split(","):
            with checksums(variant):
                result["variants"][variant] = run_variant(args, config, run, states, device, step, baseline, variant)
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    summary = {"device": result["device"], "torch": torch.__version__, "parameters": result["parameters"]}
    for name, numbers in result["variants"].items():  # the last async save: its buffers were reused
        last_async = {f"async_{key}": value for key, value in (numbers["async"][-1:] or [{}])[0].items()}
        summary[name] = {key: round(value, 3) for key, value in {**numbers, **last_async}.items()
                         if isinstance(value, (int, float))}
    print("SUMMARY " + json.dumps(summary))


def run_variant(args, config, run, states, device, step, baseline: float, variant: str) -> dict:
    train_state = states["train_state"]
    # --- synchronous saves, each followed by a load
    config.checkpoint.async_mode = "disabled"
    saves, loads, size = [], [], 0
    for _ in range(args.repeats):
        shutil.rmtree(args.folder, ignore_errors=True)
        checkpointer = Checkpointer(config.checkpoint, args.folder, states, run.to_dict(), run.layout)
        step()
        synchronize(device)
        start = time.perf_counter()
        checkpointer.maybe_save(train_state.step, force=True)
        saves.append(time.perf_counter() - start)
        path, saved_step = checkpointer.latest_complete(), train_state.step
        size = folder_bytes(path)
        step()  # move the state on, so the load has something to undo
        synchronize(device)
        start = time.perf_counter()
        assert checkpointer.load(path) == saved_step
        synchronize(device)
        loads.append(time.perf_counter() - start)
        checkpointer.close()
    result = {"checkpoint_bytes": size, "sync_save_s": statistics.median(saves), "load_s": statistics.median(loads)}
    result.update(sync_save_GBps=size / result["sync_save_s"] / 1e9, load_GBps=size / result["load_s"] / 1e9)
    print(f"[{variant}] sync save {result['sync_save_s']:.2f} s ({result['sync_save_GBps']:.2f} GB/s of "
          f"{size / 1e9:.2f} GB), load {result['load_s']:.2f} s ({result['load_GBps']:.2f} GB/s)", flush=True)

    # --- asynchronous saves: blocking time, time to complete, training stall
    shutil.rmtree(args.folder, ignore_errors=True)
    config.checkpoint.async_mode = "async"
    checkpointer = Checkpointer(config.checkpoint, args.folder, states, run.to_dict(), run.layout)
    waiting = [0.0]
    wait_for_staging = checkpointer._wait_for_staging  # the optimizer's pre-step hook calls it

    def timed_wait_for_staging() -> None:
        start = time.perf_counter()
        wait_for_staging()
        waiting[0] += time.perf_counter() - start

    checkpointer._wait_for_staging = timed_wait_for_staging
    result["async"] = []
    for index in range(args.async_saves):
        step()
        synchronize(device)
        record, waiting[0] = {}, 0.0
        with async_save_timed(record):
            start = time.perf_counter()
            checkpointer.maybe_save(train_state.step, force=True)
            blocking = time.perf_counter() - start
        step_times = []
        while checkpointer.save_in_flight() and len(step_times) < args.max_steps_during_save:
            step_times.append(step())
        staging_wait = waiting[0]
        checkpointer.wait()
        total = time.perf_counter() - start
        stall = blocking + sum(max(0.0, t - baseline) for t in step_times)
        numbers = {"blocking_s": blocking, "complete_after_s": total, "steps_during_save": len(step_times),
                   "staged_after_s": record.get("staged_at", start) - start,
                   "written_after_s": record["written_at"] - start, "staging_wait_s": staging_wait,
                   "stall_s": stall, "contention_stall_s": max(0.0, stall - blocking - staging_wait),
                   "median_step_during_save_s": statistics.median(step_times) if step_times else baseline}
        result["async"].append(numbers)
        print(f"[{variant}] async save {index + 1}{' (pins buffers)' if index == 0 else ' (reuses buffers)'}: "
              f"blocks {blocking:.2f} s, staged after {numbers['staged_after_s']:.2f} s, written after "
              f"{numbers['written_after_s']:.2f} s, {len(step_times)} steps meanwhile; stall {stall:.2f} s = blocking "
              f"+ waiting for staging {staging_wait:.2f} + slower steps {numbers['contention_stall_s']:.2f}",
              flush=True)
        shutil.rmtree(checkpointer.latest_complete(), ignore_errors=True)
    checkpointer.close()
    return result


if __name__ == "__main__":
    main()
