"""Where the training rows come from: data.source found and checked, then read as rows of seq_len + 1 tokens.

Sources (data.source; validation.source the same way):
  "default"          the generated corpus (data/corpus.py), tokenized and packed in memory;
  a prepared folder  Parquet shards + manifest.json from `python -m titanlite.prepare` (data/shards.py);
  anything else      a raw `datasets` source (hub id, file, folder, glob), tokenized and packed in
                     memory at start-up (data/documents.py, data/packing.py): small runs only.
`find_source` looks at the setting once, before any model is built (no shard or document is
read); `build_rows` reads what it found. A row source has `shard_rows` (rows per shard), `name`,
and `load(shard)` -> int32 (rows, seq_len + 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titanlite.config.settings import Data
from titanlite.data.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.data.documents import (EXTENSION_FORMATS, DataError, build_settings, iter_tokenized, resolve_files)
from titanlite.data.packing import pack_in_memory, pack_texts
from titanlite.data.shards import (MANIFEST, STATE, default_rows_per_shard, file_sha256, read_manifest)
from titanlite.data.tokenizer import Tokenizer, check_vocab_compatible

logger = logging.getLogger("titanlite")


@dataclass(frozen=True)
class Source:
    """A data setting, found: "default", a "prepared" folder (with its checked manifest), or "raw" files."""

    key: str  # the setting, for messages: data.source or validation.source
    value: str  # as given
    kind: str  # default | prepared | raw
    manifest: dict | None = None
    files: list[str] = field(default_factory=list)  # raw: the local files ([] for a hub id)


def find_source(value: str, seq_len: int, tokenizer: Tokenizer | None = None, key: str = "data.source") -> Source:
    """The source `value` names, checked: a missing path, an unfinished or empty folder, a manifest
    that is unreadable, inconsistent, for another seq_len (or, given `tokenizer`, another tokenizer)
    or lists a missing or cut shard raises DataError (TokenizerError for the tokenizer), one line
    naming the culprit and the fix. Cheap: no shard or document is read."""
    if value == "default":
        return Source(key, value, "default")
    folder = Path(value).expanduser()
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        manifest = read_manifest(folder)
        if tokenizer is not None:
            check_vocab_compatible(tokenizer, manifest["settings"]["tokenizer_fingerprint"],
                                   f"dataset manifest {manifest_path}")
            # The fingerprint covers the token table, not which token ends a document (a tokenizer.json
            # takes its EOS from tokenizer_config.json): labels and document masks follow the EOS.
            if manifest.get("eos_id", tokenizer.eos_id) != tokenizer.eos_id:
                raise DataError(f"{manifest_path} marks document ends with EOS id {manifest['eos_id']} but tokenizer.path="
                                f"{tokenizer.name} has EOS id {tokenizer.eos_id}: use the tokenizer (and its "
                                "tokenizer_config.json) the data was prepared with, or re-run titanlite.prepare")
        if manifest["seq_len"] != seq_len:
            raise DataError(f"{manifest_path} was prepared with seq_len {manifest['seq_len']} but training.seq_len="
                            f"{seq_len}: set training.seq_len={manifest['seq_len']} or re-run titanlite.prepare "
                            f"with --seq-len {seq_len}")
        return Source(key, value, "prepared", manifest=manifest)
    if (folder / STATE).exists():
        raise DataError(f"{key}={value}: the preparation there is unfinished (no manifest.json): re-run "
                        "the same titanlite.prepare command; it resumes")
    if folder.is_dir() and not any(p.suffix in EXTENSION_FORMATS for p in folder.rglob("*")):
        raise DataError(f"{key}={value}: folder has neither manifest.json nor raw data files: run "
                        f"python -m titanlite.prepare --source RAW_DATA --output {value} --seq-len {seq_len}")
    return Source(key, value, "raw", files=resolve_files(value, key=key))


# --- row sources ---------------------------------------------------------------------------------

class InMemoryRows:
    def __init__(self, rows: np.ndarray, name: str):
        self.rows, self.name, self.shard_rows = rows, name, [len(rows)]

    def load(self, shard: int) -> np.ndarray:
        return self.rows


class ShardedRows:
    """The shards listed in a prepared folder's manifest (checked by shards.read_manifest), read whole."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.row_length, self.name = folder, manifest["row_length"], str(folder)
        self.shards = manifest["shards"]
        self.shard_rows = [shard["rows"] for shard in self.shards]

    def load(self, shard: int) -> np.ndarray:
        path = self.folder / self.shards[shard]["path"]
        # ~50 ms per 64 MiB shard, once per shard per worker: corrupt bytes never become silent garbage.
        if file_sha256(path) != self.shards[shard]["sha256"]:
            raise DataError(f"shard {path}: checksum differs from {self.folder / MANIFEST}: the file is "
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


def build_rows(source: Source, settings: Data, seq_len: int, tokenizer: Tokenizer,
               cache_dir: Path) -> InMemoryRows | ShardedRows:
    """The rows of a found source. settings: data.default_num_documents (default), text_field and
    skip_bad_documents (raw); cache_dir: where `datasets` may write its lock files (raw)."""
    row_length = seq_len + 1
    if source.kind == "prepared":
        return ShardedRows(Path(source.value).expanduser(), source.manifest)
    if source.kind == "default":
        texts = generate_documents(settings.default_num_documents, seed=DEFAULT_CORPUS_SEED)
        return InMemoryRows(pack_texts(texts, tokenizer, row_length), f"default:{settings.default_num_documents}")
    # a raw source: tokenize and pack now, in this process, as titanlite.prepare would
    preparation = build_settings(source.value, tokenizer, seq_len, default_rows_per_shard(seq_len), files=source.files,
                                 text_field=settings.text_field, skip_bad_documents=settings.skip_bad_documents,
                                 key=source.key)
    documents = iter_tokenized(preparation, 1, 0, cache_dir)
    rows, counters = pack_in_memory(documents, row_length, settings.skip_bad_documents,
                                    limit_source=f"{source.key}={source.value}")
    logger.info("%s=%s: %d documents -> %d rows, tokenized at start-up", source.key, source.value,
                counters.documents, len(rows))
    return InMemoryRows(rows, source.value)
