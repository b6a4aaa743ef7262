"""YaRN RoPE scaling against the paper's formulas, computed independently in plain Python."""

import math

import pytest
import torch

from titanlite.config import Model as ModelConfig
from titanlite.model import build_model
from titanlite.rope import attention_softmax_scale, rope_inverse_frequencies, rope_tables


def yarn_config(**overrides):
    values = dict(dim=1024, n_heads=8, n_kv_heads=8, intermediate_size=256, vocab_size=64, n_layers=1,
                  rope_scaling="yarn", rope_scaling_factor=2.0, rope_original_max_position=4096,
                  rope_beta_fast=32.0, rope_beta_slow=1.0, rope_theta=10000.0)
    values.update(overrides)
    return ModelConfig(**values)


def paper_frequencies(head_dim, base, scale, original_max, alpha, beta):
    """YaRN section 3, term by term: theta_d, lambda_d, r(d), gamma(r), h(theta_d)."""
    result = []
    for d in range(head_dim // 2):
        theta = base ** (-2 * d / head_dim)
        wavelength = 2 * math.pi / theta
        rotations = original_max / wavelength
        if rotations < alpha:
            gamma = 0.0
        elif rotations > beta:
            gamma = 1.0
        else:
            gamma = (rotations - alpha) / (beta - alpha)
        result.append((1 - gamma) * theta / scale + gamma * theta)
    return result


@pytest.mark.parametrize("head_dim,scale,original,theta", [
    (128, 2.0, 4096, 10000.0), (100, 2.0, 4096, 10000.0), (128, 4.0, 2048, 500000.0), (64, 1.5, 1024, 10000.0)])
def test_yarn_frequencies_match_the_paper(head_dim, scale, original, theta):
    config = yarn_config(dim=head_dim * 8, rope_scaling_factor=scale, rope_original_max_position=original,
                         rope_theta=theta)
    expected = torch.tensor(paper_frequencies(head_dim, theta, scale, original, 1.0, 32.0), dtype=torch.float64)
    torch.testing.assert_close(rope_inverse_frequencies(config), expected, rtol=1e-12, atol=0)


def test_yarn_regions_by_hand():
    # head_dim 128, base 1e4, L 4096, s 2: pair 0 turns 4096/(2 pi) = 652 times (> 32: kept);
    # the last pair (wavelength 2 pi 1e4^(126/128) ~ 54,400) turns 0.075 times (< 1: halved).
    freqs = rope_inverse_frequencies(yarn_config())
    assert freqs[0].item() == 1.0
    assert freqs[-1].item() == pytest.approx(10000 ** (-126 / 128) / 2, rel=1e-12)
    plain = rope_inverse_frequencies(yarn_config(rope_scaling="none"))
    ratio = (freqs / plain).tolist()
    assert all(0.5 - 1e-12 <= r <= 1.0 + 1e-12 for r in ratio)
    assert ratio == sorted(ratio, reverse=True)  # slower pairs are interpolated more


def test_temperature_matches_the_paper():
    # sqrt(1/t) = 0.1 ln(s) + 1 multiplies q and k, so the logits get (0.1 ln s + 1)^2 / sqrt(head_dim).
    for scale in (2.0, 4.0, 8.0):
        config = yarn_config(rope_scaling_factor=scale)
        expected = (0.1 * math.log(scale) + 1) ** 2 / math.sqrt(128)
        assert attention_softmax_scale(config) == pytest.approx(expected, rel=1e-15)
    assert attention_softmax_scale(yarn_config(rope_scaling="none")) is None


def test_factor_one_is_plain_rope_exactly():
    yarn = yarn_config(rope_scaling_factor=1.0)
    plain = yarn_config(rope_scaling="none")
    assert torch.equal(rope_inverse_frequencies(yarn), rope_inverse_frequencies(plain))
    for a, b in zip(rope_tables(yarn, 64, "cpu"), rope_tables(plain, 64, "cpu")):
        assert torch.equal(a, b)
    assert attention_softmax_scale(yarn) is None
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 16))
    outputs = []
    for config in (yarn, plain):
        model = build_model(config, 16, device="cpu")
        model.init_weights(seed=0)
        outputs.append(model(tokens))
    assert torch.equal(outputs[0], outputs[1])


def test_model_attention_applies_yarn_to_q_and_k():
    # Reference attention in float64: rotate with the paper's frequencies as complex numbers,
    # multiply q and k each by sqrt(1/t), then softmax(q k^T / sqrt(head_dim)) with a causal mask.
    config = yarn_config(dim=64, n_heads=2, n_kv_heads=2, rope_original_max_position=8, rope_beta_fast=4.0)
    head_dim, seq = 32, 10
    model = build_model(config, seq, device="cpu").double()
    model.init_weights(seed=0)
    model.init_rope()
    attention = model.layers["0"].attention
    x = 20 * torch.randn(1, seq, 64, dtype=torch.float64)  # large logits: the temperature matters
    got = attention(x, model.rope_cos.double(), model.rope_sin.double())

    freqs = torch.tensor(paper_frequencies(head_dim, 10000.0, 2.0, 8, 1.0, 4.0), dtype=torch.float64)
    rotation = torch.polar(torch.ones(seq, head_dim // 2, dtype=torch.float64),
                           torch.outer(torch.arange(seq, dtype=torch.float64), freqs))

    def rotate(t):  # (seq, heads, head_dim), interleaved pairs as complex numbers
        z = torch.view_as_complex(t.reshape(seq, -1, head_dim // 2, 2).contiguous())
        return torch.view_as_real(z * rotation[:, None, :]).reshape(seq, -1, head_dim)

    mscale = 0.1 * math.log(2.0) + 1
    q = rotate((x[0] @ attention.wq.weight.T).view(seq, 2, head_dim)) * mscale
    k = rotate((x[0] @ attention.wk.weight.T).view(seq, 2, head_dim)) * mscale
    v = (x[0] @ attention.wv.weight.T).view(seq, 2, head_dim)
    logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
    logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(seq, 64) @ attention.wo.weight.T
    # apply_rope rotates in fp32: agreement to fp32 rounding, far below the temperature's effect.
    torch.testing.assert_close(got[0], out, rtol=1e-5, atol=1e-5 * out.abs().max().item())
    untempered = torch.einsum("hqk,khd->qhd", (logits / mscale**2).softmax(-1), v).reshape(seq, 64)
    assert (untempered @ attention.wo.weight.T - out).abs().max() > 100 * (got[0] - out).abs().max()
