"""Rotary position embedding tables, plain or YaRN-scaled, always built in float32.

bf16 keeps 8 mantissa bits: at position 4000 an angle of ~4000 rad has an error of ~16 rad
in bf16, so the tables are computed and kept in fp32 (SPEC gotcha 5).

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models",
section 3) extends a RoPE trained for L = rope_original_max_position tokens by a factor s:
  - wavelength of pair d: lambda_d = 2 pi / theta_d, with theta_d = base^(-2d/|D|);
  - rotations of pair d over the original context: r(d) = L / lambda_d;
  - ramp gamma(r) = 0 for r < alpha, 1 for r > beta, (r - alpha) / (beta - alpha) between
    (alpha = rope_beta_slow, beta = rope_beta_fast; the paper's alpha=1, beta=32 for LLaMA);
  - new frequency h(theta_d) = (1 - gamma) theta_d / s + gamma theta_d: pairs that turn many
    times in the original context keep their frequency, slow pairs are interpolated by s;
  - attention temperature: softmax(q.k / (t sqrt|D|)) with sqrt(1/t) = 0.1 ln(s) + 1.
The ramp follows the paper (linear in r); Hugging Face's implementation ramps linearly in the
pair index between rounded bounds instead, which differs by at most a few pairs near the edges.
"""

from __future__ import annotations

import math

import torch

from titanlite.config import Model as ModelConfig


def yarn_ramp(rotations: torch.Tensor, beta_slow: float, beta_fast: float) -> torch.Tensor:
    """gamma(r): 0 below beta_slow rotations (interpolate), 1 above beta_fast (keep), linear between."""
    return ((rotations - beta_slow) / (beta_fast - beta_slow)).clamp(0.0, 1.0)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """theta_d = base^(-2d/head_dim) for d < head_dim/2, YaRN-scaled if configured; float64."""
    head_dim = config.dim // config.n_heads
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if config.rope_scaling != "yarn" or config.rope_scaling_factor == 1.0:
        return inv_freq  # factor 1 is plain RoPE, bit for bit
    rotations = config.rope_original_max_position * inv_freq / (2 * math.pi)  # r(d) = L / lambda_d
    keep = yarn_ramp(rotations, config.rope_beta_slow, config.rope_beta_fast)
    return (1.0 - keep) * inv_freq / config.rope_scaling_factor + keep * inv_freq


def yarn_attention_factor(scaling_factor: float) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1: YaRN's factor on q and on k (so on the logits squared)."""
    return 0.1 * math.log(scaling_factor) + 1.0 if scaling_factor > 1.0 else 1.0


def attention_softmax_scale(config: ModelConfig) -> float | None:
    """Softmax scale for attention logits; None means SDPA's default 1/sqrt(head_dim).

    YaRN scales q and k each by sqrt(1/t), i.e. the logits by 1/t; folding it into the softmax
    scale costs nothing, where scaling the cos/sin tables would also work but hides it.
    """
    if config.rope_scaling != "yarn" or config.rope_scaling_factor == 1.0:
        return None
    head_dim = config.dim // config.n_heads
    return yarn_attention_factor(config.rope_scaling_factor) ** 2 / math.sqrt(head_dim)


def rope_tables(config: ModelConfig, max_seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim/2), float32, for interleaved-pair rotation."""
    positions = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(positions, rope_inverse_frequencies(config))
    return angles.cos().float().to(device), angles.sin().float().to(device)
