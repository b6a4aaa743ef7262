"""How a titanlite process ends: its one-line reason left for the launcher, and death with the launcher."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def report_to_launcher(message: str) -> None:
    """Under torchrun, leave the one-line `message` in torch elastic's error file for the launcher.

    torchrun sets TORCHELASTIC_ERROR_FILE for every worker and reads it back when the worker fails
    (a string "message" with a "timestamp" is its documented short form), so the launcher can show
    the reason of a rank whose output is filtered out (LOG_RANK). Outside torchrun it does nothing.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def die_with_launcher() -> None:
    """Under torchrun on Linux, have the kernel SIGKILL this rank when its launcher dies.

    torchrun starts every rank in a session of its own, so a kill -9 of the launcher reaches no
    rank: they would go on training, and saving, beside a relaunch. The parent-death signal ends
    them with it. It is armed for the parent of the moment; titanlite's launcher also leaves its
    pid in TITANLITE_LAUNCHER_PID, so that a rank whose launcher died before the signal was armed
    (during the imports) sees it and stops at once rather than train on unseen.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # no prctl here: nothing to tie this rank to
    launcher = os.environ.get("TITANLITE_LAUNCHER_PID")
    if os.getppid() != parent or (launcher and int(launcher) != parent):  # no signal will come now
        print(f"titanlite: the launcher (pid {launcher or parent}) is gone: this rank stops", file=sys.stderr)
        os._exit(128 + signal.SIGKILL)
