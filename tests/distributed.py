"""Run a function on N CPU processes joined by a gloo process group, from pytest.

    from distributed import run_distributed      # tests/ is on sys.path under pytest

    def check_allreduce(scale):                   # module level: spawn pickles it by name
        t = torch.ones(1) * scale
        dist.all_reduce(t)
        return t.item()

    def test_allreduce():
        assert run_distributed(check_allreduce, 2, 3.0) == [6.0, 6.0]

Each child gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set (so code that
reads the torchrun environment works unchanged), one intra-op thread (N processes share the
CI's 2 cores), and an initialised default process group; it calls `fn(*args)` and sends the
result back. Any exception in any child fails the caller with that child's traceback; a child
that dies without a word, or a run past `timeout` seconds, fails it too, and no process is left
behind. Keep one spawn per test and loop over cases inside `fn`: a spawn costs ~2-5 s.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedTestError(AssertionError):
    """A child process raised, died, or timed out; the message carries its traceback."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(*args)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo processes; return the values in rank order.

    `fn` and `args` must be picklable (define `fn` at module level). `timeout` is seconds of
    wall time for the whole group, spawn included.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_child, args=(rank, world_size, port, fn, args, results), daemon=True)
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(errors) < world_size:
            if time.monotonic() > deadline:
                errors[-1] = f"timed out after {timeout:.0f} s with ranks {sorted(values)} done"
                break
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                silent = [r for r, p in enumerate(processes)
                          if p.exitcode not in (None, 0) and r not in values and r not in errors]
                if silent:  # died without reporting (segfault, os._exit, OOM kill)
                    time.sleep(0.5)  # its peers may still report the real cause
                    while not results.empty():
                        rank, status, payload = results.get()
                        (values if status == "ok" else errors)[rank] = payload
                    for r in silent:
                        errors.setdefault(r, f"exited with code {processes[r].exitcode} without reporting")
                    break
                continue
            (values if status == "ok" else errors)[rank] = payload
            if errors:  # peers of a failed rank usually hang in a collective: stop waiting soon
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for process in processes:
            process.join(timeout=5.0 if not errors else 0.1)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    if errors:
        report = "\n".join(f"--- rank {rank} ---\n{text}" if rank >= 0 else f"--- {text}"
                           for rank, text in sorted(errors.items()))
        raise DistributedTestError(f"{fn.__name__} failed on {world_size} processes:\n{report}")
    return [values[rank] for rank in range(world_size)]
