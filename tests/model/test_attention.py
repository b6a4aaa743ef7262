"""attention.py: head-dim padding is exact, the start-up probe never lets the math kernel run silently,
and the FlexAttention document mask keeps attention inside each packed document."""

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import titanlite.model.attention as attention
import titanlite.train as train_module
from titanlite.config.load import load_config
from titanlite.config.settings import ConfigError
from titanlite.config.settings import Model as ModelConfig
from titanlite.data.loader import make_batch
from titanlite.model.attention import (choose_attention_head_dim, document_mask, flex_document_attention,
                                       head_dim_candidates, pad_head_dim, probe_attention_head_dim, sdpa_causal,
                                       selected_kernel)
from titanlite.model.transformer import build_model


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
    padded_shapes = []
    for head_dim in (0, 104):
        model = build_model(ModelConfig(attention_head_dim=head_dim, **config), 12, device="cpu").double()
        model.init_weights(seed=0)
        model.init_rope()
        with torch.no_grad():
            outputs.append(model(tokens))
        padded_shapes.append(model.layers["0"].attention.attention_fn.__name__)
    assert padded_shapes == ["sdpa_causal", "padded_attention"]  # 104 pads; 0 (= the true dim 100) does not
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


def test_head_dim_candidates():
    assert head_dim_candidates(100, 0) == [100, 128, 104]
    assert head_dim_candidates(128, 0) == [128]
    assert head_dim_candidates(100, 100) == [100]
    assert head_dim_candidates(100, 128) == [128]


def test_probe_pads_when_the_true_dim_falls_to_math_and_fails_loudly_otherwise():
    device = torch.device("cpu")
    shape = dict(dim=3200, n_heads=32, n_kv_heads=8)
    choose = probe_attention_head_dim
    assert choose(ModelConfig(**shape), 8, torch.float32, device, sdpa_causal) == 100
    assert choose(ModelConfig(**shape), 8, torch.float32, device, fast_only_for_multiples_of_8) == 128
    assert choose(ModelConfig(attention_head_dim=104, **shape), 8, torch.float32, device,
                  fast_only_for_multiples_of_8) == 104
    with pytest.raises(ConfigError, match="head_dim 100.*math kernel would run silently"):
        choose(ModelConfig(attention_head_dim=100, **shape), 8, torch.float32, device, fast_only_for_multiples_of_8)
    with pytest.raises(ConfigError, match="model.attention_head_dim=0"):
        choose(ModelConfig(**shape), 8, torch.float32, device, math_only)


def test_cpu_runs_keep_the_configured_head_dim():
    assert choose_attention_head_dim(ModelConfig(dim=3200, n_heads=32), 1, torch.float32, torch.device("cpu")) == 100
    assert choose_attention_head_dim(ModelConfig(dim=3200, n_heads=32, attention_head_dim=128), 1, torch.float32,
                                     torch.device("cpu")) == 128


@pytest.mark.parametrize("value, message", [("96", "must be 0 (auto) or >= the head dim 100"),
                                            ("abc", "expected int"), ("-8", "must be >= 0")])
def test_bad_head_dim_values_are_rejected(value, message):
    with pytest.raises(ConfigError, match="attention_head_dim") as error:
        load_config(None, ["--model.dim", "3200", "--model.n_heads", "32", "--model.n_kv_heads", "8",
                           "--model.attention_head_dim", value])
    assert message in str(error.value)


def test_auto_prefers_the_faster_kernel_over_no_padding(monkeypatch):
    """H100: the true head_dim 100 runs on flash, padded to 128 on cuDNN (1.7x faster): pad."""
    device = torch.device("cpu")
    seen_head_dims = []
    real_selected_kernel = attention.selected_kernel

    def spy(q, k, v, scale, mask=None):
        seen_head_dims.append(q.shape[-1])
        return sdpa_causal(q, k, v, scale)

    def h100_like(*args, **kwargs):
        kernel = real_selected_kernel(*args, **kwargs)
        return {100: "flash", 104: "cudnn", 128: "cudnn"}[seen_head_dims[-1]] if kernel != "math" else kernel

    monkeypatch.setattr(attention, "selected_kernel", h100_like)
    config = ModelConfig(dim=3200, n_heads=32, n_kv_heads=8)
    assert probe_attention_head_dim(config, 1, torch.float32, device, spy) == 128
    assert set(seen_head_dims) == {100, 104, 128}  # every candidate was probed
    seen_head_dims.clear()
    config = ModelConfig(dim=4096, n_heads=32, n_kv_heads=8)  # head_dim 128: nothing to pad
    assert probe_attention_head_dim(config, 1, torch.float32, device, spy) == 128


# --- the document mask

EOS, VOCAB = 95, 96


def tiny_model(attention: str, positions: str = "document", dim: int = 64):
    config = ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160, vocab_size=VOCAB,
                         attention=attention, positions=positions)
    model = build_model(config, 128, "cpu")
    model.init_weights(seed=0)
    return model


@pytest.fixture(scope="module")
def packed():
    """One row: document A (22 tokens + EOS), document B (40 tokens + EOS), and the start of C."""
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, EOS, (n,), generator=generator) for n in (22, 40, 30))
    row = torch.cat([a, torch.tensor([EOS]), b, torch.tensor([EOS]), c])[:81]  # 80 inputs + 1 label
    batch = make_batch(row[None].numpy().astype(np.int32), EOS, False, True, True)
    return batch, a, b


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_second_document_logits_equal_the_document_alone(packed):
    batch, a, b = packed
    flex, alone = tiny_model("flex"), tiny_model("sdpa")
    with torch.no_grad():
        packed_logits = flex(batch["input_ids"], positions=batch["positions"], mask=document_mask(batch["document_ids"]))
        a_logits = alone(torch.cat([a, torch.tensor([EOS])])[None])
        b_logits = alone(torch.cat([b, torch.tensor([EOS])])[None])
        crossing = alone(batch["input_ids"])  # plain causal attention sees document A from B
    torch.testing.assert_close(packed_logits[0, :23], a_logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_logits[0, 23:64], b_logits[0], rtol=0, atol=1e-5)
    assert (crossing[0, 23:64] - b_logits[0]).abs().max() > 1e-3  # the test can tell the difference
    # Training on CPU takes the dense-mask path (FlexAttention has no CPU backward): same logits, gradients flow.
    with_grad = flex(batch["input_ids"], positions=batch["positions"], mask=document_mask(batch["document_ids"]))
    torch.testing.assert_close(with_grad.detach(), packed_logits, rtol=0, atol=1e-5)
    with_grad[0, 23:64].sum().backward()
    assert flex.layers["0"].attention.wq.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_train_step_loss_is_the_sum_over_documents_alone(packed):
    """train_step passes the batch's document ids to the model: the packed row's loss equals the
    summed losses of its documents, each run alone through plain causal attention.

    (Per-document positions change nothing under the document mask: RoPE scores depend only on
    relative positions. The output head is scaled 10x so that attending across documents moves
    the summed loss by ~7e-4 relative, far above the 1e-5 tolerance.)"""
    import torch.nn.functional as F

    batch, _, _ = packed
    flex, alone = tiny_model("flex"), tiny_model("sdpa")
    inputs, labels = batch["input_ids"][0], batch["labels"][0]
    with torch.no_grad():
        flex.output.weight.mul_(10)
        alone.output.weight.mul_(10)

        def summed_loss(model, start, end, **kwargs):
            logits = model(inputs[None, start:end], **kwargs)[0]
            return F.cross_entropy(logits.double(), labels[start:end], ignore_index=-100, reduction="sum")

        reference = sum(summed_loss(alone, start, end) for start, end in ((0, 23), (23, 64), (64, 80)))
        crossing = summed_loss(alone, 0, 80)  # documents see each other
    assert (crossing - reference).abs() > 1e-4 * reference  # the test can tell a dropped mask
    valid = (labels != -100).sum().float()
    optimizer = torch.optim.SGD(flex.parameters(), lr=0.0)
    result = train_module.train_step(flex, optimizer, [batch], valid, 0.0, torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(result["sample_losses"][0].double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(result["loss"].double(), reference / valid.double(), rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FlexAttention kernel needs a GPU")
def test_compiled_flex_on_gpu_matches_the_document_alone(packed):
    # bf16, as in training: the compiled FlexAttention kernel is what runs on a GPU. On torch 2.11
    # (H100) inductor found no FlexAttention kernel for head_dim 16 (NoValidChoicesError), so this
    # test uses head_dim 64; the 7B shape trains with flex (bench/results/2026-11-27_flex_h100.json).
    batch, a, b = packed
    flex, alone = tiny_model("flex", dim=256).cuda().bfloat16(), tiny_model("sdpa", dim=256).cuda().bfloat16()
    batch = {k: v.cuda() for k, v in batch.items()}
    packed_logits = flex(batch["input_ids"], positions=batch["positions"], mask=document_mask(batch["document_ids"]))
    with torch.no_grad():
        b_logits = alone(torch.cat([b, torch.tensor([EOS])])[None].cuda())
        crossing = alone(batch["input_ids"])
    error = (packed_logits.detach()[0, 23:64].float() - b_logits[0].float()).abs().max()
    assert error < 3e-2  # bf16 rounding of two different kernels
    assert (crossing[0, 23:64].float() - b_logits[0].float()).abs().max() > 10 * error
    packed_logits[0, 23:64].float().sum().backward()
    assert flex.layers["0"].attention.wq.weight.grad.abs().sum() > 0


def test_block_mask_against_loops():
    document_ids = torch.tensor([[0] * 5 + [1] * 130 + [2] * 9, [0] * 144])
    mask = document_mask(document_ids)
    from torch.nn.attention.flex_attention import create_mask

    dense = create_mask(mask.mask_mod, 2, None, 144, 144, device="cpu")[:, 0]
    for b in range(2):
        ids = document_ids[b].tolist()
        reference = torch.tensor([[k <= q and ids[k] == ids[q] for k in range(144)] for q in range(144)])
        assert torch.equal(dense[b], reference)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_function_against_masked_softmax():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 40, 16, generator=generator, dtype=torch.float64).float()
    k, v = (torch.randn(1, 2, 40, 16, generator=generator).float() for _ in range(2))
    document_ids = torch.tensor([[0] * 15 + [1] * 25])
    with torch.no_grad():
        out = flex_document_attention(q, k, v, None, document_mask(document_ids))
    # Reference in float64: explicit scores, -inf outside the document-causal mask, GQA by repetition.
    k64, v64 = k.double().repeat_interleave(2, dim=1), v.double().repeat_interleave(2, dim=1)
    scores = q.double() @ k64.transpose(-1, -2) / 4.0
    ids = document_ids[0]
    allowed = (ids[:, None] == ids[None, :]) & torch.ones(40, 40, dtype=torch.bool).tril()
    reference = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v64
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-5)


class SlowLoader:
    """Wraps a loader and sleeps before each batch: a data-bound run."""

    def __init__(self, loader, seconds):
        self.loader, self.seconds = loader, seconds

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.seconds)
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def test_training_loop_with_document_mask_and_data_wait_warning(tmp_path, monkeypatch, capfd):
    real_build = train_module.build_dataloader
    monkeypatch.setattr(train_module, "build_dataloader", lambda *args: SlowLoader(real_build(*args), 0.3))
    config = load_config(None, [
        "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1",
        "--model.intermediate_size", "64", "--model.attention", "flex", "--model.positions", "document",
        "--training.seq_len", "64", "--training.micro_batch_size", "2", "--training.global_batch_tokens", "128",
        "--training.steps", "3", "--metrics.log_freq", "1", "--data.default_num_documents", "200",
        "--data.num_workers", "1", "--metrics.enable_tensorboard", "false", "--job.dump_folder", str(tmp_path)])
    history = train_module.train(config)
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)
    assert history[-1]["data_wait_fraction"] > 0.05
    log = capfd.readouterr().err  # titanlite's log handler writes to stderr
    assert "data loading took" in log and "raise data.num_workers (now 1)" in log
