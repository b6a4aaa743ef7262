"""The start-up summary: what this run will do, in a few lines a person reads before the first step."""

from __future__ import annotations

from pathlib import Path

from titanlite.config.resolve import Run
from titanlite.optim.schedule import learning_rate


def layout_words(run: Run, device_type: str) -> str:
    layout = run.layout
    parts = [f"FSDP {layout.shard}"] if layout.shard > 1 else []
    parts += [f"replicate {layout.replicate}"] if layout.replicate > 1 else []
    parts += [f"TP {layout.tensor}"] if layout.tensor > 1 else []
    processes = f"{layout.world_size} {device_type} process{'es' if layout.world_size > 1 else ''}"
    return f"{' x '.join(parts) or 'one replica'} on {processes}"


def warmup_warning(run: Run) -> str | None:
    """A warning when the LR warm-up is longer than the run: the LR never reaches optimizer.lr."""
    if run.warmup_steps <= run.total_steps:
        return None
    schedule, peak = run.config.lr_schedule, run.config.optimizer.lr
    last = learning_rate(run.total_steps, peak, schedule, run.warmup_steps, run.total_steps, 1.0)
    return (f"lr_schedule.warmup_tokens={schedule.warmup_tokens:,} is {run.warmup_steps} steps, longer than the run's "
            f"{run.total_steps}: the LR ends at {last / peak:.0%} of optimizer.lr without reaching it; lower "
            "lr_schedule.warmup_tokens or train longer")


def startup_summary(run: Run, dump_folder: Path, tokenizer, rows, validation_rows, start_step: int,
                    device_type: str) -> list[str]:
    """Lines for the log: folder, layout, data and how much of it the run covers, validation, schedule."""
    config, train = run.config, run.config.training
    row_count = sum(rows.shard_rows)
    data_tokens = row_count * train.seq_len
    epochs = run.total_tokens / data_tokens if data_tokens else float("inf")
    tensorboard = f"; TensorBoard: {dump_folder / 'tb'}" if config.metrics.enable_tensorboard else ""
    checkpoints = (f"every {config.checkpoint.interval} steps into {dump_folder / config.checkpoint.folder}"
                   if config.checkpoint.enable else "off (checkpoint.enable=false)")
    start = f"resuming after step {start_step}" if start_step else "starting at step 1"
    lines = [
        f"run: {dump_folder} ({start}){tensorboard}",
        f"layout: {layout_words(run, device_type)}, {run.compute_dtype}",
        f"data: {rows.name}: {row_count:,} rows of {train.seq_len} tokens ({data_tokens:,} tokens); the run reads "
        f"{run.total_tokens:,} tokens = {epochs:.2f} epochs",
        f"tokenizer: {tokenizer.name} ({tokenizer.vocab_size:,} tokens)",
        f"steps: {run.total_steps:,} of {run.tokens_per_step:,} tokens ({run.grad_accum_steps} x micro-batch "
        f"{train.micro_batch_size} per rank), warm-up {run.warmup_steps} steps to lr {config.optimizer.lr:g}, "
        f"{config.lr_schedule.decay} decay; checkpoints {checkpoints}",
    ]
    if validation_rows is not None:
        lines.append(f"validation: {validation_rows.name}: {config.validation.steps} batches every "
                     f"{config.validation.interval} steps")
    return lines
