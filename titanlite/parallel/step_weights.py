"""One GPU without FSDP: bf16 weights cast once per optimizer step, weight gradients summed in fp32 by the matmul.

Under autocast every fp32 weight is cast to bf16 again in each micro-batch's forward (and the
compiled backward casts it once more), and autograd widens each micro-batch's bf16 weight
gradient to fp32 and adds it into `.grad`: ~30 bytes of memory traffic per parameter per
micro-batch beside the matmuls. Here each transformer-block nn.Linear keeps a bf16 copy of its
weight, cast again only when the weight may have changed: after any optimizer step (a global step
hook: fused AdamW writes parameters without moving their version counter) or when the weight's
version counter or storage moved (a checkpoint load, an edit). Its backward adds the weight
gradient into `.grad` inside the matmul (cuBLAS with beta = 1 and an fp32 output), as Megatron's
main_grad does. The matmuls see the same bf16 operands as under autocast; the weight gradient is
no longer rounded to bf16 once per micro-batch before the fp32 sum.

Memory: the bf16 copies live between steps too (+2 bytes per block linear parameter; during the
forward autocast held copies for the backward anyway), and each weight's `.grad` is one buffer
that is never freed. Not for FSDP (it casts parameters and reduces gradients itself), tensor
parallelism (DTensor weights) or float8 linears (their own casts): `uses_step_weights` decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from titanlite.model.matmul import accumulate_matmul

_optimizer_steps = 0  # steps taken by any optimizer in this process, counted by _count_optimizer_step
_step_hook = None


def _count_optimizer_step(_optimizer, _args, _kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


@torch.library.custom_op("titanlite::accumulate_weight_grad", mutates_args=("weight_grad",))
def accumulate_weight_grad(weight_grad: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> None:
    """weight_grad += grad_output^T @ input over every token, summed in weight_grad's dtype.

    A custom op that mutates its first argument: torch.compile calls it in place inside the
    compiled backward, with no copy of the buffer.
    """
    accumulate_matmul(weight_grad, grad_output.flatten(0, -2).t(), input.flatten(0, -2), weight_grad.dtype)


@accumulate_weight_grad.register_fake
def _(weight_grad: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> None:
    return None


class _LinearIntoGrad(torch.autograd.Function):
    """y = x @ compute_weight^T; the backward returns d/dx and adds d/d weight into `weight_grad`."""

    @staticmethod
    def forward(ctx, x, compute_weight, weight_grad):
        x = x.to(compute_weight.dtype)
        ctx.save_for_backward(x, compute_weight, weight_grad)
        return F.linear(x, compute_weight)

    @staticmethod
    def backward(ctx, grad_output):
        x, compute_weight, weight_grad = ctx.saved_tensors
        accumulate_weight_grad(weight_grad, grad_output, x)
        return grad_output @ compute_weight, None, None


class StepWeightLinear(nn.Linear):
    """A bias-free nn.Linear (same parameter, same name) computing with its step's bf16 copy of the weight.

    `prepare()`, called before each forward of the model, casts the copy when the weight changed
    and makes `weight.grad` the buffer the backward adds into (zeroed after `zero_grad`).
    """

    compute_dtype: torch.dtype
    compute_weight: torch.Tensor | None
    weight_grad: torch.Tensor | None
    cast_of: tuple[int, int, int]  # (optimizer steps, version, address) when the copy was cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearIntoGrad.apply(x, self.compute_weight, self.weight_grad)

    @torch.no_grad()
    def prepare(self) -> None:
        weight = self.weight
        if self.compute_weight is None or self.compute_weight.device != weight.device:
            self.compute_weight = torch.empty_like(weight, dtype=self.compute_dtype)
            self.weight_grad = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
            self.cast_of = (-1, -1, -1)
        if self.cast_of != (now := (_optimizer_steps, weight._version, weight.data_ptr())):
            self.compute_weight.copy_(weight)
            self.cast_of = now
        if weight.grad is not self.weight_grad:
            if weight.grad is None:
                self.weight_grad.zero_()
            else:
                self.weight_grad.copy_(weight.grad)
            weight.grad = self.weight_grad


def apply_step_weights(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Turn the transformer blocks' bias-free nn.Linear modules into StepWeightLinear (float8 linears,
    other subclasses and the output head stay as they are); returns how many. Parameter names and
    the state dict are unchanged."""
    linears = [module for block in model.layers.values() for module in block.modules()
               if type(module) is nn.Linear and module.bias is None]
    for linear in linears:
        linear.__class__ = StepWeightLinear
        linear.compute_dtype, linear.compute_weight, linear.weight_grad = compute_dtype, None, None

    def prepare_all(_module, _args, _kwargs=None):
        for linear in linears:
            linear.prepare()

    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    model.register_forward_pre_hook(prepare_all, with_kwargs=True)
    return len(linears)
