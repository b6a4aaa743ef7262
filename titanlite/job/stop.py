"""Stopping on request: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 end the run at a step boundary, saved.

Clusters pre-empt with SIGTERM (then SIGKILL after a grace period) or, under SLURM's
`--signal=USR1@120`, with SIGUSR1 ahead of the time limit. The handler only records the signal;
the loop asks `StopSignals.agreed()` after every step, one all-reduce on a CPU group, so that all
ranks stop after the same step even when the signal reached only some of them. The loop then
saves and raises `StoppedBySignal` (exit code 4: not a failure, resume with the same command).
A second Ctrl-C exits at once (130) without saving: a person who presses it twice means it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """The run stopped on a signal after saving (when checkpointing is on); the message says how to resume."""


class StopSignals:
    """Records the first stop signal; install in the main thread, before the first step."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.boundary_wait_s = 0.0  # time spent waiting for the other ranks in agreed(): the straggler figure
        # Python delivers signals to the main thread only; elsewhere (a test's thread) nothing is installed.
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS} if in_main else {}

    def _handle(self, number: int, frame) -> None:
        # os.write, not logging or print: a handler that takes the logging lock the interrupted code
        # holds would deadlock.
        if self.received is not None:
            if number == signal.SIGINT:
                os.write(2, b"titanlite: second interrupt: exiting now, without saving\n")
                os._exit(130)
            return
        self.received = signal.Signals(number)
        os.write(2, f"titanlite: received {self.received.name}: stopping after the step in flight "
                    "(a second Ctrl-C exits at once, unsaved)\n".encode())

    def agreed(self, group) -> signal.Signals | None:
        """The signal some rank received, on every rank (collective on `group` when there is one)."""
        if group is None:
            return self.received
        code = torch.tensor([int(self.received or 0)])
        started = time.perf_counter()
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
        self.boundary_wait_s += time.perf_counter() - started
        return signal.Signals(int(code)) if int(code) else None

    def take_boundary_wait(self) -> float:
        """Seconds waited in agreed() since the last call."""
        waited, self.boundary_wait_s = self.boundary_wait_s, 0.0
        return waited

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def stop_on_signal(received: signal.Signals, step: int, checkpointer, dump_folder) -> None:
    """Save after `step` (when checkpointing is on) and raise StoppedBySignal with the way to resume."""
    if not checkpointer.settings.enable:
        raise StoppedBySignal(f"{received.name} after step {step}; nothing saved (checkpoint.enable=false)")
    checkpointer.maybe_save(step, force=True)
    checkpointer.close()  # an async save must be on disk before the process ends
    saved = checkpointer.latest_complete()
    how = ("run the same command again to resume from it" if checkpointer.settings.resume == "auto" else
           f"resume with --checkpoint.resume {saved}")
    raise StoppedBySignal(f"{received.name} after step {step}: saved {saved}; {how}")
