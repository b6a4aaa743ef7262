"""Checkpoint folders on disk: naming, atomic publishing, validation, single-process read/write.

A checkpoint is a folder `step-NNNNNNNN/` holding DCP's files (`.metadata`, `__<rank>_<n>.distcp`)
and a `meta.json` for people (step, tokens, layout, the resolved config). It is written as
`step-NNNNNNNN.partial/` and renamed once complete (see checkpoint.py). Everything here works
in one process without torch.distributed: convert.py and the tests use it directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

logger = logging.getLogger("titanlite")
# Single-process reads and writes pass no_dist=True on purpose; DCP still warns on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
STEP_FOLDER = re.compile(r"^step-(\d+)$")
PARTIAL = ".partial"
MODEL_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size")



class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the file and the fix."""


class ParallelFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, reading the data files of a checkpoint in parallel (one thread per file).

    DCP's own reader goes through the files one after another; a rank writes one file per writer
    thread (checkpoint.write_threads), so reading them side by side overlaps disk reads,
    deserialization and host-to-device copies. Each thread reads its own file and fills its own
    tensors, using DCP's reader unchanged on a part of the plan.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 8):
        super().__init__(path)
        self.threads = threads

    def read_data(self, plan, planner) -> torch.futures.Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        if self.threads <= 1 or len(per_file) <= 1:
            return super().read_data(plan, planner)
        parts = [dataclasses.replace(plan, items=items) for items in per_file.values()]
        with ThreadPoolExecutor(min(self.threads, len(parts)), thread_name_prefix="checkpoint-read") as pool:
            for done in [pool.submit(super(ParallelFileSystemReader, self).read_data, part, planner)
                         for part in parts]:
                done.result().wait()  # raises the first failure
        finished: torch.futures.Future = torch.futures.Future()
        finished.set_result(None)
        return finished


class CheckedFileSystemWriter(dcp.FileSystemWriter):
    """DCP's file writer, failing when any planned item was not written.

    With thread_count > 1, DCP's extra writer threads end silently on an error (a full disk while
    writing one file): their items are left out of .metadata and the save "succeeds" without them.
    """

    def write_data(self, plan, planner) -> torch.futures.Future:
        written = super().write_data(plan, planner)
        results = written.wait()
        missing = {item.index for item in plan.items} - {result.index for result in results}
        if missing:
            example = min(index.fqn for index in missing)
            raise OSError(f"{len(missing)} of {len(plan.items)} items were not written (e.g. {example!r}): "
                          f"a writer thread failed, see its traceback above")
        return written


def describe(error: BaseException) -> str:
    """One line for a failed save or load; DCP wraps each rank's exception with its traceback."""
    if isinstance(error, CheckpointException) and error.failures:
        ranks = sorted(error.failures)
        failure = error.failures[ranks[0]]
        cause = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(cause).__name__}: {cause} (rank {', '.join(map(str, ranks))})"
    return f"{type(error).__name__}: {error}"


def fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a partial left by a crash at this very step
    path.mkdir(parents=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(partial: Path, final: Path, meta: dict) -> None:
    """Write meta.json into a fully written `partial` folder, then rename it to `final` (atomic)."""
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync(partial / "meta.json")
    replaced = final.with_name(final.name + ".replaced")
    if final.exists():  # re-saving a step after a rollback: move the old one aside, never merge
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(partial, final)
    _fsync(final.parent)  # the rename itself must survive a power loss
    shutil.rmtree(replaced, ignore_errors=True)


def read_checkpoint(path: Path):
    """(meta.json dict, DCP Metadata) of a complete checkpoint, or a CheckpointError saying why not."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    if path.name.endswith(PARTIAL) or not (path / "meta.json").is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (a save that did not finish: no meta.json); "
                              f"load an earlier one or set checkpoint.resume=auto")
    try:
        meta = json.loads((path / "meta.json").read_text())
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / 'meta.json'} is corrupt ({error}): load an earlier checkpoint") from None
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # noqa: BLE001 - unpickling garbage raises anything
        raise CheckpointError(f"{path / '.metadata'} is missing or corrupt ({type(error).__name__}: {error}): "
                              f"load an earlier checkpoint") from None
    needed: dict[str, int] = {}  # every data file must hold the bytes .metadata points to
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual is None or actual < size:
            state = "missing" if actual is None else f"truncated ({actual:,} of {size:,} bytes)"
            raise CheckpointError(f"checkpoint file {path / name} is {state}: load an earlier checkpoint")
    logger.debug("checkpoint %s: step %d", path, step)
    return meta, metadata


def _flat_tensors(tree, prefix: str):
    """(dotted key, tensor) pairs of a nested dict/list, as DCP flattens it."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, torch.Tensor):
            yield f"{prefix}.{key}", value
        else:
            yield from _flat_tensors(value, f"{prefix}.{key}")


def check_model_matches(path: Path, meta: dict, metadata, model_config, states: dict) -> None:
    """Raise a CheckpointError naming the mismatch if `states` cannot load from the checkpoint."""
    saved = meta.get("config", {}).get("model", {})
    differences = [f"model.{field}={saved[field]} in the checkpoint, {getattr(model_config, field)} in the config"
                   for field in MODEL_SHAPE_FIELDS if field in saved and saved[field] != getattr(model_config, field)]
    if differences:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(differences)}: "
                              f"use the checkpoint's model config, or a new job.dump_folder")
    for name in ("model", "optimizer"):
        if name not in states:
            continue
        for key, tensor in _flat_tensors(states[name].state_dict(), name):
            entry = metadata.state_dict_metadata.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint {path} has no tensor {key!r}: it was saved from another model "
                                      f"or optimizer; use model-only loading or a matching checkpoint")
            if tuple(entry.size) != tuple(tensor.shape):
                raise CheckpointError(f"checkpoint {path}: {key} has shape {tuple(entry.size)} in the checkpoint "
                                      f"but {tuple(tensor.shape)} in this model")


def load_model_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full (unsharded) model tensors of a checkpoint, on CPU, read by this one process; and meta.json."""
    meta, metadata = read_checkpoint(path)
    template = {key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
                for key, entry in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    state = {"model": template}
    dcp.load(state, storage_reader=ParallelFileSystemReader(str(path)), no_dist=True)
    return state["model"], meta


def save_model_checkpoint(weights: dict[str, torch.Tensor], folder: Path, step: int, config) -> Path:
    """A model-only checkpoint `folder/step-N`, written by this one process (seed, HF import)."""
    final = Path(folder) / f"step-{step:08d}"
    partial = final.with_name(final.name + PARTIAL)
    fresh_folder(partial)
    dcp.save({"model": weights}, storage_writer=CheckedFileSystemWriter(str(partial), thread_count=8), no_dist=True)
    publish(partial, final, {"step": step, "tokens_seen": 0, "model_only": True, "layout": {"world_size": 1},
                             "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "torch_version": torch.__version__, "config": config.to_dict()})
    return final
