"""Pre-tokenization: raw text -> packed Parquet shards + manifest.json, once, before training.

    python -m titanlite.prepare --source 'raw/*.jsonl' --output data/prepared --seq-len 4096 --workers 16
    titanlite-prepare --source HuggingFaceFW/fineweb-edu --hub-config sample-10BT --output data/fw ...

Documents come from titanlite/documents.py (a hub dataset, or local json/jsonl/parquet rows and
whole text files), tokenized by worker processes. `pack` joins them, in input order, into rows of
seq_len + 1 tokens: every document is followed by EOS, and a document longer than a row continues
in the next row. The tail shorter than one row is dropped (and counted). `pack` is also how a raw
or the default data.source is packed in memory at start-up (titanlite/data.py).

A shard `shard_00000.parquet` has one Parquet row per packed row:
  tokens          fixed_size_list<int32>[seq_len + 1]
  first_document  int64: input index of the document the row's first token belongs to
  first_position  int32: that token's position inside its document (0: a document starts the row)
Inside a row, document boundaries are the EOS tokens (text never encodes to EOS), so the loader
rebuilds document ids and positions from the tokens alone.

Same input and settings give byte-identical shards and manifest, whatever --workers is. After
each shard, `prepare_state.json` records where the input stands; an interrupted run resumes
there and keeps finished shards whose checksum still matches. A finished preparation is kept when
run again with the same settings, and refused with other settings unless --overwrite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titanlite.documents import DataError, Settings, iter_tokenized, resolve_files
from titanlite.tokenizer import Tokenizer, TokenizerError, build_tokenizer

FORMAT_VERSION = 1
MANIFEST, STATE = "manifest.json", "prepare_state.json"
DEFAULT_SHARD_TOKENS = 1 << 24  # ~64 MiB of int32 per shard: loader workers hold one shard each


@dataclass
class Counters:
    documents: int = 0  # documents packed (wholly or partly)
    skipped: dict = field(default_factory=dict)  # reason -> count (only with skip_bad_documents)
    dropped_tail_tokens: int = 0  # set when the input ends: the tail shorter than a row


@dataclass
class PackedRows:
    rows: np.ndarray  # int32 (n, seq_len + 1)
    first_document: np.ndarray  # int64 (n,): input index of the document of each row's first token
    first_position: np.ndarray  # int32 (n,): that token's position inside its document
    resume: dict  # where the input resumes after these rows: next_document, next_token_offset, counters


def build_settings(source: str, tokenizer: Tokenizer, seq_len: int, *, text_field: str = "text",
                   skip_bad_documents: bool = False, rows_per_shard: int = 0, hub_config: str | None = None,
                   split: str = "train", max_documents: int = 0, key: str = "--source") -> Settings:
    """Settings to pack `source` into rows of seq_len + 1 tokens; rows_per_shard 0: ~16M tokens a shard."""
    return Settings(source=source, files=resolve_files(source, key), hub_config=hub_config, split=split,
                    text_field=text_field, tokenizer=tokenizer.name, tokenizer_fingerprint=tokenizer.fingerprint,
                    seq_len=seq_len, rows_per_shard=rows_per_shard or max(1, DEFAULT_SHARD_TOKENS // (seq_len + 1)),
                    skip_bad_documents=skip_bad_documents, max_documents=max_documents)


# --- packing -------------------------------------------------------------------------------------

def pack(documents: Iterable[tuple], counters: Counters, row_length: int, rows_per_piece: int,
         skip_bad_documents: bool, stream_start: int = 0, next_document: int = 0,
         next_token_offset: int = 0) -> Iterator[PackedRows]:
    """Tokenized documents -> packed rows: the one implementation of "raw text -> rows".

    `documents`: (file, row, input index, int32 tokens ending in EOS, or why it is not a document),
    in input order (iter_tokenized's items). Yields `rows_per_piece` rows at a time, then the
    remaining whole rows; the tail shorter than a row is dropped (counters.dropped_tail_tokens).
    `counters` is updated in place. A resumed run passes the global token offset of its first row
    (`stream_start`) and its first document, which starts `next_token_offset` tokens in.
    """
    pending, pending_tokens = [], 0  # token arrays not yet in rows; pending[0] starts at stream_start
    doc_index, doc_start = [], []  # documents in the pending window: input index, global start offset
    skipped_window: list[tuple[int, str]] = []

    def cut(rows_count: int) -> PackedRows:
        nonlocal stream_start, pending, pending_tokens, doc_index, doc_start, skipped_window
        stream = np.concatenate(pending)
        rows = stream[: rows_count * row_length].reshape(rows_count, row_length)
        row_starts = stream_start + row_length * np.arange(rows_count, dtype=np.int64)
        owner = np.searchsorted(np.asarray(doc_start, np.int64), row_starts, side="right") - 1
        first_document = np.asarray(doc_index, np.int64)[owner]
        first_position = (row_starts - np.asarray(doc_start, np.int64)[owner]).astype(np.int32)
        stream_start += rows_count * row_length
        pending = [stream[rows_count * row_length:]]
        pending_tokens = len(pending[0])
        keep = max(0, int(np.searchsorted(np.asarray(doc_start), stream_start, side="right")) - 1)
        doc_index, doc_start = doc_index[keep:], doc_start[keep:]
        # Resume point: the document holding the next unwritten token (it and all later input
        # rows are read again on resume, so the counters leave them out).
        resume_document = doc_index[0]
        skipped_before = dict(counters.skipped)
        for index, reason in skipped_window:
            if index >= resume_document:
                skipped_before[reason] -= 1
        skipped_window = [(i, r) for i, r in skipped_window if i >= resume_document]
        resume = {"next_document": resume_document, "next_token_offset": int(stream_start - doc_start[0]),
                  "counters": {"documents": counters.documents - len(doc_index),
                               "skipped": {k: v for k, v in skipped_before.items() if v}}}
        return PackedRows(rows, first_document, first_position, resume)

    for where, row, index, tokens in documents:
        if isinstance(tokens, str):
            if not skip_bad_documents:
                raise DataError(f"{where} document {row + 1}: {tokens}: remove or fix it, or count and skip such documents "
                                "(titanlite.prepare --skip-bad-documents; data.skip_bad_documents=true for a raw "
                                "data.source)")
            reason = tokens.split(" (")[0]
            counters.skipped[reason] = counters.skipped.get(reason, 0) + 1
            skipped_window.append((index, reason))
            continue
        offset = next_token_offset if index == next_document else 0
        doc_index.append(index)
        doc_start.append(stream_start + pending_tokens - offset)
        pending.append(tokens[offset:])
        pending_tokens += len(tokens) - offset
        counters.documents += 1
        while pending_tokens >= rows_per_piece * row_length:
            yield cut(rows_per_piece)
    if pending_tokens >= row_length:
        yield cut(pending_tokens // row_length)
    counters.dropped_tail_tokens = pending_tokens


# --- shards and manifest -------------------------------------------------------------------------

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


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_manifest(folder: Path) -> dict:
    """A finished preparation's manifest, checked against itself and the shard files' sizes (cheap:
    no shard is read); DataError names the file and the fix."""
    path, redo = folder / MANIFEST, f"prepare the data again (titanlite.prepare --output {folder} --overwrite)"
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


def _brief(value: object) -> str:
    return f"{len(value)} files" if isinstance(value, list) else repr(value)


def _previous_preparation(output: Path, settings: Settings, overwrite: bool) -> tuple[str, dict | None]:
    """(MANIFEST or STATE, its content) for a preparation in `output` with these very settings;
    ("", None) if there is none. Another preparation there is refused, or removed with `overwrite`."""
    wanted = asdict(settings)
    for name, kind in ((MANIFEST, "a finished"), (STATE, "an unfinished")):
        path = output / name
        if not path.exists():
            continue
        try:
            recorded = json.loads(path.read_text())
            differences = ", ".join(f"{key} {_brief(recorded['settings'].get(key))} -> {_brief(value)}"
                                    for key, value in wanted.items() if recorded["settings"].get(key) != value)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            differences = f"its {name} cannot be read: {type(error).__name__}: {error}"
        if not differences:
            return name, recorded
        if not overwrite:
            raise DataError(f"{output} holds {kind} preparation with other settings ({differences}): pass "
                            "--overwrite to replace it, or choose another --output folder")
        for old in [*output.glob("shard_*.parquet"), *output.glob("shard_*.parquet.tmp"), output / MANIFEST,
                    output / STATE]:
            old.unlink(missing_ok=True)
        break
    return "", None


def _intact_shards(output: Path, shards: list[dict]) -> list[dict]:
    """The shards up to the first one that is missing or whose checksum no longer matches."""
    intact = []
    for shard in shards:
        path = output / shard["path"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            break
        intact.append(shard)
    return intact


def prepare(settings: Settings, output: Path, workers: int = 1, progress: bool = True,
            overwrite: bool = False) -> dict:
    """Tokenize and pack `settings.source` into `output`; returns the manifest (see module docstring).

    A finished preparation with the same settings is kept as it is; one with other settings is
    refused unless `overwrite`; an unfinished one with the same settings resumes.
    """
    from tqdm import tqdm

    tokenizer = build_tokenizer(settings.tokenizer)
    if tokenizer.fingerprint != settings.tokenizer_fingerprint:
        raise DataError(f"tokenizer {settings.tokenizer} changed while preparing: use the same file")
    output.mkdir(parents=True, exist_ok=True)
    kind, previous = _previous_preparation(output, settings, overwrite)
    if kind == MANIFEST:
        try:
            manifest = read_manifest(output)
        except DataError:
            manifest = None  # a damaged manifest of this same preparation: prepare it again
        if manifest and len(_intact_shards(output, manifest["shards"])) == len(manifest["shards"]):
            return manifest  # already prepared
    shards = _intact_shards(output, previous["shards"]) if kind == STATE else []
    (output / MANIFEST).unlink(missing_ok=True)  # a manifest exists only for a complete preparation
    resume = shards[-1]["resume"] if shards else {"next_document": 0, "next_token_offset": 0, "counters": {}}
    counters = Counters(**resume["counters"])
    row_length = settings.seq_len + 1
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
               desc=f"resuming at shard {len(shards)}" if shards else "tokenizing")

    def counted(documents):  # the bar counts tokens: it shows tokens/s
        for document in documents:
            bar.update(0 if isinstance(document[3], str) else len(document[3]))
            yield document

    documents = counted(iter_tokenized(settings, workers, resume["next_document"], output / ".cache"))
    for piece in pack(documents, counters, row_length, settings.rows_per_shard, settings.skip_bad_documents,
                      sum(s["rows"] for s in shards) * row_length, resume["next_document"],
                      resume["next_token_offset"]):
        path = output / f"shard_{len(shards):05d}.parquet"
        sha = write_shard(path, piece.rows, piece.first_document, piece.first_position)
        shards.append({"path": path.name, "rows": len(piece.rows), "sha256": sha, "bytes": path.stat().st_size,
                       "resume": piece.resume})
        _write_json(output / STATE, {"settings": asdict(settings), "shards": shards})
    bar.close()
    if not shards:
        raise DataError(f"--source {settings.source}: fewer than seq_len + 1 = {row_length} tokens in "
                        f"{counters.documents} documents: add data or lower --seq-len")
    manifest = {
        "format_version": FORMAT_VERSION, "settings": asdict(settings), "seq_len": settings.seq_len,
        "row_length": row_length, "eos_id": tokenizer.eos_id,
        "num_rows": sum(s["rows"] for s in shards), "num_tokens": sum(s["rows"] for s in shards) * row_length,
        "num_documents": counters.documents, "skipped_documents": counters.skipped,
        "dropped_tail_tokens": counters.dropped_tail_tokens,
        "shards": [{k: v for k, v in shard.items() if k != "resume"} for shard in shards]}
    _write_json(output / MANIFEST, manifest)
    (output / STATE).unlink(missing_ok=True)
    shutil.rmtree(output / ".cache", ignore_errors=True)  # only `datasets` lock files
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize and pack a text dataset into Parquet shards.")
    parser.add_argument("--source", required=True, help="hub dataset id, or local file / folder / glob")
    parser.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--config", help="training config: its tokenizer.path and training.seq_len are the defaults")
    parser.add_argument("--tokenizer", help="tokenizer.path (default: from --config, else 'default')")
    parser.add_argument("--seq-len", type=int, help="training.seq_len (default: from --config)")
    parser.add_argument("--hub-config", default=None, help="dataset configuration name (hub sources)")
    parser.add_argument("--split", default="train", help="split (hub sources)")
    parser.add_argument("--text-field", default="text", help="column holding the text")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--rows-per-shard", type=int, default=0, help="0: ~16M tokens per shard")
    parser.add_argument("--max-documents", type=int, default=0, help="stop after this many input rows (0: all)")
    parser.add_argument("--skip-bad-documents", action="store_true",
                        help="count and skip empty or invalid documents instead of stopping")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a preparation with other settings already in --output")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        tokenizer_path, seq_len = args.tokenizer, args.seq_len
        if args.config:
            from titanlite.config import load_config  # imports torch-free config only
            config = load_config(args.config)
            tokenizer_path, seq_len = tokenizer_path or config.tokenizer.path, seq_len or config.training.seq_len
        if not seq_len or seq_len < 1:
            raise DataError("--seq-len is required (or --config): the training sequence length in tokens")
        settings = build_settings(args.source, build_tokenizer(tokenizer_path or "default"), seq_len,
                                  text_field=args.text_field, skip_bad_documents=args.skip_bad_documents,
                                  rows_per_shard=args.rows_per_shard, hub_config=args.hub_config, split=args.split,
                                  max_documents=args.max_documents)
        manifest = prepare(settings, Path(args.output), args.workers, not args.no_progress, args.overwrite)
    except (TokenizerError, ValueError) as error:  # DataError is a ValueError
        print(f"titanlite-prepare: error: {error}", file=sys.stderr)
        sys.exit(2)
    skipped = f", skipped {manifest['skipped_documents']}" if manifest["skipped_documents"] else ""
    print(f"prepared {manifest['num_documents']:,} documents -> {manifest['num_rows']:,} rows of "
          f"{manifest['row_length']} tokens in {len(manifest['shards'])} shards{skipped}: {args.output}")


if __name__ == "__main__":
    main()
