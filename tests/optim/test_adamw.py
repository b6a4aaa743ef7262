"""CompiledAdamW against torch.optim.AdamW (the reference) in float64, its device-side clip and skip,
its checkpoints in both directions, and under FSDP 2 / TP 2 against one process."""

import copy

import pytest
import torch
from distributed import run_distributed

from titanlite.optim.adamw import CompiledAdamW

HYPER = {"betas": (0.9, 0.95), "eps": 1e-8}


def small_model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.LayerNorm(48), torch.nn.Linear(48, 8)).to(dtype)


def groups_of(module):
    """The trainer's two groups: matrices decayed, gains and biases not."""
    return [{"params": [p for p in module.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in module.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def set_same_gradients(models, seed: int, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for parameters in zip(*(m.parameters() for m in models)):
        gradient = torch.randn(parameters[0].shape, generator=generator, dtype=parameters[0].dtype) * scale
        for p in parameters:
            p.grad = gradient.clone()


def assert_same_state(model, optimizer, twin, reference, rtol=1e-12):
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[p][key], reference.state[q][key], rtol=rtol, atol=1e-300)
        assert float(optimizer.state[p]["step"]) == float(reference.state[q]["step"])


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_steps_equal_torch_adamw_in_float64(compiled):
    model = small_model()
    twin = copy.deepcopy(model)
    optimizer = CompiledAdamW(groups_of(model), lr=1e-2, compile=compiled, **HYPER)
    reference = torch.optim.AdamW(groups_of(twin), lr=1e-2, foreach=False, **HYPER)
    for step, lr in enumerate((1e-2, 3e-3, 5e-2, 1e-3, 1e-2)):  # the LR changes every step, as a schedule does
        for opt in (optimizer, reference):
            for group in opt.param_groups:
                group["lr"] = lr
        set_same_gradients((model, twin), step, scale=10.0 ** (step - 2))
        optimizer.step()
        reference.step()
    assert_same_state(model, optimizer, twin, reference)
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), small_model().parameters()))


def test_grad_scale_divides_and_found_inf_leaves_everything_untouched():
    model = small_model()
    twin = copy.deepcopy(model)
    optimizer = CompiledAdamW(groups_of(model), lr=1e-2, compile=False, **HYPER)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0, foreach=False, **HYPER)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    set_same_gradients((model, twin), 0)
    for q in twin.parameters():
        q.grad /= 4.0  # the reference gets the divided gradients
    optimizer.grad_scale = torch.tensor(4.0, dtype=torch.float64)
    optimizer.step()
    reference.step()
    assert_same_state(model, optimizer, twin, reference)

    before = {p: (p.clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for p in model.parameters()}
    set_same_gradients((model, twin), 1)
    next(model.parameters()).grad[0, 0] = float("nan")
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    for p, (value, state) in before.items():
        assert torch.equal(p, value)
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())  # step count too


def test_checkpoints_move_between_compiled_and_torch_adamw():
    def compiled(module):
        return CompiledAdamW(groups_of(module), lr=1e-2, compile=False, **HYPER)

    def plain(module):
        return torch.optim.AdamW(groups_of(module), lr=1e-2, foreach=False, **HYPER)

    model = small_model(torch.float32)
    twin = copy.deepcopy(model)
    first, second = compiled(model), plain(twin)
    for step in range(2):
        set_same_gradients((model, twin), step)
        first.step()
        second.step()
    # Swapped: torch's AdamW continues from the compiled one's state and the compiled one from torch's.
    model_b, twin_b = copy.deepcopy(model), copy.deepcopy(twin)
    first_b, second_b = plain(model_b), compiled(twin_b)
    # deepcopy: as a checkpoint does, and a state dict holds the live state tensors
    first_b.load_state_dict(copy.deepcopy(first.state_dict()))
    second_b.load_state_dict(copy.deepcopy(second.state_dict()))
    set_same_gradients((model, twin, model_b, twin_b), 7)
    for opt in (first, second, first_b, second_b):
        opt.step()
    for p, q, pb, qb in zip(model.parameters(), twin.parameters(), model_b.parameters(), twin_b.parameters()):
        torch.testing.assert_close(pb, p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(qb, q, rtol=1e-6, atol=1e-7)


def train_losses(folder: str, runs: list) -> dict:
    import os

    from conftest import tiny_config

    from titanlite.train import train

    return {name: {r["step"]: r["loss"] for r in train(tiny_config(os.path.join(folder, name), *overrides))}
            for name, overrides in runs}


@pytest.mark.slow
def test_compiled_adamw_under_fsdp_and_tp_matches_torch_adamw_in_one_process_and_resumes(tmp_path):
    steps = ["--training.steps", "5", "--optimizer.lr", "3e-3"]
    single = run_distributed(train_losses, 1, str(tmp_path / "one"), [
        ("foreach", steps + ["--optimizer.implementation", "foreach"])], timeout=600)[0]["foreach"]
    compiled = steps + ["--optimizer.implementation", "compiled"]
    saving = ["--checkpoint.enable", "true", "--checkpoint.interval", "3"]
    resume = ["--checkpoint.resume", str(tmp_path / "two" / "fsdp2" / "checkpoint" / "step-00000003")]
    runs = run_distributed(train_losses, 2, str(tmp_path / "two"), [
        ("fsdp2", compiled + saving), ("fsdp2_resumed", compiled + resume),
        ("tp2", compiled + ["--parallelism.tensor_parallel_degree", "2"])], timeout=900)[0]
    for step, loss in single.items():
        assert runs["fsdp2"][step] == pytest.approx(loss, rel=1e-5), step
        assert runs["tp2"][step] == pytest.approx(loss, rel=1e-5), step
    assert sorted(runs["fsdp2_resumed"]) == [4, 5]
    for step in (4, 5):  # moments and step counts came back from the sharded checkpoint exactly
        assert runs["fsdp2_resumed"][step] == runs["fsdp2"][step], step
