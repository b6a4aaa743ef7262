"""Rotary position embedding tables: plain, YaRN or Llama 3 scaled; computed in float64.

bf16 keeps 8 mantissa bits: at position 4000 an angle of ~4000 rad has an error of ~16 rad
in bf16, so the angles are computed in float64 and the tables kept in fp32 (SPEC gotcha 5),
or in the model's dtype when that is wider (a float64 model gets float64 tables).

Pair d of a head of size |D| turns at theta_d = base^(-2d/|D|) rad per token, i.e. it makes
r(d) = L theta_d / (2 pi) rotations over the original context L = rope_original_max_position.
Both scalings keep fast pairs, divide slow pairs' frequency by the factor s, and blend between.

YaRN (Peng et al. 2023) is computed as the authors' reference code (jquesnelle/yarn), Hugging
Face transformers (`_compute_yarn_parameters`, truncate=True) and vLLM compute it, so that a
YaRN model exported to or imported from them runs with the same frequencies:
  - d(r) = |D| ln(L / (2 pi r)) / (2 ln base): the (fractional) pair index turning r times;
  - low = max(floor(d(beta_fast)), 0), high = min(ceil(d(beta_slow)), |D| - 1);
  - keep(d) = 1 - clamp((d - low) / (high - low), 0, 1): linear in the pair index d;
  - theta'_d = keep theta_d + (1 - keep) theta_d / s;
  - attention temperature: q and k each scaled by 0.1 ln(s) + 1 (HF's default attention_factor).
The paper's equation ramps linearly in r(d) without rounding; that differs from the code
everyone runs by up to 23% on some pairs (head_dim 128, s 2, L 4096), so titanlite does not use it.

Llama 3 (Llama 3.1 / 3.2, `rope_type = "llama3"`) ramps linearly in rotations, without rounding
and without a temperature: keep = clamp((r(d) - low_freq_factor) / (high_freq_factor -
low_freq_factor), 0, 1), theta'_d = keep theta_d + (1 - keep) theta_d / s.
"""

from __future__ import annotations

import math

import torch

from titanlite.config.settings import Model as ModelConfig


def yarn_pair_index(rotations: float, head_dim: int, base: float, original_max_position: int) -> float:
    """The fractional pair index d whose frequency turns `rotations` times over the original context."""
    return head_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_keep_fraction(config: ModelConfig, head_dim: int) -> torch.Tensor:
    """(head_dim/2,) float64: 1 keeps pair d's frequency, 0 divides it by the factor (reference YaRN)."""
    low = max(math.floor(yarn_pair_index(config.rope_beta_fast, head_dim, config.rope_theta,
                                         config.rope_original_max_position)), 0)
    high = min(math.ceil(yarn_pair_index(config.rope_beta_slow, head_dim, config.rope_theta,
                                         config.rope_original_max_position)), head_dim - 1)
    if low == high:
        high += 0.001  # as the reference code does: a step instead of a division by zero
    ramp = (torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)
    return 1.0 - ramp.clamp(0.0, 1.0)


def llama3_keep_fraction(config: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """(head_dim/2,) float64: Llama 3's blend, linear in the rotations over the original context."""
    rotations = config.rope_original_max_position * inv_freq / (2 * math.pi)
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    return ((rotations - low) / (high - low)).clamp(0.0, 1.0)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """theta_d = base^(-2d/head_dim) for d < head_dim/2, scaled as configured; float64, rad per token."""
    head_dim = config.dim // config.n_heads
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if config.rope_scaling == "none" or config.rope_scaling_factor == 1.0:
        return inv_freq  # factor 1 is plain RoPE, bit for bit
    if config.rope_scaling == "yarn":
        keep = yarn_keep_fraction(config, head_dim)
    elif config.rope_scaling == "llama3":
        keep = llama3_keep_fraction(config, inv_freq)
    else:
        raise ValueError(f"model.rope_scaling={config.rope_scaling!r}: allowed are none, yarn, llama3")
    return keep * inv_freq + (1.0 - keep) * inv_freq / config.rope_scaling_factor


def yarn_attention_factor(scaling_factor: float) -> float:
    """0.1 ln(s) + 1: YaRN's factor on q and on k (so on the logits squared); 1 for s <= 1."""
    return 0.1 * math.log(scaling_factor) + 1.0 if scaling_factor > 1.0 else 1.0


def attention_softmax_scale(config: ModelConfig) -> float | None:
    """Softmax scale for attention logits; None means SDPA's default 1/sqrt(head_dim).

    YaRN scales q and k each by its attention factor, i.e. the logits by its square; folding it
    into the softmax scale costs nothing (HF scales the cos/sin tables instead: the same logits).
    """
    if config.rope_scaling != "yarn" or config.rope_scaling_factor == 1.0:
        return None
    head_dim = config.dim // config.n_heads
    return yarn_attention_factor(config.rope_scaling_factor) ** 2 / math.sqrt(head_dim)


def rope_tables(config: ModelConfig, max_seq_len: int, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim/2) in `dtype`, for interleaved-pair rotation."""
    positions = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(positions, rope_inverse_frequencies(config))
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)
