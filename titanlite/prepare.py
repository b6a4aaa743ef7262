"""Pre-tokenization: raw text -> packed Parquet shards + manifest.json, once, before training.

    python -m titanlite.prepare --source 'raw/*.jsonl' --output data/prepared --seq-len 4096 --workers 16
    titanlite-prepare --source HuggingFaceFW/fineweb-edu --hub-config sample-10BT --output data/fw ...

Documents come from titanlite/data/documents.py (a hub dataset, or local json/jsonl/parquet rows and
whole text files), tokenized by worker processes, packed into rows of seq_len + 1 tokens
(titanlite/data/packing.py: each document followed by EOS, a document longer than a row continued
in the next, the tail shorter than a row dropped and counted) and written as Parquet shards listed
in manifest.json (the format: titanlite/data/shards.py).

Same input and settings give byte-identical shards and manifest (which records the input files'
mtimes), whatever --workers is. After
each shard, `prepare_state.json` records where the input stands; an interrupted run resumes
there and keeps finished shards whose checksum still matches. A finished preparation is kept when
run again with the same settings and source data (each file's size and sha256, recorded in
manifest.json and prepare_state.json), and refused with other settings or changed data unless
--overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from titanlite.data.documents import DataError, Settings, build_settings, iter_tokenized
from titanlite.data.packing import Counters, pack
from titanlite.data.shards import (FORMAT_VERSION, MANIFEST, STATE, default_rows_per_shard, file_sha256, read_manifest,
                                   source_change, source_fingerprint, write_json, write_shard)
from titanlite.data.tokenizer import TokenizerError, build_tokenizer
from titanlite.job.folder import why_not_writable


def _brief(value: object) -> str:
    return f"{len(value)} files" if isinstance(value, list) else repr(value)


def _previous_preparation(output: Path, settings: Settings, fingerprint: dict,
                          overwrite: bool) -> tuple[str, dict | None]:
    """(MANIFEST or STATE, its content) for a preparation in `output` with these very settings and
    source data (`fingerprint`); ("", None) if there is none. Another preparation there, or one of
    data that has changed since, is refused, or removed with `overwrite`: old and new rows never mix."""
    wanted = asdict(settings)
    for name, kind in ((MANIFEST, "a finished"), (STATE, "an unfinished")):
        path = output / name
        if not path.exists():
            continue
        changed = None
        try:
            recorded = json.loads(path.read_text())
            differences = ", ".join(f"{key} {_brief(recorded['settings'].get(key))} -> {_brief(value)}"
                                    for key, value in wanted.items() if recorded["settings"].get(key) != value)
            changed = None if differences else source_change(recorded.get("source_fingerprint"), fingerprint)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            differences = f"its {name} cannot be read: {type(error).__name__}: {error}"
        if not differences and not changed:
            return name, recorded
        if not overwrite:
            what = f"with other settings ({differences})" if differences else f"of other data ({changed})"
            raise DataError(f"{output} holds {kind} preparation {what}: pass --overwrite to replace it, or choose "
                            "another --output folder")
        for old in [*output.glob("shard_*.parquet"), *output.glob("shard_*.parquet.tmp"), output / MANIFEST,
                    output / STATE]:
            old.unlink(missing_ok=True)
        break
    return "", None


def _check_output(output: Path) -> None:
    """Create --output, or say in one line why it cannot hold the preparation."""
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file, not a folder: choose another path")
    reason = why_not_writable(output)
    if reason:
        raise DataError(f"--output {output} is not writable ({reason}): choose another folder or fix its permissions")


def _write(output: Path, path: Path, write, *args):
    """write(path, *args) into --output; a full disk (or any failed write) becomes one DataError. Finished
    shards and prepare_state.json are kept, so the same command resumes once there is room."""
    try:
        return write(path, *args)
    except OSError as error:
        for temporary in [*output.glob("shard_*.parquet.tmp"), output / "manifest.tmp", output / "prepare_state.tmp"]:
            temporary.unlink(missing_ok=True)  # a half-written file frees its space
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise DataError(f"--output {output}: cannot write {path.name} ({reason}): finished shards are kept; free "
                        "space (or choose another --output), then re-run the same command to resume") from None


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
    _check_output(output)
    fingerprint = source_fingerprint(settings.files, settings.source, settings.hub_config, settings.split)
    kind, previous = _previous_preparation(output, settings, fingerprint, overwrite)
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
        sha = _write(output, path, write_shard, piece.rows, piece.first_document, piece.first_position)
        shards.append({"path": path.name, "rows": len(piece.rows), "sha256": sha, "bytes": path.stat().st_size,
                       "resume": piece.resume})
        _write(output, output / STATE, write_json,
               {"settings": asdict(settings), "source_fingerprint": fingerprint, "shards": shards})
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
        "shards": [{k: v for k, v in shard.items() if k != "resume"} for shard in shards],
        "source_fingerprint": fingerprint}
    _write(output, output / MANIFEST, write_json, manifest)
    (output / STATE).unlink(missing_ok=True)
    shutil.rmtree(output / ".cache", ignore_errors=True)  # only `datasets` lock files
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titanlite.prepare",
                                     description="Tokenize and pack a text dataset into Parquet shards.")
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
                        help="replace a preparation with other settings or of other data already in --output")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        tokenizer_path, seq_len = args.tokenizer, args.seq_len
        if args.config:
            from titanlite.config.load import load_config  # torch-free
            config = load_config(args.config)
            tokenizer_path, seq_len = tokenizer_path or config.tokenizer.path, seq_len or config.training.seq_len
        if not seq_len or seq_len < 1:
            raise DataError("--seq-len is required (or --config): the training sequence length in tokens")
        for flag, value in (("--rows-per-shard", args.rows_per_shard), ("--max-documents", args.max_documents)):
            if value < 0:
                raise DataError(f"{flag} {value}: must be >= 0 (0: the default)")
        settings = build_settings(args.source, build_tokenizer(tokenizer_path or "default"), seq_len,
                                  args.rows_per_shard or default_rows_per_shard(seq_len), text_field=args.text_field,
                                  skip_bad_documents=args.skip_bad_documents, hub_config=args.hub_config,
                                  split=args.split, max_documents=args.max_documents)
        manifest = prepare(settings, Path(args.output), args.workers, not args.no_progress, args.overwrite)
    except (TokenizerError, ValueError) as error:  # DataError is a ValueError
        print(f"titanlite.prepare: {error}", file=sys.stderr)
        sys.exit(2)
    skipped = f", skipped {manifest['skipped_documents']}" if manifest["skipped_documents"] else ""
    print(f"prepared {manifest['num_documents']:,} documents -> {manifest['num_rows']:,} rows of "
          f"{manifest['row_length']} tokens in {len(manifest['shards'])} shards{skipped}: {args.output}")


if __name__ == "__main__":
    main()
