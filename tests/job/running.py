"""Start titanlite runs as a user does (./run_train.sh in a subprocess), watch their progress, find their ranks."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.intermediate_size", "128", "--training.seq_len", "32", "--training.micro_batch_size", "4",
        "--training.global_batch_tokens", "256", "--training.device", "cpu", "--training.mixed_precision", "fp32",
        "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", "--lr_schedule.warmup_tokens", "0",
        "--lr_schedule.decay", "constant", "--data.default_num_documents", "300"]


def start(folder: Path, *overrides: str, ngpu: int = 1) -> subprocess.Popen:
    """./run_train.sh --config debug_model with the tiny model, writing into `folder`."""
    environment = {key: value for key, value in os.environ.items() if key not in ("CONFIG_FILE", "LOG_RANK")}
    return subprocess.Popen([str(REPO / "run_train.sh"), "--config", "debug_model", *TINY, "--job.dump_folder",
                             str(folder), *overrides], env={**environment, "NGPU": str(ngpu)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(process: subprocess.Popen, folder: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(record["step"] >= step for record in logged_steps(folder)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.1)


def rank_pid(folder: Path, rank: int) -> int:
    """The pid of the training process of `rank` whose command line names `folder`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"titanlite.train" in command and str(folder).encode() in command and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process for {folder}")
