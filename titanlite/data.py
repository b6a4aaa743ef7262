"""Training data: packed rows of seq_len + 1 tokens, split across data-parallel ranks.

Walking-skeleton version: the generated default corpus is tokenized in memory and packed.
The loader keeps one *global* cursor (rows consumed by all ranks together), so a run can
resume on a different number of data-parallel ranks without repeating or skipping rows.
"""

from __future__ import annotations

from typing import Iterator

import torch

from titanlite.config import Config
from titanlite.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value that the loss skips


def pack_documents(documents: list[list[int]], eos_id: int, row_length: int) -> torch.Tensor:
    """Join documents with EOS after each one and cut the stream into rows of `row_length` tokens.

    The tail that does not fill a whole row is dropped. Returns int32 (rows, row_length).
    """
    stream = [token for document in documents for token in (*document, eos_id)]
    rows = len(stream) // row_length
    return torch.tensor(stream[: rows * row_length], dtype=torch.int32).view(rows, row_length)


class PackedLoader:
    """Yields micro-batches {"input_ids", "labels"} (micro_batch, seq_len) int64 for one DP rank.

    Each micro-step consumes `micro_batch x dp_degree` consecutive rows of the epoch's global
    order; rank r takes its slice r. Epoch e is ordered by a permutation seeded with (seed, e).
    """

    def __init__(self, rows: torch.Tensor, micro_batch_size: int, dp_rank: int, dp_degree: int,
                 seed: int, shuffle: bool):
        if rows.shape[0] < micro_batch_size * dp_degree:
            raise ValueError(f"dataset has {rows.shape[0]} rows, fewer than one global micro-step "
                             f"({micro_batch_size} x {dp_degree} ranks): use more data or a smaller batch")
        self.rows, self.micro_batch_size, self.dp_rank, self.dp_degree = rows, micro_batch_size, dp_rank, dp_degree
        self.seed, self.shuffle = seed, shuffle
        self.global_row = 0  # rows consumed by all ranks together, over all epochs

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.rows.shape[0])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.rows.shape[0], generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows_per_step = self.micro_batch_size * self.dp_degree
        while True:
            epoch, offset = divmod(self.global_row, self.rows.shape[0])
            if offset + rows_per_step > self.rows.shape[0]:  # an incomplete global step ends the epoch
                self.global_row = (epoch + 1) * self.rows.shape[0]
                continue
            start = offset + self.dp_rank * self.micro_batch_size
            indices = self._order(epoch)[start: start + self.micro_batch_size]
            self.global_row += rows_per_step
            batch = self.rows[indices].long()
            yield {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}

    def state_dict(self) -> dict:
        return {"global_row": self.global_row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.global_row = int(state["global_row"])


def build_dataloader(config: Config, tokenizer: Tokenizer, dp_rank: int, dp_degree: int) -> PackedLoader:
    if config.data.source != "default":
        raise ValueError(f"data.source={config.data.source!r}: only 'default' exists in this version")
    documents = tokenizer.encode_batch(generate_documents(config.data.default_num_documents, seed=DEFAULT_CORPUS_SEED))
    rows = pack_documents(documents, tokenizer.eos_id, config.training.seq_len + 1)
    return PackedLoader(rows, config.training.micro_batch_size, dp_rank, dp_degree,
                        config.training.seed, config.data.shuffle)
