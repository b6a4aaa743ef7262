"""Where a step's GPU time goes: kernel time by group and by kernel, of Chrome traces side by side.

    python bench/trace_summary.py NAME=TRACE.json[.gz] [NAME=TRACE.json ...] [--top 40] [--json OUT]

Counts the kernels inside the profiler's GPU-side step spans ("ProfilerStep#N" on the GPU
timeline): exactly the work of the profiled steps, whatever the profiler caught around them, in
milliseconds per step. Groups: matmul (cuBLAS nvjet/gemm), attention (cuDNN/flash), triton
(compiled pointwise and reductions), optimizer (multi-tensor and fused AdamW), copy
(memcpy/memset), nccl, other (eager aten kernels). With two traces or more, the kernels whose
time differs most between the first two follow.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

GROUPS = ("matmul", "attention", "triton", "optimizer", "copy", "nccl", "other")


def group_of(name: str, category: str) -> str:
    lowered = name.lower()
    if category in ("gpu_memcpy", "gpu_memset") or lowered.startswith(("memcpy", "memset")):
        return "copy"
    if "nccl" in lowered:
        return "nccl"
    if any(key in lowered for key in ("sdpa", "flash", "fmha", "cudnn")):
        return "attention"
    if any(key in lowered for key in ("nvjet", "gemm", "cutlass", "xmma")):
        return "matmul"
    if lowered.startswith("triton"):
        return "triton"
    if "multi_tensor_apply" in lowered or "adam" in lowered or "foreach" in lowered:
        return "optimizer"
    return "other"


def summarize(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        events = json.load(file)["traceEvents"]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "gpu_user_annotation"
             and str(e.get("name", "")).startswith("ProfilerStep")]
    if not steps:
        raise SystemExit(f"{path}: no GPU-side ProfilerStep span: profile with a CUDA activity and a schedule")
    by_group, by_kernel, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    for event in events:
        if event.get("ph") != "X" or event.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        if not any(start <= event["ts"] < end for start, end in steps):
            continue
        milliseconds = event.get("dur", 0) / 1000
        by_group[group_of(event["name"], event["cat"])] += milliseconds
        by_kernel[event["name"]] += milliseconds
        calls[event["name"]] += 1
    per = 1 / len(steps)
    return {"trace": str(path), "steps": len(steps), "span_ms": sum(end - start for start, end in steps) / 1000 * per,
            "busy_ms": sum(by_group.values()) * per, "groups_ms": {group: by_group[group] * per for group in GROUPS},
            "kernels": {name: {"ms": ms * per, "calls": calls[name] * per} for name, ms in by_kernel.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", help="NAME=path/to/rank0_trace.json (or .json.gz)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    args = parser.parse_args()
    summaries = {}
    for item in args.traces:
        name, _, path = item.partition("=")
        summaries[name] = summarize(Path(path))
    names = list(summaries)
    print("ms per step".ljust(40) + "".join(f"{name:>14}" for name in names))
    for key in ("span_ms", "busy_ms"):
        print(f"{key:<40}" + "".join(f"{summaries[n][key]:>14.1f}" for n in names))
    for group in GROUPS:
        print(f"  {group:<38}" + "".join(f"{summaries[n]['groups_ms'][group]:>14.1f}" for n in names))
    for name in names:
        print(f"== top kernels of {name}: ms per step x calls per step")
        ranked = sorted(summaries[name]["kernels"].items(), key=lambda item: -item[1]["ms"])[:args.top]
        for kernel, figures in ranked:
            print(f"  {figures['ms']:8.2f} ms x {figures['calls']:6.1f}  {kernel[:110]}")
    if len(names) >= 2:
        first, second = (summaries[n]["kernels"] for n in names[:2])
        print(f"== largest differences, {names[1]} - {names[0]}: ms per step (calls per step of each)")
        empty = {"ms": 0.0, "calls": 0}
        ranked = sorted(set(first) | set(second),
                        key=lambda k: -abs(second.get(k, empty)["ms"] - first.get(k, empty)["ms"]))
        for kernel in ranked[:args.top]:
            a, b = first.get(kernel, empty), second.get(kernel, empty)
            print(f"  {b['ms'] - a['ms']:+8.2f}  ({a['calls']:.0f} / {b['calls']:.0f})  {kernel[:100]}")
    if args.json:
        args.json.write_text(json.dumps(summaries))


if __name__ == "__main__":
    main()
