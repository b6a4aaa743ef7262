"""A job that stops making progress ends, naming the ranks that stopped; and the straggler figure.

A frozen rank (SIGSTOP, a dead NFS mount, a stuck kernel) leaves the others blocked in a collective
that Python cannot interrupt, and torchrun's output never says which rank it was. Each rank's
`Watchdog` thread publishes a heartbeat (a counter and the last step it finished) in the store of
the rendezvous every few seconds. When this rank has finished no step for 90% of
job.collective_timeout_s, the thread reads every rank's heartbeat twice, a few seconds apart: a
rank whose counter did not move is frozen or gone, a live rank behind the others is stuck. The
lowest live rank prints one line naming them and the last step each finished; every live rank
then exits with code 5, and the launcher stops the rest. The process groups' own timeout, a
backstop, is set a little later (see `process_group_timeout`).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from titanlite.job.exits import report_to_launcher

logger = logging.getLogger("titanlite")
EXIT_STALLED = 5
_KEY = "titanlite/heartbeat/{}"


def process_group_timeout(collective_timeout_s: float) -> timedelta:
    """The process groups' timeout: after the watchdog's decision, so that its line, not a collective's
    traceback, reports a stalled job."""
    return timedelta(seconds=collective_timeout_s + 60)


def default_store():
    """The store of the default process group (torchrun's rendezvous store), reachable from every rank."""
    return dist.distributed_c10d._get_default_store()


class Watchdog:
    """Heartbeats of this rank; ends the process when no step finished for ~job.collective_timeout_s."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, store, first_step: int) -> None:
        self.timeout_s, self.rank, self.world_size, self.store = timeout_s, rank, world_size, store
        self.period = min(5.0, timeout_s / 20)
        self.step, self.progress_at, self.beats = first_step, time.monotonic(), 0
        self._stopped = threading.Event()
        self._beat()  # at once: a rank that freezes before the first period still has a heartbeat to name it by
        self._thread = threading.Thread(target=self._run, name="titanlite-watchdog", daemon=True)
        self._thread.start()

    def finished(self, step: int) -> None:
        """This rank finished `step` (or some other long piece of work: a save, a validation)."""
        self.step, self.progress_at = step, time.monotonic()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _beat(self) -> None:
        self.beats += 1
        self.store.set(_KEY.format(self.rank), f"{self.beats} {self.step}")

    def _heartbeats(self) -> list[tuple[int, int] | None]:
        beats = []
        for rank in range(self.world_size):
            key = _KEY.format(rank)
            try:
                beats.append(tuple(int(v) for v in self.store.get(key).split()) if self.store.check([key]) else None)
            except Exception:  # noqa: BLE001 - an unreadable heartbeat is one that says nothing
                beats.append(None)
        return beats

    def _run(self) -> None:
        while not self._stopped.wait(self.period):
            try:
                self._beat()
                if time.monotonic() - self.progress_at < 0.9 * self.timeout_s - 2 * self.period:
                    continue
                before = self._heartbeats()
                if self._stopped.wait(2 * self.period):
                    return
                self._beat()
                after = self._heartbeats()
            except Exception as error:  # noqa: BLE001 - the store went away: the launcher is ending the job
                logger.debug("watchdog: heartbeat failed: %s", error)
                continue
            if time.monotonic() - self.progress_at >= 0.9 * self.timeout_s - 2 * self.period:
                self._end(before, after)

    def _end(self, before: list, after: list) -> None:
        message = stall_message(before, after, self.timeout_s, time.monotonic() - self.progress_at)
        live = [rank for rank, (b, a) in enumerate(zip(before, after)) if a is not None and (b is None or a[0] > b[0])]
        if self.rank == min(live, default=self.rank):
            print(message, file=sys.stderr, flush=True)
        report_to_launcher(message)
        sys.stdout.flush()
        os._exit(EXIT_STALLED)  # the main thread is blocked in a collective: nothing else ends it


def stall_message(before: list, after: list, timeout_s: float, idle_s: float) -> str:
    """One line naming the frozen ranks (heartbeat counter unchanged) and the live ranks that are behind."""
    frozen = [(rank, (a or b or (0, -1))[1]) for rank, (b, a) in enumerate(zip(before, after))
              if a is None or b is None or a[0] == b[0]]
    live_steps = {rank: a[1] for rank, (b, a) in enumerate(zip(before, after))
                  if rank not in dict(frozen)}
    ahead = max(live_steps.values(), default=-1)
    parts = []
    if frozen:
        parts.append("; ".join(f"rank {rank} stopped responding (last finished step "
                               f"{'unknown' if step < 0 else step})" for rank, step in frozen))
    behind = [(rank, step) for rank, step in live_steps.items() if step < ahead]
    if behind:
        parts.append("; ".join(f"rank {rank} is alive but stuck after step {step}" for rank, step in behind))
    if not parts:
        parts.append(f"every rank is alive and stuck after step {ahead} (a collective or I/O that never returns)")
    return (f"titanlite: no step finished for {idle_s:.0f} s (job.collective_timeout_s={timeout_s:g}): "
            f"{'; '.join(parts)}. Ending the job (exit {EXIT_STALLED}); check those ranks' hosts, then resume")


def straggler_figure(boundary_wait_s: float, window_s: float, steps: int, group) -> dict[str, float]:
    """Slowest rank's step time against the median, from each rank's wait at the step boundary.

    Every rank meets the others once a step (`StopSignals.agreed`): a rank's own time per step is
    the window's time per step less its wait there, so the last to arrive has the longest. This sees
    ranks slow in data loading and host work; a GPU slow in its kernels slows every rank's
    collectives alike and shows in the step time, not here. Collective on `group` (log steps only).
    """
    if group is None or steps < 1 or window_s <= 0:
        return {}
    waits = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(waits, torch.tensor([boundary_wait_s], dtype=torch.float64), group=group)
    own_step_s = [window_s / steps - float(wait) / steps for wait in waits]
    slowest = max(range(len(own_step_s)), key=own_step_s.__getitem__)
    return {"straggler_ratio": own_step_s[slowest] / statistics.median(own_step_s), "slowest_rank": slowest}
