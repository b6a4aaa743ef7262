"""The per-rank loader: micro-batches of this data-parallel rank's rows, in the global order, resumable.

Each micro-step consumes the next micro_batch x dp_degree rows of the global order (data/order.py)
and rank r takes slice r, so ranks read disjoint rows and TP peers (same dp_rank) get identical
batches. The loader's state is the global row cursor.

I/O: the rows of one micro-step mostly lie in one shard, so every rank (and every worker) reads
each shard whole and keeps the rows it needs: DP x W times the dataset is read over an epoch.
At training rates that is a few MB/s per worker, for a loader with no coordination at all.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from titanlite.config.settings import Data
from titanlite.data.documents import DataError
from titanlite.data.order import GlobalOrder, step_start
from titanlite.model.loss import IGNORE_INDEX

logger = logging.getLogger("titanlite")


def make_batch(rows: np.ndarray, eos_id: int, loss_across_documents: bool, document_positions: bool,
               document_ids: bool) -> dict[str, torch.Tensor]:
    """int32 rows (batch, seq_len + 1) -> int64 (batch, seq_len) tensors.

    input_ids, labels (next tokens; IGNORE_INDEX where the input is EOS, i.e. the prediction of
    the next document's first token, unless `loss_across_documents`); document_ids (0, 1, ...
    within the row; a document starts after each EOS); positions (restart at 0 per document).
    """
    tokens = torch.from_numpy(rows.astype(np.int64))
    # clone, not contiguous(): for one row both slices are already "contiguous" views of the same
    # memory, and masking the labels would then overwrite the inputs.
    inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    is_eos = inputs == eos_id
    if not loss_across_documents:
        labels[is_eos] = IGNORE_INDEX
    batch = {"input_ids": inputs, "labels": labels}
    starts_document = F.pad(is_eos[:, :-1], (1, 0))
    if document_ids:
        batch["document_ids"] = starts_document.long().cumsum(1)
    if document_positions:
        index = torch.arange(inputs.shape[1]).expand_as(inputs)
        batch["positions"] = index - torch.where(starts_document, index, 0).cummax(1).values
    return batch


def batch_maker(eos_id: int, loss_across_documents: bool, document_ids: bool,
                document_positions: bool) -> Callable[[np.ndarray], dict]:
    """`make_batch` with this run's fields (Run.document_ids, Run.document_positions): a partial of a
    module-level function, picklable for workers started by spawn or forkserver."""
    return functools.partial(make_batch, eos_id=eos_id, loss_across_documents=loss_across_documents,
                             document_positions=document_positions, document_ids=document_ids)


class RankStream(IterableDataset):
    """This rank's micro-batches from global row `start_row` on, forever (epochs repeat).

    With DataLoader workers, worker w yields micro-batches w, w + W, ...; the DataLoader takes them
    round-robin, so the rank still sees exactly the global order.
    """

    def __init__(self, rows, order: GlobalOrder, start_row: int, micro_batch_size: int, dp_rank: int,
                 dp_degree: int, batch_fn: Callable[[np.ndarray], dict]):
        self.rows, self.order, self.start_row, self.batch_fn = rows, order, start_row, batch_fn
        self.micro_batch_size, self.dp_rank, self.rows_per_step = micro_batch_size, dp_rank, micro_batch_size * dp_degree
        self._cache: dict[int, np.ndarray] = {}

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._cache:
            if len(self._cache) >= 2:  # a micro-step spans at most two shards
                self._cache.pop(next(iter(self._cache)))
            self._cache[shard] = self.rows.load(shard)
        return self._cache[shard]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cursor, index = self.start_row, 0
        while True:
            start = step_start(cursor, self.order.rows_per_epoch, self.rows_per_step)
            cursor = start + self.rows_per_step
            if index % workers == worker:
                first = start + self.dp_rank * self.micro_batch_size
                pieces = self.order.locate(np.arange(first, first + self.micro_batch_size, dtype=np.int64))
                try:
                    batch = self.batch_fn(np.concatenate([self._shard(s)[rows] for s, rows in pieces]))
                except DataError as error:
                    if info is None:
                        raise
                    # Raised in a worker, torch would wrap it in the worker's traceback; handed over
                    # as an item, the main process raises it with its own one line.
                    yield error
                    return
                yield batch
            index += 1


class StatefulLoader:
    """Iterable of micro-batches with state_dict()/load_state_dict() holding the global row cursor.

    The cursor counts rows handed to the training loop, not rows prefetched by workers; loading a
    state while iterating restarts the workers at the new cursor.
    """

    def __init__(self, make_stream: Callable[[int], RankStream], loader_options: dict, rows_per_step: int,
                 order: GlobalOrder, dataset_name: str):
        self.make_stream, self.loader_options, self.rows_per_step = make_stream, loader_options, rows_per_step
        self.rows_per_epoch, self.seed, self.order = order.rows_per_epoch, order.seed, order.description
        self.dataset_name = dataset_name
        self.global_row = 0  # rows consumed by all ranks together, over all epochs
        self._generation = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            generation = self._generation
            for batch in DataLoader(self.make_stream(self.global_row), batch_size=None, **self.loader_options):
                if isinstance(batch, DataError):  # a worker's (RankStream)
                    raise DataError(str(batch)) from None
                if generation != self._generation:
                    break  # load_state_dict() moved the cursor: restart the workers there
                self.global_row = step_start(self.global_row, self.rows_per_epoch, self.rows_per_step) + self.rows_per_step
                yield batch

    @property
    def epoch(self) -> int:
        return self.global_row // self.rows_per_epoch

    def state_dict(self) -> dict:
        return {"global_row": self.global_row, "seed": self.seed, "rows_per_epoch": self.rows_per_epoch,
                "order": self.order, "dataset": self.dataset_name}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed or int(state["rows_per_epoch"]) != self.rows_per_epoch:
            raise DataError(
                f"the checkpoint's data position is for seed {int(state['seed'])} over {int(state['rows_per_epoch'])} rows "
                f"({state.get('dataset')}), this run has seed {self.seed} over {self.rows_per_epoch} rows "
                f"({self.dataset_name}): use the same training.seed and data, or start without resuming")
        if state["order"] != self.order:
            raise DataError(
                f"the checkpoint's data position is for rows {state['order']} ({state.get('dataset')}), this run's are "
                f"{self.order} ({self.dataset_name}): the same rows in another order would repeat some and skip others; "
                "resume with the same data.shuffle and the same prepared shards, or start without resuming")
        self.global_row = int(state["global_row"])
        self._generation += 1


def build_dataloader(rows, settings: Data, micro_batch_size: int, seed: int, dp_rank: int, dp_degree: int,
                     to_batch: Callable[[np.ndarray], dict]) -> StatefulLoader:
    """This DP rank's loader over `rows` (data/sources.py): micro-batches of `to_batch` (`batch_maker`),
    {"input_ids", "labels"[, "positions", "document_ids"]}, int64 (micro_batch, seq_len). TP peers
    pass the same dp_rank. settings: shuffle and the DataLoader's workers. Raises DataError for bad data."""
    order = GlobalOrder(rows.shard_rows, seed, settings.shuffle)
    if order.rows_per_epoch < micro_batch_size * dp_degree:
        raise DataError(f"{rows.name} has {order.rows_per_epoch} rows, fewer than one global micro-step "
                        f"({micro_batch_size} x {dp_degree} ranks): use more data or a smaller "
                        "training.micro_batch_size")

    def make_stream(start_row: int) -> RankStream:
        return RankStream(rows, order, start_row, micro_batch_size, dp_rank, dp_degree, to_batch)

    options = {"num_workers": settings.num_workers, "pin_memory": settings.pin_memory and torch.cuda.is_available()}
    if settings.num_workers > 0:
        options["prefetch_factor"] = settings.prefetch_factor
    return StatefulLoader(make_stream, options, micro_batch_size * dp_degree, order, rows.name)


def warn_if_data_bound(step: int, data_wait_fraction: float, threshold: float, settings: Data,
                       first_window: bool = False) -> bool:
    """Warn (and return True) when the loader took more than metrics.data_wait_warn_fraction of the
    steps since the last log line (threshold: metrics.data_wait_warn_fraction). The process's first log window is exempt (`first_window`, and
    always step 1): it includes starting the workers, and after a resume the checkpoint load too."""
    if step <= 1 or first_window or threshold <= 0 or data_wait_fraction <= threshold:
        return False
    logger.warning(
        "data loading took %.1f%% of step time (threshold %.1f%%): the device waits for data. Remedies: raise "
        "data.num_workers (now %d) and data.prefetch_factor (now %d), keep data.pin_memory=true, put the shards on "
        "faster local storage, and prepare the data with titanlite.prepare instead of tokenizing on the fly",
        100 * data_wait_fraction, 100 * threshold, settings.num_workers, settings.prefetch_factor)
    return True
