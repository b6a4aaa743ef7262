"""Time one AdamW step over the 7B shape's parameters (8 layers by default): torch's fused AdamW
against titanlite's CompiledAdamW (titanlite/optim/adamw.py), both clipping through grad_scale as the
trainer does. Prints one JSON line: ms per step (median of --iters, CUDA events), the memory
traffic over that time (fused: reads weight, gradient and two moments and writes all four back,
the gradient divided by grad_scale: 32 bytes per parameter; compiled: the gradient is not written
back, 28 bytes), and the largest
difference between the two implementations' weights after the timed steps.

    python bench/bench_optimizer.py [--layers 8] [--iters 20]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from titanlite.optim.adamw import CompiledAdamW  # noqa: E402


def shapes(layers: int, dim=4096, kv_dim=1024, hidden=11008, vocab=128256) -> list[tuple[int, ...]]:
    block = [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden),
             (dim,), (dim,)]
    return [(vocab, dim)] + block * layers + [(dim,), (vocab, dim)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    params = [torch.randn(shape, device=device) * 0.02 for shape in shapes(args.layers)]
    gradients = [torch.randn_like(p) * 1e-3 for p in params]
    count = sum(p.numel() for p in params)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parameters": count}
    weights = {}
    for name in ("fused", "compiled"):
        group_params = [torch.nn.Parameter(p.clone()) for p in params]
        for p, gradient in zip(group_params, gradients):
            p.grad = gradient.clone()
        groups = [{"params": [p for p in group_params if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in group_params if p.ndim < 2], "weight_decay": 0.0}]
        hyper = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8}
        optimizer = (torch.optim.AdamW(groups, fused=True, **hyper) if name == "fused"
                     else CompiledAdamW(groups, **hyper))
        times = []
        for _ in range(args.iters + 3):
            for p, gradient in zip(group_params, gradients):  # fused divides p.grad in place
                p.grad.copy_(gradient)
            optimizer.grad_scale = torch.tensor(1.5, device=device)  # as the trainer's clipping passes it
            optimizer.found_inf = torch.zeros((), device=device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        milliseconds = statistics.median(times[3:])
        results[f"{name}_ms"] = round(milliseconds, 3)
        bytes_per_parameter = 32 if name == "fused" else 28
        results[f"{name}_tb_per_s"] = round(bytes_per_parameter * count / milliseconds / 1e9, 2)
        weights[name] = [p.detach() for p in group_params]
        del optimizer, group_params, groups
        torch.cuda.empty_cache()
    results["max_abs_weight_difference"] = max((a - b).abs().max().item()
                                               for a, b in zip(weights["fused"], weights["compiled"]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
