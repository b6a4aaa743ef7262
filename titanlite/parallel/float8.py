"""float8 training through torchao: which linears convert, the conversion, the TP styles, the FSDP scales.

`apply_float8(model, settings, tp_degree, float8_all_gather)` swaps the transformer blocks' nn.Linear for
torchao's Float8Linear on the meta-device model, before tensor parallel (parallelize() calls it
first). A Float8Linear keeps its `weight` parameter in the model's dtype and casts weight,
input and output gradient to float8 at each matmul (dynamic scaling: a scale from each tensor's
absolute max), so parameter names, checkpoints and the optimizer are unchanged.

Recipes (`float8.recipe`): tensorwise, one scale per tensor, the fastest; rowwise, one scale per
row, closer to bf16 and slower. Under FSDP with tensorwise, `float8.fsdp_float8_all_gather` makes
FSDP gather the weights in float8 (half the bytes of bf16); their scales then come from one
all-reduce over all weights (`refresh_float8_scales`) rather than one per weight. Under TP with
tensorwise, the float8 TP styles cast a block's input before the all-gather, so it travels in
float8 too.

Never converted: the output head (the logits feed the loss; torchtitan and torchao keep it in
high precision), and linears whose dims are not multiples of 16 on every TP rank (float8
matmuls need them).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel)

from titanlite.config.settings import ConfigError, Float8
from titanlite.job.logs import import_torchao

logger = logging.getLogger("titanlite")

NEVER_CONVERTED = ("output",)  # the head: module names equal to these stay in high precision
FLOAT8_MULTIPLE = 16  # float8 matmul dims must be multiples of 16


def exclude_fragments(settings: Float8) -> list[str]:
    """float8.exclude split on commas: the module-name fragments kept in high precision."""
    return [part.strip() for part in settings.exclude.split(",") if part.strip()]


def converts(module: nn.Module, name: str, exclude: list[str], tp_degree: int = 1) -> bool:
    """Whether the linear `module` named `name` (its FQN) runs in float8.

    Not the head, not a name containing an `exclude` fragment, and only if both dims, split over
    `tp_degree` ranks, stay multiples of 16 (TP splits the output dim of q/k/v/w1/w3 and the
    input dim of wo/w2; requiring both of every linear is simpler and costs nothing at model sizes
    where float8 pays).
    """
    if not isinstance(module, nn.Linear) or name in NEVER_CONVERTED:
        return False
    if any(fragment in name for fragment in exclude):
        return False
    multiple = FLOAT8_MULTIPLE * tp_degree
    return module.in_features % multiple == 0 and module.out_features % multiple == 0


def float8_linear_config(settings: Float8, float8_all_gather: bool):
    """torchao's Float8LinearConfig for the run: the recipe, emulation, and float8 all-gather under FSDP."""
    float8 = import_torchao("torchao.float8")
    if settings.recipe == "rowwise":
        linear_config = float8.Float8LinearConfig.from_recipe_name("rowwise")
        # Rowwise scales are powers of two computed in fp32: compiled code must round its casts as
        # eager does (pytorch/pytorch#150859; torchtitan sets the same flag for this recipe).
        import torch._inductor.config

        torch._inductor.config.emulate_precision_casts = True
    else:
        linear_config = float8.Float8LinearConfig(enable_fsdp_float8_all_gather=float8_all_gather)
    return dataclasses.replace(linear_config, emulate=settings.emulate)


def check_float8_device(settings: Float8) -> None:
    """float8 matmuls need compute capability 8.9 (Ada, Hopper) or newer, unless emulated."""
    if settings.emulate or not torch.cuda.is_available():
        return  # config.resolve() already refused float8 without CUDA unless emulated
    if torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError(f"float8.enable=true needs a GPU of compute capability >= 8.9 (H100, L40S, ...); "
                          f"{torch.cuda.get_device_name()} has {torch.cuda.get_device_capability()}: "
                          "set float8.enable=false")


def apply_float8(model: nn.Module, settings: Float8, tp_degree: int = 1, float8_all_gather: bool = False) -> list[str]:
    """Swap the blocks' linears that `converts` accepts for Float8Linear, in place; returns their names.

    Call on the meta-device model before TP. float8_all_gather: FSDP gathers these weights in float8
    (Run.float8_all_gather).
    """
    check_float8_device(settings)
    float8 = import_torchao("torchao.float8")
    exclude = exclude_fragments(settings)
    converted = [name for name, module in model.named_modules() if converts(module, name, exclude, tp_degree)]
    float8.convert_to_float8_training(model, config=float8_linear_config(settings, float8_all_gather),
                                      module_filter_fn=lambda module, name: converts(module, name, exclude, tp_degree))
    logger.info("float8 (%s%s%s): %d linears converted; kept in high precision: the output head%s",
                settings.recipe, ", float8 all-gather" if float8_all_gather else "",
                ", emulated" if settings.emulate else "", len(converted),
                f", names containing {exclude}" if exclude else "")
    return converted


def is_float8_linear(module: nn.Module) -> bool:
    """True for torchao's Float8Linear (checked by class name: torchao is imported only when float8 is on)."""
    return any(cls.__name__ == "Float8Linear" for cls in type(module).__mro__)


def tensor_parallel_styles(block: nn.Module, settings: Float8) -> dict[str, type]:
    """The TP style classes for one transformer block: torchao's float8 ones where they apply.

    With the tensorwise recipe, a Float8Linear gets Float8ColwiseParallel / Float8RowwiseParallel,
    and a module whose input projections are all Float8Linear (attention: wq, wk, wv; feed_forward:
    w1, w3) gets PrepareFloat8ModuleInput, which casts its input to float8 before the all-gather.
    Everything else (rowwise recipe, excluded linears) keeps the plain styles.
    Returns {"attention.wq": ColwiseParallel or Float8ColwiseParallel, ..., "attention": ..., "feed_forward": ...}.
    """
    float8_tp = settings.enable and settings.recipe == "tensorwise"
    tp = import_torchao("torchao.float8.float8_tensor_parallel") if float8_tp else None

    def style(name: str, plain: type, float8_style: str) -> type:
        return getattr(tp, float8_style) if float8_tp and is_float8_linear(block.get_submodule(name)) else plain

    styles = {name: style(name, ColwiseParallel, "Float8ColwiseParallel")
              for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")}
    styles.update({name: style(name, RowwiseParallel, "Float8RowwiseParallel")
                   for name in ("attention.wo", "feed_forward.w2")})
    for module, inputs in (("attention", ("wq", "wk", "wv")), ("feed_forward", ("w1", "w3"))):
        all_float8 = float8_tp and all(is_float8_linear(block.get_submodule(f"{module}.{name}")) for name in inputs)
        styles[module] = tp.PrepareFloat8ModuleInput if all_float8 else PrepareModuleInput
    return styles


@torch.no_grad()
def refresh_float8_scales(model: nn.Module, float8_all_gather: bool) -> None:
    """With float8 all-gather: the scales of all float8 weights as they are now, in one all-reduce.

    Called before each step's forward (so after the last optimizer step, a checkpoint load or a
    rollback alike); without it FSDP computes each weight's scale at its all-gather, one small
    all-reduce per weight. A no-op for every other configuration.
    """
    if float8_all_gather:
        import_torchao("torchao.float8").precompute_float8_dynamic_scale_for_fsdp(model)
