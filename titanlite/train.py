"""The training loop, top to bottom: set-up, loop, tear-down.

Launch through run_train.sh (torchrun), or `python -m titanlite.train --config debug_model`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from titanlite.checkpoint.checkpointer import Checkpointer
from titanlite.checkpoint.states import TrainState
from titanlite.checkpoint.storage import CheckpointError
from titanlite.config.load import config_differences, load_config
from titanlite.config.resolve import render, resolve, world_size_from_env
from titanlite.config.settings import Config, ConfigError, settings_help
from titanlite.data.documents import DataError
from titanlite.data.loader import batch_maker, build_dataloader, warn_if_data_bound
from titanlite.data.sources import build_rows, find_source
from titanlite.data.tokenizer import (TokenizerError, build_tokenizer, default_tokenizer_warning)
from titanlite.health.actions import roll_back, stop_for_health
from titanlite.health.monitor import HealthMonitor, HealthStop
from titanlite.job.exits import die_with_launcher, report_to_launcher
from titanlite.job.folder import start_run_records
from titanlite.job.lock import lock_dump_folder
from titanlite.job.logs import init_logging
from titanlite.job.stop import StopSignals, StoppedBySignal, stop_on_signal
from titanlite.job.summary import startup_summary, warmup_warning
from titanlite.job.watchdog import Watchdog, default_store, process_group_timeout, straggler_figure
from titanlite.metrics.logger import MetricLogger, format_duration, peak_flops_per_device, start_wandb
from titanlite.metrics.profiling import OutOfMemory, TrainingProfiler, available_memory, report_oom
from titanlite.metrics.validation import Validator, build_validation_rows
from titanlite.model.attention import choose_attention_head_dim
from titanlite.model.loss import ChunkedHeadLoss, batch_losses, cross_entropy_per_sample, valid_tokens_per_sample
from titanlite.model.size import count_parameters, flops_per_token
from titanlite.model.transformer import build_model
from titanlite.optim.optimizer import build_optimizer
from titanlite.optim.schedule import learning_rate, set_learning_rate
from titanlite.optim.step import global_grad_norm, step_unless_nonfinite
from titanlite.parallel.compile import compile_loss
from titanlite.parallel.float8 import refresh_float8_scales
from titanlite.parallel.init import init_weights_layout_independent
from titanlite.parallel.memory import estimate_memory, memory_verdict
from titanlite.parallel.mesh import ParallelDims
from titanlite.parallel.parallelize import parallelize
from titanlite.parallel.tensor_parallel import loss_context

logger = logging.getLogger("titanlite")


def train_step(model, optimizer, micro_batches: list[dict], global_valid_tokens: torch.Tensor,
               grad_clip: float, autocast, loss_fn=cross_entropy_per_sample,
               loss_context=contextlib.nullcontext, skip_nonfinite: bool = True) -> dict[str, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; returns device tensors (no host sync).

    Loss normalisation: every token of the global batch weighs the same. Each micro-batch adds
    sum(token losses) / `global_valid_tokens` (all ranks, all micro-batches), so the summed
    gradient is the gradient of the global mean, whatever the layout or micro-batch split.
    `loss_context()` wraps the loss and its backward (loss_parallel under TP). A step whose grad
    norm is inf/NaN is skipped on device (`skip_nonfinite`); "skipped" says so.
    """
    local_loss = torch.zeros((), device=global_valid_tokens.device)
    per_sample = []
    for batch in micro_batches:
        with loss_context():
            # The logits, the largest activation, are gone once batch_losses returns: freed before the backward.
            summed, sample_losses = batch_losses(model, batch, autocast, loss_fn)
            loss = summed / global_valid_tokens
            loss.backward()
        local_loss += loss.detach()
        per_sample.append(sample_losses.detach())
    parameters = [p for p in model.parameters() if p.grad is not None]
    grad_norm = global_grad_norm(parameters)  # global over the FSDP x TP mesh
    skipped = step_unless_nonfinite(optimizer, grad_norm, skip_nonfinite, max_norm=grad_clip)  # clips, then steps
    optimizer.zero_grad(set_to_none=True)
    return {"loss": local_loss, "grad_norm": grad_norm, "sample_losses": torch.cat(per_sample), "skipped": skipped}


def global_count(local_count: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """A count summed over the data-parallel ranks, as fp32 on device (no host sync)."""
    count = local_count.float()
    if dims.data_parallel_group is not None:
        dist.all_reduce(count, group=dims.data_parallel_group)
    return count


def resolve_device(wanted: str) -> torch.device:
    """training.device as a torch device: this process's GPU (LOCAL_RANK) or the CPU."""
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device='cuda' but no CUDA device is visible: set training.device=cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def attention_head_dim_probe(device: torch.device):
    """resolve()'s head-dim probe on `device`: the SDPA kernel check (model/attention.py)."""
    return lambda model, tp, dtype: choose_attention_head_dim(model, tp, getattr(torch, dtype), device)


def train(config: Config) -> list[dict]:
    """Run the configured training; returns the logged records (for tests and benchmarks)."""
    world_size = world_size_from_env()
    device = resolve_device(config.training.device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=process_group_timeout(config.job.collective_timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    init_logging(rank)
    # Host-side agreements (the folder lock, stopping on a signal, the straggler figure) on a CPU group:
    # no device sync, and off the training collectives.
    control_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
    lock = lock_dump_folder(Path(config.job.dump_folder), rank, control_group)
    stop_signals = StopSignals()
    try:
        return train_in_folder(config, device, rank, control_group, stop_signals)
    finally:
        stop_signals.restore()
        if lock is not None:
            lock.release()


def train_in_folder(config: Config, device: torch.device, rank: int, control_group, stop_signals: StopSignals):
    """train() once this process holds job.dump_folder (rank 0 its lock) and listens for stop signals."""
    # --- set-up: the resolved run, mesh
    tokenizer = build_tokenizer(config.tokenizer.path)
    if rank == 0 and (warning := default_tokenizer_warning(config.tokenizer.path, config.data.source)):
        logger.warning(warning)
    # A missing or mismatched data.source stops the run before any work.
    source = find_source(config.data.source, config.training.seq_len, tokenizer)
    run = resolve(config, world_size_from_env(), tokenizer.vocab_size, device.type, attention_head_dim_probe(device))
    config = run.config  # from here on, every value is concrete
    dims = ParallelDims.build(run.layout, device.type)
    torch.manual_seed(config.training.seed)
    dump_folder = Path(config.job.dump_folder)
    check_memory(run, device, rank)

    # --- set-up: data, model, optimizer, state
    train_settings, layout, dp_rank = config.training, run.layout, dims.data_parallel_rank
    to_batch = batch_maker(tokenizer.eos_id, config.data.loss_across_documents, run.document_ids,
                           run.document_positions)
    cache_dir = dump_folder / "datasets_cache"
    rows = build_rows(source, config.data, train_settings.seq_len, tokenizer, cache_dir)
    loader = build_dataloader(rows, config.data, train_settings.micro_batch_size, train_settings.seed, dp_rank,
                              layout.data_parallel_degree, to_batch)
    reduce_group = dims.data_parallel_group
    validator = held_out = None
    if config.validation.enable:
        validation = config.validation
        held_out = build_validation_rows(validation, config.data, tokenizer, train_settings.seq_len,
                                         validation.steps * run.tokens_per_step // train_settings.seq_len, cache_dir)
        validator = Validator(validation, held_out, validation.steps * run.grad_accum_steps,
                              train_settings.micro_batch_size, run.total_steps, dp_rank, layout.data_parallel_degree,
                              to_batch, reduce_group)
    model = build_model(config.model, train_settings.seq_len, device="meta")
    dtype = getattr(torch, run.compute_dtype)
    parallelize(model, dims, config.parallelism, config.activation_checkpoint, config.compile.enable, config.float8,
                param_dtype=dtype, float8_all_gather=run.float8_all_gather, step_weights=run.step_weights)
    # Same initial weights for every layout: each rank draws one full parameter at a time, keeps its shard.
    init_weights_layout_independent(model, device, train_settings.seed, config.parallelism.fsdp_cpu_offload)
    loss_fn = (ChunkedHeadLoss(train_settings.loss_chunk_tokens) if run.chunked_loss else
               compile_loss(cross_entropy_per_sample, config.compile.enable, layout.tp_enabled))
    loss_scope = loss_context(layout.tp_enabled)
    # FSDP casts parameters itself; without FSDP, autocast does it per matmul (step weights: once per step).
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16 and not layout.fsdp_enabled
                else contextlib.nullcontext())
    optimizer = build_optimizer(model, config.optimizer, run.optimizer_update, config.compile.enable)
    train_state = TrainState()
    health = HealthMonitor(config.health, train_settings.grad_clip, run.warmup_steps, config.metrics.log_freq,
                           dump_folder, rank, device, reduce_group, tokenizer)
    run_record = run.to_dict()  # what config.json, checkpoints' meta.json and W&B record
    checkpointer = Checkpointer(config.checkpoint, dump_folder, {
        "model": model, "optimizer": optimizer, "dataloader": loader, "train_state": train_state, "health": health},
        run_record, layout)
    resumed = checkpointer.load() is not None  # resume (checkpoint.resume): the loop goes on at train_state.step + 1
    if resumed and (changed := config_differences(checkpointer.loaded_meta["config"], run_record)):
        logger.warning("resume: this run's config differs from the checkpoint's; this config applies from step %d "
                       "(the LR schedule follows it): %s", train_state.step + 1, "; ".join(changed))
    check_start_step(train_state.step, run.total_steps, checkpointer)
    if rank == 0:
        start_run_records(dump_folder, run_record, resumed)
        for line in startup_summary(run, dump_folder, tokenizer, rows, held_out, train_state.step, device.type):
            logger.info(line)
        if warning := warmup_warning(run):
            logger.warning(warning)
    health.install_fault_injection(model)  # testing aid only; off unless health.inject_nan_at_step
    profiler = TrainingProfiler(config.profiling, dump_folder, rank, device)
    data_iterator = iter(loader)  # after the load: it starts at the restored data position
    model_flops = flops_per_token(config.model, train_settings.seq_len)
    metrics = MetricLogger(dump_folder, rank, model_flops, peak_flops_per_device(device, config.metrics.peak_flops),
                           config.metrics.enable_tensorboard, config.metrics.enable_jsonl, device,
                           run.total_steps, train_state.step,
                           start_wandb(config.metrics, run_record, dump_folder) if rank == 0 else None,
                           elapsed_before=train_state.elapsed_s)
    counts = count_parameters(config.model)
    logger.info("model: %s parameters (%s without the embedding), %s FLOPs/token, %d grad-accum steps",
                f"{counts.total:,}", f"{counts.non_embedding:,}", f"{model_flops:,}", run.grad_accum_steps)
    data_tokens = sum(rows.shard_rows) * train_settings.seq_len
    watchdog = (Watchdog(config.job.collective_timeout_s, rank, dist.get_world_size(), default_store(),
                         train_state.step) if control_group is not None else None)

    # --- the loop
    step = train_state.step
    loop_start = time.perf_counter()
    while step < run.total_steps:  # a while loop: a health rollback moves `step` back
        if received := stop_signals.agreed(control_group):  # every rank stops after the same step
            stop_on_signal(received, step, checkpointer, dump_folder)
        step += 1
        lr = learning_rate(step, config.optimizer.lr, config.lr_schedule, run.warmup_steps, run.total_steps,
                           health.lr_scale)
        set_learning_rate(optimizer, lr)
        wait_start = time.perf_counter()
        host_batches = [next(data_iterator) for _ in range(run.grad_accum_steps)]
        data_wait = time.perf_counter() - wait_start
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in host_batches]
        sample_tokens = torch.cat([valid_tokens_per_sample(batch["labels"]) for batch in micro_batches])
        with report_oom(step, dump_folder, rank, device):
            refresh_float8_scales(model, run.float8_all_gather)  # float8 all-gather: one all-reduce for all scales
            result = train_step(model, optimizer, micro_batches, global_count(sample_tokens.sum(), dims),
                                train_settings.grad_clip, autocast, loss_fn, loss_scope,
                                config.health.skip_nonfinite_steps)
        health.record(step, result, sample_tokens, host_batches, lr)
        profiler.step(step)
        # TP peers share each micro-batch: a GPU's throughput is its 1/TP share of those tokens.
        metrics.count(run.grad_accum_steps * run.tokens_per_micro_batch // layout.tensor, data_wait)
        train_state.step, train_state.tokens_seen = step, train_state.tokens_seen + run.tokens_per_step
        train_state.elapsed_s = metrics.elapsed()
        is_log_step = (step == 1 or step % config.metrics.log_freq == 0 or step == run.total_steps
                       or (validator is not None and validator.due(step)))
        if is_log_step or health.must_check(step, run.total_steps,
                                            config.checkpoint.interval if config.checkpoint.enable else 0):
            window, events = health.check()  # host sync: logging (or pre-checkpoint) step only
            if is_log_step:
                validation, validation_seconds = {}, 0.0
                if validator is not None and validator.due(step):
                    started = time.perf_counter()
                    validation = validator.evaluate(model, device, autocast, loss_fn, loss_scope)
                    validation_seconds = time.perf_counter() - started
                    profiler.expected_compilation()  # the blocks ran without gradients: compiled once more
                stragglers = straggler_figure(stop_signals.take_boundary_wait(), metrics.window_seconds(),
                                              step - metrics.window_first_step + 1, control_group)
                record = metrics.log(step, {**window, "lr": lr, "tokens_seen": train_state.tokens_seen,
                                            "epoch": train_state.tokens_seen / data_tokens, **validation,
                                            **stragglers, **profiler.on_log_step(step)}, validation_seconds)
                health.log_window_done()
                warn_if_data_bound(step, record["data_wait_fraction"], config.metrics.data_wait_warn_fraction,
                                   config.data, first_window=len(metrics.history) == 1)
                if step == 1 and config.compile.enable:
                    logger.info("compile: first step took %.1f s (torch.compile included)",
                                time.perf_counter() - loop_start)
            verdict = health.decide(events)
            if verdict.action == "rollback":
                step, data_iterator = roll_back(verdict, health, checkpointer, loader, run.grad_accum_steps)
                continue
            if verdict.action == "stop":
                stop_for_health(verdict, step, checkpointer, dump_folder)
        checkpointer.maybe_save(step, force=step == run.total_steps)
        if watchdog is not None:
            watchdog.finished(step)

    # --- tear-down
    checkpointer.maybe_save(step, force=True)  # a clean stop before the last step saves too
    checkpointer.close()  # waits for an async save in flight
    if watchdog is not None:
        watchdog.close()
    profiler.close()
    if rank == 0 and metrics.history:
        first, last = metrics.history[0], metrics.history[-1]
        logger.info("done: step %d of %d in %s, loss %.4f -> %.4f (log-window means, steps %d-%d of this process)",
                    step, run.total_steps, format_duration(metrics.elapsed()),
                    first.get("loss_window_mean", first["loss"]), last.get("loss_window_mean", last["loss"]),
                    first["step"], last["step"])
    metrics.close()
    if dist.is_initialized():
        # The training groups' threads live until exit (torch's DTensor caches keep the mesh): their
        # last collective is one without tensors, which frees no tensor at shutdown (Checkpointer.close).
        dist.barrier()
    return metrics.history


def check_start_step(step: int, total_steps: int, checkpointer: Checkpointer) -> None:
    """Before any work: a resumed step past the run's end, or a folder a later save would refuse."""
    if step > total_steps:
        raise ConfigError(f"the checkpoint resumed is at step {step}, past this run's {total_steps} steps "
                          "(training.steps / training.total_tokens): raise them to train on, or resume an earlier "
                          "checkpoint (checkpoint.resume)")
    if step == total_steps and step:
        logger.info("the run is already complete: step %d of %d; nothing to train", step, total_steps)
    checkpointer.check_later_folders(step)


def check_memory(run, device: torch.device, rank: int) -> None:
    """Refuse a run whose estimated peak does not fit the device (warn when only within the estimate's
    error), before anything large is allocated."""
    processes_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available, where = available_memory(device, processes_on_host)
    verdict = memory_verdict(estimate_memory(run.config, run.layout, run.grad_accum_steps), available, where)
    if verdict and verdict[0] == "refuse":
        raise OutOfMemory(f"will not fit: {verdict[1]}")
    if verdict and rank == 0:
        logger.warning("memory: may not fit: %s", verdict[1])


def print_config(config: Config) -> None:
    """The resolved run as `--print-config` shows it (on this machine's device, no process group)."""
    try:
        vocab_size = build_tokenizer(config.tokenizer.path).vocab_size
    except TokenizerError:
        if not config.model.vocab_size:
            raise
        vocab_size = config.model.vocab_size  # an explicit vocabulary needs no tokenizer file to plan with
    device = torch.device("cuda" if config.training.device != "cpu" and torch.cuda.is_available() else "cpu")
    print(render(resolve(config, world_size_from_env(), vocab_size, device.type, attention_head_dim_probe(device))))


# Errors in the input or the run's state, with the exit code scripts can test: 2 bad input,
# 1 a checkpoint or memory problem, 3 stopped on purpose by the health monitor, 4 stopped by a
# signal after saving (5, a stalled job, comes from job/watchdog.py).
_USER_ERROR_TABLE = (
    (ConfigError, "config error: ", 2), (TokenizerError, "tokenizer error: ", 2), (DataError, "data error: ", 2),
    (CheckpointError, "checkpoint error: ", 1), (OutOfMemory, "", 1),
    (HealthStop, "stopped by the health monitor: ", 3), (StoppedBySignal, "stopped by ", 4),
)
USER_ERRORS = tuple(kind for kind, _, _ in _USER_ERROR_TABLE)


def main(argv: list[str] | None = None) -> None:
    # the launcher (./run_train.sh, titanlite-run) hands --help to this parser: it names itself in the usage line
    parser = argparse.ArgumentParser(prog=os.environ.get("TITANLITE_PROG", "python -m titanlite.train"),
                                     description="Train a LLaMA-style model with titanlite.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="settings (any of them: --section.key value; a bare boolean flag "
                                            "means true):" + settings_help())
    parser.add_argument("--config", default=None, help="TOML file, or a name in train_configs/")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and derived values")
    args, overrides = parser.parse_known_args(argv)
    die_with_launcher()  # before any work: a rank must not outlive its launcher
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print_config(config)
            return
        train(config)
    except USER_ERRORS as error:  # a person can fix these: one line, no traceback, a telling exit code
        label, code = next((label, code) for kind, label, code in _USER_ERROR_TABLE if isinstance(error, kind))
        print(f"titanlite: {label}{error}", file=sys.stderr)
        report_to_launcher(f"titanlite: {label}{error}")
        sys.exit(code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
