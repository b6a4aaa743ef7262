"""Packing: tokenized documents, each ending in EOS, joined in input order into rows of seq_len + 1 tokens.

A document longer than a row continues in the next row; the tail shorter than one row is
dropped (and counted). `pack` is the one implementation of "raw text -> rows": titanlite.prepare
writes its rows to shards, and a raw or the default data.source is packed in memory at start-up
(`pack_in_memory`, `pack_texts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from titanlite.data.documents import DataError
from titanlite.data.shards import DEFAULT_SHARD_TOKENS

logger = logging.getLogger("titanlite")
ON_THE_FLY_MAX_TOKENS = 1 << 28  # raw sources tokenized at start-up: ~1 GiB of int32 per rank at most


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


def pack_in_memory(documents, row_length: int, skip_bad_documents: bool, limit_source: str | None = None):
    """(rows, counters) of `pack` over `documents`; `limit_source` (the setting naming a raw source) caps its tokens."""
    counters, pieces, tokens = Counters(), [], 0
    for piece in pack(documents, counters, row_length, max(1, DEFAULT_SHARD_TOKENS // row_length), skip_bad_documents):
        pieces.append(piece.rows)
        tokens += piece.rows.size
        if limit_source and tokens > ON_THE_FLY_MAX_TOKENS:  # a big (e.g. streamed hub) source looks like a hang
            raise DataError(f"{limit_source}: more than {ON_THE_FLY_MAX_TOKENS:,} tokens is too much to "
                            "tokenize at start-up: prepare it once with python -m titanlite.prepare and point the "
                            "setting at the output folder")
    if counters.skipped:
        logger.warning("skipped bad documents %s (data.skip_bad_documents=true)", counters.skipped)
    return (np.concatenate(pieces) if pieces else np.zeros((0, row_length), np.int32)), counters


def pack_texts(texts: list[str], tokenizer, row_length: int) -> np.ndarray:
    """Texts (each followed by EOS) -> int32 rows of `row_length` tokens."""
    documents = (("text", i, i, np.asarray(tokens, np.int32))
                 for i, tokens in enumerate(tokenizer.encode_batch(texts, eos=True)))
    return pack_in_memory(documents, row_length, skip_bad_documents=False)[0]
