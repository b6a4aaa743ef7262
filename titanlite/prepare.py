"""Pre-tokenization: raw text -> packed Parquet shards + manifest.json, once, before training.

    python -m titanlite.prepare --source 'raw/*.jsonl' --output data/prepared --seq-len 4096 --workers 16
    titanlite-prepare --source HuggingFaceFW/fineweb-edu --hub-config sample-10BT --output data/fw ...

The source is anything Hugging Face `datasets` reads: a hub id (streamed), or local
json/jsonl/parquet/text files (a file, a folder, or a glob; read in sorted order). Worker
processes tokenize chunks of documents; the main process packs them, in input order, into rows
of seq_len + 1 tokens: every document is followed by EOS, and a document longer than a row
continues in the next row. The tail shorter than one row is dropped (and counted).

A shard `shard_00000.parquet` has one Parquet row per packed row:
  tokens          fixed_size_list<int32>[seq_len + 1]
  first_document  int64: input index of the document the row's first token belongs to
  first_position  int32: that token's position inside its document (0: a document starts the row)
Inside a row, document boundaries are the EOS tokens (text never encodes to EOS), so the loader
rebuilds document ids and positions from the tokens alone.

Same input and settings give byte-identical shards and manifest, whatever --workers is. After
each shard, `prepare_state.json` records where the input stands; an interrupted run resumes
there and keeps finished shards whose checksum still matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titanlite.text_source import (EXTENSION_FORMATS, PrepareError, Settings, document_problem,  # noqa: F401
                                   iter_tokenized, resolve_files, tokenize_chunk)
from titanlite.tokenizer import TokenizerError, build_tokenizer

FORMAT_VERSION = 1
MANIFEST, STATE = "manifest.json", "prepare_state.json"
DEFAULT_SHARD_TOKENS = 1 << 24  # ~64 MiB of int32 per shard: loader workers hold one shard each


@dataclass
class Counters:
    documents: int = 0  # documents packed (wholly or partly)
    skipped: dict = field(default_factory=dict)  # reason -> count (only with skip_bad_documents)


# --- packing and writing -----------------------------------------------------------------------

def pack_rows(token_arrays: list[np.ndarray], row_length: int) -> np.ndarray:
    """Concatenate documents (each already ending in EOS) and cut into rows; drops the tail."""
    stream = np.concatenate(token_arrays) if token_arrays else np.zeros(0, np.int32)
    rows = len(stream) // row_length
    return stream[: rows * row_length].reshape(rows, row_length)


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


def _finished_shards(output: Path, settings: Settings) -> tuple[list[dict], dict]:
    """(finished shards, resume point) from prepare_state.json, keeping the shards up to the first
    one that is missing or whose checksum no longer matches."""
    fresh = {"next_document": 0, "next_token_offset": 0, "counters": asdict(Counters())}
    state_path = output / STATE
    if not state_path.exists():
        return [], fresh
    state = json.loads(state_path.read_text())
    if state["settings"] != asdict(settings):
        raise PrepareError(f"{state_path}: {output} holds a preparation with other settings: use a new "
                           "--output folder, or delete that folder to start over")
    shards = []
    for shard in state["shards"]:
        path = output / shard["path"]
        if not path.exists() or file_sha256(path) != shard["sha256"]:
            break
        shards.append(shard)
    return shards, (shards[-1]["resume"] if shards else fresh)


def prepare(settings: Settings, output: Path, workers: int = 1, progress: bool = True) -> dict:
    """Tokenize and pack `settings.source` into `output`; returns the manifest (see module docstring)."""
    from tqdm import tqdm

    tokenizer = build_tokenizer(settings.tokenizer)
    if tokenizer.fingerprint != settings.tokenizer_fingerprint:
        raise PrepareError(f"tokenizer {settings.tokenizer} changed while preparing: use the same file")
    output.mkdir(parents=True, exist_ok=True)
    row_length = settings.seq_len + 1
    shard_tokens = settings.rows_per_shard * row_length
    if (output / MANIFEST).exists():  # finished before: done if it is the same preparation and intact
        manifest = json.loads((output / MANIFEST).read_text())
        if manifest.get("settings") == asdict(settings) and all(
                (output / s["path"]).exists() and file_sha256(output / s["path"]) == s["sha256"]
                for s in manifest["shards"]):
            return manifest
    shards, resume = _finished_shards(output, settings)
    (output / MANIFEST).unlink(missing_ok=True)  # a manifest exists only for a complete preparation
    counters = Counters(**resume["counters"])
    # The stream starts at a shard boundary; the first document may begin before it.
    stream_start = sum(s["rows"] for s in shards) * row_length  # global token offset of pending[0]
    pending, pending_tokens = [], 0
    doc_index, doc_start = [], []  # documents in the pending window: input index, global start offset
    skipped_window: list[tuple[int, str]] = []
    bar = tqdm(unit="doc", unit_scale=True, disable=not progress, dynamic_ncols=True,
               desc=f"resuming at shard {len(shards)}" if shards else "tokenizing")
    started, tokens_seen = time.perf_counter(), 0

    def flush(rows_count: int) -> None:
        nonlocal stream_start, pending, pending_tokens, doc_index, doc_start, skipped_window
        shard_index = len(shards)
        stream = np.concatenate(pending)
        rows = stream[: rows_count * row_length].reshape(rows_count, row_length)
        row_starts = stream_start + row_length * np.arange(rows_count, dtype=np.int64)
        owner = np.searchsorted(np.asarray(doc_start, np.int64), row_starts, side="right") - 1
        first_document = np.asarray(doc_index, np.int64)[owner]
        first_position = (row_starts - np.asarray(doc_start, np.int64)[owner]).astype(np.int32)
        path = output / f"shard_{shard_index:05d}.parquet"
        sha = write_shard(path, rows, first_document, first_position)
        shard = {"path": path.name, "rows": rows_count, "sha256": sha, "bytes": path.stat().st_size}
        shards.append(shard)
        stream_start += rows_count * row_length
        pending = [stream[rows_count * row_length:]]
        pending_tokens = len(pending[0])
        keep = max(0, int(np.searchsorted(np.asarray(doc_start), stream_start, side="right")) - 1)
        doc_index, doc_start = doc_index[keep:], doc_start[keep:]
        # Resume point: the document holding the next unwritten token (it and all later input
        # rows are read again on resume, so the counters leave them out).
        next_document = doc_index[0]
        skipped_before = dict(counters.skipped)
        for index, reason in skipped_window:
            if index >= next_document:
                skipped_before[reason] -= 1
        skipped_window = [(i, r) for i, r in skipped_window if i >= next_document]
        shard["resume"] = {"next_document": next_document, "next_token_offset": int(stream_start - doc_start[0]),
                           "counters": {"documents": counters.documents - len(doc_index),
                                        "skipped": {k: v for k, v in skipped_before.items() if v}}}
        _write_json(output / STATE, {"settings": asdict(settings), "shards": shards})

    first = resume["next_document"] or 0
    for where, row, index, tokens in iter_tokenized(settings, workers, first, output / ".cache"):
        if isinstance(tokens, str):
            if not settings.skip_bad_documents:
                raise PrepareError(f"{where} row {row}: {tokens}: remove or fix it, or pass "
                                   "--skip-bad-documents to count and skip such documents")
            reason = tokens.split(" (")[0]
            counters.skipped[reason] = counters.skipped.get(reason, 0) + 1
            skipped_window.append((index, reason))
            continue
        offset = resume["next_token_offset"] if index == first else 0
        doc_index.append(index)
        doc_start.append(stream_start + pending_tokens - offset)
        pending.append(tokens[offset:])
        pending_tokens += len(tokens) - offset
        counters.documents += 1
        tokens_seen += len(tokens) - offset
        bar.update(1)
        if bar.n % 1000 == 0:
            bar.set_postfix_str(f"{tokens_seen / (time.perf_counter() - started):,.0f} tok/s")
        while pending_tokens >= shard_tokens:
            flush(settings.rows_per_shard)
    bar.close()
    if pending_tokens >= row_length:
        flush(pending_tokens // row_length)
    if not shards:
        raise PrepareError(f"--source {settings.source}: fewer than seq_len + 1 = {row_length} tokens in "
                           f"{counters.documents} documents: add data or lower --seq-len")
    manifest = {
        "format_version": FORMAT_VERSION, "settings": asdict(settings), "seq_len": settings.seq_len,
        "row_length": row_length, "eos_id": tokenizer.eos_id,
        "num_rows": sum(s["rows"] for s in shards), "num_tokens": sum(s["rows"] for s in shards) * row_length,
        "num_documents": counters.documents, "skipped_documents": counters.skipped,
        "dropped_tail_tokens": pending_tokens,
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
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        tokenizer_path, seq_len = args.tokenizer, args.seq_len
        if args.config:
            from titanlite.config import load_config  # imports torch-free config only
            config = load_config(args.config)
            tokenizer_path, seq_len = tokenizer_path or config.tokenizer.path, seq_len or config.training.seq_len
        if not seq_len or seq_len < 1:
            raise PrepareError("--seq-len is required (or --config): the training sequence length in tokens")
        tokenizer = build_tokenizer(tokenizer_path or "default")
        settings = Settings(
            source=args.source, files=resolve_files(args.source), hub_config=args.hub_config, split=args.split,
            text_field=args.text_field, tokenizer=tokenizer.name, tokenizer_fingerprint=tokenizer.fingerprint,
            seq_len=seq_len, rows_per_shard=args.rows_per_shard or max(1, DEFAULT_SHARD_TOKENS // (seq_len + 1)),
            skip_bad_documents=args.skip_bad_documents, max_documents=args.max_documents)
        manifest = prepare(settings, Path(args.output), args.workers, progress=not args.no_progress)
    except (PrepareError, TokenizerError, ValueError) as error:
        print(f"titanlite-prepare: error: {error}", file=sys.stderr)
        sys.exit(2)
    skipped = f", skipped {manifest['skipped_documents']}" if manifest["skipped_documents"] else ""
    print(f"prepared {manifest['num_documents']:,} documents -> {manifest['num_rows']:,} rows of "
          f"{manifest['row_length']} tokens in {len(manifest['shards'])} shards{skipped}: {args.output}")


if __name__ == "__main__":
    main()
