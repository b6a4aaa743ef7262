"""LR schedule values against the closed-form schedule; optimizer groups."""

import math

import pytest
import torch

from titanlite.config import load_config
from titanlite.resolve import resolve
from titanlite.model import build_model
from titanlite.optim import build_optimizer, learning_rate, lr_multiplier, set_learning_rate


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
    seen = [learning_rate(run, step) for step in range(1, 14)]
    assert seen[0] == pytest.approx(1e-3 / 3) and seen[2] == pytest.approx(1e-3)
    assert seen[-1] == pytest.approx(1e-4)  # update 13 = total steps: min LR
    assert learning_rate(run, 7, scale=0.25) == pytest.approx(seen[6] / 4)  # a rollback's factor
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, config, "cpu")
    set_learning_rate(optimizer, seen[4])
    assert [group["lr"] for group in optimizer.param_groups] == [seen[4]] * 2


def test_weight_decay_skips_norm_gains():
    config = load_config("debug_model")
    model = build_model(config.model.__class__(vocab_size=128, dim=32, n_heads=4, n_kv_heads=2,
                                               intermediate_size=64, n_layers=1), 8, "cpu")
    optimizer = build_optimizer(model, config, "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 3  # 2 block norms + final
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["eps"] == 1e-8
    assert isinstance(optimizer, torch.optim.AdamW)
