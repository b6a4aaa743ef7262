"""A verdict on a run in the recipe's terms, from its records (`python -m titanlite.diagnose RUN_DIR`).

Reads <run>/metrics.jsonl (one record per log step) and <run>/health.jsonl (the events the
trainer found, from every step). Prints one line per finding with the recipe's action:
    healthy | spikes at steps ... | plateau since step ... | diverged at step ... |
    grad norm far above grad_clip | data bound | MFU low | train/val gap | overfitting
and writes PNG plots to <run>/diagnose/ (titanlite/health/plots.py: loss on log-log axes with
the events marked, grad norm against grad_clip, LR, throughput (and MFU on GPUs), data wait in
percent, and all of them in overview.png; abandoned steps of a rollback or resume drawn apart).
Plots need matplotlib (`pip install titanlite[plot]`); without it the text verdict still works.

Runs without health.jsonl (health off, or another trainer's metrics) are judged by replaying the
logged losses through the same detectors, with their windows scaled to the log interval.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from titanlite.config.settings import Health
from titanlite.health.detectors import Detectors, Event

ADVICE = {
    "overfit": "the model fits the training data better than held-out data: more (or more varied) data, fewer "
               "epochs over it, check that validation.source is held out and drawn like the training data",
    "val_source": "check that validation.source is drawn like the training data (the same sources, mix, language "
                  "and cleaning) and held out from it",
    "spike": "if rare, ignore; if frequent, lower the LR or fix data cleaning. Early spikes (first ~1k steps) "
             "are a strong signal: inspect the captured batches in spikes/ (90% are data problems), consider "
             "a longer warmup or a lower initial LR",
    "plateau": "check the LR schedule (decayed too fast or too low?), consider an LR restart, check the data "
               "mix (is a high-quality source exhausted?)",
    "divergence": "stop, roll back to the last good checkpoint, lower the LR sharply (halve it), and inspect the "
                  "code (RoPE scaling, precision) and the data",
    "grad_norm": "the pre-clip grad norm is often far above grad_clip: the LR is too high; lower it",
    "data": "the device waits for data: raise data.num_workers, keep data.pin_memory on, look for GIL-bound "
            "preprocessing, check the storage's read throughput",
    "mfu": "profile a few steps (profiling.enable_profiling=true) and look for the bottleneck: data loading, "
           "all-reduce/all-gather, or the optimizer step (CPU offload)",
}


class UnreadableRecords(ValueError):
    """A run file that is there but holds no records (binary, or not JSON): the message names it."""


def read_jsonl(path: Path, note: bool = True) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line; [] when it is missing.

    A crash can cut the last line of a record file mid-write (even mid-character): such lines are
    skipped with one note on stderr (`note`). A file with lines but no record at all (a binary file,
    another format) raises UnreadableRecords, as no verdict can come from it.
    """
    if not path.is_file():
        return []
    records, bad = [], []
    # split bytes on newlines, not text: one undecodable byte spoils its own line, not the whole file
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    lines = f"{len(bad)} lines that are" if len(bad) > 1 else "1 line that is"
    if bad and not records:
        raise UnreadableRecords(f"{path} holds no JSON records ({lines} not JSON or not UTF-8 text): it is not the "
                                f"{path.name} of a titanlite run")
    if bad and note:
        print(f"titanlite.diagnose: {path}: skipped {lines} not {'JSON records' if len(bad) > 1 else 'a JSON record'} "
              f"(the first: line {bad[0]})", file=sys.stderr)
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
    path = run / "config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableRecords(f"{path} cannot be read as JSON ({type(error).__name__}: {error}); it is the "
                                "resolved config the run wrote: restore it, or move it away to judge the run "
                                "with the default settings") from None
    if not isinstance(config, dict):
        raise UnreadableRecords(f"{path} holds {type(config).__name__}, not the JSON object of a resolved config")
    known = {key: value for key, value in config.get("health", {}).items() if key in Health.__dataclass_fields__}
    warmup = config.get("derived", {}).get("warmup_steps", 0)
    wait = config.get("metrics", {}).get("data_wait_warn_fraction", 0.05)
    return Health(**known), config.get("training", {}).get("grad_clip", 1.0), warmup, wait, 30.0


def diagnose(run: Path) -> tuple[list[str], list[Event]]:
    """(verdict lines, events) for the run folder."""
    settings, grad_clip, warmup, wait_limit, mfu_limit = run_settings(run)  # first: a bad config.json ends it
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "step" in r and "loss" in r]
    if not records:
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} is missing or empty: is {run} a titanlite run folder "
                                "(job.dump_folder) with metrics.enable_jsonl on?")
    try:
        logged = read_jsonl(run / "health.jsonl")
    except UnreadableRecords as error:  # the events can be found again from the losses: judge without them
        print(f"titanlite.diagnose: {error}; the logged losses are replayed instead", file=sys.stderr)
        logged = []
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
        lines += rollback_lines(records, logged, settings)
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
    lines += validation_lines(records)
    overflow = records[-1].get("overflow_steps", 0)
    if overflow:
        lines.append(f"note: {overflow} step(s) skipped for non-finite gradients; occasional is fine, growth is not")
    if not any(line for line in lines if not line.startswith(("note", "  "))):
        lines.insert(0, f"healthy: loss {records[0]['loss']:.4g} -> {records[-1]['loss']:.4g} over steps "
                        f"{records[0]['step']}..{records[-1]['step']}, no spikes, plateau or divergence")
    return lines, events


def training_loss_near(records: list[dict], index: int, max_records: int = 5) -> tuple[float, str] | None:
    """(the training loss to set against a validation loss logged with records[index], what it is).

    One step's loss is noisy (a batch of a few sequences); the log window's mean (`loss_window_mean`)
    is not. Records without it fall back to the mean of the logged losses of up to `max_records`
    records ending at `index`, none at or before the evaluation before it.
    """
    record = records[index]
    window_mean = record.get("loss_window_mean")
    if isinstance(window_mean, (int, float)) and math.isfinite(window_mean):
        return float(window_mean), "the mean training loss of the log window"
    previous_evaluation = max((r["step"] for r in records[:index] if isinstance(r.get("val_loss"), (int, float))),
                              default=-math.inf)
    near = [r for r in records[max(0, index - max_records + 1):index + 1]
            if previous_evaluation < r["step"] <= record["step"] and isinstance(r.get("loss"), (int, float))
            and math.isfinite(r["loss"])]
    if not near:
        return None
    what = (f"the mean training loss of the {len(near)} logged steps {near[0]['step']}..{near[-1]['step']}"
            if len(near) > 1 else f"the training loss of step {near[0]['step']} (one step: noisy)")
    return sum(r["loss"] for r in near) / len(near), what


def epochs_at(records: list[dict], index: int) -> float | None:
    """Epochs of the training data consumed by records[index] (the latest `epoch` logged by then), or None."""
    for record in reversed(records[:index + 1]):
        if isinstance(record.get("epoch"), (int, float)) and math.isfinite(record["epoch"]):
            return float(record["epoch"])
    return None


def validation_lines(records: list[dict], rising_evaluations: int = 3, gap_ratio: float = 1.1,
                     overfit_epochs: float = 1.0) -> list[str]:
    """The train/val verdict at the last evaluation: val loss up `rising_evaluations` times in a row while
    the training loss falls, or val above `gap_ratio` x the training loss; else a note with both.

    A model overfits by seeing its training samples again: it is called overfitting only past
    `overfit_epochs` epochs. Within the first epoch a rise or gap says the held-out data is not drawn like
    the training data; without an epoch count in the records, the two cannot be told apart.
    """
    evaluated = [index for index, r in enumerate(records)
                 if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
    trained = {index: training_loss_near(records, index) for index in evaluated}
    evaluated = [index for index in evaluated if trained[index] is not None]
    if not evaluated:
        return []
    last = records[evaluated[-1]]
    train_loss, what = trained[evaluated[-1]]
    epochs = epochs_at(records, evaluated[-1])
    recent = evaluated[-(rising_evaluations + 1):]
    rising = len(recent) == rising_evaluations + 1 and all(
        records[a]["val_loss"] < records[b]["val_loss"] for a, b in zip(recent, recent[1:]))
    if rising and trained[recent[-1]][0] < trained[recent[0]][0]:
        first = records[recent[0]]
        kind = "val_loss rising"
        finding = (f"val_loss rose at each of the last {rising_evaluations} evaluations ({first['val_loss']:.4g} at "
                   f"step {first['step']} -> {last['val_loss']:.4g} at step {last['step']}) while the training "
                   f"loss fell")
    elif last["val_loss"] > gap_ratio * train_loss:
        kind = "train/val gap"
        finding = f"val_loss {last['val_loss']:.4g} vs {train_loss:.4g}, {what}, at step {last['step']}"
    else:
        return [f"note: val_loss {last['val_loss']:.4g} vs {train_loss:.4g}, {what}, at step {last['step']}"]
    if epochs is None:
        return [f"{kind}: {finding}; metrics.jsonl has no epoch count, so this is overfitting if the run has seen "
                f"its data more than once, else held-out data unlike the training data -> {ADVICE['val_source']}; "
                f"past one epoch, also more (or more varied) data or fewer epochs"]
    if epochs > overfit_epochs:
        return [f"overfitting after {epochs:.2f} epochs of the training data: {finding} -> {ADVICE['overfit']}"]
    return [f"{kind} within the first epoch ({epochs:.2f} epochs: no training sample seen twice, so not "
            f"overfitting): {finding} -> {ADVICE['val_source']}"]


def rollback_lines(records: list[dict], logged: list[dict], settings: Health) -> list[str]:
    """What the trainer did about it: the rollbacks it made (the health monitor's count, logged with
    every record), and a rollback it was asked for but could not make (the run then stopped)."""
    done = max((int(r.get("rollbacks", 0)) for r in records), default=0)
    decided = any("verdict" in e for e in logged)  # one per check; older runs logged only each event's action
    asked = [e for e in logged if (e.get("verdict") if decided else e.get("action")) == "rollback"]
    lines = []
    if done:
        lines.append(f"  the trainer rolled back {done} time(s); LR scale now {records[-1].get('lr_scale', 'n/a')}")
    if len(asked) > done:
        why = (f"health.max_rollbacks={settings.max_rollbacks} were used up" if done >= settings.max_rollbacks
               else f"no checkpoint predates step {asked[-1].get('start_step', asked[-1]['step'])}")
        lines.append(f"  no rollback for the {asked[-1]['signal']} at step {asked[-1]['step']} ({why}): the run "
                     f"stopped after step {records[-1]['step']}")
    return lines


def median(values) -> float | None:
    values = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    return values[len(values) // 2] if values else None
