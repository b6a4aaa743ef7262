"""Validation loss on held-out data: the same tokens on every layout, evaluated every N steps and at the end.

`[validation]` sets where the rows come from and how many: each evaluation runs `validation.steps`
global batches of training.global_batch_tokens tokens, split over the data-parallel ranks and
micro-batches exactly as a training step is, in a fixed order from the first held-out row. So
DP 1 or 64, with or without TP, evaluates the same tokens, and val_loss (the mean over every
labelled token, summed over all ranks) is the same number up to float rounding.

Sources:
  "default"         held-out documents of the generated corpus: the ones generate_documents draws
                    after the training ones, leaving out any text that is also a training document
                    (needs data.source = "default");
  a prepared folder shards from `titanlite.prepare`, never the training data itself.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from titanlite.config.settings import Data, Validation
from titanlite.data.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.data.documents import DataError
from titanlite.data.loader import RankStream
from titanlite.data.order import GlobalOrder
from titanlite.data.packing import pack_texts
from titanlite.data.sources import InMemoryRows, build_rows, find_source
from titanlite.data.tokenizer import Tokenizer
from titanlite.model.loss import batch_losses, valid_tokens_per_sample

logger = logging.getLogger("titanlite")


def held_out_rows(trained_documents: int, tokenizer: Tokenizer, seq_len: int, rows_needed: int) -> InMemoryRows:
    """Rows of generated documents that are not among the first `trained_documents` (the training
    corpus), at least `rows_needed` of them."""
    trained = trained_documents
    training_texts = set(generate_documents(trained, seed=DEFAULT_CORPUS_SEED))
    extra = max(64, rows_needed)
    while True:  # documents are ~100 tokens to a few thousand: grow the draw until the rows suffice
        texts = [text for text in generate_documents(trained + extra, seed=DEFAULT_CORPUS_SEED)[trained:]
                 if text not in training_texts]
        rows = pack_texts(texts, tokenizer, seq_len + 1)
        if len(rows) >= rows_needed:
            return InMemoryRows(rows[:rows_needed], f"default:held-out-after-{trained}")
        extra *= 2


def build_validation_rows(settings: Validation, data: Data, tokenizer: Tokenizer, seq_len: int, rows_needed: int,
                          cache_dir: Path):
    """The held-out rows for one evaluation (`rows_needed` of seq_len + 1 tokens); DataError when the
    source cannot give them. data: the training data's settings (never validated on)."""
    if settings.source == "default":
        if data.source != "default":
            raise DataError(f"validation.source=default holds out part of the generated corpus, but data.source="
                            f"{data.source}: set validation.source to a prepared folder of held-out data")
        return held_out_rows(data.default_num_documents, tokenizer, seq_len, rows_needed)
    if Path(settings.source).expanduser().resolve() == Path(data.source).expanduser().resolve():
        raise DataError(f"validation.source={settings.source} is the training data (data.source): validate on "
                        "held-out data, e.g. a separate titanlite.prepare output")
    source = find_source(settings.source, seq_len, tokenizer, key="validation.source")
    rows = build_rows(source, data, seq_len, tokenizer, cache_dir)
    if sum(rows.shard_rows) < rows_needed:
        raise DataError(f"validation.source={settings.source} has {sum(rows.shard_rows):,} rows; validation.steps="
                        f"{settings.steps} needs {rows_needed:,}: lower validation.steps or add held-out data")
    return rows


class Validator:
    """Evaluates the validation loss of the model on this rank's share of the held-out rows.

    micro_steps: micro-batches per evaluation on each rank (validation.steps x the grad-accumulation
    steps); to_batch: the training loader's rows -> micro-batch function.
    """

    def __init__(self, settings: Validation, rows, micro_steps: int, micro_batch_size: int, total_steps: int,
                 dp_rank: int, dp_degree: int, to_batch: Callable[[np.ndarray], dict], reduce_group=None):
        self.settings, self.total_steps, self.reduce_group = settings, total_steps, reduce_group
        self.micro_steps = micro_steps
        # Unshuffled, from row 0: every evaluation sees the same rows in the same order.
        self.stream = RankStream(rows, GlobalOrder(rows.shard_rows, 0, shuffle=False), 0, micro_batch_size, dp_rank,
                                 dp_degree, to_batch)

    def due(self, step: int) -> bool:
        return step == self.total_steps or (self.settings.interval > 0 and step % self.settings.interval == 0)

    @torch.no_grad()
    def evaluate(self, model, device: torch.device, autocast, loss_fn, loss_context) -> dict[str, float]:
        """{"val_loss", "val_perplexity", "val_tokens"}: mean token loss over every rank (one host sync)."""
        summed = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, labelled tokens
        batches = iter(self.stream)
        for _ in range(self.micro_steps):
            batch = {key: value.to(device, non_blocking=True) for key, value in next(batches).items()}
            with loss_context():
                summed_losses, _ = batch_losses(model, batch, autocast, loss_fn)
            summed[0] += summed_losses.double()
            summed[1] += valid_tokens_per_sample(batch["labels"]).sum()
        if self.reduce_group is not None:
            dist.all_reduce(summed, group=self.reduce_group)
        loss, tokens = summed.tolist()  # host sync: validation steps only
        loss = loss / max(tokens, 1.0)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": int(tokens)}
