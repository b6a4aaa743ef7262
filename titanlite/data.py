"""Training data: packed rows of seq_len + 1 tokens, in a seeded global order, split across DP ranks.

Sources (data.source):
  "default"          the generated corpus (titanlite/corpus.py), tokenized and packed in memory;
  a prepared folder  Parquet shards + manifest.json from `python -m titanlite.prepare`;
  anything else      a raw `datasets` source (hub id, file, folder, glob), tokenized and packed in
                     memory at start-up by prepare's packer (titanlite/prepare.py): small runs only.
A row source has `shard_rows` (rows per shard), `name`, and `load(shard)` -> int32 (rows, seq_len + 1).

The global order: epoch e visits the shards in an order seeded by (seed, e), and the rows of each
shard in an order seeded by (seed, e, shard). Each micro-step consumes the next
micro_batch x dp_degree rows of that order and rank r takes slice r, so ranks read disjoint rows
and TP peers (same dp_rank) get identical batches. The only state is the *global* row cursor:
a run resumes on any number of DP ranks at the same next sample, repeating and skipping nothing
(a micro-step that does not fit in the rest of an epoch starts the next epoch instead).

I/O: the rows of one micro-step mostly lie in one shard, so every rank (and every worker) reads
each shard whole and keeps the rows it needs: DP x W times the dataset is read over an epoch.
At training rates that is a few MB/s per worker, for a loader with no coordination at all.
"""

from __future__ import annotations

import functools
import logging
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from titanlite import prepare
from titanlite.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.documents import EXTENSION_FORMATS, DataError, iter_tokenized, resolve_files
from titanlite.loss import IGNORE_INDEX
from titanlite.settings import Config
from titanlite.tokenizer import Tokenizer, check_vocab_compatible

logger = logging.getLogger("titanlite")
ON_THE_FLY_MAX_TOKENS = 1 << 28  # raw sources tokenized at start-up: ~1 GiB of int32 per rank at most


# --- row sources ---------------------------------------------------------------------------------

class InMemoryRows:
    def __init__(self, rows: np.ndarray, name: str):
        self.rows, self.name, self.shard_rows = rows, name, [len(rows)]

    def load(self, shard: int) -> np.ndarray:
        return self.rows


class ShardedRows:
    """The shards listed in a prepared folder's manifest (checked by prepare.read_manifest), read whole."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.row_length, self.name = folder, manifest["row_length"], str(folder)
        self.shards = manifest["shards"]
        self.shard_rows = [shard["rows"] for shard in self.shards]

    def load(self, shard: int) -> np.ndarray:
        path = self.folder / self.shards[shard]["path"]
        # ~50 ms per 64 MiB shard, once per shard per worker: corrupt bytes never become silent garbage.
        if prepare.file_sha256(path) != self.shards[shard]["sha256"]:
            raise DataError(f"shard {path}: checksum differs from {self.folder / prepare.MANIFEST}: the file is "
                            "corrupt or was modified; re-run the same titanlite.prepare command to rewrite it")
        try:
            column = pq.read_table(path, columns=["tokens"]).column("tokens").combine_chunks()
            rows = column.flatten().to_numpy().reshape(-1, self.row_length)
        except (pa.ArrowException, OSError, ValueError, KeyError) as error:
            raise DataError(f"shard {path} cannot be read ({type(error).__name__}: {error}): it is corrupt or "
                            "truncated; re-run the same titanlite.prepare command to rewrite it") from error
        if len(rows) != self.shard_rows[shard]:
            raise DataError(f"shard {path} has {len(rows)} rows, the manifest says {self.shard_rows[shard]}: "
                            "re-run the same titanlite.prepare command")
        return rows


def _find_source(config: Config, tokenizer: Tokenizer | None) -> tuple[str, object]:
    """data.source -> ("default", None) | ("prepared", manifest) | ("raw", local files, [] for a hub id).

    Cheap (no shard or document is read); DataError names data.source or the file, and the fix.
    """
    source, seq_len = config.data.source, config.training.seq_len
    if source == "default":
        return "default", None
    folder = Path(source).expanduser()
    manifest_path = folder / prepare.MANIFEST
    if manifest_path.exists():
        manifest = prepare.read_manifest(folder)
        if tokenizer is not None:
            check_vocab_compatible(tokenizer, manifest["settings"]["tokenizer_fingerprint"],
                                   f"dataset manifest {manifest_path}")
            # The fingerprint covers the token table, not which token ends a document (a tokenizer.json
            # takes its EOS from tokenizer_config.json): labels and document masks follow the EOS.
            if manifest.get("eos_id", tokenizer.eos_id) != tokenizer.eos_id:
                raise DataError(f"{manifest_path} marks document ends with EOS id {manifest['eos_id']} but tokenizer.path="
                                f"{config.tokenizer.path} has EOS id {tokenizer.eos_id}: use the tokenizer (and its "
                                "tokenizer_config.json) the data was prepared with, or re-run titanlite.prepare")
        if manifest["seq_len"] != seq_len:
            raise DataError(f"{manifest_path} was prepared with seq_len {manifest['seq_len']} but training.seq_len="
                            f"{seq_len}: set training.seq_len={manifest['seq_len']} or re-run titanlite.prepare "
                            f"with --seq-len {seq_len}")
        return "prepared", manifest
    if (folder / prepare.STATE).exists():
        raise DataError(f"data.source={source}: the preparation there is unfinished (no manifest.json): re-run "
                        "the same titanlite.prepare command; it resumes")
    if folder.is_dir() and not any(p.suffix in EXTENSION_FORMATS for p in folder.rglob("*")):
        raise DataError(f"data.source={source}: folder has neither manifest.json nor raw data files: run "
                        f"python -m titanlite.prepare --source RAW_DATA --output {source} --seq-len {seq_len}")
    return "raw", resolve_files(source, key="data.source")


def check_data_source(config: Config, tokenizer: Tokenizer | None = None) -> None:
    """Refuse a data.source that cannot be used, before any model is built: a missing path, an
    unfinished or empty folder, a manifest that is unreadable, inconsistent, for another seq_len
    (or, given `tokenizer`, another tokenizer), a listed shard missing or of the wrong size.
    Raises DataError (TokenizerError for the tokenizer) with one line naming the culprit and the fix."""
    _find_source(config, tokenizer)


def build_rows(config: Config, tokenizer: Tokenizer) -> InMemoryRows | ShardedRows:
    """The row source for data.source (see the module docstring)."""
    kind, found = _find_source(config, tokenizer)
    source, row_length = config.data.source, config.training.seq_len + 1
    if kind == "prepared":
        return ShardedRows(Path(source).expanduser(), found)
    if kind == "default":
        texts = generate_documents(config.data.default_num_documents, seed=DEFAULT_CORPUS_SEED)
        return InMemoryRows(pack_texts(texts, tokenizer, row_length), f"default:{config.data.default_num_documents}")
    # a raw source: tokenize and pack now, in this process, as titanlite.prepare would
    settings = prepare.build_settings(source, tokenizer, config.training.seq_len, text_field=config.data.text_field,
                                      skip_bad_documents=config.data.skip_bad_documents, key="data.source")
    documents = iter_tokenized(settings, 1, 0, Path(config.job.dump_folder) / "datasets_cache")
    rows, counters = _pack(documents, row_length, config.data.skip_bad_documents, limit_source=source)
    logger.info("data.source=%s: %d documents -> %d rows, tokenized at start-up", source, counters.documents, len(rows))
    return InMemoryRows(rows, source)


def pack_texts(texts: list[str], tokenizer: Tokenizer, row_length: int) -> np.ndarray:
    """Texts (each followed by EOS) -> int32 rows of `row_length` tokens, by prepare's packer."""
    documents = (("text", i, i, np.asarray(tokens, np.int32))
                 for i, tokens in enumerate(tokenizer.encode_batch(texts, eos=True)))
    return _pack(documents, row_length, skip_bad_documents=False)[0]


def _pack(documents, row_length: int, skip_bad_documents: bool, limit_source: str | None = None):
    """(rows, counters) of prepare.pack over `documents`; `limit_source` caps the tokens of a raw source."""
    counters, pieces, tokens = prepare.Counters(), [], 0
    for piece in prepare.pack(documents, counters, row_length, max(1, prepare.DEFAULT_SHARD_TOKENS // row_length),
                              skip_bad_documents):
        pieces.append(piece.rows)
        tokens += piece.rows.size
        if limit_source and tokens > ON_THE_FLY_MAX_TOKENS:  # a big (e.g. streamed hub) source looks like a hang
            raise DataError(f"data.source={limit_source}: more than {ON_THE_FLY_MAX_TOKENS:,} tokens is too much to "
                            "tokenize at start-up: prepare it once with python -m titanlite.prepare and set "
                            "data.source to the output folder")
    if counters.skipped:
        logger.warning("skipped bad documents %s (data.skip_bad_documents=true)", counters.skipped)
    return (np.concatenate(pieces) if pieces else np.zeros((0, row_length), np.int32)), counters


# --- the global order --------------------------------------------------------------------------

def step_start(cursor: int, rows_per_epoch: int, rows_per_step: int) -> int:
    """Global row where the micro-step at `cursor` starts: the next epoch if it does not fit in this one."""
    epoch, offset = divmod(cursor, rows_per_epoch)
    return cursor if offset + rows_per_step <= rows_per_epoch else (epoch + 1) * rows_per_epoch


class GlobalOrder:
    """Maps a global row index to (shard, row in shard); seeded, reshuffled every epoch."""

    def __init__(self, shard_rows: list[int], seed: int, shuffle: bool):
        self.shard_rows, self.seed, self.shuffle = np.asarray(shard_rows, np.int64), seed, shuffle
        self.rows_per_epoch = int(self.shard_rows.sum())
        # What besides the seed decides which row comes when: a data position is valid only under it.
        shards = len(self.shard_rows)
        layout = f"{shards} shard{'s' * (shards != 1)} (sizes' crc32 {zlib.crc32(self.shard_rows.tobytes()):08x})"
        self.description = f"{'shuffled' if shuffle else 'in order'}, {layout}"
        self._layouts: dict = {}
        self._permutations: dict = {}

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._layouts:
            order = np.arange(len(self.shard_rows))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_rows))
            starts = np.concatenate([[0], np.cumsum(self.shard_rows[order])[:-1]])
            self._layouts = {epoch: (order, starts)}  # one epoch at a time is enough
        return self._layouts[epoch]

    def _permutation(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.clear()
            size = int(self.shard_rows[shard])
            self._permutations[key] = (np.random.default_rng([self.seed, epoch, shard]).permutation(size)
                                       if self.shuffle else np.arange(size))
        return self._permutations[key]

    def locate(self, global_rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Consecutive global rows -> [(shard, rows in shard)], in order; all in one epoch."""
        epoch = int(global_rows[0]) // self.rows_per_epoch
        offsets = global_rows - epoch * self.rows_per_epoch
        order, starts = self._layout(epoch)
        slot = np.searchsorted(starts, offsets, side="right") - 1
        pieces = []
        for s in np.unique(slot):  # consecutive offsets: slots ascend, so this keeps the order
            shard = int(order[s])
            pieces.append((shard, self._permutation(epoch, shard)[offsets[slot == s] - starts[s]]))
        return pieces


# --- micro-batches -----------------------------------------------------------------------------

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
                yield self.batch_fn(np.concatenate([self._shard(s)[rows] for s, rows in pieces]))
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


def build_dataloader(config: Config, tokenizer: Tokenizer, dp_rank: int, dp_degree: int) -> StatefulLoader:
    """This DP rank's loader: micro-batches {"input_ids", "labels"[, "positions", "document_ids"]},
    int64 (micro_batch, seq_len). TP peers pass the same dp_rank. Raises DataError for bad data."""
    rows = build_rows(config, tokenizer)
    data, micro_batch = config.data, config.training.micro_batch_size
    order = GlobalOrder(rows.shard_rows, config.training.seed, data.shuffle)
    if order.rows_per_epoch < micro_batch * dp_degree:
        raise DataError(f"data.source={data.source} has {order.rows_per_epoch} rows of {config.training.seq_len + 1} "
                        f"tokens, fewer than one global micro-step ({micro_batch} x {dp_degree} ranks): use more "
                        "data or a smaller training.micro_batch_size")

    # A partial of a module-level function: picklable, for workers started by spawn or forkserver.
    batch_fn = functools.partial(make_batch, eos_id=tokenizer.eos_id, loss_across_documents=data.loss_across_documents,
                                 document_positions=config.model.positions == "document",
                                 document_ids=config.model.attention != "sdpa")

    def make_stream(start_row: int) -> RankStream:
        return RankStream(rows, order, start_row, micro_batch, dp_rank, dp_degree, batch_fn)

    options = {"num_workers": data.num_workers, "pin_memory": data.pin_memory and torch.cuda.is_available()}
    if data.num_workers > 0:
        options["prefetch_factor"] = data.prefetch_factor
    return StatefulLoader(make_stream, options, micro_batch * dp_degree, order, rows.name)


def warn_if_data_bound(step: int, data_wait_fraction: float, config: Config, first_window: bool = False) -> bool:
    """Warn (and return True) when the loader took more than metrics.data_wait_warn_fraction of the
    steps since the last log line. The process's first log window is exempt (`first_window`, and
    always step 1): it includes starting the workers, and after a resume the checkpoint load too."""
    threshold = config.metrics.data_wait_warn_fraction
    if step <= 1 or first_window or threshold <= 0 or data_wait_fraction <= threshold:
        return False
    logger.warning(
        "data loading took %.1f%% of step time (threshold %.1f%%): the device waits for data. Remedies: raise "
        "data.num_workers (now %d) and data.prefetch_factor (now %d), keep data.pin_memory=true, put the shards on "
        "faster local storage, and prepare the data with titanlite.prepare instead of tokenizing on the fly",
        100 * data_wait_fraction, 100 * threshold, config.data.num_workers, config.data.prefetch_factor)
    return True
