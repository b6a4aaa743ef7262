"""A scheduler's SIGTERM / SIGUSR1 and Ctrl-C: every rank finishes its step, agrees, saves, says how to resume, exits 4."""

import json
import signal
import subprocess
import sys

import pytest
from running import rank_pid, start, wait_for_step

CHECKPOINTS = ["--checkpoint.enable", "true", "--checkpoint.interval", "1000"]


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_same_command_resumes_it_bitwise(tmp_path):
    run = tmp_path / "run"
    process = start(run, "--training.steps", "400", *CHECKPOINTS)
    wait_for_step(process, run, 3)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 4, err
    saved = sorted((run / "checkpoint").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "meta.json").is_file()
    step = json.loads((saved[0] / "meta.json").read_text())["step"]
    assert last_line(err) == (f"titanlite: stopped by SIGTERM after step {step}: saved {saved[0]}; run the same "
                              "command again to resume from it")
    assert "Traceback" not in err

    # Resumed to two steps past the signal, against one run that was never stopped (constant LR:
    # the schedule does not depend on training.steps).
    end = str(step + 2)
    resumed = start(run, "--training.steps", end, *CHECKPOINTS)
    reference = start(tmp_path / "reference", "--training.steps", end, *CHECKPOINTS)
    for process in (resumed, reference):
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
    losses = {name: {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / name / "metrics.jsonl")
                                                                          .read_text().splitlines())}
              for name in ("run", "reference")}
    assert [losses["run"][s] for s in (step + 1, step + 2)] == [losses["reference"][s] for s in (step + 1, step + 2)]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_after_the_same_step_with_one_checkpoint(tmp_path):
    run = tmp_path / "run"
    process = start(run, "--training.steps", "400", "--parallelism.data_parallel_shard_degree", "2", *CHECKPOINTS,
                    ngpu=2)
    wait_for_step(process, run, 3)
    subprocess.run(["kill", "-USR1", str(rank_pid(run, 1))], check=True)  # SLURM's --signal=USR1@120 reaches each task
    _, err = process.communicate(timeout=120)
    assert process.returncode == 4, err
    saved = sorted((run / "checkpoint").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "meta.json").is_file(), saved
    step = json.loads((saved[0] / "meta.json").read_text())["step"]
    assert f"titanlite: stopped by SIGUSR1 after step {step}: saved {saved[0]}" in err
    assert "Traceback" not in err


def test_a_second_ctrl_c_exits_at_once_without_saving():
    program = ("import os, signal, time\n"
               "from titanlite.job.stop import StopSignals\n"
               "signals = StopSignals()\n"
               "os.kill(os.getpid(), signal.SIGINT)\n"
               "time.sleep(0.2)\n"
               "assert signals.received == signal.SIGINT\n"
               "os.kill(os.getpid(), signal.SIGINT)\n"
               "time.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert result.stderr.splitlines() == [
        "titanlite: received SIGINT: stopping after the step in flight (a second Ctrl-C exits at once, unsaved)",
        "titanlite: second interrupt: exiting now, without saving"]


def test_stopping_without_checkpoints_says_nothing_was_saved(tmp_path):
    process = start(tmp_path / "run", "--training.steps", "400")
    wait_for_step(process, tmp_path / "run", 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 4
    assert last_line(err).startswith("titanlite: stopped by SIGINT after step ")
    assert last_line(err).endswith("; nothing saved (checkpoint.enable=false)")
