"""The loader: global order over shards, DP split, TP peers, workers, resume (also on another DP degree)."""

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from titanlite import prepare as prep
from titanlite.config.load import load_config
from titanlite.data.corpus import generate_documents
from titanlite.data.documents import DataError, build_settings
from titanlite.data.loader import batch_maker, build_dataloader, make_batch, warn_if_data_bound
from titanlite.data.shards import STATE
from titanlite.data.sources import build_rows, find_source
from titanlite.data.tokenizer import TokenizerError, build_tokenizer
from titanlite.model.loss import IGNORE_INDEX

SEQ_LEN, ROWS_PER_SHARD, MICRO_BATCH = 16, 50, 2


def check_source(config, tokenizer=None):
    """What train.py checks first: data.source found for the run's seq_len (and tokenizer)."""
    find_source(config.data.source, config.training.seq_len, tokenizer)


def loader_of(config, tokenizer, dp_rank: int, dp_degree: int):
    """The loader train.py builds for `config` on data-parallel rank `dp_rank` of `dp_degree`."""
    source = find_source(config.data.source, config.training.seq_len, tokenizer)
    rows = build_rows(source, config.data, config.training.seq_len, tokenizer,
                      Path(config.job.dump_folder) / "datasets_cache")
    to_batch = batch_maker(tokenizer.eos_id, config.data.loss_across_documents, config.model.attention != "sdpa",
                           config.model.positions == "document")
    return build_dataloader(rows, config.data, config.training.micro_batch_size, config.training.seed, dp_rank,
                            dp_degree, to_batch)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    """A prepared folder whose row count N = 8 (mod 16), so that 5 steps on 4 ranks leave a rest
    that 2 and 8 ranks both divide exactly. Returns (folder, raw jsonl, rows as int64 (N, 17))."""
    folder = tmp_path_factory.mktemp("data")
    texts = generate_documents(200, seed=21)
    lengths = np.cumsum([len(tokenizer.encode(t)) + 1 for t in texts])
    count = next(n for n in range(150, 200) if (lengths[n - 1] // (SEQ_LEN + 1)) % 16 == 8)
    raw = folder / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:count]))
    prep.prepare(build_settings(str(raw), tokenizer, SEQ_LEN, ROWS_PER_SHARD), folder / "prepared",
                 progress=False)
    manifest = json.loads((folder / "prepared" / "manifest.json").read_text())
    rows = np.concatenate([np.asarray(__import__("pyarrow.parquet").parquet.read_table(
        folder / "prepared" / s["path"]).column("tokens").to_pylist()) for s in manifest["shards"]])
    assert len(rows) % 16 == 8 and len(manifest["shards"]) > 5
    assert len({r.tobytes() for r in rows[:, :-1]}) == len(rows)  # rows are identifiable by their inputs
    return folder / "prepared", raw, rows


def loader_config(source, *extra):
    # The run folder beside the data (tmp_path): raw sources cache their Arrow files there.
    return load_config(None, ["--data.source", str(source), "--job.dump_folder", str(Path(source).parent / "run"),
                              "--training.seq_len", str(SEQ_LEN),
                              "--training.micro_batch_size", str(MICRO_BATCH), "--training.steps", "1",
                              "--data.pin_memory", "false", *extra])


def row_ids(batches, rows) -> list[int]:
    index = {r.tobytes(): i for i, r in enumerate(rows[:, :-1].astype(np.int64))}
    return [index[r.numpy().tobytes()] for b in batches for r in b["input_ids"]]


def take(loader, count: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_ranks_disjoint_and_complete_and_epochs_reshuffle(prepared, tokenizer):
    folder, _, rows = prepared
    config = loader_config(folder)
    for dp in (1, 2, 3):
        steps = len(rows) // (MICRO_BATCH * dp)
        per_rank = [row_ids(take(loader_of(config, tokenizer, r, dp), steps + steps), rows) for r in range(dp)]
        epoch0 = [ids[: steps * MICRO_BATCH] for ids in per_rank]
        seen = [i for ids in epoch0 for i in ids]
        assert len(seen) == len(set(seen)) == steps * MICRO_BATCH * dp  # disjoint, nothing twice
        assert len(rows) - len(seen) < MICRO_BATCH * dp  # complete up to the last partial step
        epoch1 = [i for ids in per_rank for i in ids[steps * MICRO_BATCH:]]
        assert len(set(epoch1)) == len(epoch1) and epoch1 != seen  # a new order, again without repeats
    first = row_ids(take(loader_of(config, tokenizer, 0, 1), 30), rows)
    assert first != sorted(first)  # shuffled within shards...
    unshuffled = row_ids(take(loader_of(loader_config(folder, "--data.shuffle", "false"), tokenizer, 0, 1), 30), rows)
    assert unshuffled == list(range(60))


def test_batch_contents_match_rows(prepared, tokenizer):
    folder, _, rows = prepared
    batch = take(loader_of(loader_config(folder, "--data.loss_across_documents", "true"), tokenizer, 0, 1), 1)[0]
    ids = row_ids([batch], rows)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (MICRO_BATCH, SEQ_LEN)
    assert torch.equal(batch["labels"], torch.from_numpy(rows[ids][:, 1:]).long())
    assert set(batch) == {"input_ids", "labels"}
    flex = take(loader_of(loader_config(folder, "--model.attention", "flex", "--model.positions", "document"),
                                 tokenizer, 0, 1), 1)[0]
    assert set(flex) == {"input_ids", "labels", "document_ids", "positions"}


def test_tensor_parallel_peers_get_identical_batches(prepared, tokenizer):
    folder, _, _ = prepared
    plain = take(loader_of(loader_config(folder), tokenizer, 1, 2), 6)
    with_workers = take(loader_of(loader_config(folder, "--data.num_workers", "2"), tokenizer, 1, 2), 6)
    for a, b in zip(plain, with_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Workers started by spawn or forkserver (the default from Python 3.14) receive the stream pickled.
    stream = pickle.loads(pickle.dumps(loader_of(loader_config(folder), tokenizer, 1, 2).make_stream(0)))
    assert all(torch.equal(x, y) for x, y in zip(next(iter(stream)).values(), plain[0].values()))


def test_resume_gives_bitwise_the_next_batches_with_workers(prepared, tokenizer):
    folder, _, rows = prepared
    config = loader_config(folder, "--model.attention", "flex", "--model.positions", "document")
    epoch_steps = len(rows) // MICRO_BATCH
    reference = take(loader_of(config, tokenizer, 0, 1), epoch_steps + 4)  # crosses into epoch 1
    workers = loader_config(folder, "--data.num_workers", "2", "--data.prefetch_factor", "3",
                            "--model.attention", "flex", "--model.positions", "document")
    interrupted = loader_of(workers, tokenizer, 0, 1)
    iterator = iter(interrupted)
    for _ in range(epoch_steps - 3):
        next(iterator)  # the workers have prefetched beyond this point: the state must not count that
    state = interrupted.state_dict()
    assert state["global_row"] == (epoch_steps - 3) * MICRO_BATCH and all(isinstance(v, (int, str)) for v in state.values())
    resumed = loader_of(workers, tokenizer, 0, 1)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[epoch_steps - 3:], take(resumed, 7)):
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    # Loading a state into a loader that is already iterating restarts it there.
    interrupted.load_state_dict({**state, "global_row": 2 * MICRO_BATCH})
    assert torch.equal(next(iterator)["input_ids"], reference[2]["input_ids"])


@pytest.mark.parametrize("new_dp", [2, 8])
def test_resume_on_another_data_parallel_degree_covers_each_row_once(prepared, tokenizer, new_dp):
    folder, _, rows = prepared
    config = loader_config(folder)
    before = [loader_of(config, tokenizer, r, 4) for r in range(4)]
    seen = [i for loader in before for i in row_ids(take(loader, 5), rows)]
    states = [loader.state_dict() for loader in before]
    assert all(s == states[0] for s in states)  # one global position, whichever rank saves it
    after = []
    for r in range(new_dp):
        loader = loader_of(config, tokenizer, r, new_dp)
        loader.load_state_dict(states[r % 4])
        after += row_ids(take(loader, (len(rows) - 5 * 4 * MICRO_BATCH) // (new_dp * MICRO_BATCH)), rows)
    assert sorted(seen + after) == list(range(len(rows)))


def test_on_the_fly_source_packs_like_prepare(prepared, tokenizer):
    folder, raw, rows = prepared
    on_the_fly = row_ids(take(loader_of(loader_config(raw, "--data.shuffle", "false"), tokenizer, 0, 1), 40), rows)
    assert on_the_fly == list(range(80))


def test_on_the_fly_source_refuses_a_large_corpus(prepared, tokenizer, monkeypatch):
    import titanlite.data.packing

    monkeypatch.setattr(titanlite.data.packing, "ON_THE_FLY_MAX_TOKENS", 1000)
    with pytest.raises(DataError, match="more than 1,000 tokens is too much.*python -m titanlite.prepare"):
        loader_of(loader_config(prepared[1]), tokenizer, 0, 1)


def test_default_source(tokenizer):
    config = load_config(None, ["--data.default_num_documents", "300", "--training.seq_len", "64",
                                "--training.steps", "1"])
    batch = take(loader_of(config, tokenizer, 0, 1), 1)[0]
    assert batch["input_ids"].shape == (4, 64)
    assert (batch["labels"][batch["input_ids"] == tokenizer.eos_id] == IGNORE_INDEX).all()


def make_batch_reference(row: list[int], eos: int):
    """Plain loops: inputs, labels, document ids, positions of one row."""
    inputs, labels, docs, positions, doc, position = row[:-1], [], [], [], 0, 0
    for t, token in enumerate(inputs):
        labels.append(IGNORE_INDEX if token == eos else row[t + 1])
        docs.append(doc)
        positions.append(position)
        position += 1
        if token == eos:
            doc, position = doc + 1, 0
    return inputs, labels, docs, positions


def test_make_batch_against_loops():
    eos = 9
    rows = np.array([[9, 1, 2, 9, 9, 3, 4, 5, 9, 6], [1, 2, 3, 4, 5, 6, 7, 8, 2, 9], [5, 9, 1, 9, 2, 2, 9, 3, 3, 3]],
                    np.int32)
    batch = make_batch(rows, eos, False, True, True)
    for r, row in enumerate(rows.tolist()):
        inputs, labels, docs, positions = make_batch_reference(row, eos)
        assert batch["input_ids"][r].tolist() == inputs and batch["labels"][r].tolist() == labels
        assert batch["document_ids"][r].tolist() == docs and batch["positions"][r].tolist() == positions
    across = make_batch(rows, eos, True, False, False)
    assert torch.equal(across["labels"], torch.from_numpy(rows[:, 1:]).long()) and set(across) == {"input_ids", "labels"}


# --- bad input -----------------------------------------------------------------------------------

def copy_prepared(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared[0], tmp_path / "copy"))


def test_manifest_mismatch(prepared, tmp_path, tokenizer):
    with pytest.raises(DataError, match=rf"manifest.json was prepared with seq_len {SEQ_LEN} but training.seq_len=32"):
        loader_of(loader_config(prepared[0], "--training.seq_len", "32"), tokenizer, 0, 1)
    folder = copy_prepared(prepared, tmp_path)
    edit_manifest(folder, settings={"tokenizer_fingerprint": "0" * 64})
    with pytest.raises(TokenizerError, match="dataset manifest .*manifest.json was made with tokenizer 000000000000"):
        loader_of(loader_config(folder), tokenizer, 0, 1)


def edit_manifest(folder: Path, **changes) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    return folder / "manifest.json"


def test_manifest_without_row_length_or_inconsistent(prepared, tmp_path, tokenizer):
    folder = copy_prepared(prepared, tmp_path)
    edit_manifest(folder, row_length=None)
    with pytest.raises(DataError, match=r"manifest.json lacks 'row_length' .*titanlite.prepare --output .* --overwrite"):
        loader_of(loader_config(folder), tokenizer, 0, 1)
    # seq_len edited to 8 while the rows hold 17 tokens: the seq_len advice ("set training.seq_len=8")
    # would give 16-token batches to a model built for 8 positions.
    edit_manifest(folder, row_length=SEQ_LEN + 1, seq_len=8)
    for seq_len in (SEQ_LEN, 8):
        with pytest.raises(DataError, match=rf"manifest.json is inconsistent: row_length {SEQ_LEN + 1} but seq_len 8 "
                                            r".*--overwrite"):
            loader_of(loader_config(folder, "--training.seq_len", str(seq_len)), tokenizer, 0, 1)


def test_check_data_source_before_the_model(prepared, tmp_path, tokenizer):
    """The cheap checks train.py runs before building the model; DataError names data.source and the fix."""
    folder, raw, _ = prepared
    for fine in ("default", folder, raw):
        assert check_source(loader_config(fine), tokenizer) is None
    missing = [(tmp_path / "missing", "no such file or folder: check the path"),
               (tmp_path / "*.jsonl", "the pattern matches no file")]
    for source, reason in missing:
        with pytest.raises(DataError, match=rf"^data.source={re.escape(str(source))}: {reason}"):
            check_source(loader_config(source))
    with pytest.raises(DataError, match=rf"prepared with seq_len {SEQ_LEN} but training.seq_len=32: set training"):
        check_source(loader_config(folder, "--training.seq_len", "32"))
    copy = copy_prepared(prepared, tmp_path)
    (copy / "shard_00001.parquet").unlink()
    with pytest.raises(DataError, match=r"shard .*shard_00001.parquet listed in .*manifest.json is missing"):
        check_source(loader_config(copy))
    shutil.copy(folder / "shard_00001.parquet", copy)
    edit_manifest(copy, settings={"tokenizer_fingerprint": "0" * 64})
    with pytest.raises(TokenizerError, match="made with tokenizer 000000000000"):
        check_source(loader_config(copy), tokenizer)


def test_empty_and_unfinished_folders(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither manifest.json nor raw data files: run python -m titanlite.prepare"):
        loader_of(loader_config(tmp_path / "empty"), tokenizer, 0, 1)
    (tmp_path / "empty" / STATE).write_text("{}")
    with pytest.raises(DataError, match="unfinished.*resumes"):
        loader_of(loader_config(tmp_path / "empty"), tokenizer, 0, 1)


def test_truncated_and_corrupt_shards(prepared, tmp_path, tokenizer):
    folder = copy_prepared(prepared, tmp_path)
    shard = folder / "shard_00003.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-200])
    with pytest.raises(DataError, match="shard .*shard_00003.parquet has .* bytes.*truncated"):
        loader_of(loader_config(folder), tokenizer, 0, 1)
    for path in folder.glob("shard_*.parquet"):  # same size, flipped bytes: caught by the checksum
        original = path.read_bytes() if path != shard else data
        path.write_bytes(original[:100] + bytes(b ^ 0xFF for b in original[100:110]) + original[110:])
    check_source(loader_config(folder))  # cheap: sizes only, no shard is read
    loader = loader_of(loader_config(folder, "--data.num_workers", "1"), tokenizer, 0, 1)
    # raised in the worker, re-raised here with its own one line (not torch's worker traceback): no hang
    with pytest.raises(DataError, match=r"^shard \S*shard_000\d\d.parquet: checksum differs from \S*manifest.json: "
                                        r"the file is corrupt or was modified; re-run the same .*prepare command to "
                                        r"rewrite it$"):
        take(loader, 1)


def test_bad_raw_documents_on_the_fly(tmp_path, tokenizer, caplog):
    texts = generate_documents(30, seed=5)
    texts[3] = ""
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with pytest.raises(DataError, match=r"raw.jsonl document 4: empty document.*data.skip_bad_documents=true"):
        loader_of(loader_config(raw, "--job.dump_folder", str(tmp_path / "run")), tokenizer, 0, 1)
    with caplog.at_level(logging.WARNING, logger="titanlite"):
        loader_of(loader_config(raw, "--data.skip_bad_documents", "true", "--job.dump_folder",
                                       str(tmp_path / "run")), tokenizer, 0, 1)
    assert "skipped bad documents {'empty document': 1}" in caplog.text


def test_too_little_data_and_foreign_state(prepared, tmp_path, tokenizer):
    raw = tmp_path / "small.jsonl"
    raw.write_text(json.dumps({"text": "one two three four five six seven eight nine ten " * 3}) + "\n")
    with pytest.raises(DataError, match="fewer than one global micro-step"):
        loader_of(loader_config(raw, "--job.dump_folder", str(tmp_path / "run")), tokenizer, 0, 8)
    loader = loader_of(loader_config(prepared[0]), tokenizer, 0, 1)
    with pytest.raises(DataError, match="seed 5 .*use the same training.seed"):
        loader.load_state_dict({**loader.state_dict(), "seed": 5})


def test_a_data_position_resumes_only_under_the_same_row_order(prepared, tokenizer):
    """The same rows (raw jsonl packed in memory = the prepared shards, row for row) in another
    shard layout, or unshuffled, come in another order: the position would repeat and skip rows."""
    folder, raw, _ = prepared
    from_raw = loader_of(loader_config(raw), tokenizer, 0, 1)
    take(from_raw, 3)
    state = from_raw.state_dict()
    prepared_loader = loader_of(loader_config(folder), tokenizer, 0, 1)
    assert prepared_loader.rows_per_epoch == from_raw.rows_per_epoch and prepared_loader.seed == from_raw.seed
    with pytest.raises(DataError, match=r"position is for rows shuffled, 1 shard .*this run's are shuffled, \d+ "
                                        r"shards.*same data.shuffle and the same prepared shards"):
        prepared_loader.load_state_dict(state)
    unshuffled = loader_of(loader_config(raw, "--data.shuffle", "false"), tokenizer, 0, 1)
    with pytest.raises(DataError, match="position is for rows shuffled, 1 shard .*this run's are in order, 1 shard "):
        unshuffled.load_state_dict(state)
    again = loader_of(loader_config(raw), tokenizer, 0, 1)
    again.load_state_dict(state)  # same data, same order: resumes
    assert again.global_row == 3 * MICRO_BATCH


def test_manifest_with_another_eos_is_refused(prepared, tmp_path, tokenizer):
    folder = copy_prepared(prepared, tmp_path)
    edit_manifest(folder, eos_id=tokenizer.eos_id - 1)
    with pytest.raises(DataError, match=rf"manifest.json marks document ends with EOS id {tokenizer.eos_id - 1} but "
                                        rf"tokenizer.path=default has EOS id {tokenizer.eos_id}"):
        loader_of(loader_config(folder), tokenizer, 0, 1)


def test_data_wait_warning(caplog):
    config = load_config(None, ["--training.steps", "1", "--data.num_workers", "1"])
    with caplog.at_level(logging.WARNING, logger="titanlite"):
        assert not warn_if_data_bound(10, 0.04, config.metrics.data_wait_warn_fraction, config.data)
        assert not warn_if_data_bound(1, 0.9, config.metrics.data_wait_warn_fraction, config.data)  # step 1 includes starting the workers
        assert warn_if_data_bound(10, 0.2, config.metrics.data_wait_warn_fraction, config.data)
        assert not warn_if_data_bound(20, 0.9, config.metrics.data_wait_warn_fraction, config.data, first_window=True)  # a resumed run's first log step
    assert "20.0% of step time (threshold 5.0%)" in caplog.text and "raise data.num_workers (now 1)" in caplog.text
    assert "the device waits for data" in caplog.text and "GPU" not in caplog.text  # CPU runs get it too


def test_a_manifest_with_or_without_the_source_fingerprint_reads_the_same_rows(prepared, tmp_path, tokenizer):
    """manifest.json records the source's fingerprint now; manifests written before it still load."""
    folder = copy_prepared(prepared, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source_fingerprint"]["files"][str(prepared[1])]["sha256"]
    edit_manifest(folder, source_fingerprint=None)
    assert "source_fingerprint" not in json.loads((folder / "manifest.json").read_text())
    with_it, without_it = (take(loader_of(loader_config(source), tokenizer, 0, 1), 3) for source in (prepared[0], folder))
    assert row_ids(with_it, prepared[2]) == row_ids(without_it, prepared[2])


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """data/fw_prepared where data/ exists: a path that is missing, refused at once (as a hub id it cost
    ~30 s of retries and ~24 lines); a hub id whose first part is no local folder stays a hub id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=r"^data.source=data/fw_prepared: no such file or folder: check the path$"):
        check_source(loader_config("data/fw_prepared"))
    assert find_source("HuggingFaceFW/fineweb-edu", SEQ_LEN).files == []  # still a hub dataset


def test_an_empty_raw_file_is_one_line(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jsonl: empty file \(0 bytes, no documents\): .*"
                                        r"data.skip_bad_documents=true"):
        loader_of(loader_config(tmp_path / "empty.jsonl"), tokenizer, 0, 1)
