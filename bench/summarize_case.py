"""Turn one benchmark case's log (and titanlite's metrics.jsonl) into one JSON line on stdout."""

import datetime
import json
import os
import re
import statistics
import sys

import torch
from steady_state import summarize_steps, titanlite_steps  # warm-up and peak memory, defined once

framework, name, ngpu, rc, wall, log_path, metrics_path, args = sys.argv[1:9]
record = {"framework": framework, "name": name, "ngpu": int(ngpu), "returncode": int(rc), "wall_s": int(wall),
          "args": args, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          "torch": torch.__version__, "date": datetime.date.today().isoformat(),
          "command": " ".join(filter(None, [os.environ.get("BENCH_SESSION"), f"bench/gpu_case.sh {framework} {name} {ngpu} {args}"]))}
log = re.sub(r"\x1b\[[0-9;]*m", "", open(log_path, errors="replace").read())
if framework == "titanlite" and metrics_path:
    try:
        rows = [json.loads(line) for line in open(metrics_path)]
    except FileNotFoundError:
        rows = []
    record.update(summarize_steps(titanlite_steps(rows)))
    losses = [r["loss"] for r in rows if "loss" in r]
    if losses:
        record["final_loss"] = losses[-1]
    startup = re.search(r"init: start-up peak ([\d.]+) GiB allocated", log)
    if startup:
        record["startup_peak_allocated_gib"] = float(startup[1])
else:
    # torchtitan: "step: 25  loss: ...  memory: 48.40GiB(...)  tps: 38,326  tflops: ...  mfu: 51.4%"
    steps = {}
    for match in re.finditer(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+).*?tflops:\s*([\d.]+).*?mfu:\s*([\d.]+)%", log):
        steps[int(match[1])] = {"peak_reserved_gib": float(match[2]), "tflops_per_gpu": float(match[4]),
                                "tokens_per_second_per_gpu": float(match[3].replace(",", "")),
                                "mfu_percent": float(match[5])}
    if steps:
        record.update(summarize_steps(steps))
# The GPU samples taken while it trained (power within 20% of the run's highest; compile, start-up
# and the end draw less): medians.
try:
    samples = [[float(x) for x in line.split(",")] for line in open(os.environ.get("GPU_SAMPLES", ""))
               if line.count(",") == 2 and "N/A" not in line]
except (FileNotFoundError, ValueError):
    samples = []
if len(samples) >= 4:
    training = [s for s in samples if s[1] >= 0.8 * max(s[1] for s in samples)]
    record.update(sm_clock_mhz=statistics.median(s[0] for s in training),
                  power_w=statistics.median(s[1] for s in training),
                  temperature_c=statistics.median(s[2] for s in training))
    # Energy per token of GPU 0: its mean power while training over its tokens per second.
    if record.get("tokens_per_second_per_gpu"):
        record["joules_per_token"] = statistics.mean(s[1] for s in training) / record["tokens_per_second_per_gpu"]
if int(rc) != 0:
    record["log_tail"] = log[-3000:]
print(json.dumps(record))
