"""Checkpoints: exact resume, resume across layouts, kill -9 during a save, retention, bad input."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from torch.distributed.checkpoint import filesystem

from titanlite.checkpoint import Checkpointer, CheckpointError, TrainState, load_model_weights
from titanlite.config import load_config
from titanlite.model import build_model
from titanlite.optim import build_lr_scheduler, build_optimizer
from titanlite.config import derive
from titanlite.parallelize import ParallelDims
from titanlite.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.intermediate_size", "128", "--model.vocab_size", "2048", "--training.seq_len", "32",
        "--training.micro_batch_size", "4", "--training.global_batch_tokens", "256", "--training.steps", "6",
        "--training.device", "cpu", "--training.mixed_precision", "fp32", "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard", "false", "--data.default_num_documents", "300",
        "--checkpoint.enable", "true", "--checkpoint.interval", "3"]


def tiny_config(folder: Path, *overrides: str):
    return load_config("debug_model", [*TINY, "--job.dump_folder", str(folder), *overrides])


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


KILLED_CHILD = """
import sys, time
from pathlib import Path
from torch.distributed.checkpoint import filesystem
sys.path.insert(0, {tests!r})
from test_checkpoint import tiny_config
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
    config.model.vocab_size = config.model.vocab_size or 2048
    model = build_model(config.model, config.training.seq_len, "cpu")
    model.init_weights(seed=config.training.seed)
    optimizer = build_optimizer(model, config, "cpu")
    scheduler = build_lr_scheduler(optimizer, config, derive(config, 1))
    return {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler, "train_state": TrainState()}


def take_steps(states, count: int) -> None:
    model, optimizer = states["model"], states["optimizer"]
    for _ in range(count):
        tokens = torch.randint(0, 2048, (2, 16))
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        states["lr_scheduler"].step()
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
    return Checkpointer(config, ParallelDims.from_config(config, 1), config.job.dump_folder, states)


def test_retention_keeps_the_newest_and_clears_crash_leftovers(tmp_path):
    config = tiny_config(tmp_path, "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2")
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    folder = tmp_path / "checkpoint"
    (folder / "step-00000001.partial").mkdir(parents=True)  # a crashed save, older than anything kept
    (folder / "step-00000099.partial").mkdir()  # newer than the newest complete: kept (may be in flight)
    for step in range(1, 6):
        take_steps(states, 1)
        checkpointer.maybe_save(step)
    checkpointer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004", "step-00000005", "step-00000099.partial"]
    assert checkpointer.latest_complete() == folder / "step-00000005"
    (folder / "step-00000007").mkdir()  # a complete-looking name without its files: ignored
    assert checkpointer.latest_complete() == folder / "step-00000005"


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


def test_cli_names_a_bad_checkpoint_and_exits_1(tmp_path, capsys):
    from titanlite.train import main

    with pytest.raises(SystemExit) as caught:
        main(["--config", "debug_model", *TINY, "--job.dump_folder", str(tmp_path),
              "--checkpoint.resume", str(tmp_path / "missing")])
    assert caught.value.code == 1
    assert f"titanlite: checkpoint error: checkpoint {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_unwritable_folder_fails_at_start(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    config = tiny_config(tmp_path, "--checkpoint.folder", str(blocker))
    with pytest.raises(CheckpointError, match="checkpoint folder .*not-a-folder is not writable"):
        checkpointer_for(config, build_states(config))


@pytest.mark.parametrize("async_mode, only_helper_threads", [("disabled", False), ("async", False), ("disabled", True),
                                                             ("async", True)])
def test_full_disk_keeps_state_and_previous_checkpoint(saved, monkeypatch, async_mode, only_helper_threads):
    """The disk is full for every file, or only for the files of DCP's extra writer threads (their
    errors do not reach the caller: the writer must notice the missing items itself)."""
    path, make_config = saved
    config = make_config()
    config.checkpoint.async_mode = async_mode
    states = build_states(config)
    checkpointer = checkpointer_for(config, states)
    assert checkpointer.load() == 2
    take_steps(states, 1)
    before = snapshot(states)

    original = filesystem.FileSystem.create_stream

    def disk_full(self, file_path, mode):
        if not only_helper_threads or "_write_files_from_queue" in threading.current_thread().name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file_path))
        return original(self, file_path, mode)

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", disk_full)
    reason = "items were not written" if only_helper_threads else "No space left"
    with pytest.raises(CheckpointError, match=f"saving step 3 to .*step-00000003.partial failed.*{reason}"):
        checkpointer.save(3)
        checkpointer.wait()  # an async save reports its failure here
    monkeypatch.undo()
    assert_unchanged(before, states)
    assert not path.with_name("step-00000003.partial").exists()  # its space is given back
    assert checkpointer.latest_complete() == path
    assert checkpointer_for(config, build_states(config)).load() == 2  # still loadable


def test_async_saves_in_a_row_reuse_the_stager_and_load_exactly(tmp_path, monkeypatch):
    """Three async saves through one stager, each followed by training, then load the last.

    torch 2.11's async_save closes the stager it is given once the upload is done (2.13 does not);
    that broke the second save on the GPU (KeyError: <class 'type'>). The wrapper below does what
    2.11 does, so this test covers that behaviour on any torch version.
    """
    import torch.distributed.checkpoint as dcp

    original_async_save = dcp.async_save

    def async_save_closing_the_stager(*args, async_stager=None, **kwargs):
        response = original_async_save(*args, async_stager=async_stager, **kwargs)
        upload = getattr(response, "upload_completion", response)
        upload.add_done_callback(lambda _: async_stager.close())
        return response

    monkeypatch.setattr(dcp, "async_save", async_save_closing_the_stager)
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
        if step == 3:  # closed behind the wrapper's back (another torch version): still saves
            checkpointer.stager.stager.close()
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
