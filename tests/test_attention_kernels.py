"""Head-dim padding is exact, and the start-up check never lets the math kernel run silently."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from titanlite.attention_kernels import (check_attention_kernel, pad_head_dim, padding_candidates,
                                         resolve_attention_head_dim_padding, selected_kernel)
from titanlite.config import Config, ConfigError, load_config
from titanlite.config import Model as ModelConfig
from titanlite.model import build_model, sdpa_causal


def reference_attention(q, k, v, scale):
    """Plain causal GQA attention in the input dtype: repeat K/V heads, mask, softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale
    seq = q.shape[2]
    logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("padded", [104, 128])
@pytest.mark.parametrize("scale", [None, 1.1434 / math.sqrt(100)])  # SDPA's default and a YaRN-tempered one
def test_padded_attention_equals_unpadded_in_float64(padded, scale):
    torch.manual_seed(0)
    shapes = [(2, 8, 24, 100), (2, 2, 24, 100), (2, 2, 24, 100)]
    inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    out = pad_head_dim(sdpa_causal, padded)(*inputs, scale)
    expected = reference_attention(*copies, scale if scale is not None else 1 / math.sqrt(100))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    for got, want in zip(inputs, copies):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_padding_with_the_padded_dims_scale_would_be_wrong():
    # Guard on the test above: a pad that let SDPA take 1/sqrt(128) would differ visibly.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 100, dtype=torch.float64) * 3 for _ in range(3))
    wrong = F.scaled_dot_product_attention(F.pad(q, (0, 28)), F.pad(k, (0, 28)), F.pad(v, (0, 28)),
                                           is_causal=True)[..., :100]
    assert (wrong - pad_head_dim(sdpa_causal, 128)(q, k, v, None)).abs().max() > 1e-3


def test_model_with_padding_matches_model_without():
    config = dict(dim=200, n_heads=2, n_kv_heads=1, intermediate_size=64, vocab_size=50, n_layers=2)
    tokens = torch.randint(0, 50, (2, 12))
    outputs = []
    for padding in ("none", "104"):
        model = build_model(ModelConfig(attention_head_dim_padding=padding, **config), 12, device="cpu").double()
        model.init_weights(seed=0)
        model.init_rope()
        outputs.append(model(tokens))
    assert getattr(model.layers["0"].attention.attention_fn, "padded_head_dim", None) == 104
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)


def math_only(q, k, v, scale, mask=None):
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa_causal(q, k, v, scale)


def fast_only_for_multiples_of_8(q, k, v, scale, mask=None):
    """Mimics H100 builds whose fast kernels reject head_dim % 8 != 0."""
    return sdpa_causal(q, k, v, scale) if q.shape[-1] % 8 == 0 else math_only(q, k, v, scale)


def test_selected_kernel_tells_flash_from_math():
    assert selected_kernel(sdpa_causal, 4, 1, 100, torch.float32, "cpu") == "flash"  # CPU flash takes any dim
    assert selected_kernel(math_only, 4, 1, 100, torch.float32, "cpu") == "math"


def test_padding_candidates():
    assert padding_candidates(100, "auto") == [100, 128, 104]
    assert padding_candidates(128, "auto") == [128]
    assert padding_candidates(100, "none") == [100]
    assert padding_candidates(100, "128") == [128]


def test_resolution_pads_when_the_true_dim_falls_to_math_and_fails_loudly_otherwise():
    cpu = torch.device("cpu")
    shape = dict(dim=3200, n_heads=32, n_kv_heads=8)
    resolve = resolve_attention_head_dim_padding
    assert resolve(ModelConfig(**shape), 8, torch.float32, cpu, sdpa_causal) == "none"
    assert resolve(ModelConfig(**shape), 8, torch.float32, cpu, fast_only_for_multiples_of_8) == "128"
    assert resolve(ModelConfig(attention_head_dim_padding="104", **shape), 8, torch.float32, cpu,
                   fast_only_for_multiples_of_8) == "104"
    assert resolve(ModelConfig(attention_head_dim_padding="128", **shape), 8, torch.float32, cpu,
                   fast_only_for_multiples_of_8) == "128"
    with pytest.raises(ConfigError, match="head_dim 100.*math kernel would run silently"):
        resolve(ModelConfig(attention_head_dim_padding="none", **shape), 8, torch.float32, cpu,
                fast_only_for_multiples_of_8)
    with pytest.raises(ConfigError, match="attention_head_dim_padding"):
        resolve(ModelConfig(**shape), 8, torch.float32, cpu, math_only)


def test_cpu_start_up_check_resolves_auto_to_none():
    config = Config()
    check_attention_kernel(config, torch.device("cpu"))
    assert config.model.attention_head_dim_padding == "none"


@pytest.mark.parametrize("value", ["96", "abc", "-8"])
def test_bad_padding_values_are_rejected(value):
    with pytest.raises(ConfigError, match="attention_head_dim_padding"):
        load_config(None, ["--training.steps", "1", "--model.dim", "3200", "--model.n_heads", "32",
                           "--model.n_kv_heads", "8", "--model.attention_head_dim_padding", value])


def test_auto_prefers_the_faster_kernel_over_no_padding(monkeypatch):
    """H100: the true head_dim 100 runs on flash, padded to 128 on cuDNN (1.7x faster): pad."""
    import titanlite.attention_kernels as attention_kernels

    seen_head_dims = []
    real_selected_kernel = attention_kernels.selected_kernel

    def spy(q, k, v, scale, mask=None):
        seen_head_dims.append(q.shape[-1])
        return sdpa_causal(q, k, v, scale)

    def h100_like(*args, **kwargs):
        kernel = real_selected_kernel(*args, **kwargs)
        return {100: "flash", 104: "cudnn", 128: "cudnn"}[seen_head_dims[-1]] if kernel != "math" else kernel

    monkeypatch.setattr(attention_kernels, "selected_kernel", h100_like)
    config = ModelConfig(dim=3200, n_heads=32, n_kv_heads=8)
    assert resolve_attention_head_dim_padding(config, 1, torch.float32, torch.device("cpu"), spy) == "128"
    assert set(seen_head_dims) == {100, 104, 128}  # every candidate was probed
    seen_head_dims.clear()
    config = ModelConfig(dim=4096, n_heads=32, n_kv_heads=8)  # head_dim 128: nothing to pad
    assert resolve_attention_head_dim_padding(config, 1, torch.float32, torch.device("cpu"), spy) == "none"
