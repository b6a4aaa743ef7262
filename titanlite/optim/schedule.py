"""The LR schedule: linear warmup, then cosine, linear or constant decay to min_lr_ratio x the peak.

The schedule is a pure function of the step: `learning_rate(step, ...)` is the LR of optimizer
step `step`, from the resolved config alone. It holds no state, so a resumed run follows the
config it is resumed with (change optimizer.lr or training.steps and the new schedule applies
from the next step), and a rollback's LR factor is just `scale`.
"""

from __future__ import annotations

import math

import torch

from titanlite.config.settings import LRSchedule


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float) -> float:
    """LR of optimizer step `step` (1-based) as a fraction of the peak.

    Warmup: step / warmup_steps, so step 1 already moves and step `warmup_steps` is at the peak
    (0 at step 0, before any update). Decay: from the peak after warmup to `min_lr_ratio` at
    `total_steps`, and flat after it.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def learning_rate(step: int, peak_lr: float, settings: LRSchedule, warmup_steps: int, total_steps: int,
                  scale: float = 1.0) -> float:
    """LR of optimizer step `step` (1-based): `peak_lr` (optimizer.lr) x `scale` (rollbacks) x the schedule."""
    return peak_lr * scale * lr_multiplier(step, warmup_steps, total_steps, settings.decay, settings.min_lr_ratio)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # torchao's AdamW8bit: a tensor, so its compiled update
            group["lr"].fill_(lr)                   # never recompiles for a new LR
        else:
            group["lr"] = lr
