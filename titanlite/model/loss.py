"""The training loss: token cross-entropy summed per sample, and the count of tokens it covers.

Labels equal to IGNORE_INDEX (the prediction of a document's first token from the EOS before it,
see data.py) add nothing to the loss and are not counted. The loop divides the summed loss of
every micro-batch by the valid tokens of the whole global batch (see train.train_step).

Two ways to the loss:
  - logits: the model returns the logits of the whole micro-batch (batch, seq, vocab), then
    `cross_entropy_per_sample`. Under tensor parallelism the logits stay vocab-sharded for loss_parallel.
  - chunked (`ChunkedHeadLoss`, training.loss_chunk_tokens > 0, one GPU or FSDP): the model's head gets
    the labels and runs `head_cross_entropy`: logits, loss and their gradients a chunk of tokens at a
    time. At the 7B shape, seq 4096, micro-batch 4, the logits are 16,384 x 128,256: 4 GB in bf16 and
    8 GB in fp32; a chunk of 4,096 tokens holds 1 GB of bf16 logits and 1 GB of their gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titanlite.model.attention import document_mask
from titanlite.model.matmul import accumulate_matmul

IGNORE_INDEX = -100  # label value that the loss skips


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (batch, seq, vocab), labels (batch, seq) -> summed token losses per sample, fp32 (batch,)."""
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1),
                                   reduction="none", ignore_index=IGNORE_INDEX)
    return token_losses.view(labels.shape).sum(dim=1)


def valid_tokens_per_sample(labels: torch.Tensor) -> torch.Tensor:
    """labels (batch, seq) -> labelled tokens of each sample (batch,), int64."""
    return (labels != IGNORE_INDEX).sum(dim=1)


@dataclass(frozen=True)
class ChunkedHeadLoss:
    """The loss computed inside the model's head, `chunk_tokens` tokens at a time (no full logits)."""

    chunk_tokens: int


def batch_losses(model, batch: dict, autocast, loss_fn=cross_entropy_per_sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token losses of `batch`, a differentiable fp32 scalar; each sample's summed losses (batch,), fp32).

    loss_fn: a function of (logits, labels) (cross_entropy_per_sample, maybe compiled), or a
    ChunkedHeadLoss. The forward runs under `autocast`. Call inside the loss context (loss_parallel
    under TP): the logits stay vocab-sharded.
    """
    mask = document_mask(batch["document_ids"]) if "document_ids" in batch else None
    if isinstance(loss_fn, ChunkedHeadLoss):
        with autocast:
            return model(batch["input_ids"], positions=batch.get("positions"), mask=mask, labels=batch["labels"],
                         loss_chunk_tokens=loss_fn.chunk_tokens)
    with autocast:
        logits = model(batch["input_ids"], positions=batch.get("positions"), mask=mask)
    sample_losses = loss_fn(logits, batch["labels"])
    if hasattr(sample_losses, "full_tensor"):  # TP: replicated
        sample_losses = sample_losses.full_tensor()
    return sample_losses.sum(), sample_losses


# --- the chunked head + cross-entropy

def token_losses_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (tokens, vocab), labels (tokens,) -> (token losses fp32 (tokens,), d(their sum)/d logits
    in logits' dtype). Softmax in fp32 (or wider); ignored labels: loss 0, gradient 0. On CUDA it runs
    compiled: one pass for the log-sum-exp and one that writes the gradient, no fp32 copy in memory."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_norm = torch.logsumexp(wide, dim=-1, keepdim=True)
    valid = (labels != IGNORE_INDEX).unsqueeze(-1)
    target = labels.clamp(min=0).unsqueeze(-1)
    losses = torch.where(valid, log_norm - wide.gather(-1, target), 0.0).squeeze(-1)
    classes = torch.arange(wide.shape[-1], device=wide.device)
    grad = torch.where(valid, torch.exp(wide - log_norm) - (classes == target).to(wide.dtype), 0.0)
    return losses, grad.to(logits.dtype)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """As token_losses_and_grad, the losses alone (evaluation: no gradient wanted)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide, labels, reduction="none", ignore_index=IGNORE_INDEX)


_compiled: dict = {}


def _kernel(fn, device: torch.device):
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight.T against labels, chunk by chunk along the tokens.

    The forward computes the gradients as it goes (each chunk's logits gradient is used at once for
    its share of d/d hidden and its addition to d/d weight, then dropped): the head's three matmuls,
    as without chunks, and no recomputation. The backward only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, compute_dtype: torch.dtype):
        tokens = hidden.shape[0]
        chunks = max(1, math.ceil(tokens / chunk_tokens))
        chunk = math.ceil(tokens / chunks)  # equal chunks: one compiled shape
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            h = hidden.to(compute_dtype)
            losses = torch.empty(tokens, dtype=torch.promote_types(compute_dtype, torch.float32), device=h.device)
            grad_hidden = torch.empty_like(h) if want_hidden else None
            grad_weight = None
            grad_dtype = torch.promote_types(weight.dtype, torch.float32)
            for start in range(0, tokens, chunk):
                end = min(start + chunk, tokens)
                logits = h[start:end] @ w.t()
                if not (want_hidden or want_weight):
                    losses[start:end] = _kernel(token_losses, h.device)(logits, labels[start:end])
                    continue
                losses[start:end], grad_logits = _kernel(token_losses_and_grad, h.device)(logits, labels[start:end])
                del logits
                if want_hidden:
                    torch.mm(grad_logits, w, out=grad_hidden[start:end])
                if want_weight:
                    grad_weight = accumulate_matmul(grad_weight, grad_logits.t(), h[start:end], grad_dtype)
                del grad_logits  # before the next chunk's logits: one chunk's gradient alive, not two
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, _grad_losses):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_sum).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_sum).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (batch, seq, dim), weight (vocab, dim), labels (batch, seq) -> (summed token losses, a
    differentiable fp32 scalar; per-sample sums (batch,), fp32, not differentiable); chunk_tokens 0: one chunk.

    The matmuls run in autocast's dtype when autocast is on (bf16 on CUDA), else in hidden's dtype;
    the softmax in fp32; d/d weight is summed over the chunks in fp32. Only the summed loss carries
    a gradient: d/d weight adds every sample's share in the forward, before any per-sample weight
    could be known.
    """
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden.dtype)
    tokens = hidden.flatten(0, 1)
    total, losses = _HeadCrossEntropy.apply(tokens, weight, labels.flatten(0, 1), chunk_tokens or len(tokens),
                                            compute_dtype)
    return total, losses.view(labels.shape).sum(dim=1)
