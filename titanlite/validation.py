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

import dataclasses
import functools
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from titanlite.resolve import Run
from titanlite.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.data import DataError, GlobalOrder, InMemoryRows, RankStream, build_rows, make_batch, pack_texts
from titanlite.loss import batch_sample_losses, valid_tokens_per_sample
from titanlite.settings import Config
from titanlite.tokenizer import Tokenizer

logger = logging.getLogger("titanlite")


def held_out_rows(config: Config, tokenizer: Tokenizer, rows_needed: int) -> InMemoryRows:
    """Rows of generated documents that are not training documents, at least `rows_needed` of them."""
    trained = config.data.default_num_documents
    training_texts = set(generate_documents(trained, seed=DEFAULT_CORPUS_SEED))
    extra = max(64, rows_needed)
    while True:  # documents are ~100 tokens to a few thousand: grow the draw until the rows suffice
        texts = [text for text in generate_documents(trained + extra, seed=DEFAULT_CORPUS_SEED)[trained:]
                 if text not in training_texts]
        rows = pack_texts(texts, tokenizer, config.training.seq_len + 1)
        if len(rows) >= rows_needed:
            return InMemoryRows(rows[:rows_needed], f"default:held-out-after-{trained}")
        extra *= 2


def build_validation_rows(run: Run, tokenizer: Tokenizer):
    """The held-out rows for one evaluation; DataError when the source cannot give them."""
    config, settings = run.config, run.config.validation
    rows_needed = settings.steps * run.tokens_per_step // config.training.seq_len
    if settings.source == "default":
        if config.data.source != "default":
            raise DataError(f"validation.source=default holds out part of the generated corpus, but data.source="
                            f"{config.data.source}: set validation.source to a prepared folder of held-out data")
        return held_out_rows(config, tokenizer, rows_needed)
    if Path(settings.source).expanduser().resolve() == Path(config.data.source).expanduser().resolve():
        raise DataError(f"validation.source={settings.source} is the training data (data.source): validate on "
                        "held-out data, e.g. a separate titanlite.prepare output")
    try:
        rows = build_rows(dataclasses.replace(config, data=dataclasses.replace(config.data, source=settings.source)),
                          tokenizer)
    except DataError as error:  # build_rows names the setting it reads: here that is validation.source
        raise DataError(str(error).replace("data.source=", "validation.source=")) from None
    if sum(rows.shard_rows) < rows_needed:
        raise DataError(f"validation.source={settings.source} has {sum(rows.shard_rows):,} rows; validation.steps="
                        f"{settings.steps} needs {rows_needed:,}: lower validation.steps or add held-out data")
    return rows


class Validator:
    """Evaluates the validation loss of the model on this rank's share of the held-out rows."""

    def __init__(self, run: Run, tokenizer: Tokenizer, dp_rank: int, reduce_group=None):
        config = run.config
        self.settings, self.total_steps, self.reduce_group = config.validation, run.total_steps, reduce_group
        self.micro_steps = config.validation.steps * run.grad_accum_steps
        rows = build_validation_rows(run, tokenizer)
        batch_fn = functools.partial(make_batch, eos_id=tokenizer.eos_id,
                                     loss_across_documents=config.data.loss_across_documents,
                                     document_positions=config.model.positions == "document",
                                     document_ids=config.model.attention != "sdpa")
        # Unshuffled, from row 0: every evaluation sees the same rows in the same order.
        self.stream = RankStream(rows, GlobalOrder(rows.shard_rows, 0, shuffle=False), 0,
                                 config.training.micro_batch_size, dp_rank, run.data_parallel_degree, batch_fn)

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
                sample_losses = batch_sample_losses(model, batch, autocast, loss_fn)
            summed[0] += sample_losses.double().sum()
            summed[1] += valid_tokens_per_sample(batch["labels"]).sum()
        if self.reduce_group is not None:
            dist.all_reduce(summed, group=self.reduce_group)
        loss, tokens = summed.tolist()  # host sync: validation steps only
        loss = loss / max(tokens, 1.0)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": int(tokens)}
