"""Shared by the tests: the tiny model and run that every training test starts from.

`tiny_config(folder, *overrides)` is the debug config shrunk to a 2-layer, 64-wide model and a few
float32 CPU steps of 256 tokens, writing into `folder`; later overrides win. It is a plain
function, not only a fixture, because distributed tests call it inside spawned processes.
"""

from pathlib import Path

import numpy as np
import pytest

from titanlite.config.load import load_config
from titanlite.config.settings import Config

TINY_RUN = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
            "--model.intermediate_size", "128", "--model.vocab_size", "2048", "--training.seq_len", "32",
            "--training.micro_batch_size", "4", "--training.global_batch_tokens", "256", "--training.steps", "6",
            "--lr_schedule.warmup_tokens", "0", "--training.device", "cpu", "--training.mixed_precision", "fp32",
            "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", "--data.default_num_documents", "300"]

# A run whose health detectors have something to see: a wider FFN, the real vocabulary, small steps.
HEALTH_RUN = ["--model.intermediate_size", "160", "--model.vocab_size", "0", "--training.global_batch_tokens", "128",
              "--data.default_num_documents", "400"]


def tiny_config(folder: str | Path, *overrides: str) -> Config:
    return load_config("debug_model", [*TINY_RUN, "--job.dump_folder", str(folder), *overrides])


@pytest.fixture
def tiny(tmp_path):
    """tiny_config writing into the test's tmp_path: `tiny("--training.steps", "3")`."""
    return lambda *overrides: tiny_config(tmp_path, *overrides)


def power_law(steps: int, seed: int, noise: float = 0.02) -> np.ndarray:
    """A healthy loss curve: 1.6 + 9 t^-0.3, with multiplicative Gaussian noise."""
    t = np.arange(1, steps + 1)
    return (1.6 + 9 * t ** -0.3) * np.exp(np.random.default_rng(seed).normal(0, noise, steps))
