"""The optimizers (AdamW, 8-bit AdamW, CPU-offloaded AdamW), the clipped and guarded step, and the LR schedule.

Optimizers (`optimizer.name`, `optimizer.cpu_offload`):
  - adamw: torch's AdamW, fp32 moments (8 bytes of state per parameter); on CUDA either torch's
    fused kernel or one compiled kernel per parameter (titanlite/adamw.py, same state).
  - adamw8bit: torchao's AdamW8bit, moments quantized to 8 bits in blocks of 256 with one fp32
    scale per block (~2 bytes per parameter); tensors under 4,096 elements keep fp32 moments.
    Works on FSDP2 / TP DTensors. Its update is PyTorch code that torch.compile fuses per tensor.
  - cpu_offload (one GPU): torchao's CPUOffloadOptimizer; each gradient is copied to pinned host
    memory as the backward produces it, the AdamW update runs on the CPU (fused CPU AdamW) and
    the new weights are copied back. GPU memory: parameters and gradients only. With FSDP,
    parallelism.fsdp_cpu_offload is the equivalent (FSDP2's own offload).

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

from titanlite.adamw import CompiledAdamW
from titanlite.ao import import_torchao
from titanlite.resolve import Run
from titanlite.settings import Config

logger = logging.getLogger("titanlite")


def build_optimizer(model: nn.Module, config: Config, device_type: str) -> torch.optim.Optimizer:
    """The configured optimizer, with the recipe's betas, eps and weight decay.

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
    hyper = {"lr": opt.lr, "betas": (opt.beta1, opt.beta2), "eps": opt.eps}
    if opt.name == "adamw8bit":
        return import_torchao("torchao.optim").AdamW8bit(groups, **hyper)
    if opt.cpu_offload:
        # Fused CPU AdamW for the host update (the on-device one for tensors under 4,096 elements).
        return import_torchao("torchao.optim").CPUOffloadOptimizer(groups, torch.optim.AdamW, fused=True, **hyper)
    implementation = opt.implementation
    if implementation == "auto":
        # On an H200 (7B shape) the compiled update takes 17.4 ms where torch's fused one takes 23.5
        # (bench/bench_optimizer.py). Fused without compile, and with float8, whose FSDP weights are
        # torchao tensor subclasses (measured with fused). foreach is the fast CPU path.
        compiled = config.compile.enable and not config.float8.enable
        implementation = ("compiled" if compiled else "fused") if device_type == "cuda" else "foreach"
    logger.info("optimizer: AdamW, %s update", implementation)
    if implementation == "compiled":
        return CompiledAdamW(groups, compile=config.compile.enable, **hyper)  # eager when compile is off
    return torch.optim.AdamW(groups, **hyper, fused=implementation == "fused", foreach=implementation == "foreach")


def _inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that do the updates: CPUOffloadOptimizer's per-tensor host ones and its
    on-device one; any other optimizer itself."""
    if hasattr(optimizer, "optim_dict"):  # torchao's CPUOffloadOptimizer
        return list(optimizer.optim_dict.values()) + ([optimizer.d_opt] if optimizer.d_opt is not None else [])
    return [optimizer]


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
        if isinstance(group["lr"], torch.Tensor):  # torchao's AdamW8bit: a tensor, so its compiled update
            group["lr"].fill_(lr)                   # never recompiles for a new LR
        else:
            group["lr"] = lr


_warned_host_check = False


def clip_divisor(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping to `max_norm` divides every gradient by: max(1, (norm + 1e-6) / max_norm).

    The reciprocal of torch.nn.utils.clip_grads_with_norm_'s coefficient (min(1, max_norm / (norm
    + 1e-6))), so both clip the same up to float rounding.
    """
    return torch.clamp((grad_norm.detach().float() + 1e-6) / max_norm, min=1.0)


@torch.no_grad()
def step_unless_nonfinite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, skip_nonfinite: bool = True,
                          max_norm: float = 0.0) -> torch.Tensor:
    """Clip the gradients to `max_norm` (0: no clipping) and step, unless the global grad norm is
    inf/NaN; returns 1.0 if skipped, else 0.0 (device).

    AdamW's fused and compiled updates (the defaults on CUDA; the host updates of the CPU-offloaded
    AdamW are fused): no host sync and no pass over the gradients. The kernel divides each gradient
    by its `grad_scale` input as it reads it (GradScaler's unscale), so clipping costs nothing, and the
    skip flag goes to its `found_inf` input, which leaves weights, moments and step count
    untouched. Other optimizers (foreach / for-loop AdamW, adamw8bit): the gradients are scaled
    in place first, and the skip is decided on the host each step (free on CPU; on CUDA a sync
    per step, warned once). `grad_norm` must be the same global norm on every rank
    (parallelize.global_grad_norm makes it so): all ranks clip and skip together.
    """
    global _warned_host_check
    skipped = (~torch.isfinite(grad_norm.detach())).float()
    updaters = _inner_optimizers(optimizer)
    if all(isinstance(inner, CompiledAdamW) or all(group.get("fused") for group in inner.param_groups)
           for inner in updaters):
        divisor = clip_divisor(grad_norm, max_norm) if max_norm > 0 else None
        on_device = {}  # the flags on each device the updates run on (the host, for the offloaded AdamW)
        for inner in updaters:
            device = inner.param_groups[0]["params"][0].device
            if device not in on_device:
                on_device[device] = (divisor.to(device) if divisor is not None else None, skipped.to(device))
            if divisor is not None:
                inner.grad_scale = on_device[device][0]
            if skip_nonfinite:
                inner.found_inf = on_device[device][1]
        try:
            optimizer.step()
        finally:
            for inner in updaters:
                inner.__dict__.pop("grad_scale", None)
                inner.__dict__.pop("found_inf", None)
        return skipped
    if max_norm > 0:
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, grad_norm, foreach=True)
    if not skip_nonfinite:
        optimizer.step()
        return skipped
    if skipped.device.type == "cuda" and not _warned_host_check:
        _warned_host_check = True
        logger.warning("the optimizer has no device-side skip (only AdamW's fused and compiled updates do): skipping "
                       "non-finite steps costs a host sync per step%s", "" if not isinstance(optimizer, torch.optim.AdamW)
                       else "; use optimizer.implementation=compiled or fused")
    if not skipped.item():  # host sync: every step, only for non-fused optimizers (see the docstring)
        optimizer.step()
    return skipped


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
