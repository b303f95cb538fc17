"""The spawned-ranks helper fails a test when a rank fails, with the rank's own message."""

import os
import time

import pytest
import torch.distributed as dist

from tests.distributed import run_ranks


def _rank_fails_a_check(rank):
    assert dist.get_world_size() == 2
    assert rank == 0, "rank 1 disagrees"


def _rank_dies(rank):
    if rank == 1:
        os._exit(3)
    time.sleep(60)  # rank 0 outlives it: the parent sees rank 1's exit first, then stops rank 0


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_test_with_its_message():
    with pytest.raises(pytest.fail.Exception, match="rank 1: AssertionError: rank 1 disagrees"):
        run_ranks(_rank_fails_a_check)


@pytest.mark.slow
def test_a_rank_that_dies_without_raising_fails_the_test_with_its_exit_status():
    with pytest.raises(pytest.fail.Exception, match="no rank raised\nProcessExitedException: process 1 .*exit code 3"):
        run_ranks(_rank_dies)
