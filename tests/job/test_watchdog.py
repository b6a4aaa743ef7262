"""A stalled job ends within job.collective_timeout_s naming the rank that stopped; the straggler figure."""

import os
import signal
import time

import pytest
from distributed import run_distributed
from running import rank_pid, start, wait_for_step

from titanlite.job.watchdog import stall_message, straggler_figure


def test_the_message_names_frozen_ranks_and_live_ranks_behind():
    # (heartbeat counter, last finished step) read twice: rank 1's counter did not move.
    before, after = [(10, 57), (8, 56), (10, 57), (9, 55)], [(12, 57), (8, 56), (12, 57), (11, 55)]
    assert stall_message(before, after, 600, 540) == (
        "titanlite: no step finished for 540 s (job.collective_timeout_s=600): rank 1 stopped responding (last "
        "finished step 56); rank 3 is alive but stuck after step 55. Ending the job (exit 5); check those ranks' "
        "hosts, then resume")
    assert "rank 2 stopped responding (last finished step unknown)" in stall_message(
        [(1, 3), (1, 3), None], [(2, 3), (2, 3), None], 60, 55)
    assert "every rank is alive and stuck after step 3" in stall_message([(1, 3), (1, 3)], [(2, 3), (2, 3)], 60, 55)


def gather_straggler(waits):
    import torch.distributed as dist
    return straggler_figure(waits[dist.get_rank()], 2.0, 2, dist.group.WORLD)


def test_the_straggler_is_the_rank_that_waited_least_at_the_step_boundary():
    # Rank 0 waited 0.5 s over 2 steps of 1 s: its own step took 0.75 s, rank 1's 1 s; the median is 0.875.
    figures = run_distributed(gather_straggler, 2, [0.5, 0.0])
    assert figures[0] == figures[1] == {"straggler_ratio": pytest.approx(1.0 / 0.875, rel=1e-12), "slowest_rank": 1}


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    run = tmp_path / "run"
    process = start(run, "--training.steps", "100000", "--job.collective_timeout_s", "20",
                    "--parallelism.data_parallel_shard_degree", "2", ngpu=2)
    wait_for_step(process, run, 3)
    frozen, rank0 = rank_pid(run, 1), rank_pid(run, 0)
    os.kill(frozen, signal.SIGSTOP)
    stopped_at = time.monotonic()
    while os.path.exists(f"/proc/{rank0}") and open(f"/proc/{rank0}/stat").read().split()[2] != "Z":
        assert time.monotonic() - stopped_at < 60, "rank 0 still running 60 s after rank 1 froze"
        time.sleep(0.2)
    ended_after = time.monotonic() - stopped_at
    # torchrun waits 30 s for a stopped process to take its SIGTERM; a scheduler would kill it sooner.
    # Later than rank 0's exit by more than torchrun's one-second timestamps, so rank 0 stays the root cause.
    time.sleep(2.5)
    os.kill(frozen, signal.SIGKILL)  # as a scheduler would; torchrun's SIGTERM waits for a stopped process
    _, err = process.communicate(timeout=120)
    assert ended_after <= 20 + 5, ended_after  # within the timeout (one heartbeat period of slack)
    assert process.returncode == 5, err
    line = next(line for line in err.splitlines() if "no step finished for" in line)
    assert "(job.collective_timeout_s=20): rank 1 stopped responding (last finished step " in line
    assert "Ending the job (exit 5)" in line
