"""RoPE scaling (YaRN, Llama 3) against reference formulas written out here and against transformers."""

import math

import pytest
import torch

from titanlite.config.settings import Model as ModelConfig
from titanlite.model.rope import attention_softmax_scale, rope_inverse_frequencies, rope_tables
from titanlite.model.transformer import apply_rope, build_model


def yarn_config(**overrides):
    values = dict(dim=1024, n_heads=8, n_kv_heads=8, intermediate_size=256, vocab_size=64, n_layers=1,
                  rope_scaling="yarn", rope_scaling_factor=2.0, rope_original_max_position=4096,
                  rope_beta_fast=32.0, rope_beta_slow=1.0, rope_theta=10000.0)
    values.update(overrides)
    return ModelConfig(**values)


def reference_yarn_frequencies(head_dim, base, scale, original_max, beta_fast, beta_slow):
    """YaRN as its authors' code (jquesnelle/yarn), transformers and vLLM compute it, pair by pair:
    the ramp is linear in the pair index between the floor/ceil-rounded pairs turning beta_fast
    and beta_slow times over the original context."""
    def pair_turning(rotations):
        return head_dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_turning(beta_fast)), 0)
    high = min(math.ceil(pair_turning(beta_slow)), head_dim - 1)
    result = []
    for d in range(head_dim // 2):
        theta = base ** (-2 * d / head_dim)
        interpolated = min(max((d - low) / (high - low), 0.0), 1.0)
        result.append(interpolated * theta / scale + (1 - interpolated) * theta)
    return result


def paper_frequencies(head_dim, base, scale, original_max, alpha, beta):
    """YaRN paper section 3, term by term: theta_d, lambda_d, r(d), gamma(r), h(theta_d) (ramp linear in r)."""
    result = []
    for d in range(head_dim // 2):
        theta = base ** (-2 * d / head_dim)
        rotations = original_max / (2 * math.pi / theta)
        gamma = min(max((rotations - alpha) / (beta - alpha), 0.0), 1.0)
        result.append((1 - gamma) * theta / scale + gamma * theta)
    return result


def meta_llama3_frequencies(head_dim, base, factor, original_max, low_freq_factor, high_freq_factor):
    """Llama 3.1's `apply_scaling` (Meta's reference), in wavelengths."""
    low_freq_wavelen, high_freq_wavelen = original_max / low_freq_factor, original_max / high_freq_factor
    result = []
    for d in range(head_dim // 2):
        freq = base ** (-2 * d / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            result.append(freq)
        elif wavelen > low_freq_wavelen:
            result.append(freq / factor)
        else:
            smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            result.append((1 - smooth) * freq / factor + smooth * freq)
    return result


@pytest.mark.parametrize("head_dim,scale,original,theta,beta_fast,beta_slow", [
    (128, 2.0, 4096, 10000.0, 32.0, 1.0), (100, 2.0, 4096, 10000.0, 32.0, 1.0), (64, 2.0, 4096, 10000.0, 32.0, 1.0),
    (128, 4.0, 2048, 500000.0, 32.0, 1.0), (64, 1.5, 1024, 10000.0, 16.0, 2.0), (100, 8.0, 8192, 1e6, 32.0, 1.0)])
def test_yarn_frequencies_match_the_reference_implementation(head_dim, scale, original, theta, beta_fast, beta_slow):
    config = yarn_config(dim=head_dim * 8, rope_scaling_factor=scale, rope_original_max_position=original,
                         rope_theta=theta, rope_beta_fast=beta_fast, rope_beta_slow=beta_slow)
    expected = torch.tensor(reference_yarn_frequencies(head_dim, theta, scale, original, beta_fast, beta_slow),
                            dtype=torch.float64)
    torch.testing.assert_close(rope_inverse_frequencies(config), expected, rtol=1e-12, atol=0)


def test_yarn_is_not_the_paper_equation():
    # head_dim 128, factor 2, original 4096: the paper's ramp (linear in rotations, no rounding)
    # gives other frequencies on 25 of 64 pairs, 29.6 rad apart at position 8191.
    ours = rope_inverse_frequencies(yarn_config())
    paper = torch.tensor(paper_frequencies(128, 10000.0, 2.0, 4096, 1.0, 32.0), dtype=torch.float64)
    assert int((ours - paper).abs().gt(1e-12 * paper).sum()) == 25
    assert (ours - paper).abs().max().item() * 8191 == pytest.approx(29.6, abs=0.05)


@pytest.mark.parametrize("head_dim,factor,original,theta,low,high", [
    (128, 8.0, 8192, 500000.0, 1.0, 4.0), (64, 32.0, 8192, 500000.0, 1.0, 4.0), (100, 4.0, 2048, 10000.0, 2.0, 8.0)])
def test_llama3_frequencies_match_metas_reference(head_dim, factor, original, theta, low, high):
    config = yarn_config(dim=head_dim * 8, rope_scaling="llama3", rope_scaling_factor=factor,
                         rope_original_max_position=original, rope_theta=theta, rope_low_freq_factor=low,
                         rope_high_freq_factor=high)
    expected = torch.tensor(meta_llama3_frequencies(head_dim, theta, factor, original, low, high), dtype=torch.float64)
    got = rope_inverse_frequencies(config)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    plain = rope_inverse_frequencies(yarn_config(dim=head_dim * 8, rope_scaling="none", rope_theta=theta))
    assert got[0].item() == plain[0].item()  # all three regions
    assert got[-1].item() == pytest.approx(plain[-1].item() / factor, rel=1e-12)
    assert attention_softmax_scale(config) is None  # llama3 has no attention temperature


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 16.0, "beta_slow": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0}])
@pytest.mark.parametrize("head_dim", [64, 100, 128])
def test_scaling_equals_transformers(rope_parameters, head_dim):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = rope_parameters["rope_type"]
    hf = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                  max_position_embeddings=16384,
                                  rope_parameters={**rope_parameters, "rope_theta": 500000.0})
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    names = {"factor": "rope_scaling_factor", "original_max_position_embeddings": "rope_original_max_position",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "low_freq_factor": "rope_low_freq_factor",
             "high_freq_factor": "rope_high_freq_factor"}
    config = yarn_config(dim=head_dim * 4, n_heads=4, rope_scaling=kind, rope_theta=500000.0,
                         **{names[key]: value for key, value in rope_parameters.items() if key in names})
    # transformers computes in float32: agreement to a few float32 ulps (a misplaced ramp bound
    # moves a frequency by ~1/(high - low) of the factor's effect, > 1%).
    torch.testing.assert_close(rope_inverse_frequencies(config), hf_inv_freq.double(), rtol=1e-6, atol=0)
    softmax_scale = attention_softmax_scale(config) or 1 / math.sqrt(head_dim)
    assert softmax_scale == pytest.approx(hf_attention_factor ** 2 / math.sqrt(head_dim), rel=1e-12)


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

    freqs = torch.tensor(reference_yarn_frequencies(head_dim, 10000.0, 2.0, 8, 4.0, 1.0), dtype=torch.float64)
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


def test_float64_model_runs_rope_and_norm_in_float64():
    # A model cast to float64 (then init_rope(), which rebuilds the tables in the buffers' dtype)
    # must not round RoPE or RMSNorm through float32: reference in float64, to 1e-12.
    config = yarn_config(dim=64, n_heads=2, n_kv_heads=2, rope_scaling="none")
    head_dim, seq = 32, 3000
    model = build_model(config, seq, device="cpu").double()
    model.init_weights(seed=0)
    assert model.rope_cos.dtype == torch.float64
    x = torch.randn(1, seq, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norm = model.layers["0"].attention_norm
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt(), rtol=1e-13, atol=0)

    freqs = torch.tensor([10000.0 ** (-2 * d / head_dim) for d in range(head_dim // 2)], dtype=torch.float64)
    rotation = torch.polar(torch.ones(seq, head_dim // 2, dtype=torch.float64),
                           torch.outer(torch.arange(seq, dtype=torch.float64), freqs))
    q = x.view(1, seq, 2, head_dim)
    expected = torch.view_as_real(torch.view_as_complex(q.reshape(1, seq, 2, head_dim // 2, 2).contiguous())
                                  * rotation[None, :, None, :]).reshape(q.shape)
    got = apply_rope(q, model.rope_cos, model.rope_sin)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # float32 tables or rotation: ~1e-4 at 3000
