"""titanlite.prepare (and titanlite.documents): packing, determinism, resume, re-runs, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from titanlite import prepare as prep
from titanlite.data.corpus import generate_documents
from titanlite.data.documents import DataError, resolve_files, tokenize_chunk
from titanlite.data.tokenizer import build_tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


def write_jsonl(path: Path, texts: list) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def settings_for(source: str, tokenizer, rows_per_shard: int = 10, skip: bool = False, seq_len: int = SEQ_LEN):
    return prep.build_settings(source, tokenizer, seq_len, rows_per_shard=rows_per_shard, skip_bad_documents=skip)


def read_shards(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    tables = [pq.read_table(folder / s["path"]) for s in manifest["shards"]]
    table = pa.concat_tables(tables)
    rows = np.asarray(table.column("tokens").to_pylist(), dtype=np.int64)
    return rows, table.column("first_document").to_numpy(), table.column("first_position").to_numpy()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two jsonl files; one document is far longer than a row."""
    folder = tmp_path_factory.mktemp("raw")
    texts = generate_documents(60, seed=11)
    texts[7] = " ".join(["a long document"] * 120)  # ~360 tokens: spans many 33-token rows
    write_jsonl(folder / "part0.jsonl", texts[:35])
    write_jsonl(folder / "part1.jsonl", texts[35:])
    return folder, texts


def test_packing_round_trip(tmp_path, corpus, tokenizer):
    folder, texts = corpus
    manifest = prep.prepare(settings_for(str(folder), tokenizer), tmp_path / "out", progress=False)
    # Independent reference: the token stream, each document followed by EOS, in file order.
    documents = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    stream = np.concatenate([np.asarray(d) for d in documents])
    rows, first_document, first_position = read_shards(tmp_path / "out")
    row_length = SEQ_LEN + 1
    assert rows.shape == (len(stream) // row_length, row_length)
    assert np.array_equal(rows.reshape(-1), stream[: rows.size])
    assert manifest["num_rows"] == len(rows) and manifest["num_tokens"] == rows.size
    assert manifest["num_documents"] == len(texts)
    assert manifest["dropped_tail_tokens"] == len(stream) - rows.size
    assert [s["rows"] for s in manifest["shards"]] == [10] * (len(rows) // 10) + ([len(rows) % 10] if len(rows) % 10 else [])
    # first_document / first_position locate each row's first token in the document list.
    starts = np.cumsum([0] + [len(d) for d in documents])
    for r in range(len(rows)):
        offset = r * row_length
        doc = int(np.searchsorted(starts, offset, side="right") - 1)
        assert (first_document[r], first_position[r]) == (doc, offset - starts[doc])
    assert (first_document == 7).sum() >= 10 and first_position[first_document == 7].max() > row_length
    for shard in manifest["shards"]:
        assert prep.file_sha256(tmp_path / "out" / shard["path"]) == shard["sha256"]
    assert manifest["settings"]["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert not (tmp_path / "out" / prep.STATE).exists()


def test_byte_identical_across_runs_and_worker_counts(tmp_path, corpus, tokenizer):
    folder, _ = corpus
    prep.prepare(settings_for(str(folder), tokenizer), tmp_path / "one", workers=1, progress=False)
    prep.prepare(settings_for(str(folder), tokenizer), tmp_path / "two", workers=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.*"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.*")) and len(names) > 3
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_and_skips_finished_shards(tmp_path, corpus, tokenizer, monkeypatch):
    folder, _ = corpus
    settings = settings_for(str(folder), tokenizer)
    prep.prepare(settings, tmp_path / "full", progress=False)
    real_write, written = prep.write_shard, []

    def interrupted_write(path, *args):
        if len(written) == 3:
            raise Interrupt
        written.append(path.name)
        return real_write(path, *args)

    monkeypatch.setattr(prep, "write_shard", interrupted_write)
    with pytest.raises(Interrupt):
        prep.prepare(settings, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "manifest.json").exists() and (tmp_path / "cut" / prep.STATE).exists()
    # Damage the third finished shard: the resumed run must rewrite it, and keep the first two.
    (tmp_path / "cut" / "shard_00002.parquet").write_bytes(b"garbage")
    written.clear()
    monkeypatch.setattr(prep, "write_shard", lambda path, *a: written.append(path.name) or real_write(path, *a))
    prep.prepare(settings, tmp_path / "cut", progress=False)
    assert written[0] == "shard_00002.parquet" and "shard_00000.parquet" not in written
    for path in (tmp_path / "full").iterdir():
        assert (tmp_path / "cut" / path.name).read_bytes() == path.read_bytes(), path.name
    written.clear()  # a finished preparation run again writes nothing
    assert prep.prepare(settings, tmp_path / "cut", progress=False)["num_rows"] > 0 and written == []


def test_resume_refuses_other_settings(tmp_path, corpus, tokenizer, monkeypatch):
    folder, _ = corpus
    monkeypatch.setattr(prep, "write_shard", lambda *a: (_ for _ in ()).throw(Interrupt()))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / prep.STATE).write_text(json.dumps({"settings": {**prep.asdict(settings_for(
        str(folder), tokenizer)), "seq_len": 4}, "shards": []}))
    with pytest.raises(DataError, match=r"holds an unfinished preparation with other settings \(seq_len 4 -> 32\): "
                                        "pass --overwrite"):
        prep.prepare(settings_for(str(folder), tokenizer), tmp_path / "out", progress=False)
    with pytest.raises(Interrupt):  # --overwrite: the old state is gone and the new preparation starts
        prep.prepare(settings_for(str(folder), tokenizer), tmp_path / "out", progress=False, overwrite=True)
    assert not (tmp_path / "out" / prep.STATE).exists()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_finished_preparation_is_kept_refused_or_overwritten(tmp_path, corpus, tokenizer):
    folder, _ = corpus
    settings, out = settings_for(str(folder), tokenizer), tmp_path / "out"
    manifest = prep.prepare(settings, out, progress=False)
    before = folder_bytes(out)
    assert prep.prepare(settings, out, progress=False) == manifest and folder_bytes(out) == before  # a no-op
    # Another source and seq_len into the same folder: refused, naming what differs; nothing touched.
    other = settings_for(str(folder / "part0.jsonl"), tokenizer, seq_len=64)
    with pytest.raises(DataError, match=r"out holds a finished preparation with other settings \(source '.*raw\d*' -> "
                                        r"'.*part0.jsonl', files 2 files -> 1 files, seq_len 32 -> 64\): pass "
                                        r"--overwrite to replace it, or choose another --output folder$"):
        prep.prepare(other, out, progress=False)
    assert folder_bytes(out) == before
    # --overwrite replaces it: the same bytes as a preparation into a new folder, no stale shard left.
    prep.prepare(other, out, progress=False, overwrite=True)
    prep.prepare(other, tmp_path / "new", progress=False)
    assert folder_bytes(out) == folder_bytes(tmp_path / "new") and len(before) > len(folder_bytes(out)) > 2


def test_text_file_is_one_document(tmp_path, tokenizer):
    texts = generate_documents(12, seed=2)
    # Blank lines (paragraphs) and Windows line ends inside: each file is one document, whole;
    # `datasets` reads text files with universal newlines.
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes("\n\n".join(texts[:6]).encode() + b"\n")
    (tmp_path / "txt" / "b.txt").write_bytes("\r\n\r\n".join(texts[6:]).encode())
    manifest = prep.prepare(settings_for(str(tmp_path / "txt"), tokenizer), tmp_path / "out_txt", progress=False)
    documents = ["\n\n".join(texts[:6]) + "\n", "\n\n".join(texts[6:])]
    rows, _, _ = read_shards(tmp_path / "out_txt")
    expected = np.concatenate([tokenizer.encode(d) + [tokenizer.eos_id] for d in documents])
    assert manifest["num_documents"] == 2 and np.array_equal(rows.reshape(-1), expected[: rows.size])
    assert manifest["dropped_tail_tokens"] == len(expected) - rows.size < SEQ_LEN + 1


def test_parquet_source(tmp_path, tokenizer):
    texts = generate_documents(12, seed=2)
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet")
    manifest = prep.prepare(settings_for(str(tmp_path / "b.parquet"), tokenizer), tmp_path / "out", progress=False)
    rows, _, _ = read_shards(tmp_path / "out")
    expected = np.concatenate([tokenizer.encode(t) + [tokenizer.eos_id] for t in texts])
    assert manifest["num_documents"] == 12 and np.array_equal(rows.reshape(-1), expected[: rows.size])


@pytest.mark.parametrize("bad", ["", "  \n "])
def test_empty_document_names_file_and_row_or_is_counted(tmp_path, tokenizer, bad):
    texts = generate_documents(20, seed=4)
    texts[5] = bad
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    with pytest.raises(DataError, match=r"docs.jsonl document 6: empty document.*--skip-bad-documents"):
        prep.prepare(settings_for(str(source), tokenizer), tmp_path / "out", progress=False)
    manifest = prep.prepare(settings_for(str(source), tokenizer, skip=True), tmp_path / "skip", progress=False)
    assert manifest["skipped_documents"] == {"empty document": 1} and manifest["num_documents"] == 19
    rows, _, _ = read_shards(tmp_path / "skip")
    expected = [tokenizer.encode(t) + [tokenizer.eos_id] for i, t in enumerate(texts) if i != 5]
    assert np.array_equal(rows.reshape(-1), np.concatenate(expected)[: rows.size])


def test_unpaired_surrogate(tmp_path, tokenizer):
    # In a json file Arrow refuses it and the error names the file and row; a hub source can
    # still hand one over, which the per-document check catches.
    source = write_jsonl(tmp_path / "docs.jsonl", ["fine text here"] * 5 + ["ok \ud800 no"])
    with pytest.raises(DataError, match=r"docs.jsonl: cannot be read as json.*row 5.*fix or remove"):
        prep.prepare(settings_for(str(source), tokenizer), tmp_path / "out", progress=False)
    tokens = tokenize_chunk(["fine", "ok \ud800 no"], tokenizer)
    assert tokens[1].startswith("invalid UTF-8") and list(tokens[0]) == tokenizer.encode("fine", eos=True)


def test_invalid_utf8_file_names_the_line(tmp_path, tokenizer):
    source = tmp_path / "broken.jsonl"
    good = "".join(json.dumps({"text": t}) + "\n" for t in generate_documents(5, seed=1))
    source.write_bytes(good.encode() + b'{"text": "caf\xe9 latin-1"}\n')
    with pytest.raises(DataError, match=r"broken.jsonl: invalid UTF-8 at line 6.*re-encode"):
        prep.prepare(settings_for(str(source), tokenizer), tmp_path / "out", progress=False)


def test_bad_sources(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder has no"):
        resolve_files(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such file"):
        resolve_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="matches no file"):
        resolve_files(str(tmp_path / "*.jsonl"))
    source = write_jsonl(tmp_path / "tiny.jsonl", ["one two"])
    with pytest.raises(DataError, match="fewer than seq_len"):
        prep.prepare(settings_for(str(source), tokenizer), tmp_path / "out", progress=False)
    (tmp_path / "other.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"other.jsonl document 1: no field 'text'.*--text-field"):
        prep.prepare(settings_for(str(tmp_path / "other.jsonl"), tokenizer), tmp_path / "out2", progress=False)


def test_cli(tmp_path, capsys, corpus):
    folder, _ = corpus
    prep.main(["--source", str(folder), "--output", str(tmp_path / "out"), "--seq-len", "64", "--workers", "1",
               "--no-progress"])
    assert "prepared 60 documents" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seq_len"] == 64
    with pytest.raises(SystemExit) as exit_info:
        prep.main(["--source", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"), "--seq-len", "64"])
    assert exit_info.value.code == 2 and "no such file" in capsys.readouterr().err
    again = ["--source", str(folder), "--output", str(tmp_path / "out"), "--seq-len", "48", "--workers", "1",
             "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        prep.main(again)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert f"other settings (seq_len 64 -> 48, rows_per_shard {2**24 // 65} -> {2**24 // 49}): pass --overwrite" in error
    prep.main([*again, "--overwrite"])
    assert "prepared 60 documents" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["seq_len"] == 48


def test_a_changed_source_is_refused_never_mixed(tmp_path, tokenizer, monkeypatch):
    """The source file grew (a finished preparation) or was edited in place after a kill (an unfinished
    one): refused, naming the file; --overwrite prepares the new data from scratch."""
    texts = generate_documents(120, seed=8)
    source = write_jsonl(tmp_path / "docs.jsonl", texts[:60])
    settings, out = settings_for(str(source), tokenizer), tmp_path / "out"
    manifest = prep.prepare(settings, out, progress=False)
    recorded = manifest["source_fingerprint"]["files"][str(source)]
    assert recorded["bytes"] == source.stat().st_size and recorded["sha256"] == prep.file_sha256(source)
    before = folder_bytes(out)
    write_jsonl(source, texts)  # 60 more documents
    with pytest.raises(DataError, match=rf"out holds a finished preparation of other data \({re.escape(str(source))} "
                                        r"changed since: \d+ -> \d+ bytes\): pass --overwrite"):
        prep.prepare(settings, out, progress=False)
    assert folder_bytes(out) == before
    assert prep.prepare(settings, out, progress=False, overwrite=True)["num_documents"] == 120
    # Killed after two shards, then one character edited (same size): resuming would mix old and new rows.
    real_write = prep.write_shard

    def interrupted_write(path, *args):
        if path.name == "shard_00002.parquet":
            raise Interrupt
        return real_write(path, *args)

    monkeypatch.setattr(prep, "write_shard", interrupted_write)
    with pytest.raises(Interrupt):
        prep.prepare(settings, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    source.write_text(source.read_text().replace("a", "b", 1))
    with pytest.raises(DataError, match=r"cut holds an unfinished preparation of other data \(.*docs.jsonl changed "
                                        r"since: same size, other content\)"):
        prep.prepare(settings, tmp_path / "cut", progress=False)
    prep.prepare(settings, tmp_path / "cut", progress=False, overwrite=True)
    prep.prepare(settings, tmp_path / "fresh", progress=False)
    assert folder_bytes(tmp_path / "cut") == folder_bytes(tmp_path / "fresh")


def test_a_preparation_recorded_without_fingerprint_is_kept(tmp_path, corpus, tokenizer):
    """A manifest from before source fingerprints: nothing to compare, kept as it was."""
    folder, _ = corpus
    settings, out = settings_for(str(folder), tokenizer), tmp_path / "out"
    manifest = prep.prepare(settings, out, progress=False)
    del manifest["source_fingerprint"]
    prep.write_json(out / "manifest.json", manifest)
    before = folder_bytes(out)
    assert prep.prepare(settings, out, progress=False) == manifest and folder_bytes(out) == before


def test_unusable_output_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    import errno

    folder, _ = corpus
    (tmp_path / "a_file").write_text("keep me")
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # storage mounted read-only (root ignores file modes)
        if tmp_path / "ro" in (self, *self.parents):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    for output, words in ((tmp_path / "a_file", "is a file, not a folder: choose another path"),
                          (tmp_path / "ro" / "out", "is not writable (Read-only file system)")):
        with pytest.raises(SystemExit) as exit_info:
            prep.main(["--source", str(folder), "--output", str(output), "--seq-len", "32", "--no-progress"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith(f"titanlite.prepare: --output {output} {words}"), error
        assert error.count("\n") == 1
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path, corpus, capsys, monkeypatch):
    import errno

    import pyarrow.parquet

    folder, _ = corpus
    arguments = ["--source", str(folder), "--output", str(tmp_path / "out"), "--seq-len", "32", "--workers", "1",
                 "--rows-per-shard", "10", "--no-progress"]
    real_write, written = pyarrow.parquet.write_table, []

    def fills_up(table, where, **kwargs):  # room for two shards; the third is cut short, as by a full disk
        if len(written) == 2:
            Path(where).write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        written.append(where)
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pyarrow.parquet, "write_table", fills_up)
    with pytest.raises(SystemExit) as exit_info:
        prep.main(arguments)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error == (f"titanlite.prepare: --output {tmp_path / 'out'}: cannot write shard_00002.parquet (No space left "
                     "on device): finished shards are kept; free space (or choose another --output), then re-run "
                     "the same command to resume\n")
    assert sorted(p.name for p in (tmp_path / "out").glob("shard_*")) == ["shard_00000.parquet", "shard_00001.parquet"]
    monkeypatch.undo()
    prep.main(arguments)
    prep.main([*arguments[:3], str(tmp_path / "fresh"), *arguments[4:]])
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "fresh")


@pytest.mark.parametrize("flag", ["--rows-per-shard", "--max-documents"])
def test_negative_counts_are_one_line(tmp_path, corpus, capsys, flag):
    folder, _ = corpus
    with pytest.raises(SystemExit) as exit_info:
        prep.main(["--source", str(folder), "--output", str(tmp_path / "out"), "--seq-len", "32", flag, "-1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error == f"titanlite.prepare: {flag} -1: must be >= 0 (0: the default)\n"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_an_empty_file_is_named_or_skipped(tmp_path, tokenizer, capsys, suffix):
    """A 0-byte file (a failed download) as --source, or inside a glob: `datasets` raised a bare StopIteration."""
    texts = generate_documents(40, seed=3)
    write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / f"b{suffix}").write_bytes(b"")
    for source in (tmp_path / f"b{suffix}", tmp_path / "*.*"):
        with pytest.raises(SystemExit) as exit_info:
            prep.main(["--source", str(source), "--output", str(tmp_path / "out"), "--seq-len", "32", "--workers", "1",
                       "--no-progress"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.count("\n") == 1
        assert error.startswith(f"titanlite.prepare: {tmp_path / f'b{suffix}'}: empty file (0 bytes, no documents): "
                                "remove it from the source, or skip it"), error
    manifest = prep.prepare(settings_for(str(tmp_path / "*.*"), tokenizer, skip=True), tmp_path / "out", progress=False)
    assert manifest["num_documents"] == 40


def test_a_null_text_says_so_and_how_to_skip_it(tmp_path, tokenizer):
    texts = generate_documents(20, seed=4)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": None if i == 2 else t}) + "\n" for i, t in enumerate(texts)))
    with pytest.raises(DataError, match=r"docs.jsonl document 3: no text \(null\): remove or fix it, or count and skip "
                                        r"such documents \(.*--skip-bad-documents"):
        prep.prepare(settings_for(str(source), tokenizer), tmp_path / "out", progress=False)
    manifest = prep.prepare(settings_for(str(source), tokenizer, skip=True), tmp_path / "skip", progress=False)
    assert manifest["skipped_documents"] == {"no text": 1} and manifest["num_documents"] == 19
