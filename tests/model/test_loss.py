"""The chunked output head + cross-entropy against the whole-logits loss in float64."""

import torch

from titanlite.model.loss import IGNORE_INDEX, head_cross_entropy


def reference(hidden, weight, labels):
    """Per-sample summed losses, d(sum)/d hidden and d(sum)/d weight, all in float64."""
    hidden, weight = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    token_losses = torch.nn.functional.cross_entropy((hidden @ weight.t()).flatten(0, 1), labels.flatten(),
                                                     reduction="none", ignore_index=IGNORE_INDEX)
    sample_losses = token_losses.view(labels.shape).sum(dim=1)
    sample_losses.sum().backward()
    return sample_losses.detach(), hidden.grad, weight.grad


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def draw(batch=3, seq=10, dim=16, vocab=50, dtype=torch.float32):
    hidden = torch.randn(batch, seq, dim, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, dim, dtype=dtype) * dim ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, 0] = labels[-1, 5] = IGNORE_INDEX  # skipped tokens: no loss, no gradient
    return hidden, weight, labels


def test_chunked_head_matches_float64_reference():
    for chunk_tokens in (1, 7, 30, 1000, 0):  # one token, uneven chunks, one chunk per sample, one chunk (twice)
        hidden, weight, labels = draw()
        want_losses, want_hidden, want_weight = reference(hidden, weight, labels)
        total, sample_losses = head_cross_entropy(hidden, weight, labels, chunk_tokens)
        (total * 0.25).backward()  # the incoming gradient scales both gradients
        assert relative_error(sample_losses, want_losses) < 1e-6
        assert abs(total.item() - want_losses.sum().item()) < 1e-5 * want_losses.sum().item()
        assert relative_error(hidden.grad, 0.25 * want_hidden) < 1e-6
        assert relative_error(weight.grad, 0.25 * want_weight) < 1e-6
        assert not sample_losses.requires_grad


def test_chunked_head_float64_is_exact_and_ignored_tokens_get_no_gradient():
    hidden, weight, labels = draw(dtype=torch.float64)
    want_losses, want_hidden, want_weight = reference(hidden, weight, labels)
    total, sample_losses = head_cross_entropy(hidden, weight, labels, 4)
    total.backward()
    assert relative_error(sample_losses, want_losses) < 1e-12
    assert relative_error(hidden.grad, want_hidden) < 1e-12
    assert relative_error(weight.grad, want_weight) < 1e-12
    assert hidden.grad[0, 0].abs().max() == 0 and hidden.grad[-1, 5].abs().max() == 0


def test_chunked_head_under_bf16_autocast_is_within_bf16_rounding():
    hidden, weight, labels = draw(batch=2, seq=64, dim=64, vocab=300)
    want_losses, want_hidden, want_weight = reference(hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, sample_losses = head_cross_entropy(hidden, weight, labels, 48)
    total.backward()
    assert sample_losses.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert relative_error(sample_losses, want_losses) < 1e-2
    assert relative_error(hidden.grad, want_hidden) < 2e-2
    assert relative_error(weight.grad, want_weight) < 2e-2


def test_chunked_head_without_gradients_returns_the_losses():
    hidden, weight, labels = draw()
    want_losses, _, _ = reference(hidden, weight, labels)
    with torch.no_grad():
        total, sample_losses = head_cross_entropy(hidden, weight, labels, 7)
    assert relative_error(sample_losses, want_losses) < 1e-6 and not total.requires_grad


def test_model_with_labels_matches_the_logits_path():
    """batch_losses through the model's chunked head: loss and every parameter's gradient as the logits path."""
    import contextlib

    from titanlite.config.settings import Model
    from titanlite.model.loss import ChunkedHeadLoss, batch_losses, cross_entropy_per_sample
    from titanlite.model.transformer import build_model

    model = build_model(Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=300),
                        32, device="cpu")
    model.init_weights(0)
    model.double()
    model.init_rope()
    batch = {"input_ids": torch.randint(0, 300, (2, 32)), "labels": torch.randint(0, 300, (2, 32))}
    grads, totals = [], []
    for loss_fn in (ChunkedHeadLoss(20), cross_entropy_per_sample):
        total, _ = batch_losses(model, batch, contextlib.nullcontext(), loss_fn)
        total.backward()
        totals.append(total.item())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        model.zero_grad()
    assert abs(totals[0] - totals[1]) < 1e-6 * totals[1]  # the logits path's loss is fp32
    for name, grad in grads[1].items():
        assert relative_error(grads[0][name], grad) < 1e-6, name
