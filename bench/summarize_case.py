"""Turn one benchmark case's log (and titanlite's metrics.jsonl) into one JSON line on stdout."""

import datetime
import json
import os
import re
import statistics
import sys

import torch

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
    steady = [r for r in rows if r["step"] > max(r2["step"] for r2 in rows) / 3] if rows else []
    for key, out in [("tokens_per_second_per_device", "tokens_per_second_per_gpu"), ("mfu_percent", "mfu_percent"),
                     ("tflops_per_device", "tflops_per_gpu"), ("memory/max_allocated_gib", "peak_allocated_gib"),
                     ("memory/max_reserved_gib", "peak_reserved_gib"), ("loss", "final_loss")]:
        values = [r[key] for r in steady if key in r]
        if values:
            record[out] = values[-1] if key.startswith("memory") or key == "loss" else statistics.mean(values)
    compile_times = re.findall(r"compil\w* [^\n]*?([\d.]+) ?s", log)
    record["steps_logged"] = [r["step"] for r in steady]
    startup = re.search(r"init: start-up peak ([\d.]+) GiB allocated", log)
    if startup:
        record["startup_peak_allocated_gib"] = float(startup[1])
else:
    # torchtitan: "step: 25  loss: ...  memory: 48.40GiB(...)  tps: 38,326  tflops: ...  mfu: 51.4%"
    steps = []
    for match in re.finditer(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+).*?tflops:\s*([\d.]+).*?mfu:\s*([\d.]+)%", log):
        steps.append([int(match[1]), float(match[2]), float(match[3].replace(",", "")), float(match[4]), float(match[5])])
    # 30-step runs: steps 20-30, as the peer figures were read; shorter runs (20 steps, log every 5):
    # the log steps after the first third, as for titanlite.
    last = max((s[0] for s in steps), default=0)
    steady = ([s for s in steps if 20 <= s[0] <= 30] if last >= 30 else [s for s in steps if s[0] > last / 3]) \
        or steps[len(steps) // 2:]
    if steady:
        record.update(tokens_per_second_per_gpu=statistics.mean(s[2] for s in steady),
                      tflops_per_gpu=statistics.mean(s[3] for s in steady),
                      mfu_percent=statistics.mean(s[4] for s in steady), peak_reserved_gib=max(s[1] for s in steady),
                      steps_logged=[s[0] for s in steady])
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
