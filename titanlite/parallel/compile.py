"""torch.compile: each transformer block in place, and the loss."""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Compile each transformer block (fullgraph). Module.compile() compiles in place: parameter names
    keep no `_orig_mod.` prefix, so checkpoints are the same with and without compile."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


def compile_loss(loss_fn, enabled: bool, tp_enabled: bool):
    """torch.compile the loss so the fp32 upcast of the logits fuses into the cross-entropy.

    Not under TP: the vocab-sharded loss_parallel path is already sharded and stays eager.
    """
    if enabled and not tp_enabled:
        return torch.compile(loss_fn)
    return loss_fn
