"""Training health in the loop: skip non-finite steps, watch the loss, act on what it shows.

Hot path (every step, no host sync):
  - `guarded_optimizer_step` skips an update whose global grad norm is inf/NaN. With a fused
    AdamW (the default on CUDA) the skip flag goes to the optimizer's `found_inf` input, the
    device-side flag GradScaler uses: the kernel leaves weights, moments and the step count
    untouched, and the host never waits. Foreach/for-loop AdamW cannot take that flag: they fall
    back to a host check each step (free on CPU; on CUDA a sync per step, warned once).
  - `HealthMonitor.record` writes the step's loss, grad norm, worst per-sample loss and skip flag
    into small device buffers and keeps the step's host batch for capture.
On check steps (every log step, and before every checkpoint save) `check` all-reduces those
buffers over the data-parallel ranks and syncs them in one copy, so the detectors see every step
and every rank reaches the same verdict. Detection latency is therefore up to metrics.log_freq
steps (about a minute for a 7B on 64 H100s at log_freq 10); a non-finite update never lands
meanwhile, and a checkpoint is never written before the steps it holds were checked.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from titanlite.loss import valid_tokens_per_sample
from titanlite.health_detectors import Detectors, Event

logger = logging.getLogger("titanlite")

ACTION_ORDER = ("log", "capture", "stop", "rollback")
CAPTURED_SIGNALS = ("spike", "divergence")  # signals that point at one step's batch


class HealthStop(RuntimeError):
    """The health monitor stopped the run; the message says why and what to do next."""


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a scalar all-reduce, no host sync); a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


_warned_host_check = False


def guarded_optimizer_step(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor,
                           skip_nonfinite: bool = True) -> torch.Tensor:
    """optimizer.step() unless the global grad norm is inf/NaN; returns 1.0 if skipped, else 0.0 (device).

    grad_norm must be the same global norm on every rank (it is: clipping all-reduces it), so
    all ranks skip together and FSDP shards stay consistent.
    """
    global _warned_host_check
    skipped = (~torch.isfinite(full_value(grad_norm).detach())).float()
    if not skip_nonfinite:
        optimizer.step()
        return skipped
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = skipped  # read by the fused kernel on device: no host sync
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return skipped
    if skipped.device.type == "cuda" and not _warned_host_check:
        _warned_host_check = True
        logger.warning("health: optimizer.implementation is not fused: skipping non-finite steps costs a host "
                       "sync per step; use optimizer.implementation=fused")
    if not skipped.item():  # host sync: every step, only for non-fused optimizers (see module docstring)
        optimizer.step()
    return skipped


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

    def __init__(self, config, warmup_steps: int, dump_folder: Path, rank: int, device: torch.device,
                 reduce_group=None, tokenizer=None):
        self.settings = config.health
        self.detectors = Detectors(config.health, config.training.grad_clip, warmup_steps)
        self.dump_folder, self.rank, self.reduce_group, self.tokenizer = Path(dump_folder), rank, reduce_group, tokenizer
        self.capacity = config.metrics.log_freq
        self.losses = torch.zeros(self.capacity, device=device)
        self.stats = torch.zeros(self.capacity, 3, device=device)  # grad norm, worst sample loss, skipped
        self.grad_clip = config.training.grad_clip
        self.pending: list[StepRecord] = []
        self.checked: list[StepRecord] = []  # the last checked window, for capture
        self.last_step = 0  # last recorded step
        self.overflow_steps = 0  # steps skipped for non-finite gradients, over the whole run
        self.nonfinite_loss_steps = 0
        self.rollbacks = 0
        self.lr_scale = 1.0  # product of the rollback LR factors; persists across rollbacks and resumes
        self.events: list[dict] = []  # the run's last 100 events
        self.injected = False

    # --- every step (device only)
    def record(self, step: int, result: dict, micro_batches: list[dict], host_batches: list[dict], lr: float) -> None:
        """Store step `step`'s numbers in device buffers; `result` is train_step's output."""
        if len(self.pending) == self.capacity:
            raise RuntimeError(f"health: {self.capacity} steps recorded without a check: call check() every "
                               "metrics.log_freq steps")
        slot = len(self.pending)
        valid = torch.cat([valid_tokens_per_sample(batch["labels"]) for batch in micro_batches])
        sample_losses = result["sample_losses"] / valid.clamp(min=1)
        grad_norm = full_value(result["grad_norm"]).detach().float()
        self.losses[slot].copy_(result["loss"].detach())
        # inf for NaN: a max all-reduce over NaN is not defined the same way on every backend.
        self.stats[slot, 0].copy_(torch.nan_to_num(grad_norm, nan=math.inf))
        self.stats[slot, 1].copy_(torch.nan_to_num(sample_losses.max(), nan=math.inf))
        if "skipped" in result:  # not .get(default): that would allocate a device zero every step
            self.stats[slot, 2].copy_(result["skipped"])
        else:
            self.stats[slot, 2].zero_()  # the slot may hold an earlier window's flag
        self.pending.append(StepRecord(step, lr, sample_losses.detach(), valid, host_batches))
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
        finite_norms = [row[1] for row in rows if math.isfinite(row[1])]
        metrics = {
            "loss": rows[-1][0], "grad_norm": rows[-1][1],
            "loss_max_step": max(row[0] for row in rows), "loss_max_sample": max(row[2] for row in rows),
            "grad_norm_max": max(finite_norms, default=math.nan),
            "clipped_fraction": (sum(n > self.grad_clip for n in finite_norms) / len(finite_norms)
                                 if finite_norms and self.grad_clip > 0 else 0.0),
            "overflow_steps": self.overflow_steps, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
        }
        return metrics, events

    def act(self, events: list[Event]) -> tuple[str | None, Event | None]:
        """Log, record and capture each event; returns the strongest of stop/rollback, with its event."""
        decision, cause, captured = None, None, set()
        for event in events:
            action = getattr(self.settings, f"{event.signal}_action")
            record = {**event.to_dict(), "action": action}
            self.events = (self.events + [record])[-100:]
            logger.warning("health: %s at step %d: %s -> %s", event.signal, event.step, event.message, action)
            if self.rank == 0:
                with open(self.dump_folder / "health.jsonl", "a") as events_file:
                    events_file.write(json.dumps(record) + "\n")
            if event.signal in CAPTURED_SIGNALS and action != "log" and event.signal not in captured:
                captured.add(event.signal)  # the first step of each kind is the one that points at the cause
                self.capture(event.step)
            if action in ("stop", "rollback") and (decision is None or action == "stop"):
                decision, cause = action, event  # stop wins: it is the safer of the two
        return decision, cause

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
        """TESTING AID: with health.inject_nan_at_step = k, the model output of step k is NaN, once."""
        if not self.settings.inject_nan_at_step:
            return

        def poison_output(module, args, output):
            if self.last_step + 1 == self.settings.inject_nan_at_step and not self.injected:
                self.injected = True  # once per process: the replay after a rollback runs clean
                return output * math.nan
            return output

        model.register_forward_hook(poison_output)

    # --- LR scale and rollback
    def apply_lr_scale(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Base LRs := each group's initial LR x lr_scale; call after every checkpoint load."""
        scheduler.base_lrs = [group["initial_lr"] * self.lr_scale for group in optimizer.param_groups]
        for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    def roll_back(self, cause: Event, checkpointer, optimizer, scheduler, loader=None, batches_per_step: int = 1):
        """Reload the last checkpoint before `cause.start_step` and scale the LR.

        Returns (the checkpoint's step, a fresh iterator over `loader` at its data position, past
        the failed window's batches if health.rollback_skip_data). Raises HealthStop when
        rollbacks are used up or no checkpoint predates the failure.
        """
        if self.rollbacks >= self.settings.max_rollbacks:
            raise HealthStop(f"{cause.signal} at step {cause.step} after {self.rollbacks} rollbacks "
                             f"(health.max_rollbacks={self.settings.max_rollbacks}): {cause.message}. "
                             "Inspect the data and code, lower optimizer.lr, then resume.")
        path = last_checkpoint_before(checkpointer, cause.start_step)
        if path is None:
            raise HealthStop(f"{cause.signal} at step {cause.step}: {cause.message}; no checkpoint predates step "
                             f"{cause.start_step} to roll back to (enable checkpoint.enable, lower "
                             "checkpoint.interval), or lower optimizer.lr and restart.")
        keep = {"rollbacks": self.rollbacks + 1, "lr_scale": self.lr_scale * self.settings.rollback_lr_factor,
                "overflow_steps": self.overflow_steps, "nonfinite_loss_steps": self.nonfinite_loss_steps,
                "events": self.events, "injected": self.injected}
        step = checkpointer.load(path)  # restores every Stateful, this monitor's detectors included
        self.__dict__.update(keep)  # the run's counters and the LR scale outlive the rollback
        self.pending, self.checked, self.last_step = [], [], step
        self.apply_lr_scale(optimizer, scheduler)
        logger.warning("health: rolled back to step %d (%s); LR scale now %.4g, rollback %d of %d",
                       step, path, self.lr_scale, self.rollbacks, self.settings.max_rollbacks)
        data_iterator = iter(loader) if loader is not None else None  # at the checkpoint's data position
        if data_iterator is not None and self.settings.rollback_skip_data:
            for _ in range((cause.step - step) * batches_per_step):  # do not replay what led to the failure
                next(data_iterator)
        return step, data_iterator

    def stop(self, cause: Event, step: int, checkpointer) -> None:
        """Save (unless diverged: that state must not become the checkpoint to resume) and raise HealthStop."""
        if checkpointer is not None and cause.signal != "divergence":
            checkpointer.maybe_save(step, force=True)
        if checkpointer is not None:
            checkpointer.close()
        raise HealthStop(f"{cause.signal} at step {cause.step}: {cause.message} (health.{cause.signal}_action="
                         f"stop). Events in {self.dump_folder / 'health.jsonl'}; run `python -m titanlite.diagnose "
                         f"{self.dump_folder}`")

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


def last_checkpoint_before(checkpointer, step: int) -> Path | None:
    """The newest complete checkpoint saved before `step` (a later one may hold the failure)."""
    if checkpointer is None or not checkpointer.settings.enable:
        return None
    checkpointer.wait()
    earlier = [path for saved_step, path in checkpointer.complete_checkpoints() if saved_step < step]
    return earlier[-1] if earlier else None


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
