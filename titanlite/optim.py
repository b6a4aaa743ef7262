"""AdamW, the guarded optimizer step, and the token-based learning-rate schedule.

The schedule is a pure function of the step: `learning_rate(run, step, scale)` is the LR of
optimizer step `step`, from the resolved config alone. It holds no state, so a resumed run
follows the config it is resumed with (change optimizer.lr or training.steps and the new
schedule applies from the next step), and a rollback's LR factor is just `scale`.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from titanlite.config import Config
from titanlite.resolve import Run

logger = logging.getLogger("titanlite")


def build_optimizer(model: nn.Module, config: Config, device_type: str) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas, eps and weight decay.

    Weight decay applies to matrices (linear and embedding weights) and not to the RMSNorm gains:
    decaying a gain towards 0 fights the normalization it exists for (as Megatron and OLMo do).
    """
    opt = config.optimizer
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    not_decayed = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decayed, "weight_decay": opt.weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    implementation = opt.implementation
    if implementation == "auto":
        # Fused AdamW is one kernel per parameter group on CUDA; foreach is the fast CPU path.
        implementation = "fused" if device_type == "cuda" else "foreach"
    return torch.optim.AdamW(
        groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
        fused=implementation == "fused", foreach=implementation == "foreach")


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


def learning_rate(run: Run, step: int, scale: float = 1.0) -> float:
    """LR of optimizer step `step` (1-based): optimizer.lr x `scale` (rollbacks) x the schedule."""
    schedule = run.config.lr_schedule
    return run.config.optimizer.lr * scale * lr_multiplier(step, run.warmup_steps, run.total_steps,
                                                           schedule.decay, schedule.min_lr_ratio)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


_warned_host_check = False


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor,
                          skip_nonfinite: bool = True) -> torch.Tensor:
    """optimizer.step() unless the global grad norm is inf/NaN; returns 1.0 if skipped, else 0.0 (device).

    No host sync with a fused AdamW (the default on CUDA): the skip flag goes to the optimizer's
    `found_inf` input, the device-side flag GradScaler uses, and the kernel leaves weights,
    moments and step count untouched. Foreach/for-loop AdamW cannot take that flag: they check
    on the host each step (free on CPU; on CUDA a sync per step, warned once). `grad_norm` must be
    the same global norm on every rank (clip_grad_norm makes it so): all ranks skip together.
    """
    global _warned_host_check
    skipped = (~torch.isfinite(grad_norm.detach())).float()
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
        logger.warning("optimizer.implementation is not fused: skipping non-finite steps costs a host sync per "
                       "step; use optimizer.implementation=fused")
    if not skipped.item():  # host sync: every step, only for non-fused optimizers (see the docstring)
        optimizer.step()
    return skipped
