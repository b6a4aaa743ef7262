"""Time the output head and the loss alone (forward + backward), as titanlite and as torchtitan write the loss.

An H200 profile (not in this repository; bench/gpu_profile.sh makes one) showed titanlite's compiled loss
kernels ~40% slower per micro-batch than torchtitan's (4.3 + 3.9 ms against 3.0 + 2.7) and one
head matmul (nvjet ..._NTT) 30.5 ms against 21.2. This isolates them: final RMSNorm -> head ->
loss -> backward, on one GPU under autocast with fp32 weights (titanlite's single-GPU set-up):
  titanlite: loss.cross_entropy_per_sample (per-sample sums, reduction='none'), compiled;
  sum:       F.cross_entropy(reduction='sum') over all tokens (torchtitan's), compiled;
  head_only: the head's forward and backward with a given gradient (no loss);
  chunked_N: loss.head_cross_entropy, the head and the loss N tokens at a time (no full logits).
Prints one JSON line: milliseconds per micro-batch and peak allocated GiB for each (CUDA events, median
of --iters). --check first compares the chunked loss and its gradients (hidden, head weight) with a
float64 reference on fresh random inputs (CUDA: bf16 matmuls, the fp32 out_dtype accumulation).

    python bench/bench_head_loss.py [--tokens 16384] [--dim 4096] [--vocab 128256] [--iters 20] [--check]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite.model.loss import IGNORE_INDEX, cross_entropy_per_sample, head_cross_entropy  # noqa: E402
from titanlite.model.transformer import RMSNorm  # noqa: E402


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def check(device: torch.device) -> dict:
    """Relative errors of the chunked head + loss under bf16 autocast against float64 (2 draws)."""
    errors = {}
    for draw in range(2):
        hidden = torch.randn(2, 1536, 512, device=device, requires_grad=True)
        weight = (torch.randn(8000, 512, device=device) * 512 ** -0.5).requires_grad_()
        labels = torch.randint(0, 8000, (2, 1536), device=device)
        labels[:, :7] = IGNORE_INDEX
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total, sample_losses = head_cross_entropy(hidden, weight, labels, 1000)
        (total / 100).backward()
        ref_hidden, ref_weight = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref = F.cross_entropy((ref_hidden @ ref_weight.t()).flatten(0, 1), labels.flatten(), reduction="none",
                              ignore_index=IGNORE_INDEX).view(labels.shape).sum(1)
        (ref.sum() / 100).backward()
        for name, got, want in (("loss", sample_losses, ref), ("grad_hidden", hidden.grad, ref_hidden.grad),
                                ("grad_weight", weight.grad, ref_weight.grad)):
            error = ((got.double() - want).norm() / want.norm()).item()
            errors[f"{name}_{draw}"] = error
            assert error < 2e-2, f"chunked head: {name} relative error {error:.2e}"
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4 * 4096)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--chunk-tokens", default="4096", help="comma-separated chunk sizes to time")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.check:
        print(json.dumps({"check_relative_errors": check(device)}))
    dtype = torch.bfloat16 if cuda else torch.float32
    norm = RMSNorm(args.dim, 1e-5).to(device)
    head = torch.nn.Linear(args.dim, args.vocab, bias=False, device=device)
    hidden = torch.randn(4, args.tokens // 4, args.dim, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.vocab, (4, args.tokens // 4), device=device)
    count = torch.tensor(float(args.tokens), device=device)
    per_sample, summed = torch.compile(cross_entropy_per_sample), torch.compile(summed_cross_entropy)

    def step(variant: str) -> None:
        if variant.startswith("chunked"):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                total, _ = head_cross_entropy(norm(hidden), head.weight, labels, int(variant.split("_")[1]))
            (total / count).backward()
            return
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = head(norm(hidden))
        if variant == "head_only":
            logits.backward(torch.ones_like(logits))
            return
        loss = (per_sample(logits, labels).sum() if variant == "titanlite" else summed(logits, labels)) / count
        del logits
        loss.backward()

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "tokens": args.tokens, "dim": args.dim, "vocab": args.vocab}
    chunked = [f"chunked_{tokens}" for tokens in args.chunk_tokens.split(",")]
    for variant in ("titanlite", "sum", "head_only", *chunked):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # compile and warm up
            step(variant)
        times = []
        for _ in range(args.iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(variant)
                end.record()
                end.synchronize()  # host sync: benchmark measurement
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                step(variant)
                times.append(1e3 * (time.perf_counter() - began))
        hidden.grad = head.weight.grad = norm.weight.grad = None
        results[f"{variant}_ms"] = round(statistics.median(times), 3)
        if cuda:
            results[f"{variant}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if cuda:  # d/d weight of one 4,096-token chunk summed into fp32: in cuBLAS (beta = 1), or a product then add_
        a = torch.randn(args.vocab, 4096, device=device, dtype=dtype)
        b = torch.randn(4096, args.dim, device=device, dtype=dtype)
        acc = torch.zeros(args.vocab, args.dim, device=device)
        for name, accumulate in (("addmm_out_dtype", lambda: torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)),
                                 ("mm_then_add", lambda: acc.add_(torch.mm(a, b, out_dtype=acc.dtype))),
                                 ("mm_bf16", lambda: torch.mm(a, b))):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            results[f"accumulate_{name}_ms"] = round(triton_median(accumulate), 3)
            results[f"accumulate_{name}_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    print(json.dumps(results))


def triton_median(fn) -> float:
    """Median milliseconds of fn (CUDA events, after warm-up)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


if __name__ == "__main__":
    main()
