"""What a checkpoint holds besides the loader and the health monitor: the model, the optimizer, the run's progress.

Each is a Stateful object (state_dict / load_state_dict) that DCP saves and loads. Model and
optimizer state are keyed by parameter name (FQN), never by position, so they survive resharding:
a checkpoint saved on 2 x 2 GPUs loads on 4 x 1 or on one.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, set_model_state_dict)

from titanlite.optim.optimizer import load_optimizer_state_dict, optimizer_state_dict


class TrainState:
    """Progress of the run: optimizer steps done and tokens consumed (all ranks together)."""

    def __init__(self) -> None:
        self.step, self.tokens_seen = 0, 0
        # Wall time of the run's processes so far: recorded in meta.json, not in the DCP state, so
        # checkpoints without it still load.
        self.elapsed_s = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


class ModelState:
    """The model as DCP sees it: FQN -> tensor or DTensor, for plain, FSDP2 and TP models alike."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """Optimizer state keyed by parameter FQN (not by index), so it survives re-sharding."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state_dict(self.model, self.optimizer, state)
