"""How a titanlite process ends: the launcher's channel for a rank's one-line reason."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def report_to_launcher(message: str) -> None:
    """Under torchrun, leave the one-line `message` in torch elastic's error file for the launcher.

    torchrun sets TORCHELASTIC_ERROR_FILE for every worker and reads it back when the worker fails
    (a string "message" with a "timestamp" is its documented short form), so the launcher can show
    the reason of a rank whose output is filtered out (LOG_RANK). Outside torchrun it does nothing.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
