"""Model weights in one process: a checkpoint's full tensors read, and a model-only checkpoint written.

For the commands (convert, generate) and seed checkpoints: DCP assembles the full tensors of a
checkpoint saved under any layout, and writes a model-only one without torch.distributed.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titanlite.checkpoint.folders import (PARTIAL, fresh_folder, publish, read_checkpoint, step_folder)
from titanlite.checkpoint.storage import (CheckpointError, ChecksummedFileSystemReader, ChecksummedFileSystemWriter,
                                          describe, first_failure)


def load_model_weights(path: Path, load_unverified: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Full (unsharded) model tensors of a checkpoint, on CPU, read by this one process; and meta.json.
    load_unverified: accept a meta.json without checksums (read_checkpoint)."""
    meta, metadata = read_checkpoint(path, load_unverified)
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
    final = step_folder(folder, step)
    partial = final.with_name(final.name + PARTIAL)
    meta = {"step": step, "tokens_seen": 0, "model_only": True, "layout": {"world_size": 1},
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__, "config": config.to_dict()}
    try:
        fresh_folder(partial, final)
        dcp.save({"model": weights}, storage_writer=ChecksummedFileSystemWriter(str(partial), thread_count=8),
                 no_dist=True)
        publish(partial, final, meta)
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - DCP's is a BaseException
        cause = first_failure(error)
        if not isinstance(cause, OSError):
            raise
        shutil.rmtree(partial, ignore_errors=True)  # a full disk: free what the failed save took
        raise CheckpointError(f"cannot write checkpoint {final}: {cause.strerror or cause} ({cause.filename}); "
                              "nothing was replaced: free space or choose another folder") from None
    return final
