"""One run per job.dump_folder: rank 0 holds an exclusive lock on <folder>/.lock for the run's life.

Two runs in one folder replace each other's records and checkpoints. The lock is a POSIX record
lock (lockf), which the kernel drops when its holder dies however it dies, so a lock left by a
killed run is free; unlike flock it is not shared with forked children (DataLoader workers that
outlive a killed trainer would keep an flock), and NFS carries it between hosts. The file keeps
the holder's host, pid and start time, for the line that refuses a second run and for the
warning when a run takes over after one that did not end cleanly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from titanlite.config.settings import ConfigError
from titanlite.job.folder import check_dump_folder

logger = logging.getLogger("titanlite")
LOCK_NAME = ".lock"


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


class DumpFolderLock:
    """Take the lock (ConfigError if another live run holds it); `release()` at the end of the run."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self.file.seek(0)
            holder = describe_holder(self.file.read())
            self.file.close()
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"job.dump_folder={folder} is in use by another run ({holder}): wait for it to "
                                  "end, stop it, or choose another job.dump_folder") from None
            # A filesystem without locks (some Lustre mounts): run, but say what is unguarded.
            logger.warning("job.dump_folder=%s cannot be locked (%s): nothing stops a second run from using it "
                           "at the same time", folder, error.strerror)
            self.file = None
            return
        self.file.seek(0)
        if earlier := self.file.read().strip():
            logger.warning("job.dump_folder=%s: took over the lock of a run that did not end cleanly (%s)", folder,
                           describe_holder(earlier))
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        self.file.flush()

    def release(self) -> None:
        """Clear the holder's details (a clean end) and drop the lock."""
        if self.file is None:
            return
        self.file.truncate(0)
        self.file.close()
        self.file = None


def lock_dump_folder(folder: Path, rank: int, group) -> DumpFolderLock | None:
    """Rank 0 proves job.dump_folder writable and takes its lock; every rank raises its ConfigError, if
    any, before anything is written there. Collective on `group` (a CPU group) when there is one."""
    lock, message = None, None
    if rank == 0:
        try:
            check_dump_folder(folder)
            lock = DumpFolderLock(folder)
        except ConfigError as error:
            message = str(error)
    if group is not None:
        box = [message]
        dist.broadcast_object_list(box, src=0, group=group)
        message = box[0]
    if message:
        raise ConfigError(message)
    return lock
