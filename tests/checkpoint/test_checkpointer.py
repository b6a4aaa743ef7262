"""Checkpoints: exact resume, resume across layouts, kill -9 during a save, retention, bad input."""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import conftest
import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed import run_distributed
from torch.distributed.checkpoint import filesystem

from titanlite.checkpoint.checkpointer import Checkpointer
from titanlite.checkpoint.states import TrainState
from titanlite.checkpoint.storage import CheckpointError
from titanlite.checkpoint.weights import load_model_weights
from titanlite.config.resolve import optimizer_update, resolve
from titanlite.model.transformer import build_model
from titanlite.optim.optimizer import build_optimizer
from titanlite.train import train

ROOT = Path(__file__).resolve().parents[2]
# Single-process saves pass no_dist=True on purpose; checkpoint_files silences DCP's warning about
# it at import, which pytest's per-test warning filters undo.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
CHECKPOINTS = ["--checkpoint.enable", "true", "--checkpoint.interval", "3"]


@pytest.fixture(autouse=True)
def root_logging_restored():
    """train() points the root logger at this test's sys.stderr (logging.basicConfig(force=True)):
    a later test must not log into that closed stream."""
    handlers = logging.root.handlers[:]
    yield
    logging.root.handlers[:] = handlers


def tiny_config(folder: Path, *overrides: str):
    """The shared tiny run (conftest), saving a checkpoint every 3 steps."""
    return conftest.tiny_config(folder, *CHECKPOINTS, *overrides)


def step_folder(run: Path, step: int) -> Path:
    return run / "checkpoint" / f"step-{step:08d}"


def by_step(history: list[dict]) -> dict[int, tuple[float, float]]:
    return {record["step"]: (record["loss"], record["grad_norm"]) for record in history}


def assert_same_trajectory(history: dict, straight: dict) -> None:
    """Another layout sums in another order: losses within 1e-5, grad norms within the 3e-5 that
    the parallel-layout parity tests allow (tests/test_parallelize.py)."""
    assert sorted(history) == [4, 5, 6]
    for step, (loss, grad_norm) in history.items():
        assert loss == pytest.approx(straight[step][0], rel=1e-5), step
        assert grad_norm == pytest.approx(straight[step][1], rel=3e-5), step


def assert_same_weights(path_a: Path, path_b: Path, atol: float = 0.0) -> None:
    weights_a, _ = load_model_weights(path_a)
    weights_b, _ = load_model_weights(path_b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps in one go (data workers on), saving at steps 3 and 6: the reference trajectory.

    It saves asynchronously and the runs compared with it save synchronously, so every equality
    below also says that an async save changes nothing and writes a complete checkpoint.
    """
    run = tmp_path_factory.mktemp("straight")
    history = train(tiny_config(run, "--data.num_workers", "2", "--checkpoint.async_mode", "async"))
    return run, by_step(history)


def test_resume_is_bitwise_exact(straight_run, tmp_path):
    """3 steps -> stop -> resume -> 3 steps equals 6 steps straight: losses, grad norms, weights."""
    run, straight = straight_run
    resumed_run = tmp_path / "resumed"
    shutil.copytree(step_folder(run, 3), step_folder(resumed_run, 3))
    history = by_step(train(tiny_config(resumed_run, "--data.num_workers", "2")))
    assert sorted(history) == [4, 5, 6]  # the loop went on at step 4
    assert history == {step: straight[step] for step in (4, 5, 6)}  # bitwise: float32 on CPU
    assert_same_weights(step_folder(run, 6), step_folder(resumed_run, 6))
    meta = json.loads((step_folder(resumed_run, 6) / "meta.json").read_text())
    assert meta["step"] == 6 and meta["tokens_seen"] == 6 * 256 and meta["config"]["model"]["dim"] == 64


def test_data_position_is_one_global_entry_and_no_rng_state_is_saved(straight_run):
    """The loader's state is one global row cursor, stored once like train_state (no pickled blob
    per rank), and no RNG state is saved: nothing random runs after init (the bitwise resume
    above would catch it)."""
    run, _ = straight_run
    path = step_folder(run, 3)
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert {key.split(".", 1)[0] for key in keys} == {"model", "optimizer", "train_state",
                                                        "dataloader", "health"}
    assert sorted(key for key in keys if key.startswith("dataloader.")) == [
        "dataloader.dataset", "dataloader.global_row", "dataloader.order", "dataloader.rows_per_epoch",
        "dataloader.seed"]
    state = {"dataloader": {"global_row": -1}}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    assert state["dataloader"]["global_row"] == 3 * 256 // 32  # 3 steps of 256 tokens, rows of 32 tokens


def test_every_file_has_its_checksum_in_meta_json(straight_run):
    """Saved asynchronously (the straight run): meta.json holds the CRC-32 of every data file and of
    .metadata, as zlib computes it from the files on disk; the per-rank sidecars are merged away."""
    run, _ = straight_run
    for step in (3, 6):
        path = step_folder(run, step)
        recorded = json.loads((path / "meta.json").read_text())["crc32"]
        files = [".metadata", *(p.name for p in path.glob("*.distcp"))]
        assert sorted(recorded) == sorted(files) and len(files) > 2
        for name in files:
            assert recorded[name] == f"{zlib.crc32((path / name).read_bytes()):08x}", name
        assert sorted(p.name for p in path.iterdir()) == sorted([*files, "meta.json"])


def file_holding(path: Path, key: str) -> Path:
    """The data file of checkpoint `path` that holds (a shard of) tensor `key`."""
    storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    return path / next(info.relative_path for index, info in storage.items() if index.fqn == key)


def flip_bytes(file: Path, count: int = 16) -> None:
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(byte ^ 0xFF for byte in data[middle:middle + count])
    file.write_bytes(bytes(data))


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_published_checkpoint_that_does_not_load_is_refused_and_kept(straight_run, tmp_path):
    """Only .partial folders are unfinished. A step-N folder without meta.json, or copied with
    `cp dir/*` (no hidden .metadata), stops resume=auto with one line naming it (it used to be
    taken for an unfinished save and overwritten); a fresh run (resume=never) refuses the folder."""
    run, _ = straight_run
    for missing in ("meta.json", ".metadata"):
        copy = tmp_path / missing.strip(".")
        shutil.copytree(step_folder(run, 3), step_folder(copy, 3))
        shutil.copytree(step_folder(run, 6), step_folder(copy, 6))
        (step_folder(copy, 6) / missing).unlink()
        before = folder_digest(step_folder(copy, 6))
        with pytest.raises(CheckpointError) as caught:
            train(tiny_config(copy))
        message = str(caught.value)
        assert message.startswith(f"checkpoint {step_folder(copy, 6)} has no {missing}") and "\n" not in message
        assert f"move {step_folder(copy, 6)} out of" in message
        assert folder_digest(step_folder(copy, 6)) == before
    with pytest.raises(CheckpointError, match=f"checkpoint.resume=never but {copy / 'checkpoint'} holds an earlier "
                                              f"run's checkpoints \\(newest step-00000006\\)"):
        train(tiny_config(copy, "--checkpoint.resume", "never"))
    assert folder_digest(step_folder(copy, 6)) == before
    assert not step_folder(copy, 6).with_name("step-00000006.partial").exists()


def _train_fsdp_and_report(folder: str) -> int:
    train(tiny_config(Path(folder)))
    return 0


@pytest.mark.slow
def test_resume_on_another_layout(straight_run, tmp_path):
    """Saved by FSDP on 2 ranks, resumed on 1 process: same trajectory as the straight run (1e-5)."""
    run, straight = straight_run
    fsdp_run = tmp_path / "fsdp2"
    run_distributed(_train_fsdp_and_report, 2, str(fsdp_run))
    meta = json.loads((step_folder(fsdp_run, 3) / "meta.json").read_text())
    assert meta["layout"]["world_size"] == 2 and meta["layout"]["data_parallel_degree"] == 2
    single_run = tmp_path / "single"
    shutil.copytree(step_folder(fsdp_run, 3), step_folder(single_run, 3))
    assert_same_trajectory(by_step(train(tiny_config(single_run, "--data.num_workers", "2"))), straight)
    assert_same_weights(step_folder(run, 6), step_folder(single_run, 6), atol=1e-5)


def _train_tp_then_resume_as_fsdp4(folder: str) -> list:
    """FSDP 2 x TP 2 for 6 steps (saving 3 and 6), then FSDP 4 x TP 1 resumed from its step 3."""
    import torch.distributed as dist

    tp_run, fsdp_run = Path(folder) / "tp", Path(folder) / "fsdp4"
    train(tiny_config(tp_run, "--parallelism.tensor_parallel_degree", "2"))
    if dist.get_rank() == 0:
        shutil.copytree(step_folder(tp_run, 3), step_folder(fsdp_run, 3))
    dist.barrier()
    return train(tiny_config(fsdp_run, "--training.micro_batch_size", "2"))  # 4 ranks x 2 rows: the same 8


@pytest.mark.slow
def test_resume_from_tensor_parallel_on_another_layout(straight_run, tmp_path):
    _, straight = straight_run
    history = by_step(run_distributed(_train_tp_then_resume_as_fsdp4, 4, str(tmp_path), timeout=300)[0])
    meta = json.loads((step_folder(tmp_path / "tp", 3) / "meta.json").read_text())
    assert meta["layout"]["tensor_parallel"] == 2 and meta["layout"]["data_parallel_shard"] == 2
    assert_same_trajectory(history, straight)
    assert_same_weights(step_folder(straight_run[0], 6), step_folder(tmp_path / "fsdp4", 6), atol=1e-5)


def _save_corrupt_then_resume(folder: str) -> str:
    """2 FSDP ranks: 3 steps (saved), flip bytes in a file of rank 1, resume: the error each rank raises."""
    import torch.distributed as dist

    run = Path(folder)
    train(tiny_config(run, "--training.steps", "3"))
    if dist.get_rank() == 0:
        flip_bytes(step_folder(run, 3) / "__1_0.distcp")  # the file of rank 1's largest shards
    dist.barrier()
    with pytest.raises(CheckpointError) as caught:
        train(tiny_config(run))
    return str(caught.value)


@pytest.mark.slow
def test_corrupt_file_is_named_on_every_rank(tmp_path):
    corrupt = step_folder(tmp_path, 3) / "__1_0.distcp"
    assert run_distributed(_save_corrupt_then_resume, 2, str(tmp_path)) == [
        f"checkpoint file {corrupt} is corrupt (checksum mismatch): load an earlier checkpoint"] * 2


KILLED_CHILD = """
import sys, time
from pathlib import Path
from torch.distributed.checkpoint import filesystem
sys.path.insert(0, {tests!r})
sys.path.insert(0, {tests!r} + "/checkpoint")
from test_checkpointer import tiny_config
from titanlite.train import train

marker, opened = Path({marker!r}), []
original = filesystem.FileSystem.create_stream
def create_stream(self, path, mode):
    if "step-00000006" in str(path) and "wb" in mode:  # the second save: announce it, then hang mid-write
        marker.write_text("saving")
        time.sleep(600)
    return original(self, path, mode)
filesystem.FileSystem.create_stream = create_stream
train(tiny_config(Path({run!r}), "--data.num_workers", "2"))
"""


@pytest.mark.slow
def test_kill_9_during_save_keeps_the_previous_checkpoint(straight_run, tmp_path):
    _, straight = straight_run
    run, marker = tmp_path / "killed", tmp_path / "saving"
    script = KILLED_CHILD.format(tests=str(ROOT / "tests"), marker=str(marker), run=str(run))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, f"child exited early: {child.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "child never reached the save"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert step_folder(run, 3).is_dir() and not step_folder(run, 6).exists()
    assert (run / "checkpoint" / "step-00000006.partial").is_dir()  # left behind, never to be loaded
    history = by_step(train(tiny_config(run, "--data.num_workers", "2")))  # resume=auto
    assert history == {step: straight[step] for step in (4, 5, 6)}
    assert not (run / "checkpoint" / "step-00000006.partial").exists()  # replaced by the complete save


# --- Checkpointer on its own: retention, model-only load, bad input ---------------------------

def build_states(config):
    model = build_model(resolve(config, 1, 2048).config.model, config.training.seq_len, "cpu")
    model.init_weights(seed=config.training.seed)
    optimizer = build_optimizer(model, config.optimizer, optimizer_update(config, "cpu"), config.compile.enable)
    return {"model": model, "optimizer": optimizer, "train_state": TrainState()}


def take_steps(states, count: int) -> None:
    model, optimizer = states["model"], states["optimizer"]
    for _ in range(count):
        tokens = torch.randint(0, 2048, (2, 16))
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        states["train_state"].step += 1


def snapshot(states) -> dict:
    model_state = {k: v.clone() for k, v in states["model"].state_dict().items()}
    optimizer_state = {(k, n): t.clone() for k, s in states["optimizer"].state.items() for n, t in s.items()}
    return {"model": model_state, "optimizer": optimizer_state, "step": states["train_state"].step}


def assert_unchanged(before: dict, states) -> None:
    after = snapshot(states)
    assert after["step"] == before["step"]
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key]), key
    assert before["optimizer"].keys() == after["optimizer"].keys()
    assert all(torch.equal(before["optimizer"][k], after["optimizer"][k]) for k in before["optimizer"])


def checkpointer_for(config, states) -> Checkpointer:
    run = resolve(config, 1, 2048)
    return Checkpointer(config.checkpoint, Path(config.job.dump_folder), states, run.to_dict(), run.layout)


def gloo_worker_threads() -> int:
    """This process's gloo worker threads (torch names them pt_gloo_runloop)."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += (task / "comm").read_text().strip() == "pt_gloo_runloop"
        except OSError:  # exited meanwhile
            pass
    return count


def _save_close_and_count_gloo_threads(folder: str) -> list[tuple[int, int, int]]:
    counts = []
    for async_mode in ("disabled", "async"):
        config = tiny_config(Path(folder) / async_mode, "--checkpoint.async_mode", async_mode)
        states = build_states(config)
        before = gloo_worker_threads()
        checkpointer = checkpointer_for(config, states)
        take_steps(states, 1)
        checkpointer.save(1)
        saving = gloo_worker_threads()
        checkpointer.close()
        counts.append((before, saving, gloo_worker_threads()))
    return counts


def test_close_ends_the_checkpoint_group_and_its_threads(tmp_path):
    """A finished 2-process run aborted at exit (SIGABRT) when a gloo thread of the checkpoint's group
    freed the last save's broadcast after interpreter shutdown had begun: close() joins those threads."""
    per_rank = run_distributed(_save_close_and_count_gloo_threads, 2, str(tmp_path))
    for before, saving, closed in per_rank[0] + per_rank[1]:  # sync, then async saves
        if saving == before:
            pytest.skip("this torch does not name its gloo threads pt_gloo_runloop")
        assert closed == before < saving


def test_retention_keeps_the_newest_and_clears_crash_leftovers(tmp_path):
    config = tiny_config(tmp_path, "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    folder = tmp_path / "checkpoint"
    (folder / "step-00000001.partial").mkdir(parents=True)  # a crashed save, older than anything kept
    (folder / "step-00000099.partial").mkdir()  # newer than the newest complete: kept (may be in flight)
    (folder / "step-00000000").mkdir()  # published, then lost its files: evidence, never deleted
    (folder / "step-00000000" / "__0_0.distcp").write_bytes(b"data")
    for step in range(1, 6):
        take_steps(states, 1)
        checkpointer.maybe_save(step)
    checkpointer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000000", "step-00000004", "step-00000005",
                                                        "step-00000099.partial"]
    assert checkpointer.latest_complete() == folder / "step-00000005"
    (folder / "step-00000007").mkdir()  # a published name without its files: the newest, and refused
    assert checkpointer.latest_complete() == folder / "step-00000007"
    with pytest.raises(CheckpointError, match=f"checkpoint {folder / 'step-00000007'} has no meta.json"):
        checkpointer.load()


def test_retention_never_deletes_the_save_it_follows_nor_another_branch(tmp_path):
    """A folder holding a later step (saved before a rollback, or by a run resumed from an older
    checkpoint): with keep_latest_k=1 each new save is kept, the older ones of this branch go, and
    the later step stays."""
    config = tiny_config(tmp_path, "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "1")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    folder = tmp_path / "checkpoint"
    take_steps(states, 1)
    checkpointer.maybe_save(9)
    for step in range(1, 4):
        take_steps(states, 1)
        checkpointer.maybe_save(step)
        checkpointer.wait()
        assert sorted(p.name for p in folder.iterdir()) == [f"step-{step:08d}", "step-00000009"]
    checkpointer.close()


def test_a_load_waits_for_the_async_save_in_flight(tmp_path, monkeypatch):
    """A rollback loads while the last async save may still be writing (its DCP collectives share the
    checkpoint process group): the load first lets that save finish and publish."""
    import titanlite.checkpoint.checkpointer as checkpoint_module

    config = tiny_config(tmp_path, "--checkpoint.interval", "1", "--checkpoint.async_mode", "async")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    take_steps(states, 1)
    checkpointer.maybe_save(1)
    checkpointer.wait()
    slow_publish = checkpoint_module.publish
    monkeypatch.setattr(checkpoint_module, "publish", lambda *args: (time.sleep(1.0), slow_publish(*args)))
    take_steps(states, 1)
    checkpointer.maybe_save(2)
    assert checkpointer.load(tmp_path / "checkpoint" / "step-00000001") == 1
    assert not checkpointer.save_in_flight() and (tmp_path / "checkpoint" / "step-00000002" / "meta.json").is_file()
    checkpointer.close()


def test_a_rollback_sets_aside_the_checkpoints_saved_after_the_trouble(tmp_path):
    config = tiny_config(tmp_path, "--checkpoint.interval", "1")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    for step in range(1, 4):
        take_steps(states, 1)
        checkpointer.maybe_save(step)
    checkpointer.set_aside_after(1, "rollback-1")
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001", "step-00000002.rollback-1",
                                                        "step-00000003.rollback-1"]
    assert checkpointer.latest_complete() == folder / "step-00000001"  # what a restart resumes from
    checkpointer.close()


def _choose_with_a_lagging_listing(folder: str) -> list:
    """Rank 1 lists the folder as a lagging shared filesystem might (empty); both ranks must choose rank 0's."""
    import torch.distributed as dist
    config = tiny_config(Path(folder), "--checkpoint.interval", "1")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    for step in (1, 2):
        take_steps(states, 1)
        checkpointer.maybe_save(step)
    if dist.get_rank() == 1:
        checkpointer.complete_checkpoints = lambda warn=False: []
    chosen = [checkpointer.latest_complete(), checkpointer.latest_complete(before_step=2)]
    checkpointer.close()
    return [path.name for path in chosen]


@pytest.mark.slow
def test_every_rank_resumes_from_the_checkpoint_rank_0_lists(tmp_path):
    assert run_distributed(_choose_with_a_lagging_listing, 2, str(tmp_path)) == [["step-00000002",
                                                                                  "step-00000001"]] * 2


def test_a_kill_between_the_renames_of_a_re_save_keeps_the_earlier_copy(tmp_path):
    """publish() moves a re-saved step's earlier copy to step-N.replaced, then renames step-N.partial
    to step-N: killed in between, the next start puts the earlier copy back and resumes from it."""
    config = tiny_config(tmp_path, "--checkpoint.interval", "1")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    take_steps(states, 3)
    checkpointer.maybe_save(3)
    checkpointer.close()
    folder = tmp_path / "checkpoint"
    (folder / "step-00000003").rename(folder / "step-00000003.replaced")
    (folder / "step-00000003.partial").mkdir()  # the re-save, written but not yet renamed
    restarted = checkpointer_for(config, build_states(config))
    assert restarted.load() == 3
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003", "step-00000003.partial"]


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints(straight_run, tmp_path):
    run, _ = straight_run
    copy = tmp_path / "earlier"
    shutil.copytree(step_folder(run, 3), step_folder(copy, 3))
    before = folder_digest(step_folder(copy, 3))
    with pytest.raises(CheckpointError, match=r"^checkpoint.resume=never but .* holds an earlier run's checkpoints "
                                              r"\(newest step-00000003\).*resume it \(checkpoint.resume=auto\)"):
        train(tiny_config(copy, "--checkpoint.resume", "never"))
    assert folder_digest(step_folder(copy, 3)) == before and len(list((copy / "checkpoint").iterdir())) == 1
    train(tiny_config(copy, "--checkpoint.resume", "never", "--checkpoint.enable", "false"))  # saves nothing: fine


def test_model_only_initial_load(tmp_path):
    seed_config = tiny_config(tmp_path / "seed", "--training.seed", "7")
    seed_states = build_states(seed_config)
    seed_checkpointer = checkpointer_for(seed_config, seed_states)
    seed_checkpointer.save(0)
    seed_path = step_folder(tmp_path / "seed", 0)
    config = tiny_config(tmp_path / "run", "--checkpoint.initial_load_path", str(seed_path))
    states = build_states(config)
    assert checkpointer_for(config, states).load() is None  # weights only: training starts at step 1
    for name, tensor in seed_states["model"].state_dict().items():
        assert torch.equal(states["model"].state_dict()[name], tensor), name
    assert not states["optimizer"].state and states["train_state"].step == 0


@pytest.fixture()
def saved(tmp_path):
    """A run folder with one complete checkpoint at step 2, and fresh states to load it into."""
    config = tiny_config(tmp_path / "run")
    states = build_states(config)
    take_steps(states, 2)
    checkpointer = checkpointer_for(config, states)
    checkpointer.save(2)
    return step_folder(tmp_path / "run", 2), lambda: tiny_config(tmp_path / "run")


def expect_load_error(path: Path, config, *fragments: str) -> None:
    states = build_states(config)
    take_steps(states, 1)
    before = snapshot(states)
    with pytest.raises(CheckpointError) as caught:
        checkpointer_for(config, states).load(path)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    assert_unchanged(before, states)


def test_mismatched_model_is_rejected(saved):
    path, make_config = saved
    config = make_config()
    config.model.dim, config.model.n_heads = 32, 2
    expect_load_error(path, config, str(path), "model.dim=64 in the checkpoint, 32 in the config")
    config = make_config()
    config.model.vocab_size = 4096
    expect_load_error(path, config, "model.vocab_size=2048 in the checkpoint, 4096 in the config")
    meta = json.loads((path / "meta.json").read_text())  # meta.json agrees, the tensors do not
    meta["config"]["model"]["vocab_size"] = 4096
    (path / "meta.json").write_text(json.dumps(meta))
    expect_load_error(path, config, "model.tok_embeddings.weight has shape (2048, 64) in the checkpoint",
                      "(4096, 64) in this model")


class LoaderState:
    """A Stateful holding `state` (a stand-in for the data loader)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def test_state_saved_in_another_format_is_rejected(tmp_path):
    """A checkpoint whose data-loader state has other keys (titanlite before this version kept one
    pickled blob per DP rank, "dp0", ...) stops the load with one line naming the missing key."""
    config = tiny_config(tmp_path)
    states = build_states(config)
    checkpointer_for(config, {**states, "dataloader": LoaderState({"dp0": b"opaque"})}).save(1)
    fresh = build_states(config)
    loader = LoaderState({"global_row": 0, "seed": 0})
    with pytest.raises(CheckpointError, match=r"checkpoint .*step-00000001 has no dataloader state 'global_row' "
                                              r"\(saved by another titanlite version\?\)"):
        checkpointer_for(config, {**fresh, "dataloader": loader}).load(step_folder(tmp_path, 1))
    assert loader.state == {"global_row": 0, "seed": 0}


def test_missing_or_corrupt_files_are_rejected(saved):
    path, make_config = saved
    config = make_config()
    data_file = path / "__0_0.distcp"
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) // 2])
    expect_load_error(path, config, str(data_file), "truncated")
    data_file.unlink()
    expect_load_error(path, config, str(data_file), "missing")
    data_file.write_bytes(data)
    (path / ".metadata").write_bytes(b"not a pickle")
    expect_load_error(path, config, str(path / ".metadata"), "corrupt")
    (path / "meta.json").write_text("{ broken")
    expect_load_error(path, config, str(path / "meta.json"), "corrupt")
    partial = path.with_name(path.name + ".partial")
    path.rename(partial)
    expect_load_error(partial, config, str(partial), "incomplete")


def test_corrupt_data_is_refused_naming_the_file(saved):
    """16 flipped bytes in a data file (they loaded silently before): refused by the Checkpointer and by
    the single-process reader of convert.py. Files are verified as they load, so tensors of other
    files may already be in place: the error stops the run, nothing is saved from that state."""
    path, make_config = saved
    corrupt = file_holding(path, "model.tok_embeddings.weight")
    flip_bytes(corrupt)
    message = f"checkpoint file {corrupt} is corrupt (checksum mismatch): load an earlier checkpoint"
    config = make_config()
    for load in (checkpointer_for(config, build_states(config)).load, load_model_weights):
        with pytest.raises(CheckpointError) as caught:
            load(path)
        assert str(caught.value) == message


def test_a_checkpoint_without_checksums_loads_only_when_unverified_data_is_allowed(saved):
    """meta.json without crc32 (a damaged or hand-made one as likely as an old titanlite's): refused by the
    Checkpointer and by the single-process reader, naming the setting; loaded once it is set."""
    path, make_config = saved
    meta = json.loads((path / "meta.json").read_text())
    del meta["crc32"]
    (path / "meta.json").write_text(json.dumps(meta))
    expect_load_error(path, make_config(), f"checkpoint {path} has no checksums", "checkpoint.load_unverified=true",
                      "--load-unverified")
    with pytest.raises(CheckpointError, match="checkpoint.load_unverified=true"):
        load_model_weights(path)
    config = make_config()
    config.checkpoint.load_unverified = True
    states = build_states(config)
    assert checkpointer_for(config, states).load(path) == 2 and states["train_state"].step == 2
    weights, _ = load_model_weights(path, load_unverified=True)
    for name, tensor in states["model"].state_dict().items():
        assert torch.equal(weights[name], tensor), name


def test_cli_names_a_bad_checkpoint_and_exits_1(tmp_path, capsys):
    from titanlite.train import main

    with pytest.raises(SystemExit) as caught:
        main(["--config", "debug_model", *conftest.TINY_RUN, *CHECKPOINTS, "--job.dump_folder", str(tmp_path),
              "--checkpoint.resume", str(tmp_path / "missing")])
    assert caught.value.code == 1
    assert f"titanlite: checkpoint error: checkpoint {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_unwritable_folder_fails_at_start(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    config = tiny_config(tmp_path, "--checkpoint.folder", str(blocker))
    with pytest.raises(CheckpointError, match="checkpoint folder .*not-a-folder is not writable"):
        checkpointer_for(config, build_states(config))


class FullDisk:
    """A file that takes `capacity` bytes, then fails every write as a full disk does (ENOSPC)."""

    def __init__(self, file, capacity: int):
        self.file, self.room = file, capacity

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def fill_disk(monkeypatch, only_helper_threads: bool = False) -> None:
    """From now on every file DCP writes fills up after 4 KiB (or only those of its extra writer threads)."""
    original = filesystem.FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        with original(self, path, mode) as stream:
            helper = "_write_files_from_queue" in threading.current_thread().name
            yield FullDisk(stream, 4096) if "w" in mode and (helper or not only_helper_threads) else stream

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)


UNITS = {"bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


@pytest.mark.parametrize("async_mode, only_helper_threads", [("disabled", False), ("async", False), ("disabled", True),
                                                             ("async", True)])
def test_full_disk_is_one_line_and_keeps_state_and_previous_checkpoint(saved, monkeypatch, caplog, capfd, async_mode,
                                                                       only_helper_threads):
    """The disk fills up during a save, for every file or only for those of DCP's extra writer threads
    (their errors never reach DCP's caller): one line naming the file and the bytes needed, nothing
    else spilled (no thread tracebacks, warnings or logged tracebacks), the partial folder removed,
    the state and the previous checkpoint intact."""
    path, make_config = saved
    config = make_config()
    config.checkpoint.async_mode = async_mode
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    assert checkpointer.load() == 2
    take_steps(states, 1)
    before = snapshot(states)
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    fill_disk(monkeypatch, only_helper_threads)
    with warnings.catch_warnings(record=True) as spilled, pytest.raises(CheckpointError) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # as titanlite does
        checkpointer.save(3)
        checkpointer.wait()  # an async save reports its failure here
    monkeypatch.undo()
    message = str(caught.value)
    match = re.fullmatch(r"no space left on device writing (\S+) \(([\d.]+) (\w+) needed, [\d.]+ \w+ free\) at step 3; "
                         r"(\S+) was removed, the previous checkpoint \((\S+)\) is intact: free space or set "
                         r"checkpoint.folder, then resume", message)
    assert match, message
    partial = path.with_name("step-00000003.partial")
    assert Path(match[1]).parent == partial and match[1].endswith(".distcp")
    assert (match[4], match[5]) == (str(partial), str(path))
    checkpoint_bytes = sum(f.stat().st_size for f in path.glob("*.distcp"))  # the same tensors, saved at step 2
    assert float(match[2]) * UNITS[match[3]] == pytest.approx(checkpoint_bytes, rel=0.1)
    assert not thread_errors and not spilled and not [record for record in caplog.records if record.exc_info]
    assert "Traceback" not in capfd.readouterr().err
    assert_unchanged(before, states)
    assert not partial.exists()  # its space is given back
    assert checkpointer.latest_complete() == path
    assert checkpointer_for(config, build_states(config)).load() == 2  # still loadable


def test_cli_full_disk_is_one_line(tmp_path, monkeypatch, capfd):
    """What a user sees when the disk fills up during a save: the error line, no traceback (there
    were ~180 lines ending in torch's "inline_container.cc ... unexpected pos")."""
    from titanlite.train import main

    fill_disk(monkeypatch)
    with pytest.raises(SystemExit) as caught:
        main(["--config", "debug_model", *conftest.TINY_RUN, *CHECKPOINTS, "--job.dump_folder", str(tmp_path)])
    errors = capfd.readouterr().err
    assert caught.value.code == 1
    assert "Traceback" not in errors and "inline_container" not in errors
    assert errors.strip().splitlines()[-1].startswith(
        f"titanlite: checkpoint error: no space left on device writing {step_folder(tmp_path, 3)}.partial/__0_")


def test_async_saves_in_a_row_load_exactly_with_a_stager_that_closes_itself(tmp_path, monkeypatch):
    """Three async saves, each followed by training, then load the last.

    torch 2.11's DefaultStager empties its copier at the end of every stage (2.13's keeps it, with
    its pinned buffers); that broke the second save on the GPU (KeyError: <class 'type'>). The
    patch below makes this torch's stager do what 2.11's does.
    """
    from torch.distributed.checkpoint.staging import DefaultStager

    original_stage = DefaultStager._stage

    def stage_then_close(self, state_dict, **kwargs):
        staged = original_stage(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return staged

    monkeypatch.setattr(DefaultStager, "_stage", stage_then_close)
    config = tiny_config(tmp_path, "--checkpoint.async_mode", "async", "--checkpoint.write_threads", "3")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)

    def by_name(states) -> dict:
        model, optimizer = states["model"], states["optimizer"]
        tensors = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        for name, parameter in model.named_parameters():
            tensors.update({(name, key): value.clone() for key, value in optimizer.state[parameter].items()})
        return tensors

    for step in (1, 2, 3):
        take_steps(states, 1)
        states["train_state"].step = step
        checkpointer.save(step)
        saved = by_name(states)
        take_steps(states, 1)  # changes the live state while the save may still be writing
    checkpointer.close()
    assert len(list(step_folder(tmp_path, 3).glob("*.distcp"))) == 3  # one file per writer thread
    fresh = build_states(config)
    assert checkpointer_for(config, fresh).load() == 3
    loaded = by_name(fresh)
    assert loaded.keys() == saved.keys() and len(saved) > 3 * len(list(fresh["model"].parameters()))
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key


def test_a_resume_follows_the_new_config_and_says_what_changed(tmp_path, capfd):
    """Config wins on resume (as in torchtitan and Megatron): a new LR or step budget reshapes the schedule
    from the next step, and one log line lists every setting that differs from the checkpoint's run."""
    import math

    train(tiny_config(tmp_path, "--training.steps", "6", "--optimizer.lr", "3e-4"))
    capfd.readouterr()
    resumed = train(tiny_config(tmp_path, "--training.steps", "12", "--optimizer.lr", "1e-4"))
    assert resumed[0]["step"] == 7
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 12))  # no warmup; cosine to 0.1 over 12 steps
    assert resumed[0]["lr"] == pytest.approx(1e-4 * cosine, rel=1e-12)
    log = capfd.readouterr().err
    line = next(line for line in log.splitlines() if "resume: this run's config differs" in line)
    assert "applies from step 7" in line
    assert "optimizer.lr: 0.0003 -> 0.0001" in line and "training.steps: 6 -> 12" in line
    assert "data.source" not in line  # only what changed
