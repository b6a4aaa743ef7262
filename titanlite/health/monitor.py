"""Training health: record every step on the device, judge on check steps, return a verdict.

Health decides, the loop acts. Hot path (every step, no host sync): `HealthMonitor.record`
writes the step's loss, grad norm, worst per-sample loss and skip flag into small device
buffers and keeps the step's host batch for capture. On check steps (every log step, and before
every checkpoint save) `check` all-reduces those buffers over the data-parallel ranks and syncs
them in one copy, so the detectors see every step and every rank reaches the same verdict.
`decide` logs and records each event, captures the batch of a spike or divergence, and returns a
`Verdict`: carry on, roll back, or stop. train.py carries it out (reload, rewind the data, scale
the LR through the schedule; or save and stop). Detection latency is therefore up to
metrics.log_freq steps (about a minute for a 7B on 64 H100s at log_freq 10); a non-finite update
never lands meanwhile (optim/step.py skips it), and a checkpoint is never written
before the steps it holds were checked.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from titanlite.config.settings import Health
from titanlite.health.detectors import Detectors, Event

logger = logging.getLogger("titanlite")

ACTION_ORDER = ("log", "capture", "stop", "rollback")
CAPTURED_SIGNALS = ("spike", "divergence")  # signals that point at one step's batch


class HealthStop(RuntimeError):
    """The health monitor stopped the run; the message says why and what to do next."""


@dataclass
class Verdict:
    """What the loop must do after a check: action None (carry on), "rollback" or "stop", and why."""

    action: str | None = None
    cause: Event | None = None  # the first event that asks for `action` (stop wins over rollback)
    trouble_start: int | None = None  # the earliest start_step of all events that ask for a rollback or a stop
    diverged: bool = False  # a divergence is among them: the current state must not become a checkpoint


@dataclass
class StepRecord:
    """What a capture needs of one step: per-sample losses (device) and the host batch."""

    step: int
    lr: float
    sample_losses: torch.Tensor  # (samples,) mean token loss of each of this rank's samples
    valid_tokens: torch.Tensor  # (samples,) labelled tokens per sample
    micro_batches: list[dict]  # host tensors, as the loader yielded them


class HealthMonitor:
    """Device-side step history, the detectors, the actions, and checkpointable state.

    `reduce_group`: the data-parallel process group (None in a single process).
    """

    def __init__(self, settings: Health, grad_clip: float, warmup_steps: int, window: int, dump_folder: Path,
                 rank: int, device: torch.device, reduce_group=None, tokenizer=None):
        """grad_clip: training.grad_clip; window: the steps between checks at most (metrics.log_freq)."""
        self.settings = settings
        self.detectors = Detectors(settings, grad_clip, warmup_steps)
        self.dump_folder, self.rank, self.reduce_group, self.tokenizer = Path(dump_folder), rank, reduce_group, tokenizer
        self.capacity = window
        self.losses = torch.zeros(self.capacity, device=device)
        self.stats = torch.zeros(self.capacity, 3, device=device)  # grad norm, worst sample loss, skipped
        self.grad_clip = grad_clip
        self.pending: list[StepRecord] = []
        self.checked: list[StepRecord] = []  # the last checked window, for capture
        self.log_window_losses: list[float] = []  # losses since the last log step: the logged loss is their mean
        self.last_step = 0  # last recorded step
        self.overflow_steps = 0  # steps skipped for non-finite gradients, over the whole run
        self.nonfinite_loss_steps = 0
        self.rollbacks = 0
        self.lr_scale = 1.0  # product of the rollback LR factors; persists across rollbacks and resumes
        self.events: list[dict] = []  # the run's last 100 events
        self.injected = False

    # --- every step (device only)
    def record(self, step: int, result: dict, valid_tokens: torch.Tensor, host_batches: list[dict],
               lr: float) -> None:
        """Store step `step`'s numbers in device buffers; `result` is train_step's output and
        `valid_tokens` (samples,) the labelled tokens of each of this rank's samples."""
        if len(self.pending) == self.capacity:
            raise RuntimeError(f"health: {self.capacity} steps recorded without a check: call check() every "
                               "metrics.log_freq steps")
        slot = len(self.pending)
        sample_losses = result["sample_losses"] / valid_tokens.clamp(min=1)
        grad_norm = result["grad_norm"].detach().float()
        self.losses[slot].copy_(result["loss"].detach())
        # inf for NaN: a max all-reduce over NaN is not defined the same way on every backend. (posinf
        # stays inf: nan_to_num's default would turn it into 3.4e38, a finite norm.)
        self.stats[slot, 0].copy_(torch.nan_to_num(grad_norm, nan=math.inf, posinf=math.inf))
        self.stats[slot, 1].copy_(torch.nan_to_num(sample_losses.max(), nan=math.inf, posinf=math.inf))
        if "skipped" in result:  # not .get(default): that would allocate a device zero every step
            self.stats[slot, 2].copy_(result["skipped"])
        else:
            self.stats[slot, 2].zero_()  # the slot may hold an earlier window's flag
        self.pending.append(StepRecord(step, lr, sample_losses.detach(), valid_tokens, host_batches))
        self.last_step = step

    def must_check(self, step: int, total_steps: int, checkpoint_interval: int = 0) -> bool:
        """A full buffer, the last step, or a checkpoint step: check before anything is saved."""
        return (len(self.pending) == self.capacity or step == total_steps
                or (checkpoint_interval > 0 and step % checkpoint_interval == 0))

    # --- check steps (one host sync)
    def check(self) -> tuple[dict[str, float], list[Event]]:
        """Sync the recorded steps, run the detectors; returns (metrics of the window, events)."""
        count = len(self.pending)
        if count == 0:
            return {}, []
        losses, stats = self.losses[:count].clone(), self.stats[:count].clone()
        if self.reduce_group is not None:
            dist.all_reduce(losses, group=self.reduce_group)  # each rank holds its share of the mean
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self.reduce_group)
        rows = torch.cat([losses[:, None], stats], dim=1).tolist()  # host sync: logging step only
        events: list[Event] = []
        for record, (loss, grad_norm, worst_sample, skipped) in zip(self.pending, rows):
            self.overflow_steps += int(skipped)
            self.nonfinite_loss_steps += int(not math.isfinite(loss))
            if self.settings.enable:
                events += self.detectors.observe(record.step, loss, grad_norm, bool(skipped))
        self.checked, self.pending = self.pending, []
        self.log_window_losses += [row[0] for row in rows]
        finite_norms = [row[1] for row in rows if math.isfinite(row[1])]
        metrics = {
            "loss": rows[-1][0], "grad_norm": rows[-1][1],
            "loss_window_mean": sum(self.log_window_losses) / len(self.log_window_losses),
            "loss_max_step": max(row[0] for row in rows), "loss_max_sample": max(row[2] for row in rows),
            "grad_norm_max": max(finite_norms, default=math.nan),
            "clipped_fraction": (sum(n > self.grad_clip for n in finite_norms) / len(finite_norms)
                                 if finite_norms and self.grad_clip > 0 else 0.0),
            "overflow_steps": self.overflow_steps, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
        }
        return metrics, events

    def decide(self, events: list[Event]) -> Verdict:
        """Log, record and capture each event; the verdict is the strongest of stop/rollback, with its event,
        where the earliest of those events' troubles began, and whether one of them is a divergence."""
        acting, captured, records = [], set(), []
        for event in events:
            action = getattr(self.settings, f"{event.signal}_action")
            records.append({**event.to_dict(), "action": action})
            logger.warning("health: %s at step %d: %s -> %s", event.signal, event.step, event.message, action)
            if event.signal in CAPTURED_SIGNALS and action != "log" and event.signal not in captured:
                captured.add(event.signal)  # the first step of each kind is the one that points at the cause
                self.capture(event.step)
            if action in ("stop", "rollback"):
                acting.append((action, event))
        verdict = Verdict()
        if acting:
            action = "stop" if any(wanted == "stop" for wanted, _ in acting) else "rollback"  # the safer of the two
            cause = next(event for wanted, event in acting if wanted == action)
            verdict = Verdict(action, cause, min(event.start_step for _, event in acting),
                              any(event.signal == "divergence" for _, event in acting))
            records[events.index(cause)]["verdict"] = action  # one decision per check, however many events
        self.events = (self.events + records)[-100:]
        if self.rank == 0 and records:
            with open(self.dump_folder / "health.jsonl", "a") as events_file:
                events_file.write("".join(json.dumps(record) + "\n" for record in records))
        return verdict

    def capture(self, step: int) -> Path | None:
        """Write step `step`'s batch, worst sample first, to <run>/spikes/step-<step>.jsonl (rank 0)."""
        record = next((r for r in self.checked if r.step == step), None)
        if record is None:
            return None
        rows = capture_rows(record, self.tokenizer)
        if self.reduce_group is not None:
            gathered = [None] * dist.get_world_size(self.reduce_group)
            dist.all_gather_object(gathered, rows, group=self.reduce_group)
            rows = [row for part in gathered for row in part]
        path = self.dump_folder / "spikes" / f"step-{step}.jsonl"
        if self.rank == 0:
            rows.sort(key=lambda row: (math.isnan(row["loss"]), row["loss"]), reverse=True)  # NaN first, then worst
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            logger.warning("health: captured step %d's batch (%d samples, worst loss %.4g) in %s",
                           step, len(rows), rows[0]["loss"] if rows else math.nan, path)
        return path

    # --- fault injection (tests only)
    def install_fault_injection(self, model: torch.nn.Module) -> None:
        """TESTING AID: with health.inject_nan_at_step = k, the final norm's output (the hidden states
        both loss paths start from: whole logits or the chunked head) of step k is NaN, once."""
        if not self.settings.inject_nan_at_step:
            return

        def poison_output(module, args, output):
            if self.last_step + 1 == self.settings.inject_nan_at_step and not self.injected:
                self.injected = True  # once per process: the replay after a rollback runs clean
                return output * math.nan
            return output

        model.norm.register_forward_hook(poison_output)

    # --- rollback: the loop reloads a checkpoint, which restores this monitor's detectors
    def run_counters(self) -> dict:
        """What outlives a rollback: the run's counters, its events and the LR scale."""
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "overflow_steps": self.overflow_steps,
                "nonfinite_loss_steps": self.nonfinite_loss_steps, "events": self.events, "injected": self.injected}

    def rolled_back(self, counters: dict, step: int) -> None:
        """After the loop reloaded step `step`: restore `counters`, count the rollback, scale the LR."""
        self.__dict__.update(counters)
        self.rollbacks += 1
        self.lr_scale *= self.settings.rollback_lr_factor
        self.pending, self.checked, self.last_step = [], [], step
        self.log_window_losses = []

    def log_window_done(self) -> None:
        """The loop logged the window: loss_window_mean starts over (checks between log steps add to it)."""
        self.log_window_losses = []

    def state_dict(self) -> dict:
        # One JSON string: DCP stores it as one object, whatever the lengths of the histories
        # (nested lists would become per-element keys that must match on load).
        state = {"detectors": self.detectors.state_dict(), "last_step": self.last_step,
                 "overflow_steps": self.overflow_steps, "nonfinite_loss_steps": self.nonfinite_loss_steps,
                 "rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "events": self.events}
        return {"json": json.dumps(state)}

    def load_state_dict(self, state: dict) -> None:
        state = json.loads(state["json"])
        self.detectors.load_state_dict(state["detectors"])
        self.last_step, self.overflow_steps = int(state["last_step"]), int(state["overflow_steps"])
        self.nonfinite_loss_steps, self.rollbacks = int(state["nonfinite_loss_steps"]), int(state["rollbacks"])
        self.lr_scale, self.events = float(state["lr_scale"]), list(state["events"])


def decode_or_none(tokenizer, token_ids: list[int]) -> str | None:
    """The text of `token_ids`, or None when there is no tokenizer or an id is outside it (padding rows)."""
    try:
        return tokenizer.decode(token_ids) if tokenizer is not None else None
    except Exception:  # noqa: BLE001 - a capture must not crash the run it documents
        return None


def capture_rows(record: StepRecord, tokenizer=None) -> list[dict]:
    """One JSON-ready row per sample of this rank's batch at `record.step` (host sync: rare event).

    document_starts: token offsets where a document begins (after each EOS), so a person can cut
    the packed row into its documents. Any other per-sample field the loader adds (document ids,
    source rows) is copied as is.
    """
    losses, valid = record.sample_losses.tolist(), record.valid_tokens.tolist()
    eos_id = getattr(tokenizer, "eos_id", None)
    rows, index = [], 0
    for micro_batch_index, batch in enumerate(record.micro_batches):
        for row_index in range(batch["input_ids"].shape[0]):
            token_ids = batch["input_ids"][row_index].tolist()
            row = {"step": record.step, "lr": record.lr, "loss": losses[index], "valid_tokens": int(valid[index]),
                   "micro_batch": micro_batch_index, "row": row_index,
                   "rank": dist.get_rank() if dist.is_initialized() else 0,
                   "document_starts": [0] + [i + 1 for i, t in enumerate(token_ids[:-1]) if t == eos_id]}
            for key, value in batch.items():
                if key not in ("input_ids", "labels", "positions") and torch.is_tensor(value):
                    row[key] = value[row_index].tolist()  # e.g. document_ids (the loader's numbering)
            row.update({"token_ids": token_ids, "text": decode_or_none(tokenizer, token_ids)})
            rows.append(row)
            index += 1
    return rows
