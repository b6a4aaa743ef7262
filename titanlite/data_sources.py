"""Where packed rows come from (data.source): the generated corpus, prepared shards, or raw text.

A row source has `shard_rows` (rows per shard), `name`, and `load(shard)` -> int32
(rows, seq_len + 1). See titanlite/data.py for the order in which rows are read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titanlite.config import Config
from titanlite.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.prepare import file_sha256
from titanlite.tokenizer import Tokenizer, check_vocab_compatible

logger = logging.getLogger("titanlite")
ON_THE_FLY_MAX_TOKENS = 1 << 28  # raw sources tokenized at start-up: ~1 GiB of int32 per rank at most


class DataError(ValueError):
    """Data that cannot be used; the message names the file and the fix."""


class InMemoryRows:
    def __init__(self, rows: np.ndarray, name: str):
        self.rows, self.name, self.shard_rows = rows, name, [len(rows)]

    def load(self, shard: int) -> np.ndarray:
        return self.rows


class ShardedRows:
    """The shards listed in a prepared folder's manifest.json, read whole, one at a time."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.row_length, self.name = folder, manifest["row_length"], str(folder)
        self.shards = manifest["shards"]
        self.shard_rows = [shard["rows"] for shard in self.shards]
        for shard in self.shards:  # cheap checks up front: a missing or cut file fails now, not at hour 10
            path = folder / shard["path"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in {folder / 'manifest.json'} is missing: restore it or "
                                "re-run the same titanlite.prepare command")
            if path.stat().st_size != shard["bytes"]:
                raise DataError(f"shard {path} has {path.stat().st_size} bytes, the manifest says {shard['bytes']}: "
                                "it is truncated or was modified; re-run the same titanlite.prepare command")

    def load(self, shard: int) -> np.ndarray:
        path = self.folder / self.shards[shard]["path"]
        # ~50 ms per 64 MiB shard, once per shard per worker: corrupt bytes never become silent garbage.
        if file_sha256(path) != self.shards[shard]["sha256"]:
            raise DataError(f"shard {path}: checksum differs from {self.folder / 'manifest.json'}: the file is "
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


def pack_in_memory(token_lists: list[list[int]], row_length: int) -> np.ndarray:
    """Documents (each ending in EOS) -> int32 rows; the tail shorter than a row is dropped."""
    from titanlite.prepare import pack_rows

    return pack_rows([np.asarray(tokens, np.int32) for tokens in token_lists], row_length)


def open_prepared(folder: Path, config: Config, tokenizer: Tokenizer) -> ShardedRows:
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{manifest_path} cannot be read ({error}): re-run titanlite.prepare") from error
    check_vocab_compatible(tokenizer, manifest["settings"]["tokenizer_fingerprint"], f"dataset manifest {manifest_path}")
    if manifest["seq_len"] != config.training.seq_len:
        raise DataError(f"{manifest_path} was prepared with seq_len {manifest['seq_len']} but training.seq_len="
                        f"{config.training.seq_len}: set training.seq_len={manifest['seq_len']} or re-run "
                        f"titanlite.prepare with --seq-len {config.training.seq_len}")
    return ShardedRows(folder, manifest)


def build_rows(config: Config, tokenizer: Tokenizer):
    """The row source for data.source (see the module docstring)."""
    from titanlite import prepare

    source, row_length = config.data.source, config.training.seq_len + 1
    if source == "default":
        documents = generate_documents(config.data.default_num_documents, seed=DEFAULT_CORPUS_SEED)
        rows = pack_in_memory(tokenizer.encode_batch(documents, eos=True), row_length)
        return InMemoryRows(rows, f"default:{config.data.default_num_documents}")
    folder = Path(source).expanduser()
    if (folder / "manifest.json").exists():
        return open_prepared(folder, config, tokenizer)
    if (folder / prepare.STATE).exists():
        raise DataError(f"data.source={source}: the preparation there is unfinished (no manifest.json): re-run "
                        "the same titanlite.prepare command; it resumes")
    if folder.is_dir() and not any(p.suffix in prepare.EXTENSION_FORMATS for p in folder.rglob("*")):
        raise DataError(f"data.source={source}: folder has neither manifest.json nor raw data files: run "
                        f"python -m titanlite.prepare --source RAW_DATA --output {source} --seq-len {config.training.seq_len}")
    try:  # a raw source: tokenize and pack now, in this process
        settings = prepare.Settings(
            source=source, files=prepare.resolve_files(source), hub_config=None, split="train",
            text_field=config.data.text_field, tokenizer=tokenizer.name, tokenizer_fingerprint=tokenizer.fingerprint,
            seq_len=config.training.seq_len, rows_per_shard=0, skip_bad_documents=config.data.skip_bad_documents,
            max_documents=0)
        documents, skipped, total_tokens = [], {}, 0
        cache = Path(config.job.dump_folder) / "datasets_cache"
        for where, row, _, tokens in prepare.iter_tokenized(settings, 1, 0, cache):
            if isinstance(tokens, str):
                if not settings.skip_bad_documents:
                    raise DataError(f"{where} row {row}: {tokens}: fix the data, or set data.skip_bad_documents=true "
                                    "to count and skip such documents")
                skipped[tokens.split(" (")[0]] = skipped.get(tokens.split(" (")[0], 0) + 1
                continue
            documents.append(tokens)
            total_tokens += len(tokens)
            if total_tokens > ON_THE_FLY_MAX_TOKENS:  # a big (e.g. streamed hub) source would look like a hang
                raise DataError(f"data.source={source}: more than {ON_THE_FLY_MAX_TOKENS:,} tokens is too much to "
                                "tokenize at start-up: prepare it once with python -m titanlite.prepare and set "
                                "data.source to the output folder")
    except prepare.PrepareError as error:
        raise DataError(str(error)) from error
    if skipped:
        logger.warning("data.source=%s: skipped bad documents %s (data.skip_bad_documents=true)", source, skipped)
    rows = prepare.pack_rows(documents, row_length)
    logger.info("data.source=%s: %d documents -> %d rows, tokenized at start-up", source, len(documents), len(rows))
    return InMemoryRows(rows, source)
