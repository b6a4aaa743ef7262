"""One run per job.dump_folder: a second run is refused before it writes anything; a dead run's lock is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
from running import start, wait_for_step

from titanlite.config.settings import ConfigError
from titanlite.job.lock import lock_dump_folder


HOLD = ("import sys, time\n"
        "from titanlite.job.lock import DumpFolderLock\n"
        "lock = DumpFolderLock(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError) as error:
            lock_dump_folder(tmp_path, 0, None)
        assert str(error.value).startswith(f"job.dump_folder={tmp_path} is in use by another run (pid {holder.pid} "
                                           f"on host {socket.gethostname()}, started ")
        assert str(error.value).endswith("wait for it to end, stop it, or choose another job.dump_folder")
    finally:
        holder.kill()
        holder.wait()
    # Killed: the kernel dropped its lock; the next run takes over and warns (the details stayed).
    lock = lock_dump_folder(tmp_path, 0, None)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    # A process killed with -9 leaves its details in the file, but the kernel dropped its flock.
    (tmp_path / ".lock").write_text(json.dumps({"host": "node7", "pid": 4242, "started": "2026-12-01T10:00:00+00:00"}))
    with caplog.at_level(logging.WARNING, logger="titanlite"):
        lock = lock_dump_folder(tmp_path, 0, None)
    assert "took over the lock of a run that did not end cleanly (pid 4242 on host node7, started 2026-12-01" \
        in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""


@pytest.mark.slow
def test_a_second_run_in_a_live_runs_folder_changes_nothing_of_it(tmp_path):
    run = tmp_path / "run"
    first = start(run, "--training.steps", "400", "--checkpoint.enable", "true", "--checkpoint.interval", "2")
    wait_for_step(first, run, 3)
    config_before = (run / "config.json").read_text()
    second = start(run, "--training.steps", "4", "--optimizer.lr", "0.1")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert err.strip().splitlines()[-1].startswith(f"titanlite: config error: job.dump_folder={run} is in use by "
                                                   f"another run (pid {first.pid}")
    assert (run / "config.json").read_text() == config_before and not (run / "previous_runs").exists()
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 4, err
    for meta in (run / "checkpoint").glob("step-*/meta.json"):
        assert json.loads(meta.read_text())["config"]["optimizer"]["lr"] != 0.1
