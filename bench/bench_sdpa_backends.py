"""Causal attention forward+backward per SDPA backend for the recipe shapes (GPU).

    python bench/bench_sdpa_backends.py OUT.json

For each shape: every backend alone (flash, cuDNN, memory-efficient), with GQA through
`enable_gqa` and with K/V expanded to all heads, timed with CUDA events (median of 20 after
warm-up). A backend that rejects a shape is recorded as such. Also checks each result against
the math backend in fp32 on a small slice.
"""

import datetime
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (batch, heads, kv_heads, seq, head_dim): the recipes' micro-batches
    "3b_4k": (8, 32, 8, 4096, 100), "7b_4k": (4, 32, 8, 4096, 128), "13b_4k": (2, 40, 8, 4096, 128),
    "7b_8k": (2, 32, 8, 8192, 128),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_fwd_bwd(fn, repeats=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def case(batch, heads, kv_heads, seq, head_dim, backend, gqa_mode):
    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)

    def run():
        with sdpa_kernel([backend]):
            if gqa_mode == "enable_gqa":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                group = heads // kv_heads
                out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                     is_causal=True)
        out.backward(grad)
        return out

    out = run()
    with torch.no_grad():  # correctness on one batch element and two heads against fp32 math
        group = heads // kv_heads
        ref = F.scaled_dot_product_attention(q[:1, :2].float(), k[:1, :1].float().repeat_interleave(2, 1),
                                             v[:1, :1].float().repeat_interleave(2, 1), is_causal=True)
        error = ((out[:1, :2].float() - ref).norm() / ref.norm()).item() if group >= 2 else None
    ms = time_fwd_bwd(run)
    flops = 4 * batch * heads * seq * seq * head_dim / 2 * 3.5  # causal half; bwd = 2.5 x fwd
    return {"ms": ms, "tflops_causal": flops / ms / 1e9, "rel_error_vs_fp32": error}


def main():
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "cases": []}
    for name, shape in SHAPES.items():
        for backend_name, backend in BACKENDS.items():
            for gqa_mode in ("enable_gqa", "expanded"):
                entry = {"shape": name, "backend": backend_name, "gqa": gqa_mode}
                try:
                    entry.update(case(*shape, backend, gqa_mode))
                except RuntimeError as error:
                    entry["rejected"] = str(error).splitlines()[0][:200]
                torch.cuda.empty_cache()
                results["cases"].append(entry)
                print(json.dumps(entry), flush=True)
    with open(sys.argv[1], "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
