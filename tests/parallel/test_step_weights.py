"""Step weights (parallel/step_weights.py): the block linears compute with a copy of their weights cast once per
step and add their weight gradients into `.grad` inside the matmul.

References: the same model with plain nn.Linear (autograd's own gradients), in float64 where the
step weights run in bf16. The copies must follow every change of the weights (optimizer updates of
each kind, a state-dict load), the gradient buffer must start from zero after `zero_grad`, and
compile and activation checkpointing must give the same gradients.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from titanlite.config.resolve import resolve
from titanlite.config.settings import Model
from titanlite.model.transformer import build_model
from titanlite.parallel.activation_checkpoint import apply_activation_checkpointing
from titanlite.parallel.compile import apply_compile
from titanlite.parallel.step_weights import StepWeightLinear, apply_step_weights

CONFIG = Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=97)
SEQ = 16


def fresh_model(dtype=torch.float32):
    model = build_model(CONFIG, SEQ, device="cpu")
    model.init_weights(seed=0)
    return model.to(dtype)


def micro_batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, CONFIG.vocab_size, (2, SEQ), generator=generator),
             torch.randint(0, CONFIG.vocab_size, (2, SEQ), generator=generator)) for _ in range(count)]


def accumulate(model, batches, autocast: bool = False) -> list[torch.Tensor]:
    """Forward and backward of each micro-batch (summed cross-entropy / 100); the losses."""
    losses = []
    for tokens, labels in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / 100
        loss.backward()
        losses.append(loss.detach())
    return losses


def block_linear_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if name.startswith("layers.") and p.ndim == 2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_conversion_keeps_names_and_converts_only_block_linears():
    model = fresh_model()
    names = list(model.state_dict())
    assert apply_step_weights(model, torch.bfloat16) == 7 * CONFIG.n_layers  # wq wk wv wo w1 w2 w3
    assert list(model.state_dict()) == names
    assert type(model.output) is not StepWeightLinear
    assert all(isinstance(module, StepWeightLinear) for name, module in model.named_modules()
               if name.startswith("layers.") and isinstance(module, torch.nn.Linear))


def test_bf16_matches_autocast_forward_and_float64_gradients():
    batches = micro_batches(3)
    plain = fresh_model()
    stepped = copy.deepcopy(plain)
    reference = copy.deepcopy(plain).double()
    apply_step_weights(stepped, torch.bfloat16)
    plain_losses = accumulate(plain, batches, autocast=True)
    stepped_losses = accumulate(stepped, batches, autocast=True)
    accumulate(reference, batches)
    # The same bf16 operands as autocast gives each matmul: the same losses, bit for bit.
    assert torch.equal(torch.stack(stepped_losses), torch.stack(plain_losses))
    want, autocast_grads = block_linear_grads(reference), block_linear_grads(plain)
    for name, grad in block_linear_grads(stepped).items():
        assert grad.dtype == torch.float32
        error, autocast_error = relative_error(grad, want[name]), relative_error(autocast_grads[name], want[name])
        # bf16 activations bound both; the fp32 sum in the matmul is no worse than autocast's bf16 products.
        assert error < 2e-2 and error <= 1.05 * autocast_error + 1e-4, (name, error, autocast_error)


@pytest.mark.parametrize("update", ["foreach", "for-loop", "fused"])
def test_copies_follow_optimizer_steps_zero_grad_and_loads(update):
    """float32 step weights against plain linears over 3 optimizer steps: equal to rounding. A copy
    not cast again after a step (or a gradient buffer not cleared by zero_grad) would differ by ~lr."""
    plain = fresh_model()
    stepped = copy.deepcopy(plain)
    apply_step_weights(stepped, torch.float32)
    options = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}, "fused": {"fused": True}}[update]
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2, **options) for model in (plain, stepped)]
    for step in range(3):
        batches = micro_batches(2, seed=step)
        losses = [accumulate(model, batches) for model in (plain, stepped)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        want = block_linear_grads(plain)
        for name, grad in block_linear_grads(stepped).items():
            torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    stepped.load_state_dict(fresh_model().state_dict())  # a checkpoint load copies into the same tensors
    tokens = micro_batches(1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(stepped(tokens), fresh_model()(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_compiled_and_checkpointed_blocks_give_the_same_gradients(mode):
    batches = micro_batches(2)
    plain = fresh_model()
    stepped = copy.deepcopy(plain)
    apply_step_weights(stepped, torch.float32)
    if mode != "none":
        apply_activation_checkpointing(stepped, mode)
    apply_compile(stepped)
    torch.testing.assert_close(accumulate(stepped, batches), accumulate(plain, batches), rtol=1e-5, atol=1e-6)
    want = block_linear_grads(plain)
    for name, grad in block_linear_grads(stepped).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides, world_size, device, expected", [
    ((), 1, "cuda", True),  # the default
    (("--training.bf16_step_weights", "false"), 1, "cuda", False),
    (("--training.global_batch_tokens", "128"), 1, "cuda", False),  # one micro-batch: no cast to share
    ((), 1, "cpu", False),  # CPU runs compute in float32
    (("--float8.enable", "true"), 1, "cuda", False),
    ((), 2, "cuda", False),  # FSDP casts and reduces itself
    (("--parallelism.tensor_parallel_degree", "2"), 2, "cuda", False),
])
def test_used_only_for_bf16_on_one_gpu_without_float8_over_several_micro_batches(tmp_path, overrides, world_size, device, expected):
    config = tiny_config(tmp_path, "--training.mixed_precision", "bf16", "--training.global_batch_tokens", "512",
                         *overrides)
    assert resolve(config, world_size, 2048, device).step_weights is expected


def test_training_run_with_step_weights_equals_the_plain_run_and_resumes(tmp_path, monkeypatch):
    """Through train(): CPU runs compute in float32, where the rule leaves step weights off, so it is forced
    on. The run must equal the plain one (1e-5), also when it ends after step 3 and a longer run resumes
    it (as the plain run does: the LR schedule follows each run's length): the copies are cast from the
    loaded weights and the gradient buffers start from zero."""
    import logging

    import titanlite.config.resolve as resolve_module
    from titanlite.train import train

    checkpoints = ["--checkpoint.enable", "true", "--checkpoint.interval", "3"]

    def straight_and_resumed(name: str) -> tuple[dict, dict]:
        straight = {r["step"]: r["loss"] for r in train(tiny_config(tmp_path / name))}
        train(tiny_config(tmp_path / f"{name}_resumed", *checkpoints, "--training.steps", "3"))
        resumed = {r["step"]: r["loss"] for r in train(tiny_config(tmp_path / f"{name}_resumed", *checkpoints))}
        return straight, resumed

    handlers = logging.root.handlers[:]
    try:
        plain = straight_and_resumed("plain")
        monkeypatch.setattr(resolve_module, "uses_step_weights", lambda *args: True)
        stepped = straight_and_resumed("stepped")
    finally:
        logging.root.handlers[:] = handlers
    assert json.loads((tmp_path / "stepped_resumed" / "config.json").read_text())["derived"]["step_weights"]
    for want, got in zip(plain, stepped):
        assert sorted(got) == sorted(want) and len(got) in (3, 6)
        for step, loss in got.items():
            assert loss == pytest.approx(want[step], rel=1e-5), step
