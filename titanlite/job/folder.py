"""The run's folder (job.dump_folder): proved writable before any work, and its records started or continued."""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from titanlite.config.settings import ConfigError

logger = logging.getLogger("titanlite")


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


# A run's records in its folder: a fresh run starts them anew, a resumed run continues them.
RUN_RECORDS = ("config.json", "metrics.jsonl", "health.jsonl", "tb", "wandb", "spikes", "diagnose")


def check_dump_folder(folder: Path) -> None:
    """Create job.dump_folder and make sure this process can write there, or raise a one-line ConfigError."""
    reason = why_not_writable(folder)
    if reason:
        raise ConfigError(f"job.dump_folder={folder} is not writable ({reason}): fix its permissions or choose "
                          "another folder")


def start_run_records(folder: Path, run_record: dict, resumed: bool) -> None:
    """Write config.json; on a fresh run, first move an earlier run's records aside (never mixed, never lost)."""
    earlier = [name for name in RUN_RECORDS if (folder / name).exists()]
    if earlier and not resumed:
        aside = folder / "previous_runs" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True)
        for name in earlier:
            shutil.move(str(folder / name), str(aside / name))
        logger.warning("job.dump_folder=%s held an earlier run's records (%s): moved to %s; this run starts new "
                       "ones", folder, ", ".join(earlier), aside)
    (folder / "config.json").write_text(json.dumps(run_record, indent=2))
