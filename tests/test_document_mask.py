"""Document masking: FlexAttention block mask, per-document positions, and the training loop's use of them."""

import time

import numpy as np
import pytest
import torch

import titanlite.train as train_module
from titanlite.config import Model as ModelConfig
from titanlite.config import load_config
from titanlite.data import make_batch
from titanlite.document_mask import build_document_mask, flex_document_attention
from titanlite.model import build_model

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
        packed_logits = flex(batch["input_ids"], positions=batch["positions"], mask=batch["document_ids"])
        a_logits = alone(torch.cat([a, torch.tensor([EOS])])[None])
        b_logits = alone(torch.cat([b, torch.tensor([EOS])])[None])
        crossing = alone(batch["input_ids"])  # plain causal attention sees document A from B
    torch.testing.assert_close(packed_logits[0, :23], a_logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_logits[0, 23:64], b_logits[0], rtol=0, atol=1e-5)
    assert (crossing[0, 23:64] - b_logits[0]).abs().max() > 1e-3  # the test can tell the difference
    # Training on CPU takes the dense-mask path (FlexAttention has no CPU backward): same logits, gradients flow.
    with_grad = flex(batch["input_ids"], positions=batch["positions"], mask=batch["document_ids"])
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
    packed_logits = flex(batch["input_ids"], positions=batch["positions"], mask=batch["document_ids"])
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
    mask = build_document_mask(document_ids)
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
        out = flex_document_attention(q, k, v, None, build_document_mask(document_ids))
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
