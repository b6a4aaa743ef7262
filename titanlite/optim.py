"""AdamW and the token-based learning-rate schedule (linear warmup, then cosine/linear decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from titanlite.config import Config, Derived


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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: Config, derived: Derived):
    """LambdaLR whose i-th value (after i optimizer steps) is the LR of update i + 1."""
    schedule = config.lr_schedule

    def multiplier(completed_steps: int) -> float:
        return lr_multiplier(completed_steps + 1, derived.warmup_steps, derived.total_steps,
                             schedule.decay, schedule.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
