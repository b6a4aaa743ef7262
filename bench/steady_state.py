"""What the benchmark figures mean: warm-up and peak memory, defined once.

Imported by summarize_case.py (gpu_case.sh's JSON lines), bench_layouts.sh and perf_table.py;
docs/performance.md states the same.
- Warm-up: the logged steps in the first third of a run (compilation, autotuning, the allocator
  growing) are left out; tokens/s, TFLOP/s and MFU are the mean over the logged steps after them.
- Peak memory: the largest value logged at those steps. titanlite logs the peak since start-up
  (reset once after init), so this is the run's peak; torchtitan logs the peak since its
  previous log line, so this is the peak of the steady steps.
- Side by side, memory is compared as reserved bytes: the one figure both frameworks log.
"""

from __future__ import annotations

import statistics

COMPARED_MEMORY = "peak_reserved_gib"
# titanlite's metrics.jsonl names -> the result lines' names
TITANLITE_NAMES = {"tokens_per_second_per_device": "tokens_per_second_per_gpu", "tflops_per_device": "tflops_per_gpu",
                   "mfu_percent": "mfu_percent", "memory/max_allocated_gib": "peak_allocated_gib",
                   "memory/max_reserved_gib": "peak_reserved_gib"}


def steady_steps(steps: list[int]) -> list[int]:
    """The logged steps after warm-up: those past the first third of the last logged step."""
    last = max(steps, default=0)
    return [step for step in steps if step > last / 3]


def summarize_steps(rows: dict[int, dict[str, float]]) -> dict:
    """Figures of one run from its logged steps ({step: {name: value}}, names as in the JSON lines)."""
    steady = steady_steps(sorted(rows))
    record: dict = {"steps_logged": steady}
    for name in ("tokens_per_second_per_gpu", "tflops_per_gpu", "mfu_percent"):
        values = [rows[step][name] for step in steady if name in rows[step]]
        if values:
            record[name] = statistics.mean(values)
    for name in ("peak_allocated_gib", "peak_reserved_gib"):
        values = [rows[step][name] for step in steady if name in rows[step]]
        if values:
            record[name] = max(values)
    return record


def titanlite_steps(rows: list[dict]) -> dict[int, dict[str, float]]:
    """{step: figures} of titanlite's metrics.jsonl rows, under the result lines' names."""
    steps: dict[int, dict[str, float]] = {}
    for row in rows:
        steps.setdefault(row["step"], {}).update({TITANLITE_NAMES[k]: v for k, v in row.items() if k in TITANLITE_NAMES})
    return steps
