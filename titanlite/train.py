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

from titanlite.attention import choose_attention_head_dim
from titanlite.checkpoint import CheckpointError, Checkpointer, TrainState
from titanlite.config import config_differences, load_config
from titanlite.data import DataError, build_dataloader, check_data_source, warn_if_data_bound
from titanlite.float8 import refresh_float8_scales
from titanlite.health import HealthMonitor, HealthStop, Verdict
from titanlite.launch import report_to_launcher
from titanlite.loss import batch_sample_losses, cross_entropy_per_sample, valid_tokens_per_sample
from titanlite.metrics import (MetricLogger, check_dump_folder, init_logging, peak_flops_per_device, start_run_records,
                               start_wandb)
from titanlite.model import build_model
from titanlite.optim import build_optimizer, learning_rate, set_learning_rate, step_unless_nonfinite
from titanlite.parallelize import (ParallelDims, compile_loss, global_grad_norm, init_weights_layout_independent,
                                   loss_context, parallelize)
from titanlite.profiling import OutOfMemory, TrainingProfiler, report_oom
from titanlite.resolve import Run, compute_dtype, render, resolve, world_size_from_env
from titanlite.settings import Config, ConfigError, settings_help
from titanlite.tokenizer import TokenizerError, build_tokenizer, default_tokenizer_warning
from titanlite.validation import Validator

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
            # The logits, the largest activation, are gone once batch_sample_losses returns: freed before the backward.
            sample_losses = batch_sample_losses(model, batch, autocast, loss_fn)
            loss = sample_losses.sum() / global_valid_tokens
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
    if dims.data_parallel_mesh is not None:
        dist.all_reduce(count, group=dims.data_parallel_mesh.get_group())
    return count


def resolve_device(config: Config) -> torch.device:
    wanted = config.training.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device='cuda' but no CUDA device is visible: set training.device=cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def last_checkpoint_before(checkpointer: Checkpointer, step: int) -> Path | None:
    """The newest complete checkpoint saved before `step` (a later one may hold the failure)."""
    if not checkpointer.settings.enable:
        return None
    return checkpointer.latest_complete(before_step=step)


def roll_back(verdict: Verdict, health: HealthMonitor, checkpointer: Checkpointer, loader, run: Run):
    """Reload the last checkpoint before the trouble began; returns (its step, a data iterator there).

    The LR scale (health.lr_scale, read by the schedule) shrinks by health.rollback_lr_factor; with
    health.rollback_skip_data the batches that led to the failure are not replayed. Later checkpoints
    (saved after the trouble began) are moved aside, so that a restart does not resume into it.
    """
    settings, cause = run.config.health, verdict.cause
    resume_from = last_checkpoint_before(checkpointer, verdict.trouble_start)
    if health.rollbacks >= settings.max_rollbacks or resume_from is None:
        why = (f"after {health.rollbacks} rollbacks (health.max_rollbacks={settings.max_rollbacks})"
               if resume_from is not None else f"and no checkpoint predates step {verdict.trouble_start} to roll back to")
        raise HealthStop(f"{cause.signal} at step {cause.step} {why}: {cause.message}. {resume_advice(resume_from)}")
    counters = health.run_counters()
    step = checkpointer.load(resume_from)  # restores every Stateful, the health detectors included
    checkpointer.set_aside_after(step, f"rollback-{health.rollbacks + 1}")
    health.rolled_back(counters, step)
    logger.warning("health: rolled back to step %d (%s); LR scale now %.4g, rollback %d of %d",
                   step, resume_from, health.lr_scale, health.rollbacks, settings.max_rollbacks)
    data_iterator = iter(loader)  # at the checkpoint's data position
    if settings.rollback_skip_data:
        for _ in range((cause.step - step) * run.grad_accum_steps):
            next(data_iterator)
    return step, data_iterator


def resume_advice(resume_from: Path | None) -> str:
    if resume_from is None:
        return "Inspect the data and code, lower optimizer.lr, and start again (enable checkpoints to roll back)"
    return (f"Inspect the data and code, then resume from the last checkpoint before the trouble with a lower LR: "
            f"--checkpoint.resume {resume_from} --optimizer.lr <lower>")


def stop(verdict: Verdict, step: int, checkpointer: Checkpointer, dump_folder: Path) -> None:
    """Save (unless diverged: that state must not become the checkpoint to resume) and raise HealthStop."""
    cause = verdict.cause
    if not verdict.diverged:
        checkpointer.maybe_save(step, force=True)
    resume_from = last_checkpoint_before(checkpointer, verdict.trouble_start if verdict.diverged else step + 1)
    checkpointer.close()
    raise HealthStop(f"{cause.signal} at step {cause.step}: {cause.message} (health.{cause.signal}_action=stop). "
                     f"Events in {dump_folder / 'health.jsonl'}; `python -m titanlite.diagnose {dump_folder}`. "
                     f"{resume_advice(resume_from)}")


def train(config: Config) -> list[dict]:
    """Run the configured training; returns the logged records (for tests and benchmarks)."""
    # --- set-up: processes, device, the resolved run, mesh
    world_size = world_size_from_env()
    device = resolve_device(config)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    init_logging(rank)
    tokenizer = build_tokenizer(config.tokenizer.path)
    if rank == 0 and (warning := default_tokenizer_warning(config)):
        logger.warning(warning)
    check_data_source(config, tokenizer)  # a missing or mismatched data.source stops the run before any work
    dtype = getattr(torch, compute_dtype(config, device.type))
    attention_head_dim = choose_attention_head_dim(  # never a silent fallback to the math kernel
        config.model, config.parallelism.tensor_parallel_degree, dtype, device)
    run = resolve(config, world_size, tokenizer.vocab_size, device.type, attention_head_dim)
    config = run.config  # from here on, every value is concrete
    dims = ParallelDims.from_run(run)
    dims.build_mesh(device.type)
    torch.manual_seed(config.training.seed)
    dump_folder = Path(config.job.dump_folder)
    if rank == 0:
        check_dump_folder(dump_folder)
        logger.info("derived: %s", run.derived())

    # --- set-up: data, model, optimizer, state
    loader = build_dataloader(config, tokenizer, dims.data_parallel_rank, dims.data_parallel_degree)
    reduce_group = dims.data_parallel_mesh.get_group() if dims.data_parallel_mesh is not None else None
    validator = Validator(run, tokenizer, dims.data_parallel_rank, reduce_group) if config.validation.enable else None
    model = build_model(config.model, config.training.seq_len, device="meta")
    parallelize(model, dims, config, param_dtype=dtype)
    # Same initial weights for every layout: each rank draws one full parameter at a time, keeps its shard.
    init_weights_layout_independent(model, device, config.training.seed, config.parallelism.fsdp_cpu_offload)
    loss_fn = compile_loss(cross_entropy_per_sample, dims, config)
    # FSDP casts parameters itself; without FSDP, autocast does it per matmul.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16 and not dims.fsdp_enabled
                else contextlib.nullcontext())
    optimizer = build_optimizer(model, config, device.type)
    train_state = TrainState()
    health = HealthMonitor(config, run.warmup_steps, dump_folder, rank, device, reduce_group, tokenizer)
    run_record = run.to_dict()  # what config.json, checkpoints' meta.json and W&B record
    checkpointer = Checkpointer(config, dims, dump_folder, {
        "model": model, "optimizer": optimizer, "dataloader": loader, "train_state": train_state, "health": health},
        run_record)
    resumed = checkpointer.load() is not None  # resume (checkpoint.resume): the loop goes on at train_state.step + 1
    if resumed and (changed := config_differences(checkpointer.loaded_meta["config"], run_record)):
        logger.warning("resume: this run's config differs from the checkpoint's; this config applies from step %d "
                       "(the LR schedule follows it): %s", train_state.step + 1, "; ".join(changed))
    if rank == 0:
        start_run_records(dump_folder, run_record, resumed)
    health.install_fault_injection(model)  # testing aid only; off unless health.inject_nan_at_step
    profiler = TrainingProfiler(config, dump_folder, rank, device)
    data_iterator = iter(loader)  # after the load: it starts at the restored data position
    metrics = MetricLogger(dump_folder, rank, model.flops_per_token(config.training.seq_len),
                           peak_flops_per_device(device, config.metrics.peak_flops),
                           config.metrics.enable_tensorboard, config.metrics.enable_jsonl, device,
                           run.total_steps, train_state.step,
                           start_wandb(config.metrics, run_record, dump_folder) if rank == 0 else None)
    logger.info("model: %s parameters (%s without the embedding), %s FLOPs/token, %d grad-accum steps",
                f"{model.num_params():,}", f"{model.num_params(exclude_embedding=True):,}",
                f"{model.flops_per_token(config.training.seq_len):,}", run.grad_accum_steps)

    # --- the loop
    step = train_state.step
    loop_start = time.perf_counter()
    while step < run.total_steps:  # a while loop: a health rollback moves `step` back
        step += 1
        lr = learning_rate(run, step, health.lr_scale)
        set_learning_rate(optimizer, lr)
        wait_start = time.perf_counter()
        host_batches = [next(data_iterator) for _ in range(run.grad_accum_steps)]
        data_wait = time.perf_counter() - wait_start
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in host_batches]
        sample_tokens = torch.cat([valid_tokens_per_sample(batch["labels"]) for batch in micro_batches])
        with report_oom(step, dump_folder, rank, device):
            refresh_float8_scales(model, config, dims.shard)  # float8 all-gather: one all-reduce for all scales
            result = train_step(model, optimizer, micro_batches, global_count(sample_tokens.sum(), dims),
                                config.training.grad_clip, autocast, loss_fn, loss_context(dims),
                                config.health.skip_nonfinite_steps)
        health.record(step, result, sample_tokens, host_batches, lr)
        profiler.step(step)
        # TP peers share each micro-batch: a GPU's throughput is its 1/TP share of those tokens.
        metrics.count(run.grad_accum_steps * run.tokens_per_micro_batch // dims.tensor, data_wait)
        train_state.step, train_state.tokens_seen = step, train_state.tokens_seen + run.tokens_per_step
        is_log_step = (step == 1 or step % config.metrics.log_freq == 0 or step == run.total_steps
                       or (validator is not None and validator.due(step)))
        if is_log_step or health.must_check(step, run.total_steps,
                                            config.checkpoint.interval if config.checkpoint.enable else 0):
            window, events = health.check()  # host sync: logging (or pre-checkpoint) step only
            if is_log_step:
                validation, validation_seconds = {}, 0.0
                if validator is not None and validator.due(step):
                    started = time.perf_counter()
                    validation = validator.evaluate(model, device, autocast, loss_fn, loss_context(dims))
                    validation_seconds = time.perf_counter() - started
                    profiler.expected_compilation()  # the blocks ran without gradients: compiled once more
                record = metrics.log(step, {**window, "lr": lr, "tokens_seen": train_state.tokens_seen, **validation,
                                            **profiler.on_log_step(step)}, validation_seconds)
                warn_if_data_bound(step, record["data_wait_fraction"], config, first_window=len(metrics.history) == 1)
                if step == 1 and config.compile.enable:
                    logger.info("compile: first step took %.1f s (torch.compile included)",
                                time.perf_counter() - loop_start)
            verdict = health.decide(events)
            if verdict.action == "rollback":
                step, data_iterator = roll_back(verdict, health, checkpointer, loader, run)
                continue
            if verdict.action == "stop":
                stop(verdict, step, checkpointer, dump_folder)
        checkpointer.maybe_save(step, force=step == run.total_steps)

    # --- tear-down
    checkpointer.maybe_save(step, force=True)  # a clean stop before the last step saves too
    checkpointer.close()  # waits for an async save in flight
    profiler.close()
    if rank == 0 and metrics.history:
        first, last = metrics.history[0], metrics.history[-1]
        logger.info("done: %d steps, loss %.4f -> %.4f", step, first["loss"], last["loss"])
    metrics.close()
    return metrics.history


def print_config(config: Config) -> None:
    """The resolved run as `--print-config` shows it (on this machine's device, no process group)."""
    try:
        vocab_size = build_tokenizer(config.tokenizer.path).vocab_size
    except TokenizerError:
        if not config.model.vocab_size:
            raise
        vocab_size = config.model.vocab_size  # an explicit vocabulary needs no tokenizer file to plan with
    device = torch.device("cuda" if config.training.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, compute_dtype(config, device.type))
    head_dim = choose_attention_head_dim(config.model, config.parallelism.tensor_parallel_degree, dtype, device)
    print(render(resolve(config, world_size_from_env(), vocab_size, device.type, head_dim)))


# Errors in the input or the run's state, with the exit code scripts can test: 2 bad input,
# 1 a checkpoint or memory problem, 3 stopped on purpose by the health monitor.
_USER_ERROR_TABLE = (
    (ConfigError, "config error: ", 2), (TokenizerError, "tokenizer error: ", 2), (DataError, "data error: ", 2),
    (CheckpointError, "checkpoint error: ", 1), (OutOfMemory, "", 1),
    (HealthStop, "stopped by the health monitor: ", 3),
)
USER_ERRORS = tuple(kind for kind, _, _ in _USER_ERROR_TABLE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a LLaMA-style model with titanlite.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="settings (any of them: --section.key value; a bare boolean flag "
                                            "means true):" + settings_help())
    parser.add_argument("--config", default=None, help="TOML file, or a name in train_configs/")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and derived values")
    args, overrides = parser.parse_known_args(argv)
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
