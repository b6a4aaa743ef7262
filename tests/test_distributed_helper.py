"""The multi-process test helper itself: results come back in rank order, failures carry the traceback."""

import os

import pytest
import torch
import torch.distributed as dist
from distributed import DistributedTestError, run_distributed


def sum_of_ranks_times(scale):
    value = torch.tensor([float(dist.get_rank()) * scale])
    dist.all_reduce(value)
    return dist.get_rank(), int(os.environ["WORLD_SIZE"]), value.item()


def raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("rank one says no")
    dist.barrier()  # rank 0 hangs here: the helper must not wait for it long


def exit_silently_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(3)
    return "fine"


def test_results_in_rank_order_with_env_set():
    assert run_distributed(sum_of_ranks_times, 3, 2.0) == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_child_exception_fails_with_its_traceback():
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1.*ValueError: rank one says no"):
        run_distributed(raise_on_rank_one, 2, timeout=60)


def test_child_that_dies_silently_is_reported():
    with pytest.raises(DistributedTestError, match="exited with code 3"):
        run_distributed(exit_silently_on_rank_one, 2, timeout=60)
