"""Attention kernel benchmark: head_dim 100 (the 3B recipe) against zero-padding to 104 / 128.

Times causal GQA attention forward + backward through the model's own attention function
(`sdpa_causal`, wrapped by `pad_head_dim` for the padded variants, so the pad and slice copies
are included), on the default dispatch and with each fast backend forced; checks that the
padded output equals the unpadded one; and lists which SDPA backends accept each recipe shape
(3B/7B/13B, at the per-GPU head counts of TP 8 and of TP 1). Writes JSON.

GPU:  python bench/bench_attention.py --out bench/results/attention_h100.json
CPU smoke test: python bench/bench_attention.py --device cpu --batch 1 --seq-len 256 --iters 2 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite.model.attention import (  # noqa: E402
    BACKENDS,
    accepting_backends,
    pad_head_dim,
    sdpa_causal,
    selected_kernel,
)

RECIPE_SHAPES = {"3b": (32, 8, 100), "7b": (32, 8, 128), "13b": (40, 8, 128)}  # q heads, kv heads, head_dim


def time_fwd_bwd(fn, q, k, v, scale, iters: int, device: torch.device) -> float:
    """Median milliseconds of fn(q, k, v) forward + backward."""
    grad = torch.randn(q.shape[:-1] + (q.shape[-1],), dtype=q.dtype, device=device)
    times = []
    for i in range(iters + 3):
        for t in (q, k, v):
            t.grad = None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(q, k, v, scale).backward(grad)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            fn(q, k, v, scale).backward(grad)
            elapsed = (time.perf_counter() - begin) * 1e3
        if i >= 3:  # warm-up iterations are not timed
            times.append(elapsed)
    return sorted(times)[len(times) // 2]


def forced(backend_name, fn):
    def run(q, k, v, scale, mask=None):
        with sdpa_kernel(BACKENDS[backend_name]):
            return fn(q, k, v, scale)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU (3B 4k recipe: 8)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tp", type=int, nargs="+", default=[8, 1], help="TP degrees: heads per GPU = heads / tp")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results/attention.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    results = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "dtype": str(dtype), "timings": [], "acceptance": []}

    q_heads_full, kv_heads_full, head_dim = RECIPE_SHAPES["3b"]
    scale = 1.0 / math.sqrt(head_dim)
    for tp in args.tp:
        q_heads, kv_heads = q_heads_full // tp, max(1, kv_heads_full // tp)
        torch.manual_seed(0)
        q = torch.randn(args.batch, q_heads, args.seq_len, head_dim, dtype=dtype, device=device, requires_grad=True)
        k = torch.randn(args.batch, kv_heads, args.seq_len, head_dim, dtype=dtype, device=device, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        reference = sdpa_causal(q, k, v, scale).detach()
        for padded in (100, 104, 128):
            fn = sdpa_causal if padded == head_dim else pad_head_dim(sdpa_causal, padded)
            kernel = selected_kernel(fn, q_heads, kv_heads, head_dim, dtype, device, scale=scale)
            max_diff = (fn(q, k, v, scale).detach().float() - reference.float()).abs().max().item()
            for backend in ("default", "flash", "efficient", "cudnn"):
                run = fn if backend == "default" else forced(backend, fn)
                try:
                    ms = time_fwd_bwd(run, q, k, v, scale, args.iters, device)
                except RuntimeError as error:
                    ms, note = None, str(error).splitlines()[0][:160]
                else:
                    note = ""
                row = {"tp": tp, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim, "padded_to": padded,
                       "backend": backend, "default_kernel": kernel, "fwd_bwd_ms": ms, "error": note,
                       "max_abs_diff_vs_unpadded": max_diff, "batch": args.batch, "seq_len": args.seq_len}
                results["timings"].append(row)
                print(json.dumps(row), flush=True)
        del q, k, v, reference
    for name, (q_full, kv_full, dim) in RECIPE_SHAPES.items():
        for tp in args.tp:
            q_heads, kv_heads = q_full // tp, max(1, kv_full // tp)
            row = {"model": name, "tp": tp, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": dim,
                   "accepting": accepting_backends(sdpa_causal, q_heads, kv_heads, dim, dtype, device),
                   "default_kernel": selected_kernel(sdpa_causal, q_heads, kv_heads, dim, dtype, device)}
            results["acceptance"].append(row)
            print(json.dumps(row), flush=True)
    best = {}
    for row in results["timings"]:
        if row["backend"] == "default" and row["tp"] == args.tp[0] and row["fwd_bwd_ms"] is not None:
            best[row["padded_to"]] = row["fwd_bwd_ms"]
    if best:
        results["fastest_padding_tp%d" % args.tp[0]] = min(best, key=best.get)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}; fastest default-dispatch padding: {results.get('fastest_padding_tp%d' % args.tp[0])}")


if __name__ == "__main__":
    main()
