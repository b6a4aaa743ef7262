"""What the loop does on a health verdict: roll back to the last checkpoint before the trouble, or stop.

The monitor (monitor.py) decides; these act, with the checkpointer, and raise HealthStop (exit 3)
when the run must end, with the command that resumes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from titanlite.checkpoint.checkpointer import Checkpointer
from titanlite.health.monitor import HealthMonitor, HealthStop, Verdict

logger = logging.getLogger("titanlite")


def last_checkpoint_before(checkpointer: Checkpointer, step: int) -> Path | None:
    """The newest complete checkpoint saved before `step` (a later one may hold the failure)."""
    if not checkpointer.settings.enable:
        return None
    return checkpointer.latest_complete(before_step=step)


def roll_back(verdict: Verdict, health: HealthMonitor, checkpointer: Checkpointer, loader, grad_accum_steps: int):
    """Reload the last checkpoint before the trouble began; returns (its step, a data iterator there).

    The LR scale (health.lr_scale, read by the schedule) shrinks by health.rollback_lr_factor; with
    health.rollback_skip_data the batches that led to the failure are not replayed. Later checkpoints
    (saved after the trouble began) are moved aside, so that a restart does not resume into it.
    """
    settings, cause = health.settings, verdict.cause
    resume_from = last_checkpoint_before(checkpointer, verdict.trouble_start)
    if health.rollbacks >= settings.max_rollbacks or resume_from is None:
        why = (f"after {health.rollbacks} rollbacks (health.max_rollbacks={settings.max_rollbacks})"
               if resume_from is not None else f"and no checkpoint predates step {verdict.trouble_start} to roll back to")
        raise HealthStop(f"{cause.signal} at step {cause.step} {why}: {cause.message}. {resume_advice(resume_from)}")
    counters = health.run_counters()
    step = checkpointer.load(resume_from)  # restores every Stateful, the health detectors included
    checkpointer.set_aside_after(step, f"rollback-{health.rollbacks + 1}")
    health.rolled_back(counters, step)
    logger.warning("health: rolled back to step %d (%s); LR scale now %.4g, rollback %d of %d",
                   step, resume_from, health.lr_scale, health.rollbacks, settings.max_rollbacks)
    data_iterator = iter(loader)  # at the checkpoint's data position
    if settings.rollback_skip_data:
        for _ in range((cause.step - step) * grad_accum_steps):
            next(data_iterator)
    return step, data_iterator


def resume_advice(resume_from: Path | None) -> str:
    if resume_from is None:
        return "Inspect the data and code, lower optimizer.lr, and start again (enable checkpoints to roll back)"
    return (f"Inspect the data and code, then resume from the last checkpoint before the trouble with a lower LR: "
            f"--checkpoint.resume {resume_from} --optimizer.lr <lower>")


def stop_for_health(verdict: Verdict, step: int, checkpointer: Checkpointer, dump_folder: Path) -> None:
    """Save (unless diverged: that state must not become the checkpoint to resume) and raise HealthStop."""
    cause = verdict.cause
    if not verdict.diverged:
        checkpointer.maybe_save(step, force=True)
    resume_from = last_checkpoint_before(checkpointer, verdict.trouble_start if verdict.diverged else step + 1)
    checkpointer.close()
    raise HealthStop(f"{cause.signal} at step {cause.step}: {cause.message} (health.{cause.signal}_action=stop). "
                     f"Events in {dump_folder / 'health.jsonl'}; `python -m titanlite.diagnose {dump_folder}`. "
                     f"{resume_advice(resume_from)}")
