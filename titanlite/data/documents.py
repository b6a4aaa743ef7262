"""Raw documents: read with `datasets`, checked, tokenized (for titanlite.prepare and raw data.source runs).

The source is anything Hugging Face `datasets` reads: a hub id (streamed), or local
json/jsonl/parquet/text files (a file, a folder, or a glob; read in sorted order). A json/jsonl
or parquet row is one document (its text field); a .txt/.text file is one document, whole.
Every document is checked (a string, not empty, valid UTF-8) and becomes int32 token ids
followed by EOS; tokenizing runs in worker processes, and the results come back in input order.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from titanlite.data.tokenizer import Tokenizer, build_tokenizer

EXTENSION_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
CHUNK_DOCUMENTS = 256  # documents per task sent to a tokenizer worker


class DataError(ValueError):
    """Data that cannot be used (raw documents, a preparation, shards); the message names the file
    (and row) and the fix."""


@dataclass
class Settings:
    """What to read and how to pack it: everything that determines a preparation's bytes (a resumed
    or repeated titanlite.prepare must match it exactly)."""

    source: str
    files: list[str]  # resolved local files, or [] for a hub dataset
    hub_config: str | None
    split: str
    text_field: str
    tokenizer: str
    tokenizer_fingerprint: str
    seq_len: int
    rows_per_shard: int
    skip_bad_documents: bool
    max_documents: int  # 0 = all


def build_settings(source: str, tokenizer: Tokenizer, seq_len: int, rows_per_shard: int, *,
                   files: list[str] | None = None, text_field: str = "text", skip_bad_documents: bool = False,
                   hub_config: str | None = None, split: str = "train", max_documents: int = 0,
                   key: str = "--source") -> Settings:
    """Settings to pack `source` into rows of seq_len + 1 tokens, `rows_per_shard` rows a shard.
    files: `source`'s local files if already found (resolve_files), else they are found here."""
    return Settings(source=source, files=resolve_files(source, key) if files is None else files,
                    hub_config=hub_config, split=split, text_field=text_field, tokenizer=tokenizer.name,
                    tokenizer_fingerprint=tokenizer.fingerprint, seq_len=seq_len, rows_per_shard=rows_per_shard,
                    skip_bad_documents=skip_bad_documents, max_documents=max_documents)


# --- reading documents -------------------------------------------------------------------------

def resolve_files(source: str, key: str = "--source") -> list[str]:
    """Local files for `source` (a file, a folder searched recursively, or a glob); [] for a hub id.
    A value starting with . / ~, ending in a data file's extension, or whose first folder exists
    here is a local path, never a hub id. `key` names the setting in error messages (--source, data.source)."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in EXTENSION_FORMATS and p.is_file()]
        if not files:
            raise DataError(f"{key}={source}: folder has no {'/'.join(EXTENSION_FORMATS)} files: "
                            "point it at the data files")
    elif any(ch in source for ch in "*?["):
        files = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
        if not files:
            raise DataError(f"{key}={source}: the pattern matches no file: check the pattern")
    elif source.startswith((".", "/", "~")) or path.suffix in EXTENSION_FORMATS or (
            path.parts and Path(path.parts[0]).exists()):
        # data/fw_prepared with data/ here is a mistyped path: taken for a hub id, it costs ~30 s of retries
        raise DataError(f"{key}={source}: no such file or folder: check the path")
    else:
        return []  # a hub id
    for file in files:
        if file.suffix not in EXTENSION_FORMATS:
            raise DataError(f"{file}: unknown extension; known: {', '.join(EXTENSION_FORMATS)}")
    return sorted(str(file) for file in files)


def _first_invalid_utf8(file: str) -> str | None:
    """'line N, byte B' of the first invalid UTF-8 in a text file, or None."""
    with open(file, "rb") as handle:
        for line_number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"line {line_number}, byte {error.start}"
    return None


def iter_texts(settings: Settings, cache_dir: Path) -> Iterator[tuple[str, int, object]]:
    """(file or hub id, row within it, text) for every document, in a fixed order.

    `cache_dir`: where `datasets` may write its lock files (streaming writes no data there).
    """
    import datasets  # slow import: only here, not in the tokenizer workers

    datasets.logging.set_verbosity_error()
    if not settings.files:
        try:
            dataset = datasets.load_dataset(settings.source, settings.hub_config, split=settings.split,
                                            streaming=True, cache_dir=str(cache_dir))
        except Exception as error:
            raise DataError(f"data source {settings.source}: not a local file and the hub dataset cannot be "
                            f"opened ({type(error).__name__}: {error})") from error
        for row, record in enumerate(dataset):
            yield settings.source, row, _text_of(record, settings.text_field, settings.source, row)
        return
    for file in settings.files:
        builder = EXTENSION_FORMATS[Path(file).suffix]
        # A text file is one document: read by line, every line would be one, and a blank line an
        # empty document (paragraphs, code and man pages are full of them).
        options = {"sample_by": "document"} if builder == "text" else {}
        field = "text" if builder == "text" else settings.text_field  # the text builder's one column
        if os.path.getsize(file) == 0:  # `datasets` fails on it with a bare StopIteration
            if settings.skip_bad_documents:
                continue
            raise DataError(f"{file}: empty file (0 bytes, no documents): remove it from the source, or skip it "
                            "with the bad documents (titanlite.prepare --skip-bad-documents; "
                            "data.skip_bad_documents=true for a raw data.source)")
        row = -1
        try:
            dataset = datasets.load_dataset(builder, data_files=[file], split="train", streaming=True,
                                            cache_dir=str(cache_dir), **options)
            for row, record in enumerate(dataset):
                yield file, row, _text_of(record, field, file, row)
        except DataError:
            raise
        except Exception as error:
            where = _first_invalid_utf8(file) if builder in ("json", "text") else None
            if where:
                raise DataError(f"{file}: invalid UTF-8 at {where}: re-encode the file "
                                "(e.g. iconv -f latin1 -t utf-8) or remove that line") from error
            raise DataError(f"{file}: cannot be read as {builder} after {row + 1} good rows "
                            f"({type(error).__name__}: {error}): fix or remove the file") from error


def _text_of(record: dict, field: str, where: str, row: int) -> object:
    if field not in record:
        raise DataError(f"{where} document {row + 1}: no field {field!r} (fields: {sorted(record)}): "
                        "pass --text-field (data.text_field)")
    return record[field]


def document_problem(text: object) -> str | None:
    """Why `text` cannot be a training document (None if it can)."""
    if text is None:
        return "no text (null)"
    if not isinstance(text, str):
        return f"not a string ({type(text).__name__})"
    if not text or text.isspace():
        return "empty document"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"invalid UTF-8 (unpaired surrogate at character {error.start})"
    return None


# --- tokenizing (in worker processes) ----------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(tokenizer_path)


def tokenize_chunk(texts: list, tokenizer: Tokenizer | None = None) -> list[np.ndarray | str]:
    """Each text -> int32 token ids followed by EOS, or a string saying why it is not a document."""
    tokenizer = tokenizer or _worker_tokenizer
    out: list[np.ndarray | str] = []
    for text in texts:
        problem = document_problem(text)
        if problem:
            out.append(problem)
        else:
            out.append(np.array(tokenizer.encoding.encode_ordinary(text) + [tokenizer.eos_id], dtype=np.int32))
    return out


def iter_tokenized(settings: Settings, workers: int, start_document: int,
                   cache_dir: Path) -> Iterator[tuple[str, int, int, object]]:
    """(file, row, input index, tokens or problem) from `start_document` on, in input order.

    At most 4 chunks per worker are in flight: a streamed source is never read ahead unboundedly.
    """
    def chunks() -> Iterator[tuple[list, list]]:
        places, texts = [], []
        for index, (where, row, text) in enumerate(iter_texts(settings, cache_dir)):
            if settings.max_documents and index >= settings.max_documents:
                break
            if index < start_document:
                continue
            places.append((where, row, index))
            texts.append(text)
            if len(texts) == CHUNK_DOCUMENTS:
                yield places, texts
                places, texts = [], []
        if texts:
            yield places, texts

    if workers <= 1:
        tokenizer = build_tokenizer(settings.tokenizer)
        for places, texts in chunks():
            yield from ((*place, result) for place, result in zip(places, tokenize_chunk(texts, tokenizer)))
        return
    # spawn, not fork: the parent may hold threads (datasets, tiktoken) that fork would break.
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (settings.tokenizer,)) as pool:
        pending: deque = deque()
        for places, texts in chunks():
            pending.append((places, pool.apply_async(tokenize_chunk, (texts,))))
            if len(pending) >= 4 * workers:
                places_done, result = pending.popleft()
                yield from ((*place, tokens) for place, tokens in zip(places_done, result.get()))
        while pending:
            places_done, result = pending.popleft()
            yield from ((*place, tokens) for place, tokens in zip(places_done, result.get()))
