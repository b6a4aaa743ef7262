"""Profiling and memory: PyTorch profiler traces, CUDA memory snapshots, OOM reports, compile stats.

Files, under the run folder:
    profile_traces/step-<N>/rank<r>_trace.json   Chrome traces (chrome://tracing, ui.perfetto.dev)
    memory_snapshots/step-<N>-rank<r>.pickle     drag into https://pytorch.org/memory_viz
    oom/step-<N>-rank<r>.txt (+ .pickle)         torch.cuda.memory_summary() at the OOM, and a snapshot
A memory snapshot can be asked for while a run goes: `touch <run>/dump_memory_snapshot`; the
next log step writes one and removes the file.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import traceback
import warnings
from pathlib import Path

import torch

from titanlite.config.settings import Profiling

logger = logging.getLogger("titanlite")
# Each profiled window is written out when its cycle ends (on_trace_ready): that the profiler then
# clears its events is the point, not something to warn about at every run.
warnings.filterwarnings("ignore", message="Warning: Profiler clears events at the end of each cycle")

SNAPSHOT_TRIGGER = "dump_memory_snapshot"
# Function names in an OOM traceback -> the phase of the step it happened in (innermost wins).
PHASES = (("forward", "forward"), ("backward", "backward"), ("_engine_run_backward", "backward"),
          ("global_grad_norm", "gradient norm"), ("clip_grads_with_norm_", "gradient clipping"),
          ("step", "optimizer step"), ("step_unless_nonfinite", "optimizer step"))


class OutOfMemory(RuntimeError):
    """A CUDA OOM, with where it happened and where the report went; the message is for a person."""


class TrainingProfiler:
    """Owns the torch profiler schedule, memory snapshots and compile statistics of one rank."""

    def __init__(self, settings: Profiling, dump_folder: Path, rank: int, device: torch.device):
        self.settings, self.dump_folder, self.rank, self.device = settings, Path(dump_folder), rank, device
        self.cuda = device.type == "cuda"
        self.profiler = None
        self.compile_frames = 0
        if self.cuda and self.settings.record_memory_history:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if self.settings.enable_profiling:
            self.profiler = self._start_profiler()

    def _start_profiler(self):
        s = self.settings
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
        schedule = torch.profiler.schedule(wait=s.profile_freq - s.profile_warmup - s.profile_active,
                                           warmup=s.profile_warmup, active=s.profile_active)

        def write_trace(profiler) -> None:
            folder = self.dump_folder / "profile_traces" / f"step-{profiler.step_num}"
            folder.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))
            # A plain-text table of the costliest ops: a first look without opening the trace.
            sort_key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            (folder / f"rank{self.rank}_top_ops.txt").write_text(
                profiler.key_averages().table(sort_by=sort_key, row_limit=50, max_name_column_width=80))
            logger.info("profiling: trace of steps up to %d written to %s", profiler.step_num, folder)

        profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write_trace,
                                          record_shapes=True, with_stack=False)
        profiler.start()
        return profiler

    def step(self, step: int) -> None:
        """After every training step: advance the profiler schedule; snapshot if configured."""
        if self.profiler is not None:
            self.profiler.step()
        if step == self.settings.memory_snapshot_step:
            self.snapshot(step)

    def on_log_step(self, step: int) -> dict[str, float]:
        """Compile statistics (and a snapshot if someone touched the trigger file)."""
        trigger = self.dump_folder / SNAPSHOT_TRIGGER
        if trigger.exists():
            self.snapshot(step)
            if self.rank == 0:
                trigger.unlink(missing_ok=True)
        return self.compile_stats(step)

    def expected_compilation(self) -> None:
        """Frames compiled up to now are expected (validation runs the blocks without gradients once)."""
        from torch._dynamo.utils import counters

        self.compile_frames = counters["frames"].get("total", 0)

    def compile_stats(self, step: int) -> dict[str, float]:
        """Frames compiled so far and seconds spent compiling; warns when frames recompile after step 1."""
        try:
            from torch._dynamo.utils import compile_times, counters
        except ImportError:  # pragma: no cover - dynamo missing
            return {}
        frames = counters["frames"].get("total", 0)
        if frames == 0:
            return {}
        names, seconds = compile_times(repr="csv", aggregate=True)
        total = sum(float(value) for name, value in zip(names, seconds) if name == "_compile.compile_inner")
        if step > 1 and frames > self.compile_frames and self.compile_frames:
            logger.warning("compile: %d frame(s) compiled again before step %d (recompilation costs time each "
                           "time): rerun with TORCH_LOGS=recompiles to see which guard failed",
                           frames - self.compile_frames, step)
        self.compile_frames = frames
        return {"compile/frames": frames, "compile/seconds": total}

    def snapshot(self, step: int, folder: str = "memory_snapshots") -> Path | None:
        """Write this rank's CUDA memory snapshot (allocation stacks only with record_memory_history)."""
        if not self.cuda:
            return None
        path = self.dump_folder / folder / f"step-{step}-rank{self.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as snapshot_file:
            pickle.dump(torch.cuda.memory._snapshot(), snapshot_file)
        logger.info("profiling: memory snapshot written to %s (open it at https://pytorch.org/memory_viz)", path)
        return path

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.cuda and self.settings.record_memory_history:
            torch.cuda.memory._record_memory_history(enabled=None)


def oom_phase(error: BaseException) -> tuple[str, str]:
    """(phase, innermost titanlite frame) of an exception, read from its traceback."""
    phase, where = "training step", "unknown"
    for frame in traceback.extract_tb(error.__traceback__):
        for name, label in PHASES:
            if frame.name == name:
                phase = label
        if "titanlite" in frame.filename:
            where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return phase, where


@contextlib.contextmanager
def report_oom(step: int, dump_folder: Path, rank: int, device: torch.device):
    """Turn a CUDA OOM inside the block into an OutOfMemory naming the step and phase, after writing
    torch.cuda.memory_summary() and a memory snapshot to <run>/oom/ (the recipe's 8k OOM gotcha)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        phase, where = oom_phase(error)
        folder = Path(dump_folder) / "oom"
        folder.mkdir(parents=True, exist_ok=True)
        summary = folder / f"step-{step}-rank{rank}.txt"
        lines = [f"CUDA out of memory at step {step}, rank {rank}, during the {phase} ({where})", str(error), ""]
        if device.type == "cuda":
            gib = 1024 ** 3
            lines += [f"max allocated: {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB, "
                      f"max reserved: {torch.cuda.max_memory_reserved(device) / gib:.2f} GiB", "",
                      torch.cuda.memory_summary(device)]
            with open(summary.with_suffix(".pickle"), "wb") as snapshot_file:
                pickle.dump(torch.cuda.memory._snapshot(), snapshot_file)
        summary.write_text("\n".join(lines))
        raise OutOfMemory(
            f"CUDA out of memory at step {step} during the {phase} ({where}); memory summary and snapshot in "
            f"{folder}. Lower training.micro_batch_size, turn on activation_checkpoint.mode=selective or full, "
            "or rerun with profiling.record_memory_history=true to see which allocation grew") from error


def available_memory(device: torch.device, processes_on_host: int) -> tuple[float, str]:
    """(bytes this process may use, in words where): the GPU's free memory, or on CPU this process's
    share of the host's available memory (every local rank allocates from it)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0]), f"GPU {device.index}"
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = float(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf"), "the host"
    return available / max(1, processes_on_host), f"the host (shared by {processes_on_host} processes)"
