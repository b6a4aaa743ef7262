"""The launcher's side of a clean stop: SIGTERM, SIGINT and SIGUSR1 are passed on to the ranks.

A scheduler preempts a job by signalling the launcher (SLURM: SIGTERM, or SIGUSR1 with
--signal=USR1@120), Ctrl-C reaches only the launcher (torchrun starts every rank in a session of
its own), and the ranks stop cleanly on these signals: they finish the step in flight, save, and
exit with code 4. torchrun's agent would instead send them SIGTERM and SIGKILL them 30 s later,
whatever they were writing. So the launcher passes the signal itself to every rank, waits until
all have exited (up to TITANLITE_STOP_GRACE_S seconds, default 300, then kills the rest), and
torchrun then reports their exit codes as it would any others. No torch import: the launcher
checks the config before importing torch.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from titanlite.config.settings import ConfigError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEFAULT_STOP_GRACE_S = 300.0


def stop_grace_seconds() -> float:
    """TITANLITE_STOP_GRACE_S: how long the ranks may take to stop after a signal (save included)."""
    text = os.environ.get("TITANLITE_STOP_GRACE_S", "")
    if not text:
        return DEFAULT_STOP_GRACE_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"TITANLITE_STOP_GRACE_S={text!r}: must be a number of seconds >= 0")
    return seconds


def child_pids() -> list[int]:
    """This process's children, from /proc: torchrun's agent runs in the launcher's process and
    starts no process but the ranks, so these are this node's ranks (exited ones included until
    the agent reaps them)."""
    parent, children = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                # "pid (command) state ppid ...": the command may hold spaces and parentheses
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


def has_exited(pid: int) -> bool:
    """Whether child `pid` has exited, without reaping it: torchrun's agent still reads its status."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def pass_to_ranks(signum: int, grace_s: float) -> bool:
    """Send `signum` to every rank and wait up to `grace_s` seconds for all to exit; kill those that
    did not (with their process group: their data-loader workers). False if no rank runs yet."""
    pids = child_pids()
    if not pids:
        return False
    name = signal.Signals(signum).name
    print(f"titanlite: {name} received: passed to the {len(pids)} ranks of this node; waiting up to {grace_s:g} s "
          f"(TITANLITE_STOP_GRACE_S) for them to stop", file=sys.stderr, flush=True)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while (running := [pid for pid in pids if not has_exited(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in running:
        print(f"titanlite: the rank with pid {pid} did not stop within {grace_s:g} s of {name}: killed",
              file=sys.stderr, flush=True)
        try:
            os.killpg(pid, signal.SIGKILL)  # torchrun starts each rank as the leader of its own group
        except ProcessLookupError:
            pass
    return True


def forward_stop_signals(grace_s: float) -> None:
    """From now on, SIGTERM, SIGINT and SIGUSR1 to this process go to the ranks (pass_to_ranks), and
    the launch ends when they have exited, with their exit codes. Before any rank runs, a signal
    ends the launch as torchrun's own handler does (SignalException). A second signal during the
    wait is passed on too (a second Ctrl-C stops the ranks at once)."""

    def handle(signum, frame) -> None:
        if not pass_to_ranks(signum, grace_s):
            from torch.distributed.elastic.multiprocessing.api import SignalException
            raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, handle)
