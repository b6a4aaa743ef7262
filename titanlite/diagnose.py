"""`python -m titanlite.diagnose RUN_DIR`: a verdict on a run in the recipe's terms, and plots.

Reads <run>/metrics.jsonl (one record per log step) and <run>/health.jsonl (the events the
trainer found, from every step). Prints one line per finding with the recipe's action:
    healthy | spikes at steps ... | plateau since step ... | diverged at step ... |
    grad norm far above grad_clip | data bound | MFU low
and writes PNG plots to <run>/diagnose/ (loss on log-log axes with the events marked, grad norm,
LR, throughput and MFU, data-wait). Plots need matplotlib (`pip install titanlite[plot]`);
without it the text verdict still works.

Runs without health.jsonl (health off, or another trainer's metrics) are judged by replaying the
logged losses through the same detectors, with their windows scaled to the log interval.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from titanlite.config import Health
from titanlite.health_detectors import Detectors, Event

ADVICE = {
    "spike": "if rare, ignore; if frequent, lower the LR or fix data cleaning. Early spikes (first ~1k steps) "
             "are a strong signal: inspect the captured batches in spikes/ (90% are data problems), consider "
             "a longer warmup or a lower initial LR",
    "plateau": "check the LR schedule (decayed too fast or too low?), consider an LR restart, check the data "
               "mix (is a high-quality source exhausted?)",
    "divergence": "stop, roll back to the last good checkpoint, lower the LR sharply (halve it), and inspect the "
                  "code (RoPE scaling, precision) and the data",
    "grad_norm": "the pre-clip grad norm is often far above grad_clip: the LR is too high; lower it",
    "data": "the GPU waits for data: raise data.num_workers, keep data.pin_memory on, look for GIL-bound "
            "preprocessing, check the storage's read throughput",
    "mfu": "profile a few steps (profiling.enable_profiling=true) and look for the bottleneck: data loading, "
           "all-reduce/all-gather, or the optimizer step (CPU offload)",
}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"titanlite.diagnose: {path}:{number} is not JSON; skipped", file=sys.stderr)
    return records


def replay_events(records: list[dict], settings: Health, grad_clip: float, warmup_steps: int) -> list[Event]:
    """Run the detectors over the logged steps; windows counted in steps become windows of log records."""
    steps = [r["step"] for r in records]
    spacing = max(1, round((steps[-1] - steps[0]) / max(1, len(steps) - 1))) if len(steps) > 1 else 1
    scaled = replace(settings,
                     spike_window=max(8, settings.spike_window // spacing),
                     spike_min_history=max(4, settings.spike_min_history // spacing),
                     divergence_window=max(5, settings.divergence_window // spacing),
                     grad_norm_window=max(5, settings.grad_norm_window // spacing))
    detectors = Detectors(scaled, grad_clip, warmup_steps)
    events = []
    for record in records:
        events += detectors.observe(record["step"], float(record["loss"]), float(record.get("grad_norm", math.nan)))
    return events


def run_settings(run: Path) -> tuple[Health, float, int, float, float]:
    """[health], grad_clip, warmup steps, data-wait and MFU thresholds from the run's resolved config.json."""
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    known = {key: value for key, value in config.get("health", {}).items() if key in Health.__dataclass_fields__}
    warmup = config.get("derived", {}).get("warmup_steps", 0)
    wait = config.get("metrics", {}).get("data_wait_warn_fraction", 0.05)
    return Health(**known), config.get("training", {}).get("grad_clip", 1.0), warmup, wait, 30.0


def diagnose(run: Path) -> tuple[list[str], list[Event]]:
    """(verdict lines, events) for the run folder."""
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "step" in r and "loss" in r]
    if not records:
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} is missing or empty: is {run} a titanlite run folder "
                                "(job.dump_folder) with metrics.enable_jsonl on?")
    settings, grad_clip, warmup, wait_limit, mfu_limit = run_settings(run)
    logged = read_jsonl(run / "health.jsonl")
    if logged:
        events = [Event(e["step"], e["signal"], e["message"], e.get("start_step", e["step"]), e.get("value", math.nan))
                  for e in logged]
    else:
        events = replay_events(records, settings, grad_clip, warmup)
    lines = []
    by_signal = {signal: [e for e in events if e.signal == signal] for signal in ("spike", "plateau", "divergence",
                                                                                  "grad_norm")}
    if by_signal["divergence"]:
        first = by_signal["divergence"][0]
        lines.append(f"diverged at step {first.step} ({first.message}) -> {ADVICE['divergence']}")
        rollbacks = [e for e in logged if e.get("action") == "rollback"]
        if rollbacks:
            lines.append(f"  the trainer rolled back {len(rollbacks)} time(s); last LR scale "
                         f"{records[-1].get('lr_scale', 'n/a')}")
    if by_signal["spike"]:
        steps = [e.step for e in by_signal["spike"]]
        early = [s for s in steps if s <= settings.early_steps]
        shown = ", ".join(map(str, steps[:20])) + (" ..." if len(steps) > 20 else "")
        lines.append(f"spikes at steps {shown}" + (f" ({len(early)} in the early phase)" if early else "")
                     + f" -> {ADVICE['spike']}")
    if by_signal["plateau"]:
        first = by_signal["plateau"][0]
        lines.append(f"plateau since step {first.start_step} ({first.message}) -> {ADVICE['plateau']}")
    if by_signal["grad_norm"]:
        lines.append(f"grad norm far above grad_clip from step {by_signal['grad_norm'][0].start_step} -> "
                     f"{ADVICE['grad_norm']}")
    steady = records[len(records) // 4:] or records  # skip start-up (compile, warm caches)
    wait = median([r.get("data_wait_fraction") for r in steady])
    if wait is not None and wait > wait_limit:
        lines.append(f"data bound: the loader takes {wait:.0%} of each step (median) -> {ADVICE['data']}")
    mfu = median([r.get("mfu_percent") for r in steady])
    if mfu is not None and mfu < mfu_limit:
        lines.append(f"MFU low: {mfu:.1f}% (median; 50-60% is excellent for a 7B on H100) -> {ADVICE['mfu']}")
    overflow = records[-1].get("overflow_steps", 0)
    if overflow:
        lines.append(f"note: {overflow} step(s) skipped for non-finite gradients; occasional is fine, growth is not")
    if not any(line for line in lines if not line.startswith(("note", "  "))):
        lines.insert(0, f"healthy: loss {records[0]['loss']:.4g} -> {records[-1]['loss']:.4g} over steps "
                        f"{records[0]['step']}..{records[-1]['step']}, no spikes, plateau or divergence")
    return lines, events


def median(values) -> float | None:
    values = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    return values[len(values) // 2] if values else None


def write_plots(run: Path, events: list[Event]) -> list[Path]:
    """PNG plots in <run>/diagnose/; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("titanlite.diagnose: matplotlib is not installed, no plots (pip install 'titanlite[plot]')",
              file=sys.stderr)
        return []
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "step" in r]
    folder = run / "diagnose"
    folder.mkdir(exist_ok=True)

    def series(key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key])]
        return ([p[0] for p in points], [p[1] for p in points])

    colors = {"spike": "tab:orange", "plateau": "tab:purple", "divergence": "tab:red", "grad_norm": "tab:brown"}
    plots = [("loss.png", "loss (log-log: healthy is a straight line)", ["loss", "loss_max_step"], True),
             ("grad_norm.png", "grad norm before clipping", ["grad_norm", "grad_norm_max"], False),
             ("lr.png", "learning rate", ["lr"], False),
             ("throughput.png", "tokens/s per device and MFU %", ["tokens_per_second_per_device", "mfu_percent"], False),
             ("data_wait.png", "fraction of time waiting for data", ["data_wait_fraction"], False)]
    written = []
    for name, title, keys, loglog in plots:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for index, key in enumerate(keys):
            xs, ys = series(key)
            if not xs:
                continue
            target = axis.twinx() if name == "throughput.png" and index == 1 else axis
            target.plot(xs, ys, label=key, color=f"C{index}", linewidth=1)
            target.set_ylabel(key)
        if loglog:
            axis.set_xscale("log")
            axis.set_yscale("log")
        if name in ("loss.png", "grad_norm.png"):
            for event in events:
                axis.axvline(event.step, color=colors.get(event.signal, "gray"), alpha=0.6, linestyle="--",
                             label=event.signal)
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if unique:
            axis.legend(unique.values(), unique.keys(), fontsize=8)
        axis.set_title(title)
        axis.set_xlabel("step")
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
        written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Diagnose a titanlite run from its metrics (the recipe's "
                                                 "loss-curve reading) and plot it.")
    parser.add_argument("run", type=Path, help="the run folder (job.dump_folder)")
    parser.add_argument("--no-plots", action="store_true", help="only print the verdict")
    args = parser.parse_args(argv)
    try:
        lines, events = diagnose(args.run)
    except FileNotFoundError as error:
        print(f"titanlite.diagnose: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.run}:")
    for line in lines:
        print(f"  {line}")
    if not args.no_plots:
        written = write_plots(args.run, events)
        if written:
            print(f"  plots: {', '.join(str(path) for path in written)}")


if __name__ == "__main__":
    main()
