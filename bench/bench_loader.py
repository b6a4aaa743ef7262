"""Data pipeline throughput: titanlite.prepare (tokenize + pack) and the training loader.

Prepares a generated corpus into Parquet shards, then pulls micro-batches through
`build_dataloader` exactly as training does (DP rank 0 of `--dp-degree`, document ids and
per-document positions for the flex mask, pinned memory and a host-to-device copy where a GPU
is present) and reports tokens/s delivered to the training loop, for each --workers value.
The 7B recipe's H100 consumes roughly 40,000 tokens/s per GPU; the verdict column says how many
such GPUs one loader feeds. Writes JSON (command, CPU count, GPU name, torch version, date).

On this 2-core CI machine:  python bench/bench_loader.py --out bench/results/loader_cpu.json
On a GPU host (the number that counts; 1 GPU is enough):
    python bench/bench_loader.py --documents 200000 --workers 0,2,4,8 --out bench/results/loader_h100.json
Smoke test:  python bench/bench_loader.py --documents 3000 --seq-len 512 --batches 20 --out /tmp/loader.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite import prepare as prep  # noqa: E402
from titanlite.config.load import load_config  # noqa: E402
from titanlite.data.corpus import generate_documents  # noqa: E402
from titanlite.data.documents import build_settings  # noqa: E402
from titanlite.data.loader import batch_maker, build_dataloader  # noqa: E402
from titanlite.data.sources import build_rows, find_source  # noqa: E402
from titanlite.data.tokenizer import build_tokenizer  # noqa: E402

H100_7B_TOKENS_PER_SECOND = 40_000  # per GPU, the brief's figure for the 7B shape


def prepare_corpus(folder: Path, documents: int, seq_len: int, workers: int, rows_per_shard: int) -> dict:
    raw = folder / "raw"
    raw.mkdir()
    texts = generate_documents(documents, seed=7)
    per_file = max(1, documents // 8)
    for start in range(0, documents, per_file):  # several files, as real corpora come
        (raw / f"part{start // per_file:03d}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[start:start + per_file]))
    settings = build_settings(str(raw), build_tokenizer("default"), seq_len, rows_per_shard)
    begin = time.perf_counter()
    manifest = prep.prepare(settings, folder / "prepared", workers=workers, progress=False)
    seconds = time.perf_counter() - begin
    tokens = manifest["num_tokens"] + manifest["dropped_tail_tokens"]
    return {"documents": documents, "tokens": tokens, "shards": len(manifest["shards"]), "workers": workers,
            "seconds": round(seconds, 2), "documents_per_second": round(documents / seconds),
            "tokens_per_second": round(tokens / seconds)}


def time_loader(folder: Path, args, workers: int) -> dict:
    config = load_config(None, [
        "--data.source", str(folder), "--training.seq_len", str(args.seq_len), "--training.steps", "1",
        "--training.micro_batch_size", str(args.micro_batch), "--data.num_workers", str(workers),
        "--data.prefetch_factor", "4", "--model.attention", "flex", "--model.positions", "document"])
    tokenizer = build_tokenizer("default")
    rows = build_rows(find_source(str(folder), args.seq_len, tokenizer), config.data, args.seq_len, tokenizer,
                      folder / ".cache")
    to_batch = batch_maker(tokenizer.eos_id, False, document_ids=True, document_positions=True)
    loader = build_dataloader(rows, config.data, args.micro_batch, 0, 0, args.dp_degree, to_batch)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    iterator = iter(loader)
    first_begin = time.perf_counter()
    next(iterator)  # worker start-up and the first shard read: reported apart
    first_batch_seconds = time.perf_counter() - first_begin
    begin, cpu_begin = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        batch = next(iterator)
        if device is not None:  # what the training loop does with each micro-batch
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if device is not None:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu_begin
    tokens_per_second = args.batches * args.micro_batch * args.seq_len / seconds
    return {"num_workers": workers, "first_batch_seconds": round(first_batch_seconds, 2),
            "tokens_per_second": round(tokens_per_second),
            # CPU time the training process itself spends per micro-batch (workers not counted)
            "main_process_cpu_ms_per_micro_batch": round(1e3 * cpu_seconds / args.batches, 2),
            "h100_7b_gpus_fed": round(tokens_per_second / H100_7B_TOKENS_PER_SECOND, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=60000, help="generated documents (~130 tokens each)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4, help="the 7B 4k recipe's micro-batch")
    parser.add_argument("--dp-degree", type=int, default=8, help="the loader is DP rank 0 of this many")
    parser.add_argument("--rows-per-shard", type=int, default=256, help="small shards: many shard changes")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated data.num_workers values")
    parser.add_argument("--prepare-workers", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--batches", type=int, default=200, help="timed micro-batches per setting")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="titanlite_bench_loader_"))
    try:
        prepare_result = prepare_corpus(folder, args.documents, args.seq_len, args.prepare_workers,
                                        args.rows_per_shard)
        print("prepare:", prepare_result, flush=True)
        loader_results = []
        for workers in (int(w) for w in args.workers.split(",")):
            loader_results.append(time_loader(folder / "prepared", args, workers))
            print("loader:", loader_results[-1], flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "h100_7b_tokens_per_second_per_gpu": H100_7B_TOKENS_PER_SECOND,
        "prepare": prepare_result, "loader": loader_results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
