"""Output folders: created, and proved writable, before a run spends time on anything else."""

from __future__ import annotations

import os
from pathlib import Path


def why_not_writable(folder: Path) -> str | None:
    """Create `folder` (and its parents) and write and delete a probe file there: None if that
    worked, else the reason in a few words, for the caller's one-line error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        return error.strerror or str(error)
    return None
