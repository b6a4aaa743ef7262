"""Checkpoint folders on disk: naming, checksummed DCP storage, atomic publishing, validation.

A checkpoint is a folder `step-NNNNNNNN/` holding DCP's files (`.metadata`, `__<rank>_<n>.distcp`:
one data file per writer thread) and a `meta.json` (step, tokens, layout, the resolved config,
and the CRC-32 of every data file and of .metadata). It is written as `step-NNNNNNNN.partial/`
and renamed once complete (see checkpoint.py): only `.partial` folders are unfinished, and a
`step-N` folder that does not load is an error to report, never something to overwrite.
Everything here works in one process without torch.distributed: convert.py and the tests use it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

logger = logging.getLogger("titanlite")
# Single-process reads and writes pass no_dist=True on purpose; DCP still warns on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
STEP_FOLDER = re.compile(r"^step-(\d+)$")
PARTIAL = ".partial"
REPLACED = ".replaced"  # a published step moved aside while a re-save of the same step is published
DATA_SUFFIX = ".distcp"
CHECKSUMS_SUFFIX = "crc32.json"  # per-rank sidecar "__<rank>_crc32.json", merged into meta.json at publish
MODEL_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the file and the fix."""


def crc32_hex(data) -> str:
    return f"{zlib.crc32(data):08x}"


# --- checksummed DCP storage --------------------------------------------------------------------

class _HashingStream:
    """A file opened for writing that keeps the CRC-32 of what goes through it, and its first OSError.

    torch.save reports a failed write (a full disk) as "inline_container.cc ... unexpected pos":
    the OSError kept here is the real cause.
    """

    def __init__(self, file):
        self.file, self.crc32, self.error = file, 0, None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        self.crc32 = zlib.crc32(data, self.crc32)  # releases the GIL: DCP's writer threads hash in parallel
        return written

    def __getattr__(self, name):  # tell, flush, fileno, close: the file's own
        return getattr(self.file, name)


class ChecksummedFileSystem(FileSystem):
    """DCP's local file system, checksumming the data files (.distcp) that stream through it.

    Writing: the writer thread hashes each buffer as it writes it (no second pass over the data)
    and the CRC-32 of a finished file goes into `written`. A failure goes into `failures` instead
    of being raised: DCP's extra writer threads would die with it and the caller never hear of it.
    Reading: the reader thread reads the whole file once, checks it against `expected` (file name
    -> CRC-32 hex; None: a checkpoint saved without checksums), and DCP parses it from memory.
    """

    def __init__(self, expected: dict[str, str] | None = None):
        super().__init__()
        self.expected = expected
        self.written: dict[str, str] = {}
        self.failures: list[tuple[str, BaseException]] = []

    @contextmanager
    def create_stream(self, path, mode: str):
        path = Path(path)
        if path.suffix != DATA_SUFFIX:
            with super().create_stream(path, mode) as stream:
                yield stream
        elif "r" in mode:
            yield io.BytesIO(self._read_verified(path))
        else:
            stream = None
            try:
                with super().create_stream(path, mode) as file:
                    stream = _HashingStream(file)
                    yield stream
            except Exception as error:  # noqa: BLE001 - write_data raises the first one
                self.failures.append((str(path), (stream and stream.error) or error))
                if stream is None:
                    raise  # could not even open it: nothing was yielded, so it cannot be swallowed
                return
            self.written[path.name] = f"{stream.crc32:08x}"

    def _read_verified(self, path: Path) -> bytes:
        data = path.read_bytes()
        if self.expected is not None:
            expected = self.expected.get(path.name)
            if expected is None:
                raise CheckpointError(f"checkpoint file {path} has no checksum in meta.json (not written by this "
                                      f"save): load an earlier checkpoint")
            if crc32_hex(data) != expected:
                raise CheckpointError(f"checkpoint file {path} is corrupt (checksum mismatch): "
                                      f"load an earlier checkpoint")
        return data


class ChecksummedFileSystemWriter(dcp.FileSystemWriter):
    """DCP's file writer through a ChecksummedFileSystem.

    After its files are written, each rank writes `__<rank>_crc32.json` (file name -> CRC-32)
    beside them; publish() merges these into meta.json. A failure of any writer thread is raised
    here, naming its file (with thread_count > 1, DCP would otherwise leave that thread's items
    out of .metadata and report success).
    """

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = ChecksummedFileSystem()

    def write_data(self, plan, planner) -> torch.futures.Future:
        written = super().write_data(plan, planner)
        written.wait()
        if self.fs.failures:
            path, error = self.fs.failures[0]
            if isinstance(error, OSError):
                raise OSError(error.errno, error.strerror, path)
            raise error
        sidecar = Path(self.path) / f"{plan.storage_data.prefix}{CHECKSUMS_SUFFIX}"
        sidecar.write_text(json.dumps(self.fs.written))
        if self.sync_files:
            _fsync(sidecar)
        return written


class ChecksummedFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader through a ChecksummedFileSystem, one thread per data file.

    DCP's own reader goes through the files one after another; a rank writes one file per
    writer thread (checkpoint.write_threads), so reading them side by side overlaps disk reads,
    checksums, deserialization and host-to-device copies. Each thread reads and verifies its own
    file and fills its own tensors, with DCP's reader unchanged on that part of the plan. A file's
    bytes are held in host memory while its tensors load (up to `threads` files at a time).
    """

    def __init__(self, path, expected: dict[str, str] | None, threads: int = 8):
        super().__init__(path)
        self.fs = ChecksummedFileSystem(expected)
        self.threads = threads

    def read_data(self, plan, planner) -> torch.futures.Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        if self.threads <= 1 or len(per_file) <= 1:
            return super().read_data(plan, planner)
        parts = [dataclasses.replace(plan, items=items) for items in per_file.values()]
        with ThreadPoolExecutor(min(self.threads, len(parts)), thread_name_prefix="checkpoint-read") as pool:
            for done in [pool.submit(super(ChecksummedFileSystemReader, self).read_data, part, planner)
                         for part in parts]:
                done.result().wait()  # raises the first failure
        finished: torch.futures.Future = torch.futures.Future()
        finished.set_result(None)
        return finished


def first_failure(error: BaseException) -> BaseException:
    """The exception behind a failed DCP call (DCP wraps each failed rank's in a CheckpointException)."""
    if isinstance(error, CheckpointException) and error.failures:
        failure = error.failures[min(error.failures)]
        return failure[0] if isinstance(failure, tuple) else failure
    return error


def describe(error: BaseException) -> str:
    """One line for a failed save or load."""
    cause = first_failure(error)
    ranks = f" (rank {', '.join(map(str, sorted(error.failures)))})" if cause is not error else ""
    return f"{type(cause).__name__}: {cause}{ranks}"


# --- folders: publish, validate -----------------------------------------------------------------

def looks_complete(path: Path) -> bool:
    """A folder with the files of a published checkpoint (the only kind retention may delete)."""
    return (path / "meta.json").is_file() and (path / ".metadata").is_file()


def fresh_folder(partial: Path, final: Path) -> None:
    """An empty `partial` folder to save into; refuses if `final` exists and is not a checkpoint."""
    if final.exists() and not looks_complete(final):
        raise CheckpointError(f"{final} exists but is not a complete checkpoint (no meta.json or .metadata); it is "
                              f"never overwritten: move it out of {final.parent}, or set checkpoint.folder")
    shutil.rmtree(partial, ignore_errors=True)  # a partial left by a crash at this very step
    partial.mkdir(parents=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(partial: Path, final: Path, meta: dict) -> None:
    """Write meta.json (with every rank's checksums) into a fully written `partial`, then rename it
    to `final` (atomic)."""
    checksums = {".metadata": crc32_hex((partial / ".metadata").read_bytes())}
    sidecars = sorted(partial.glob(f"__*_{CHECKSUMS_SUFFIX}"))
    for sidecar in sidecars:
        checksums.update(json.loads(sidecar.read_text()))
    (partial / "meta.json").write_text(json.dumps({**meta, "crc32": checksums}, indent=2))
    _fsync(partial / "meta.json")
    for sidecar in sidecars:
        sidecar.unlink()
    _fsync(partial)  # the data files' entries and DCP's .metadata rename, before the folder is published
    replaced = final.with_name(final.name + REPLACED)
    if final.exists():  # re-saving a step after a rollback: move the old one aside, never merge
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(partial, final)
    _fsync(final.parent)  # the rename itself must survive a power loss
    shutil.rmtree(replaced, ignore_errors=True)


def restore_replaced(folder: Path) -> list[Path]:
    """Put back a step that publish() had moved aside when a kill came before the re-save took its
    name: `step-N.replaced` without `step-N` is that step's complete earlier copy. Returns the
    restored folders."""
    restored = []
    for path in sorted(folder.glob(f"step-*{REPLACED}")) if folder.is_dir() else []:
        final = path.with_name(path.name.removesuffix(REPLACED))
        if STEP_FOLDER.match(final.name) and not final.exists() and looks_complete(path):
            os.replace(path, final)
            restored.append(final)
    return restored


def read_checkpoint(path: Path):
    """(meta.json dict, DCP Metadata) of a complete checkpoint, or a CheckpointError saying why not."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    if path.name.endswith(PARTIAL):
        raise CheckpointError(f"checkpoint {path} is incomplete (a save that did not finish): load an earlier one "
                              f"or set checkpoint.resume=auto")
    fix = f"restore it, or move {path} out of {path.parent} to resume from the checkpoint before it"
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no meta.json, so it cannot be loaded: {fix}")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path} has no .metadata (a copy made with `cp dir/*` leaves out hidden "
                              f"files: copy the folder itself): {fix}")
    try:
        meta = json.loads((path / "meta.json").read_text())
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / 'meta.json'} is corrupt ({error}): load an earlier checkpoint") from None
    checksums = meta.get("crc32")
    if checksums is not None and crc32_hex((path / ".metadata").read_bytes()) != checksums.get(".metadata"):
        raise CheckpointError(f"checkpoint file {path / '.metadata'} is corrupt (checksum mismatch): "
                              f"load an earlier checkpoint")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # noqa: BLE001 - unpickling garbage raises anything
        raise CheckpointError(f"{path / '.metadata'} is corrupt ({type(error).__name__}: {error}): "
                              f"load an earlier checkpoint") from None
    needed: dict[str, int] = {}  # every data file must hold the bytes .metadata points to
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual is None or actual < size:
            state = "missing" if actual is None else f"truncated ({actual:,} of {size:,} bytes)"
            raise CheckpointError(f"checkpoint file {path / name} is {state}: load an earlier checkpoint")
    if checksums is None:
        logger.warning("checkpoint %s has no checksums (saved by an older titanlite): its data is not verified", path)
    logger.debug("checkpoint %s: step %d", path, step)
    return meta, metadata


def flat_tensors(tree, prefix: str):
    """(dotted key, tensor) pairs of a nested dict/list, as DCP flattens it."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, torch.Tensor):
            yield f"{prefix}.{key}", value
        else:
            yield from flat_tensors(value, f"{prefix}.{key}")


def check_states_match(path: Path, meta: dict, metadata, model_config, states: dict) -> None:
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
        for key, tensor in flat_tensors(states[name].state_dict(), name):
            entry = metadata.state_dict_metadata.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint {path} has no tensor {key!r}: it was saved from another model "
                                      f"or optimizer; use model-only loading or a matching checkpoint")
            if tuple(entry.size) != tuple(tensor.shape):
                raise CheckpointError(f"checkpoint {path}: {key} has shape {tuple(entry.size)} in the checkpoint "
                                      f"but {tuple(tensor.shape)} in this model")
    prefixes = {".".join(key.split(".")[:depth]) for key in metadata.state_dict_metadata
                for depth in range(2, key.count(".") + 2)}
    for name in states.keys() - {"model", "optimizer"}:
        for key, value in states[name].state_dict().items():
            empty = isinstance(value, (dict, list)) and not value  # DCP stores no key for it
            if f"{name}.{key}" not in prefixes and not empty:
                raise CheckpointError(f"checkpoint {path} has no {name} state {key!r} (saved by another titanlite "
                                      f"version?): resume with the version that saved it, or load its weights with "
                                      f"checkpoint.initial_load_path")


def load_model_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full (unsharded) model tensors of a checkpoint, on CPU, read by this one process; and meta.json."""
    meta, metadata = read_checkpoint(path)
    template = {key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
                for key, entry in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    state = {"model": template}
    try:
        dcp.load(state, storage_reader=ChecksummedFileSystemReader(str(path), meta.get("crc32")), no_dist=True)
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - DCP's is a BaseException
        cause = first_failure(error)
        raise CheckpointError(str(cause) if isinstance(cause, CheckpointError) else
                              f"loading {path} failed ({describe(error)})") from None
    return state["model"], meta


def save_model_checkpoint(weights: dict[str, torch.Tensor], folder: Path, step: int, config) -> Path:
    """A model-only checkpoint `folder/step-N`, written by this one process (seed, HF import)."""
    final = Path(folder) / f"step-{step:08d}"
    partial = final.with_name(final.name + PARTIAL)
    fresh_folder(partial, final)
    dcp.save({"model": weights}, storage_writer=ChecksummedFileSystemWriter(str(partial), thread_count=8),
             no_dist=True)
    publish(partial, final, {"step": step, "tokens_seen": 0, "model_only": True, "layout": {"world_size": 1},
                             "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "torch_version": torch.__version__, "config": config.to_dict()})
    return final
