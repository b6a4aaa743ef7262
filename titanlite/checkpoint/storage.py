"""Checksummed DCP storage: the CRC-32 of every data file, computed as it is written and checked as it is read.

A rank writes one data file per writer thread (`__<rank>_<n>.distcp`) and a sidecar
`__<rank>_crc32.json` with their checksums; publishing (checkpoint/folders.py) merges them into
meta.json. Reading verifies each file against meta.json before DCP parses it, one thread a file.
Everything here works in one process without torch.distributed: convert.py and the tests use it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

# Single-process reads and writes pass no_dist=True on purpose; DCP still warns on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
DATA_SUFFIX = ".distcp"
CHECKSUMS_SUFFIX = "crc32.json"  # per-rank sidecar "__<rank>_crc32.json", merged into meta.json at publish


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the file and the fix."""


def crc32_hex(data) -> str:
    return f"{zlib.crc32(data):08x}"


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)



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
            fsync_path(sidecar)
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
