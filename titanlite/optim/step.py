"""The guarded optimizer step: the global gradient norm, clipping, and skipping non-finite steps."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from titanlite.optim.adamw import CompiledAdamW

logger = logging.getLogger("titanlite")


def _copies(grad: torch.Tensor, world_size: int) -> int:
    """How many ranks hold each element of `grad`: its replicated mesh dims, times the meshes beside its own."""
    if not isinstance(grad, DTensor):
        return world_size
    mesh = grad.device_mesh
    replicated = 1
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            replicated *= mesh.size(dim)
    return replicated * world_size // mesh.size()


@torch.no_grad()
def global_grad_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of every gradient, over all ranks (0-dim fp32 on device, no host sync).

    One all-reduce over all ranks: each rank sums the squared norms of its local shards (an element
    held by k ranks counts 1/k on each), in float64, and the sum is reduced once. So every rank,
    under any FSDP x TP layout, gets the same number (a per-mesh-dimension reduction, as DTensor's
    full_tensor() does it, sums in another order on every layout) and clips by the same factor
    (optim.step_unless_nonfinite clips).
    A gradient left Partial (under TP, the sequence-parallel norms' gains) is summed here once and
    put back as the parameter's gradient, so the optimizer does not sum it again.
    """
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and any(q.is_partial() for q in grad.placements):
            param.grad = grad.redistribute(placements=[Replicate() if q.is_partial() else q for q in grad.placements])
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    by_copies: dict[int, list[torch.Tensor]] = {}  # divided by Python numbers: no host-to-device copy, no sync
    for param in parameters:
        if param.grad is not None:
            local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            by_copies.setdefault(_copies(param.grad, world_size), []).append(local)
    squared = sum(torch.stack(torch._foreach_norm(group)).double().square().sum() / copies
                  for copies, group in sorted(by_copies.items()))
    if world_size > 1:
        if squared.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            squared = squared.cuda()  # FSDP's CPU offload keeps the gradients on the host; NCCL reduces on the GPU
        torch.distributed.all_reduce(squared)
    return squared.sqrt().float()


def _inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that do the updates: CPUOffloadOptimizer's per-tensor host ones and its
    on-device one; any other optimizer itself."""
    if hasattr(optimizer, "optim_dict"):  # torchao's CPUOffloadOptimizer
        return list(optimizer.optim_dict.values()) + ([optimizer.d_opt] if optimizer.d_opt is not None else [])
    return [optimizer]


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
    (global_grad_norm makes it so): all ranks clip and skip together.
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
