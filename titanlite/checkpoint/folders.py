"""Checkpoint folders: naming, atomic publishing, and what makes a folder loadable.

A checkpoint is a folder `step-NNNNNNNN/` holding DCP's files (`.metadata`, `__<rank>_<n>.distcp`:
one data file per writer thread) and a `meta.json` (step, tokens, layout, the resolved config,
and the CRC-32 of every data file and of .metadata). It is written as `step-NNNNNNNN.partial/`
and renamed once complete: only `.partial` folders are unfinished, and a `step-N` folder that
does not load is an error to report, never something to overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titanlite.checkpoint.storage import CHECKSUMS_SUFFIX, CheckpointError, crc32_hex, fsync_path
from titanlite.config.settings import ConfigError

logger = logging.getLogger("titanlite")
STEP_FOLDER = re.compile(r"^step-(\d+)$")
PARTIAL = ".partial"
REPLACED = ".replaced"  # a published step moved aside while a re-save of the same step is published
MODEL_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size")
# What the weights mean beyond their shapes: the same tensors under another eps or RoPE compute another
# model. The scaling keys count only under the scaling that reads them.
MODEL_MEANING_FIELDS = {None: ("norm_eps", "rope_theta", "rope_scaling"),
                        "yarn": ("rope_scaling_factor", "rope_original_max_position", "rope_beta_fast",
                                 "rope_beta_slow"),
                        "llama3": ("rope_scaling_factor", "rope_original_max_position", "rope_low_freq_factor",
                                   "rope_high_freq_factor")}


def step_folder(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}"


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


def publish(partial: Path, final: Path, meta: dict) -> None:
    """Write meta.json (with every rank's checksums) into a fully written `partial`, then rename it
    to `final` (atomic)."""
    checksums = {".metadata": crc32_hex((partial / ".metadata").read_bytes())}
    sidecars = sorted(partial.glob(f"__*_{CHECKSUMS_SUFFIX}"))
    for sidecar in sidecars:
        checksums.update(json.loads(sidecar.read_text()))
    (partial / "meta.json").write_text(json.dumps({**meta, "crc32": checksums}, indent=2))
    fsync_path(partial / "meta.json")
    for sidecar in sidecars:
        sidecar.unlink()
    fsync_path(partial)  # the data files' entries and DCP's .metadata rename, before the folder is published
    replaced = final.with_name(final.name + REPLACED)
    if final.exists():  # re-saving a step after a rollback: move the old one aside, never merge
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(partial, final)
    fsync_path(final.parent)  # the rename itself must survive a power loss
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


def read_checkpoint(path: Path, load_unverified: bool = False):
    """(meta.json dict, DCP Metadata) of a complete checkpoint, or a CheckpointError saying why not.

    A meta.json without checksums (crc32) is refused unless `load_unverified` (the setting
    checkpoint.load_unverified; --load-unverified for the commands): every save writes them, so
    their absence means a damaged or hand-made meta.json as likely as an older titanlite.
    """
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
    if checksums is None and not load_unverified:
        raise CheckpointError(f"checkpoint {path} has no checksums in meta.json (crc32), so its data cannot be "
                              "verified: load it only if you trust it, with checkpoint.load_unverified=true "
                              "(generate, convert to-hf: --load-unverified)")
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
        logger.warning("checkpoint %s has no checksums: its data is loaded unverified (load_unverified)", path)
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


def model_meaning_differences(saved: dict, model: dict) -> list[tuple[str, object, object]]:
    """(field, the checkpoint's value, this run's) for each [model] setting beyond the shapes that the
    checkpoint was saved under and this run sets otherwise. saved, model: [model] sections of run records."""
    kinds = (None, saved.get("rope_scaling"), model.get("rope_scaling"))
    fields = dict.fromkeys(field for kind in kinds for field in MODEL_MEANING_FIELDS.get(kind, ()))
    return [(field, saved[field], model.get(field)) for field in fields
            if field in saved and saved[field] != model.get(field)]


def refuse_other_model_meaning(path: Path, meta: dict, model: dict) -> None:
    """A run started from a checkpoint (an HF import, a seed) computes that checkpoint's model: a norm_eps or
    RoPE setting of this run's config that differs from the one it was saved under is refused, with the
    overrides that train it as saved: a ConfigError (exit 2), as the fix is the config. (A resume instead
    applies its config, and lists what changed.)"""
    differences = model_meaning_differences(meta.get("config", {}).get("model", {}), model)
    if differences:
        found = ", ".join(f"model.{field}={saved} (this run: {ours})" for field, saved, ours in differences)
        overrides = " ".join(f"--model.{field} {saved}" for field, saved, _ in differences)
        raise ConfigError(f"checkpoint.initial_load_path={path} was saved with other model settings: {found}; "
                              f"its weights under this run's compute another model: to train it as saved, pass "
                              f"{overrides} (or set them in the TOML); to change them on purpose (a longer "
                              f"context's RoPE), set checkpoint.initial_load_change_model=true")


def check_states_match(path: Path, meta: dict, metadata, model: dict, states: dict) -> None:
    """Raise a CheckpointError naming the mismatch if `states` cannot load from the checkpoint.
    model: this run's [model] settings, as its run record holds them."""
    saved = meta.get("config", {}).get("model", {})
    differences = [f"model.{field}={saved[field]} in the checkpoint, {model.get(field)} in the config"
                   for field in MODEL_SHAPE_FIELDS if field in saved and saved[field] != model.get(field)]
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
