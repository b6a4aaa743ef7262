"""The training loss: token cross-entropy summed per sample, and the count of tokens it covers.

Labels equal to IGNORE_INDEX (the prediction of a document's first token from the EOS before it,
see data.py) add nothing to the loss and are not counted. The loop divides the summed loss of
every micro-batch by the valid tokens of the whole global batch (see train.train_step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titanlite.model.attention import document_mask

IGNORE_INDEX = -100  # label value that the loss skips


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (batch, seq, vocab), labels (batch, seq) -> summed token losses per sample, fp32 (batch,)."""
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1),
                                   reduction="none", ignore_index=IGNORE_INDEX)
    return token_losses.view(labels.shape).sum(dim=1)


def valid_tokens_per_sample(labels: torch.Tensor) -> torch.Tensor:
    """labels (batch, seq) -> labelled tokens of each sample (batch,), int64."""
    return (labels != IGNORE_INDEX).sum(dim=1)


def batch_sample_losses(model, batch: dict, autocast, loss_fn=cross_entropy_per_sample) -> torch.Tensor:
    """The model's summed token losses of each sample of `batch` (batch,), fp32; the forward runs under
    `autocast`. Call inside the loss context (loss_parallel under TP): the logits stay vocab-sharded."""
    mask = document_mask(batch["document_ids"]) if "document_ids" in batch else None
    with autocast:
        logits = model(batch["input_ids"], positions=batch.get("positions"), mask=mask)
    sample_losses = loss_fn(logits, batch["labels"])
    return sample_losses.full_tensor() if hasattr(sample_losses, "full_tensor") else sample_losses  # TP: replicated
