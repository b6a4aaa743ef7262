"""What the job prints: one logger, rank 0 at INFO; and torchao imported quietly, only when a run uses it.

torchao's import takes seconds and logs a line for every compiled extension it cannot load (on a
CPU build of torch: all of its CUDA kernels). titanlite uses none of those extensions: float8
matmuls run on torch's `_scaled_mm`, the 8-bit optimizer is PyTorch code compiled by
torch.compile. So the import-time lines go to the debug log instead of the console.
"""

from __future__ import annotations

import importlib
import logging
import warnings

_IMPORT_NOISE = ("torchao", "torch.utils._pytree")  # extension load failures; enum registration notices


def import_torchao(module: str):
    """`importlib.import_module(module)` (a torchao module) with torchao's import-time warnings demoted to debug."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        # torch warns once per tensor subclass that AOT autograd cannot cache it; the 8-bit optimizer
        # state is one, and the warning changes nothing about the run.
        warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")


def init_logging(rank: int) -> None:
    """The `titanlite` log on stdout: rank 0 at INFO, every other rank WARNING and up."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True)
