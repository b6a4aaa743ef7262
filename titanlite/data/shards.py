"""Prepared data on disk: Parquet shards of packed rows and the manifest.json that lists them.

A shard `shard_00000.parquet` has one Parquet row per packed row:
  tokens          fixed_size_list<int32>[seq_len + 1]
  first_document  int64: input index of the document the row's first token belongs to
  first_position  int32: that token's position inside its document (0: a document starts the row)
Inside a row, document boundaries are the EOS tokens (text never encodes to EOS), so the loader
rebuilds document ids and positions from the tokens alone. manifest.json lists every shard with
its rows, bytes and sha256, and the settings the data was prepared with (titanlite/prepare.py
writes both; the loader reads them, data/sources.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titanlite.data.documents import DataError

FORMAT_VERSION = 1
MANIFEST, STATE = "manifest.json", "prepare_state.json"
DEFAULT_SHARD_TOKENS = 1 << 24  # ~64 MiB of int32 per shard: loader workers hold one shard each


def default_rows_per_shard(seq_len: int) -> int:
    """Rows of seq_len + 1 tokens in a shard of ~DEFAULT_SHARD_TOKENS tokens."""
    return max(1, DEFAULT_SHARD_TOKENS // (seq_len + 1))


def write_shard(path: Path, rows: np.ndarray, first_document: np.ndarray, first_position: np.ndarray) -> str:
    """Write one shard atomically (temp file, then rename); returns its sha256 hex."""
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.int32()), rows.shape[1])
    table = pa.table({"tokens": tokens, "first_document": pa.array(first_document, pa.int64()),
                      "first_position": pa.array(first_position, pa.int32())})
    temporary = path.with_suffix(".parquet.tmp")
    pq.write_table(table, temporary, compression="zstd", use_dictionary=False, write_statistics=False,
                   row_group_size=1024)
    os.replace(temporary, path)
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(files: list[str], source: str, hub_config: str | None, split: str) -> dict:
    """What identifies the raw data, recorded in manifest.json and prepare_state.json: each local
    file's size, mtime and sha256 (whole files are hashed: a path says nothing of what it holds
    now); a hub dataset's id, configuration and split."""
    if not files:
        return {"hub": {"id": source, "config": hub_config, "split": split}}
    return {"files": {file: {"bytes": os.stat(file).st_size, "mtime_ns": os.stat(file).st_mtime_ns,
                             "sha256": file_sha256(Path(file))} for file in files}}


def source_change(recorded: dict | None, current: dict) -> str | None:
    """How the data of a recorded fingerprint differs from `current`, naming the first changed
    file; None if it does not, or if nothing was recorded (a preparation by an older titanlite).
    Only the bytes count: a file touched or copied (a new mtime) still holds the same rows."""
    if recorded is None or recorded.get("hub") != current.get("hub"):
        return None if recorded is None else f"hub dataset {recorded.get('hub')} -> {current.get('hub')}"
    before = recorded.get("files", {})
    for file, now in current.get("files", {}).items():
        then = before.get(file)
        if then is None:
            return f"{file} was not part of it"
        if then.get("bytes") != now["bytes"]:
            return f"{file} changed since: {then.get('bytes')} -> {now['bytes']} bytes"
        if then.get("sha256") != now["sha256"]:
            return f"{file} changed since: same size, other content"
    return None


def write_json(path: Path, value: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_manifest(folder: Path) -> dict:
    """A finished preparation's manifest, checked against itself and the shard files' sizes (cheap:
    no shard is read); DataError names the file and the fix."""
    path = folder / MANIFEST
    redo = f"prepare the data again (python -m titanlite.prepare --output {folder} --overwrite)"
    try:
        manifest = json.loads(path.read_text())
        # Every key the loader reads, looked up now: a KeyError at hour 10 is no error message.
        row_length, seq_len = int(manifest["row_length"]), int(manifest["seq_len"])
        shards = [(folder / s["path"], int(s["bytes"]), int(s["rows"]), str(s["sha256"])) for s in manifest["shards"]]
        str(manifest["settings"]["tokenizer_fingerprint"])
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} cannot be read ({error}): {redo}") from error
    except KeyError as error:
        raise DataError(f"{path} lacks {error} (it was not written by titanlite.prepare, or was edited): "
                        f"{redo}") from error
    except (TypeError, ValueError) as error:
        raise DataError(f"{path} holds a malformed value ({error}): {redo}") from error
    if row_length != seq_len + 1:  # rows hold seq_len inputs and one more label
        raise DataError(f"{path} is inconsistent: row_length {row_length} but seq_len {seq_len} (rows hold "
                        f"seq_len + 1 tokens): it was edited or is damaged; {redo}")
    for shard, size, _, _ in shards:  # a missing or cut file fails now, not at hour 10
        if not shard.is_file():
            raise DataError(f"shard {shard} listed in {path} is missing: restore it or re-run the same "
                            "titanlite.prepare command")
        if shard.stat().st_size != size:
            raise DataError(f"shard {shard} has {shard.stat().st_size} bytes, the manifest says {size}: it is "
                            "truncated or was modified; re-run the same titanlite.prepare command")
    return manifest
