"""The optimizers (AdamW, 8-bit AdamW, CPU-offloaded AdamW) and their state in checkpoints.

Optimizers (`optimizer.name`, `optimizer.cpu_offload`; Run.optimizer_update says which runs):
  - adamw: torch's AdamW, fp32 moments (8 bytes of state per parameter); on CUDA either torch's
    fused kernel or one compiled kernel per parameter (optim/adamw.py, same state).
  - adamw8bit: torchao's AdamW8bit, moments quantized to 8 bits in blocks of 256 with one fp32
    scale per block (~2 bytes per parameter); tensors under 4,096 elements keep fp32 moments.
    Works on FSDP2 / TP DTensors. Its update is PyTorch code that torch.compile fuses per tensor.
  - cpu_offload (one GPU): torchao's CPUOffloadOptimizer; each gradient is copied to pinned host
    memory as the backward produces it, the AdamW update runs on the CPU (fused CPU AdamW) and
    the new weights are copied back. GPU memory: parameters and gradients only. With FSDP,
    parallelism.fsdp_cpu_offload is the equivalent (FSDP2's own offload).
The clipped, guarded step is optim/step.py; the LR schedule optim/schedule.py.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from titanlite.config.settings import Optimizer
from titanlite.job.logs import import_torchao
from titanlite.optim.adamw import CompiledAdamW

logger = logging.getLogger("titanlite")


def build_optimizer(model: nn.Module, settings: Optimizer, update: str, compile: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer, with the recipe's betas, eps and weight decay.

    update: Run.optimizer_update (adamw8bit, cpu_offload, or AdamW's compiled / fused / foreach /
    for-loop update); compile: compile.enable (the compiled update runs eagerly without it).

    Weight decay applies to matrices (linear and embedding weights) and not to the RMSNorm gains:
    decaying a gain towards 0 fights the normalization it exists for (as Megatron and OLMo do).
    """
    opt = settings
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    not_decayed = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decayed, "weight_decay": opt.weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    hyper = {"lr": opt.lr, "betas": (opt.beta1, opt.beta2), "eps": opt.eps}
    if update == "adamw8bit":
        return import_torchao("torchao.optim").AdamW8bit(groups, **hyper)
    if update == "cpu_offload":
        # Fused CPU AdamW for the host update (the on-device one for tensors under 4,096 elements).
        return import_torchao("torchao.optim").CPUOffloadOptimizer(groups, torch.optim.AdamW, fused=True, **hyper)
    logger.info("optimizer: AdamW, %s update", update)
    if update == "compiled":
        return CompiledAdamW(groups, compile=compile, **hyper)  # eager when compile is off
    return torch.optim.AdamW(groups, **hyper, fused=update == "fused", foreach=update == "foreach")


# --- optimizer state for checkpoints

def _offloaded_states(model: nn.Module, optimizer) -> dict[str, tuple[torch.optim.Optimizer, torch.Tensor]]:
    """CPUOffloadOptimizer: parameter FQN -> (the optimizer that updates it, the tensor its state is keyed by)."""
    found = {}
    for name, param in model.named_parameters():
        if param in optimizer.optim_dict:
            found[name] = (optimizer.optim_dict[param], optimizer.param_d2h_map[param])
        elif optimizer.d_opt is not None:
            found[name] = (optimizer.d_opt, param)
    return found


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter FQN, in DCP's layout (`get_optimizer_state_dict`).

    torchao's CPUOffloadOptimizer is no regular Optimizer (no `state`): its per-tensor host states
    are listed by FQN here ({"state": {fqn: {"step", "exp_avg", "exp_avg_sq"}}}), filled with zeros
    before the first step so that a load has tensors to read into. The LR, betas and weight
    decay come from the config at every step, so no param_groups are saved for it.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not hasattr(optimizer, "optim_dict"):
        return get_optimizer_state_dict(model, optimizer)
    state = {}
    for name, (inner, key) in _offloaded_states(model, optimizer).items():
        if key not in inner.state:  # fused AdamW's state before its first step
            inner.state[key] = {"step": torch.zeros((), dtype=torch.float32, device=key.device),
                                "exp_avg": torch.zeros_like(key), "exp_avg_sq": torch.zeros_like(key)}
        state[name] = inner.state[key]
    return {"state": state}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore what `optimizer_state_dict` gave (DCP has loaded into its tensors in place)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not hasattr(optimizer, "optim_dict"):
        set_optimizer_state_dict(model, optimizer, state)
        return
    for name, (inner, key) in _offloaded_states(model, optimizer).items():
        for item, value in state["state"][name].items():
            inner.state[key][item].copy_(value)
