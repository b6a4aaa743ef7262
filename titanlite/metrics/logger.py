"""Throughput, MFU and memory, logged to stdout, TensorBoard and a JSONL file in the run folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from titanlite.config.settings import ConfigError

logger = logging.getLogger("titanlite")

# Dense bf16 tensor-core peaks (no sparsity). Peers have quoted the sparse figure (2x) or the
# TF32 one by mistake; MFU against those reads low by 2x or high by 2x.
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "H200 NVL": 835e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "GB200": 2500e12, "B200": 2250e12,
    "L40S": 362e12,
}


def start_wandb(settings, run_record: dict, dump_folder: Path):
    """The W&B run of metrics.enable_wandb (call on rank 0, after job.folder.start_run_records), or None.

    wandb is an optional extra, imported only here. A resumed run continues the same W&B run (its
    id is kept in <run>/wandb/run_id; a fresh run's start_run_records moves that folder aside).
    """
    if not settings.enable_wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("metrics.enable_wandb=true but wandb is not installed: pip install 'titanlite[wandb]' "
                          "or set metrics.enable_wandb=false") from None
    id_file = dump_folder / "wandb" / "run_id"  # wandb itself writes into <dir>/wandb/
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    try:
        run = wandb.init(project=settings.wandb_project, name=dump_folder.resolve().name, id=run_id,
                         resume="allow" if run_id else None, dir=str(dump_folder), config=run_record)
    except wandb.errors.Error as error:  # no API key (UsageError), no network, ...: the set-up, not the run
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"metrics.enable_wandb=true but W&B cannot start ({reason}): run `wandb login` (or set "
                          "WANDB_API_KEY), or set WANDB_MODE=offline to log locally, or metrics.enable_wandb=false"
                          ) from None
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.id)
    run.define_metric("*", step_metric="step")  # our step, which goes back after a rollback or resume
    return run


def peak_flops_per_device(device: torch.device, override: float = 0.0) -> float:
    """Dense bf16 peak FLOP/s of one device; `override` (config metrics.peak_flops) wins.

    Returns 0 when unknown (CPU, unlisted GPU): MFU is then not reported.
    """
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda item: -len(item[0])):
        if all(part in name for part in key.split()):
            return flops
    logger.warning("unknown GPU %r: set metrics.peak_flops to report MFU", name)
    return 0.0


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated / reserved memory since the last reset, in GiB (empty on CPU)."""
    if device.type != "cuda":
        return {}
    gib = 1024 ** 3
    return {
        "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
        "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
        "memory/allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "memory/reserved_gib": torch.cuda.memory_reserved(device) / gib,
    }


class MetricLogger:
    """Collects one log step's numbers and writes them everywhere, on rank 0 only.

    Throughput is measured between log steps: tokens processed by this rank (its micro-batches,
    not the global batch) over wall time, so tokens/s is per device as peers report it.
    """

    def __init__(self, dump_folder: Path, rank: int, flops_per_token: int, peak_flops: float,
                 tensorboard: bool, jsonl: bool, device: torch.device, total_steps: int = 0, start_step: int = 0,
                 wandb_run=None, elapsed_before: float = 0.0):
        self.rank, self.flops_per_token, self.peak_flops, self.device = rank, flops_per_token, peak_flops, device
        self.total_steps, self.window_first_step = total_steps, start_step + 1  # progress and ETA
        self.jsonl = None
        self.writer = None
        self.wandb_run = wandb_run  # start_wandb's run: every record goes to it as written to metrics.jsonl
        if rank == 0:
            dump_folder.mkdir(parents=True, exist_ok=True)
            if jsonl:
                self.jsonl = open(dump_folder / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # imported late: slow and optional
                )
                self.writer = SummaryWriter(str(dump_folder / "tb"))
        self.window_start = time.perf_counter()
        self.run_start = self.window_start - elapsed_before  # elapsed counts the run's earlier processes too
        self.window_tokens = 0
        self.window_data_wait = 0.0
        self.history: list[dict] = []  # every logged record, for the closing summary

    def elapsed(self) -> float:
        """Seconds of the run so far, its earlier processes (before a resume) included."""
        return time.perf_counter() - self.run_start

    def window_seconds(self) -> float:
        """Seconds since the last log step (no device sync: the straggler figure's scale)."""
        return time.perf_counter() - self.window_start

    def count(self, tokens: int, data_wait_seconds: float) -> None:
        self.window_tokens += tokens
        self.window_data_wait += data_wait_seconds

    def log(self, step: int, values: dict[str, float], excluded_seconds: float = 0.0) -> dict[str, float]:
        """Add throughput, progress and memory to `values`, write them, and start a new window.

        excluded_seconds: time of the window that was not training (a validation), left out of tokens/s.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: logging step only
        now = time.perf_counter()
        elapsed = now - self.window_start - excluded_seconds
        tokens_per_second = self.window_tokens / max(elapsed, 1e-9)
        steps_in_window = step - self.window_first_step + 1  # < 1 after a rollback moved the step back
        progress = {"elapsed_s": now - self.run_start}
        if self.total_steps and steps_in_window >= 1:
            progress["eta_s"] = max(0, self.total_steps - step) * (elapsed + excluded_seconds) / steps_in_window
        record = {"step": step, "total_steps": self.total_steps, **values, **progress,
                  "tokens_per_second_per_device": tokens_per_second,
                  "tflops_per_device": tokens_per_second * self.flops_per_token / 1e12,
                  "data_wait_fraction": self.window_data_wait / max(elapsed, 1e-9),
                  **device_memory(self.device)}
        if self.peak_flops:
            record["mfu_percent"] = 100 * tokens_per_second * self.flops_per_token / self.peak_flops
        record["time"] = time.time()
        self.history.append(record)
        if self.rank == 0:
            logger.info(format_record(record))
            if self.jsonl:
                self._write_jsonl(record)
            if self.writer:
                for key, value in record.items():
                    if key not in ("step", "time") and isinstance(value, (int, float)):
                        self.writer.add_scalar(key, value, step)
            if self.wandb_run is not None:
                self.wandb_run.log(record)
        self.window_start, self.window_tokens, self.window_data_wait = time.perf_counter(), 0, 0.0
        self.window_first_step = step + 1
        return record

    def _write_jsonl(self, record: dict) -> None:
        """One line of metrics.jsonl. A failed write (a full disk) stops the file, not the run: metrics
        are not worth losing a run for, the log lines still carry them, and checkpoints still save."""
        try:
            self.jsonl.write(json.dumps(record) + "\n")
        except OSError as error:
            logger.warning("metrics: cannot write %s (%s): it stops at step %d, training goes on (the log lines keep "
                           "the metrics)", self.jsonl.name, error.strerror or error, record["step"])
            try:
                self.jsonl.close()  # flushes the failed line again: it may fail again
            except OSError:
                pass
            self.jsonl = None

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_duration(seconds: float) -> str:
    """3725.4 -> '1:02:05'; days are counted in hours ('50:00:00')."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def format_record(record: dict) -> str:
    """'step: 10/80  loss: 7.1234  grad_norm: 1.23 ...': stable keys so tools can grep logs."""
    total = f"/{record['total_steps']}" if record.get("total_steps") else ""
    # The mean over the log window, as Megatron logs it; metrics.jsonl keeps the step's own `loss` too.
    parts = [f"step: {record['step']}{total}", f"loss: {record.get('loss_window_mean', record['loss']):.4f}"]
    if "tokens_seen" in record:
        parts.append(f"tokens: {record['tokens_seen']:,}")
    if "elapsed_s" in record:
        eta = f" eta {format_duration(record['eta_s'])}" if "eta_s" in record else ""
        parts.append(f"elapsed {format_duration(record['elapsed_s'])}{eta}")
    formats = {"grad_norm": "grad_norm: {:.3f}", "lr": "lr: {:.3e}",
               "tokens_per_second_per_device": "tokens/s/device: {:,.0f}", "tflops_per_device": "tflops: {:.1f}",
               "mfu_percent": "mfu: {:.1f}%", "memory/max_allocated_gib": "mem: {:.1f}GiB",
               "data_wait_fraction": "data_wait: {:.1%}", "loss_max_sample": "worst_sample: {:.3f}",
               "clipped_fraction": "clipped: {:.0%}", "overflow_steps": "overflow: {:d}",
               "val_loss": "val_loss: {:.4f}", "val_perplexity": "val_ppl: {:.3f}",
               "epoch": "epoch: {:.2f}", "straggler_ratio": "straggler: {:.2f}"}
    parts += [fmt.format(record[key]) for key, fmt in formats.items() if key in record]
    return "  ".join(parts)
