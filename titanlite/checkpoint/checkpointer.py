"""Checkpoints: all training state saved with DCP, checksummed, crash-safe, loadable under any layout.

On disk, under <job.dump_folder>/<checkpoint.folder>/:
    step-00000200/           published: DCP files (.metadata, __<rank>_<n>.distcp: one per writer thread) + meta.json
    step-00000300.partial/   being written, or left by a crash: never loaded, removed later
A save writes into `step-N.partial/`. DCP writes `.metadata` only after every rank's data is on
disk; rank 0 then writes meta.json (step, tokens, layout, resolved config, the CRC-32 of every
file) and renames the folder to `step-N`. A rename is atomic, so a kill -9 at any moment leaves
the previous checkpoint as it was. Only `.partial` folders are unfinished: a `step-N` folder
that does not load (no meta.json, no .metadata, a file that fails its checksum) stops the run
with an error naming it, and is never overwritten or deleted.

What a checkpoint holds (DCP flattens it into keys like "model.layers.0.attention.wq.weight"):
    model, optimizer        sharded tensors (DTensors under FSDP/TP); DCP reshards them on load,
                            so a checkpoint saved on 2 x 2 GPUs loads on 4 x 1 or on one
    train_state, dataloader, health   small Python values, the same on every rank
                            (DCP stores each once). The data position is a global row cursor,
                            valid under any DP degree.
No RNG state: nothing random happens after initialization (no dropout; the data order is a
seeded numpy permutation of the cursor).
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from titanlite.checkpoint.folders import (PARTIAL, REPLACED, STEP_FOLDER, check_states_match, flat_tensors,
                                           fresh_folder, looks_complete, publish, read_checkpoint,
                                           refuse_other_model_meaning, restore_replaced, step_folder)
from titanlite.checkpoint.states import ModelState, OptimizerState
from titanlite.checkpoint.storage import (CheckpointError, ChecksummedFileSystemReader, ChecksummedFileSystemWriter,
                                          describe, first_failure)
from titanlite.config.resolve import Layout
from titanlite.config.settings import Checkpoint
from titanlite.job.folder import why_not_writable

logger = logging.getLogger("titanlite")


def _bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


class Checkpointer:
    """Saves and restores `states` (Stateful objects) under <dump_folder>/<checkpoint.folder>.

    states: "model" (nn.Module), "optimizer" (torch Optimizer), "dataloader",
    "train_state" (TrainState), optional "health"; anything with state_dict/load_state_dict.
    Every method is collective under torch.distributed: call it on all ranks at the same point.
    """

    def __init__(self, settings: Checkpoint, dump_folder: Path, states: dict, run_record: dict, layout: Layout):
        """run_record: what meta.json records as the run's config (the resolved Run.to_dict()); layout:
        the ranks' layout, recorded with each save."""
        self.settings, self.run_record, self.layout = settings, run_record, layout
        self.loaded_meta: dict | None = None  # meta.json of the checkpoint load() restored
        self.folder = Path(dump_folder) / self.settings.folder
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        # DCP's collectives run in the async writer thread too; their own gloo group keeps them
        # off the training process group (and async save needs a CPU backend anyway).
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.train_state = states["train_state"]
        self.states = {"model": ModelState(states["model"])}
        optimizer = states.get("optimizer")
        # Async staging copies the state in the background: the update must wait for it, in a step
        # pre-hook. torchao's CPUOffloadOptimizer skips Optimizer.__init__ and so runs no step
        # hooks: then save() waits for the staging copy itself (the write still runs in the background).
        self._staging_waits_in_save = optimizer is not None and not hasattr(optimizer, "_optimizer_step_pre_hooks")
        if optimizer is not None:
            self.states["optimizer"] = OptimizerState(states["model"], optimizer)
            if not self._staging_waits_in_save:
                optimizer.register_step_pre_hook(lambda *_: self._wait_for_staging())
        self.states.update({name: states[name] for name in ("train_state", "dataloader", "health")
                            if states.get(name) is not None})
        self.async_mode = self.settings.async_mode == "async"
        self.stager = None  # DCP's DefaultStager, made at the first async save
        self._staging = None  # future: the state is copied out, training may change it again
        self._in_flight = None  # (step, upload future, publisher future or None, partial folder)
        self._last_saved_step = None
        self._warned: set[str] = set()
        if self.settings.enable:
            self._on_rank0(self._check_writable)
        for path in self._on_rank0(lambda: restore_replaced(self.folder)) or []:
            logger.warning("checkpoint: restored %s from %s%s (a re-save of that step was killed while it was "
                           "being published)", path, path.name, REPLACED)

    def _async_stager(self) -> DefaultStager:
        """DCP's stager, kept across saves so that its pinned host buffers are allocated once.

        torch 2.11's DefaultStager empties its copier after each stage (2.13's keeps it, with its
        buffers); one that did so cannot stage again, so the save gets a new one.
        """
        copier = getattr(self.stager, "_state_dict_stager", None)
        if self.stager is None or not getattr(copier, "_deepcopy_dispatch", True):
            if self.stager is not None:
                self.stager.close()
            cuda = torch.cuda.is_available()
            # Pinned host buffers make the device-to-host copy fast and let it run on a side
            # stream while training goes on.
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                       use_async_staging=cuda, use_non_blocking_copy=cuda))
        return self.stager

    def _dcp_kwargs(self) -> dict:
        return {"process_group": self.group} if self.distributed else {"no_dist": True}

    def _on_rank0(self, operation):
        """Run a file operation on rank 0 only and give every rank its result: what rank 0 sees of the
        folder is what all act on (a shared filesystem's listing can lag on some). Every rank raises
        if it failed; none waits forever."""
        result, message = None, None
        if self.rank == 0:
            try:
                result = operation()
            except Exception as error:  # noqa: BLE001 - reported to every rank below
                message = str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"
        if self.distributed:
            box = [(result, message)]
            dist.broadcast_object_list(box, src=0, group=self.group)
            result, message = box[0]
        if message:
            raise CheckpointError(message)
        return result

    def _check_writable(self) -> None:
        reason = why_not_writable(self.folder)
        if reason:
            raise CheckpointError(f"checkpoint folder {self.folder} is not writable ({reason}): fix its permissions "
                                  "or set checkpoint.folder")

    # --- saving
    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save at every `checkpoint.interval` steps, or now if `force` (the last step, a clean stop)."""
        if self.settings.enable and step != self._last_saved_step and (force or step % self.settings.interval == 0):
            self.save(step)

    def save(self, step: int) -> None:
        self.wait()  # one save in flight at a time
        final = step_folder(self.folder, step)
        partial = final.with_name(final.name + PARTIAL)
        self._on_rank0(lambda: fresh_folder(partial, final))
        meta = self._meta(step)
        # One file per writer thread: threads serialize, checksum and write in parallel.
        # sync_files: DCP fsyncs every data file before it writes .metadata, and publish() fsyncs
        # meta.json and the folder around the rename, so a published checkpoint is on disk.
        writer = ChecksummedFileSystemWriter(str(partial), single_file_per_rank=True, sync_files=True,
                                             thread_count=self.settings.write_threads)
        self._last_saved_step = step
        if not self.async_mode:
            try:
                dcp.save(self.states, storage_writer=writer, **self._dcp_kwargs())
            except (Exception, CheckpointException) as error:  # noqa: BLE001 - DCP's is a BaseException
                self._fail(step, partial, error)
            self._on_rank0(lambda: self._publish(partial, final, meta))
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # host sync: checkpoint step only. The stager copies on its own CUDA stream, which
            # would not wait for this step's optimizer kernels on the training stream.
            torch.cuda.synchronize()
        try:
            response = dcp.async_save(self.states, storage_writer=writer, async_stager=self._async_stager(),
                                      **self._dcp_kwargs())
        except (Exception, CheckpointException) as error:  # noqa: BLE001
            self._fail(step, partial, error)
        upload = getattr(response, "upload_completion", response)  # torch >= 2.9 returns both futures
        self._staging = getattr(response, "staging_completion", None)
        publisher = None
        if self.rank == 0:  # publish as soon as the files are written, not at the next save
            executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-publish")
            publisher = executor.submit(lambda: (upload.result(), self._publish(partial, final, meta)))
            executor.shutdown(wait=False)
        self._in_flight = (step, upload, publisher, partial)
        if self._staging_waits_in_save:
            self._wait_for_staging()

    def _meta(self, step: int) -> dict:
        layout = self.layout
        return {"step": step, "tokens_seen": self.train_state.tokens_seen, "elapsed_s": self.train_state.elapsed_s,
                "model_only": False,
                "layout": {"world_size": layout.world_size, "data_parallel_replicate": layout.replicate,
                           "data_parallel_shard": layout.shard, "tensor_parallel": layout.tensor,
                           "data_parallel_degree": layout.data_parallel_degree},
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "torch_version": torch.__version__, "config": self.run_record}

    def _publish(self, partial: Path, final: Path, meta: dict) -> None:
        publish(partial, final, meta)
        logger.info("checkpoint: saved step %d to %s", meta["step"], final)
        self._apply_retention(meta["step"])

    def _fail(self, step: int, partial: Path, error: BaseException) -> None:
        cause = first_failure(error)
        if not isinstance(cause, OSError):  # a bug, not the disk: keep the traceback for whoever debugs it
            logger.error("checkpoint: saving step %d to %s failed", step, partial, exc_info=error)
        self._on_rank0(lambda: shutil.rmtree(partial, ignore_errors=True))  # free the space it took
        complete = [path for _, path in self.complete_checkpoints() if looks_complete(path)]
        kept = f"{partial} was removed, the previous checkpoint ({complete[-1] if complete else 'none'}) is intact"
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            # The whole checkpoint, all ranks: a DTensor's numel() counts the global tensor.
            needed = sum(tensor.numel() * tensor.element_size() for name in ("model", "optimizer")
                         if name in self.states for _, tensor in flat_tensors(self.states[name].state_dict(), name))
            raise CheckpointError(f"no space left on device writing {cause.filename} ({_bytes(needed)} needed, "
                                  f"{_bytes(shutil.disk_usage(self.folder).free)} free) at step {step}; {kept}: "
                                  f"free space or set checkpoint.folder, then resume") from None
        raise CheckpointError(f"saving step {step} to {partial} failed ({describe(error)}); {kept}: "
                              f"fix the cause, then resume") from None

    def _wait_for_staging(self) -> None:
        """Runs before every optimizer step: waits for the device-to-host copy only, never the write."""
        if self._staging is not None:
            try:
                self._staging.result()
            except Exception:  # noqa: BLE001 - the upload fails with it too: wait() reports it
                pass
            self._staging = None

    def wait(self) -> None:
        """Block until the save in flight (async mode) is on disk and visible."""
        if self._in_flight is None:
            return
        step, upload, publisher, partial = self._in_flight
        self._in_flight = None
        self._wait_for_staging()
        try:
            upload.result()
        except (Exception, CheckpointException) as error:  # noqa: BLE001
            self._fail(step, partial, error)
        self._on_rank0(lambda: publisher.result())

    def save_in_flight(self) -> bool:
        """True while an async save is still being written (no waiting, no collective)."""
        return self._in_flight is not None and not self._in_flight[1].done()

    def close(self) -> None:
        """Finish the save in flight, then end what the saves ran on: the stager, then the gloo group
        (after a barrier: no rank still sends on it). Collective; call it once, at the end of training.

        A gloo group's worker thread frees each collective just after the caller saw it complete,
        taking the GIL to release its tensors. If the interpreter is already shutting down by then
        (the publishing broadcast of the last save is the last collective of a run), the thread
        cannot take the GIL, exits, and the process aborts: "terminate called without an active
        exception", SIGABRT, exit code 134 after `done`. dist.destroy_process_group() alone does
        not stop the threads while the group object lives; dropping the last reference runs the
        group's destructor, which joins them.
        """
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        if self.group is not None:
            dist.barrier(group=self.group)
            dist.destroy_process_group(self.group)
            self.group = None  # the last reference: the destructor joins the group's threads

    # --- retention and discovery
    def complete_checkpoints(self, warn: bool = False) -> list[tuple[int, Path]]:
        """(step, path) of the published (`step-N`) checkpoints in the folder, oldest first."""
        found = []
        for path in sorted(self.folder.iterdir()) if self.folder.is_dir() else []:
            match = STEP_FOLDER.match(path.name)
            if match and path.is_dir():
                found.append((int(match[1]), path))
            elif warn and path.name.endswith(PARTIAL) and path.name not in self._warned:
                self._warned.add(path.name)
                logger.warning("checkpoint: ignoring incomplete %s (a save that did not finish)", path)
        return sorted(found)

    def check_later_folders(self, step: int) -> None:
        """Refuse now what a save would refuse after training: a step-N folder past `step` that is not a
        complete checkpoint (never overwritten). Collective."""
        def check() -> None:
            for later, path in self.complete_checkpoints():
                if later > step and not looks_complete(path):
                    raise CheckpointError(f"{path} exists but is not a complete checkpoint (no meta.json or .metadata); "
                                          f"this run would stop at its save of step {later}: move it out of "
                                          f"{self.folder}, or set checkpoint.folder")
        if self.settings.enable:
            self._on_rank0(check)

    def _apply_retention(self, published_step: int) -> None:
        # Keeps the keep_latest_k newest checkpoints up to the one just published. Later steps
        # (saved before a rollback, or by a run resumed from an older checkpoint) are another
        # branch's: never deleted here. Nor is a folder that lost its files: evidence for its owner.
        complete = [(step, path) for step, path in self.complete_checkpoints()
                    if step <= published_step and looks_complete(path)]
        doomed = [path for _, path in complete[:-self.settings.keep_latest_k]] if self.settings.keep_latest_k else []
        for path in self.folder.iterdir():  # leftovers of crashed saves older than this one
            match = re.match(r"^step-(\d+)\.(partial|replaced)$", path.name)
            if match and int(match[1]) < published_step:
                doomed.append(path)
        for path in doomed:
            try:
                shutil.rmtree(path)
            except OSError as error:
                logger.warning("checkpoint: could not delete %s (%s); it stays", path, error)

    def set_aside_after(self, step: int, reason: str) -> None:
        """Rename the published checkpoints after `step` to step-N.<reason> (a rollback's abandoned
        branch): kept for whoever investigates, never resumed from by resume=auto, never deleted."""
        def rename() -> None:
            for saved, path in self.complete_checkpoints():
                if saved > step:
                    path.rename(path.with_name(f"{path.name}.{reason}"))
                    logger.warning("checkpoint: %s was saved after the trouble began: moved to %s.%s",
                                   path, path.name, reason)
        self.wait()
        self._on_rank0(rename)

    def latest_complete(self, before_step: int | None = None) -> Path | None:
        """The newest published checkpoint in this run's folder (of a step before `before_step`, if
        given), as rank 0 lists it: every rank loads the same one even where a shared filesystem's
        listing lags on some. Waits for a save in flight. Collective."""
        self.wait()

        def newest() -> Path | None:
            complete = [path for step, path in self.complete_checkpoints(warn=True)
                        if before_step is None or step < before_step]
            return complete[-1] if complete else None

        return self._on_rank0(newest)

    # --- loading
    def load(self, path: Path | str | None = None) -> int | None:
        """Restore from `path`, or as checkpoint.resume says; returns the step loaded, None if none.

        resume=auto: the newest published checkpoint in this run's folder (an error if it does
        not load); else, if set, checkpoint.initial_load_path (model only unless
        initial_load_model_only=false). A model-only checkpoint sets the weights and returns
        None: training starts at step 1.
        """
        self.wait()  # a save in flight uses the same process group, and may be the checkpoint wanted
        model_only = initial = False
        if path is None:
            resume = self.settings.resume
            path = None if resume == "never" else self.latest_complete() if resume == "auto" else Path(resume)
            earlier = self.complete_checkpoints()
            if resume == "never" and earlier and self.settings.enable:
                raise CheckpointError(f"checkpoint.resume=never but {self.folder} holds an earlier run's checkpoints "
                                      f"(newest {earlier[-1][1].name}); a fresh run would mix its saves with them: "
                                      "resume it (checkpoint.resume=auto), or set another job.dump_folder or "
                                      "checkpoint.folder")
            if path is None and self.settings.initial_load_path:
                path, model_only = Path(self.settings.initial_load_path), self.settings.initial_load_model_only
                initial = True
            if path is None:
                return None
        path = Path(path)
        meta, metadata = read_checkpoint(path, self.settings.load_unverified)
        if initial and not self.settings.initial_load_change_model:
            refuse_other_model_meaning(path, meta, self.run_record.get("model", {}))
        self.loaded_meta = meta
        model_only = model_only or bool(meta.get("model_only"))
        present = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
        states = {"model": self.states["model"]} if model_only else {}
        for name, state in ({} if model_only else self.states).items():
            if name in present or name in ("model", "optimizer"):
                states[name] = state
            else:
                logger.warning("checkpoint: %s has no %r state; it keeps its current value", path, name)
        check_states_match(path, meta, metadata, self.run_record.get("model", {}), states)
        try:
            reader = ChecksummedFileSystemReader(str(path), meta.get("crc32"), threads=self.settings.write_threads)
            dcp.load(states, storage_reader=reader, **self._dcp_kwargs())
        except (Exception, CheckpointException) as error:  # noqa: BLE001
            cause = first_failure(error)
            if isinstance(cause, CheckpointError):
                raise CheckpointError(str(cause)) from None
            if not isinstance(cause, (OSError, ValueError)):  # a bug, not the files: keep the traceback
                logger.error("checkpoint: loading %s failed", path, exc_info=error)
            raise CheckpointError(f"loading {path} failed ({describe(error)})") from None
        saved = meta.get("layout", {})
        logger.info("checkpoint: loaded %s%s (saved on %s ranks, now %d)", path, " (model only)" if model_only else "",
                    saved.get("world_size", "?"), self.layout.world_size)
        if model_only:
            return None
        self._last_saved_step = self.train_state.step
        self.train_state.elapsed_s = float(meta.get("elapsed_s", 0.0))
        return self.train_state.step
