"""LR schedule values against the closed-form schedule; optimizer groups."""

import copy
import math

import pytest
import torch
from distributed import run_distributed

from titanlite.config.load import load_config
from titanlite.config.resolve import optimizer_update, resolve
from titanlite.config.settings import ConfigError
from titanlite.model.transformer import build_model
from titanlite.optim.optimizer import build_optimizer
from titanlite.optim.schedule import learning_rate, lr_multiplier, set_learning_rate


def test_schedule_at_landmarks():
    warmup, total, floor = 10, 110, 0.1
    assert lr_multiplier(0, warmup, total, "cosine", floor) == 0.0
    assert lr_multiplier(1, warmup, total, "cosine", floor) == pytest.approx(0.1)
    assert lr_multiplier(warmup, warmup, total, "cosine", floor) == 1.0
    assert lr_multiplier(60, warmup, total, "cosine", floor) == pytest.approx((1 + floor) / 2)  # cosine midpoint
    assert lr_multiplier(total, warmup, total, "cosine", floor) == pytest.approx(floor)
    assert lr_multiplier(total + 50, warmup, total, "cosine", floor) == pytest.approx(floor)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_multiplier(35, warmup, total, "cosine", floor) == pytest.approx(quarter)
    assert lr_multiplier(60, warmup, total, "linear", floor) == pytest.approx(0.55)
    assert lr_multiplier(60, warmup, total, "constant", floor) == 1.0


def test_schedule_is_token_based_and_scaled():
    # warmup_tokens = 3 steps of 8192 tokens; total 13 steps.
    config = load_config("debug_model", ["--lr_schedule.warmup_tokens", "24576", "--training.steps", "13",
                                         "--optimizer.lr", "1e-3"])
    run = resolve(config, 1, 2048)
    assert run.warmup_steps == 3
    seen = [learning_rate(step, config.optimizer.lr, config.lr_schedule, run.warmup_steps, run.total_steps) for step in range(1, 14)]
    assert seen[0] == pytest.approx(1e-3 / 3) and seen[2] == pytest.approx(1e-3)
    assert seen[-1] == pytest.approx(1e-4)  # update 13 = total steps: min LR
    assert learning_rate(7, config.optimizer.lr, config.lr_schedule, run.warmup_steps, run.total_steps, scale=0.25) == pytest.approx(seen[6] / 4)  # a rollback's factor
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, config.optimizer, optimizer_update(config, "cpu"), config.compile.enable)
    set_learning_rate(optimizer, seen[4])
    assert [group["lr"] for group in optimizer.param_groups] == [seen[4]] * 2


def test_weight_decay_skips_norm_gains():
    config = load_config("debug_model")
    model = build_model(config.model.__class__(vocab_size=128, dim=32, n_heads=4, n_kv_heads=2,
                                               intermediate_size=64, n_layers=1), 8, "cpu")
    optimizer = build_optimizer(model, config.optimizer, optimizer_update(config, "cpu"), config.compile.enable)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 3  # 2 block norms + final
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["eps"] == 1e-8
    assert isinstance(optimizer, torch.optim.AdamW)


# --- clipping inside the fused AdamW, the guarded step

def two_copies(seed: int = 0):
    """A small model and an exact copy, with the same fused AdamW each (CPU has a fused AdamW)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8))
    twin = copy.deepcopy(model)
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    return model, make(model), twin, make(twin)


def set_gradients(model, twin, scale: float, seed: int) -> torch.Tensor:
    """The same random gradients (norm ~ scale) on both; returns their global norm (float32, as the trainer gives it)."""
    generator = torch.Generator().manual_seed(seed)
    size = sum(p.numel() for p in model.parameters())
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.randn(p.shape, generator=generator) * scale / size ** 0.5
        q.grad = p.grad.clone()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).float()


def test_clipping_inside_fused_adamw_equals_clipping_the_gradients_first():
    from titanlite.optim.step import step_unless_nonfinite

    model, optimizer, twin, reference = two_copies()
    max_norm = 1.0
    for step, scale in enumerate((5.0, 0.3, 20.0, 1.0)):  # clipped, not clipped, clipped hard, about the limit
        norm = set_gradients(model, twin, scale, step)
        # Reference: torch's own clipping, a separate pass over the gradients, then the plain fused step.
        torch.nn.utils.clip_grads_with_norm_(list(twin.parameters()), max_norm, norm)
        reference.step()
        skipped = step_unless_nonfinite(optimizer, norm, max_norm=max_norm)
        assert skipped.item() == 0.0
        for p, q in zip(model.parameters(), twin.parameters()):
            # the kernel divides by (norm + 1e-6) / max_norm where torch multiplies by its reciprocal
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-8)
        assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):  # elementwise, cancellation in exp_avg amplifies the rounding
            mine, torchs = optimizer.state[p][key], reference.state[q][key]
            assert (mine - torchs).norm() <= 1e-6 * torchs.norm(), key


def test_gradients_within_the_limit_step_bitwise_as_unclipped():
    from titanlite.optim.step import step_unless_nonfinite

    model, optimizer, twin, reference = two_copies(1)
    norm = set_gradients(model, twin, 0.5, 0)
    assert norm < 1.0
    reference.step()
    step_unless_nonfinite(optimizer, norm, max_norm=1.0)  # divisor exactly 1: x / 1 == x
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_clip_divisor_is_the_reciprocal_of_torchs_coefficient():
    from titanlite.optim.step import clip_divisor

    for norm, max_norm in ((5.0, 1.0), (0.5, 1.0), (1e3, 0.25)):
        coefficient = min(1.0, max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grads_with_norm_, in float64
        assert clip_divisor(torch.tensor(norm), max_norm).item() == pytest.approx(1 / coefficient, rel=1e-6)


# --- torchao's 8-bit AdamW

@pytest.fixture(scope="module")
def adamw8bit_config():
    return load_config("debug_model", ["--optimizer.name", "adamw8bit", "--optimizer.lr", "1e-2"])


def small_transformer(seed: int = 0):
    """dim 256: AdamW8bit's blocks of 256 values then lie within one row, as in real models (with
    dim 64 a block mixes four embedding rows, and rows without gradients lose precision: measured
    0.9x the weight change in 5 steps)."""
    config = load_config("debug_model")
    model = build_model(config.model.__class__(vocab_size=256, dim=256, n_heads=4, n_kv_heads=2,
                                               intermediate_size=512, n_layers=1), 8, "cpu")
    model.init_weights(seed=seed)
    return model


def loss_step(model, optimizer, seed: int, max_norm: float = 1.0, poison: bool = False):
    from titanlite.optim.step import step_unless_nonfinite

    tokens = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(next(model.parameters()).device)
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    (loss * (math.nan if poison else 1.0)).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).float()
    skipped = step_unless_nonfinite(optimizer, norm, max_norm=max_norm)
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), skipped.item()


@pytest.mark.slow  # torchao's import and the compile of its update: ~30 s on the CI machine
def test_adamw8bit_state_is_two_bytes_per_parameter_and_tracks_adamw(adamw8bit_config):
    model, twin = small_transformer(), small_transformer()
    optimizer = build_optimizer(model, adamw8bit_config.optimizer, optimizer_update(adamw8bit_config, "cpu"), adamw8bit_config.compile.enable)
    reference = torch.optim.AdamW([{"params": [p for p in twin.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in twin.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    assert type(optimizer).__name__ == "AdamW8bit"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    for step in range(5):
        loss_step(model, optimizer, step)
        loss_step(twin, reference, step)
    # State bytes: 8-bit codes plus one fp32 scale per 256 values, for both moments, where a tensor
    # has >= 4096 elements (here every matrix); fp32 moments below that (the norm gains).
    state_bytes = 0
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = optimizer.state[p][key]
            if p.numel() >= 4096:
                assert value.codes.dtype == torch.uint8 and value.codes.numel() == p.numel()
                state_bytes += value.codes.numel() + 4 * value.scale.numel()
            else:
                state_bytes += 4 * value.numel()
    matrices = sum(p.numel() for p in model.parameters() if p.numel() >= 4096)
    assert state_bytes == 2 * (matrices + 4 * matrices / 256) + 8 * sum(
        p.numel() for p in model.parameters() if p.numel() < 4096)
    # 8-bit moments follow fp32 AdamW closely over 5 steps (measured below 2% of the weight change)
    change = sum((p - q0).norm() for p, q0 in zip(twin.parameters(), small_transformer().parameters()))
    error = sum((p - q).norm() for p, q in zip(model.parameters(), twin.parameters()))
    assert error < 0.05 * change


@pytest.mark.slow
def test_adamw8bit_skips_nonfinite_steps_and_resumes_from_a_checkpoint_exactly(adamw8bit_config, tmp_path):
    import torch.distributed.checkpoint as dcp

    from titanlite.optim.optimizer import load_optimizer_state_dict, optimizer_state_dict

    model = small_transformer()
    optimizer = build_optimizer(model, adamw8bit_config.optimizer, optimizer_update(adamw8bit_config, "cpu"), adamw8bit_config.compile.enable)
    for step in range(3):
        loss_step(model, optimizer, step)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    codes = {n: optimizer.state[p]["exp_avg"].codes.clone() for n, p in model.named_parameters() if p.numel() >= 4096}
    assert loss_step(model, optimizer, 99, poison=True)[1] == 1.0  # NaN gradients: skipped
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(optimizer.state[model.get_parameter(n)]["exp_avg"].codes, c) for n, c in codes.items())

    dcp.save({"model": model.state_dict(), "optimizer": optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(tmp_path), no_dist=True)
    straight = [loss_step(model, optimizer, step)[0] for step in range(3, 6)]

    resumed = small_transformer(seed=5)  # other weights, fresh (empty) optimizer state: all must come from disk
    resumed_optimizer = build_optimizer(resumed, adamw8bit_config.optimizer, optimizer_update(adamw8bit_config, "cpu"), adamw8bit_config.compile.enable)
    state = {"model": resumed.state_dict(), "optimizer": optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    resumed.load_state_dict(state["model"])
    load_optimizer_state_dict(resumed, resumed_optimizer, state["optimizer"])
    assert [loss_step(resumed, resumed_optimizer, step)[0] for step in range(3, 6)] == straight  # bitwise
    saved = sum(f.stat().st_size for f in tmp_path.iterdir())
    parameters = sum(p.numel() for p in model.parameters())
    assert saved < 4 * parameters + 3 * parameters  # fp32 weights + 8-bit moments, not 4 + 8 bytes


# --- CPU-offloaded AdamW (torchao's CPUOffloadOptimizer needs CUDA)

def test_combinations_that_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="optimizer.cpu_offload=true is for one GPU .* use parallelism.fsdp_cpu_offload"):
        resolve(load_config("debug_model", ["--optimizer.cpu_offload", "--training.steps", "2"]), 2, 2048, "cuda")
    with pytest.raises(ConfigError, match="optimizer.cpu_offload=true needs a CUDA device"):
        resolve(load_config("debug_model", ["--optimizer.cpu_offload", "--training.steps", "2"]), 1, 2048, "cpu")
    with pytest.raises(ConfigError, match="optimizer.cpu_offload=true offloads torch's AdamW"):
        load_config("debug_model", ["--optimizer.cpu_offload", "--optimizer.name", "adamw8bit"])
    with pytest.raises(ConfigError, match="optimizer.name=adamw8bit cannot update the float8 all-gather's weights"):
        resolve(load_config("debug_model", ["--optimizer.name", "adamw8bit", "--float8.enable", "--compile.enable",
                                            "--training.steps", "2"]), 2, 2048, "cuda")
    resolve(load_config("debug_model", ["--optimizer.name", "adamw8bit", "--float8.enable", "--compile.enable",
                                        "--float8.fsdp_float8_all_gather", "false", "--training.steps", "2"]), 2, 2048,
            "cuda")  # bf16 all-gathers: fine (tested on CPU, FSDP 2, emulated float8)
    with pytest.raises(ConfigError, match="optimizer.implementation='fused' applies to adamw only"):
        load_config("debug_model", ["--optimizer.name", "adamw8bit", "--optimizer.implementation", "fused"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's CPUOffloadOptimizer runs on CUDA only")
def test_gpu_cpu_offload_tracks_adamw_clips_skips_and_resumes(tmp_path):
    import torch.distributed.checkpoint as dcp

    from titanlite.optim.optimizer import load_optimizer_state_dict, optimizer_state_dict

    config = load_config("debug_model", ["--optimizer.cpu_offload", "--optimizer.lr", "1e-2"])
    model, twin = small_transformer().cuda(), small_transformer().cuda()
    optimizer = build_optimizer(model, config.optimizer, optimizer_update(config, "cuda"), config.compile.enable)
    reference_config = load_config("debug_model", ["--optimizer.lr", "1e-2"])
    reference = build_optimizer(twin, reference_config.optimizer, optimizer_update(reference_config, "cuda"), False)
    assert type(optimizer).__name__ == "CPUOffloadOptimizer"
    for step in range(3):  # clipped steps (max_norm 0.1 is below these gradients' norms)
        loss_step(model, optimizer, step, max_norm=0.1)
        loss_step(twin, reference, step, max_norm=0.1)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)  # host fused AdamW = device fused AdamW
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert loss_step(model, optimizer, 99, poison=True)[1] == 1.0
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    dcp.save({"optimizer": optimizer_state_dict(model, optimizer)}, checkpoint_id=str(tmp_path), no_dist=True)
    straight = [loss_step(model, optimizer, step)[0] for step in range(3, 6)]
    resumed = small_transformer().cuda()
    resumed.load_state_dict(weights)
    resumed_optimizer = build_optimizer(resumed, config.optimizer, optimizer_update(config, "cuda"), config.compile.enable)
    state = {"optimizer": optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    load_optimizer_state_dict(resumed, resumed_optimizer, state["optimizer"])
    assert [loss_step(resumed, resumed_optimizer, step)[0] for step in range(3, 6)] == straight


def train_losses(folder: str, runs: list[tuple[str, list[str]]]) -> dict[str, dict[int, float]]:
    """Train each run (tiny config) in this process group; {name: {step: loss}}."""
    import os

    from conftest import tiny_config

    from titanlite.train import train

    return {name: {r["step"]: r["loss"] for r in train(tiny_config(os.path.join(folder, name), *overrides))}
            for name, overrides in runs}


# dim 256 so that the matrices keep >= 4096 elements per rank (8-bit state) and blocks stay within rows
WIDE_8BIT = ["--optimizer.name", "adamw8bit", "--model.dim", "256", "--model.intermediate_size", "512",
             "--training.micro_batch_size", "2", "--optimizer.lr", "3e-3", "--training.steps", "6"]


@pytest.mark.slow
def test_adamw8bit_under_fsdp_and_tp_matches_one_process_and_resumes(tmp_path):
    single = run_distributed(train_losses, 1, str(tmp_path / "one"), [("single", WIDE_8BIT)], timeout=600)[0]["single"]
    saving = ["--checkpoint.enable", "true", "--checkpoint.interval", "3"]
    resume = ["--checkpoint.resume", str(tmp_path / "two" / "fsdp2" / "checkpoint" / "step-00000003")]
    runs = run_distributed(train_losses, 2, str(tmp_path / "two"), [
        ("fsdp2", WIDE_8BIT + saving), ("fsdp2_resumed", WIDE_8BIT + resume),
        ("tp2", WIDE_8BIT + ["--parallelism.tensor_parallel_degree", "2"]),
        ("fsdp2_float8", WIDE_8BIT + ["--float8.enable", "--float8.emulate", "--float8.fsdp_float8_all_gather", "false"])],
        timeout=900)[0]
    # FSDP2 shards rows, and AdamW8bit's blocks of 256 are rows here: the same quantization as one process.
    for step, loss in single.items():
        assert runs["fsdp2"][step] == pytest.approx(loss, rel=1e-5), step
        # TP splits wo/w2 by columns: other blocks of 256, other scales, other 8-bit rounding (measured:
        # up to 0.36% apart by step 4, where the fp32-state layouts agree to 1e-5).
        assert runs["tp2"][step] == pytest.approx(loss, rel=1e-2), step
        assert runs["fsdp2_float8"][step] == pytest.approx(loss, rel=1e-2), step  # with float8 linears too
    assert sorted(runs["fsdp2_resumed"]) == [4, 5, 6]
    for step in (4, 5, 6):  # the 8-bit moments came back from the sharded checkpoint exactly
        assert runs["fsdp2_resumed"][step] == runs["fsdp2"][step], step
