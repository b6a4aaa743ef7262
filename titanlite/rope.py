"""Rotary position embedding tables, plain or YaRN-scaled, always built in float32.

bf16 keeps 8 mantissa bits: at position 4000 an angle of ~4000 rad has an error of ~16 rad
in bf16, so the tables are computed and kept in fp32 (SPEC gotcha 5).
"""

from __future__ import annotations

import math

import torch

from titanlite.config import Model as ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2, float64 (rounded to fp32 by the caller)."""
    head_dim = config.dim // config.n_heads
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if config.rope_scaling == "yarn":
        raise NotImplementedError("YaRN scaling lands with the recipes (issue 6)")
    return inv_freq


def attention_softmax_scale(config: ModelConfig) -> float | None:
    """Softmax scale for attention logits; None means SDPA's default 1/sqrt(head_dim)."""
    return None


def rope_tables(config: ModelConfig, max_seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim/2), float32, for interleaved-pair rotation."""
    positions = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(positions, rope_inverse_frequencies(config))
    return angles.cos().float().to(device), angles.sin().float().to(device)
