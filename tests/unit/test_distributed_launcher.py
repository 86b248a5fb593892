"""The gloo test launcher: results by rank, a failing rank's traceback, a hang reported."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from megatron_video.testing.distributed import run_distributed


def _sum_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world_size, t.item() * scale


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def _hang_on_rank_one(rank, world_size):
    if rank == 1:
        time.sleep(60)
    return rank


def test_results_in_rank_order():
    assert run_distributed(_sum_ranks, 2, 10.0, timeout_s=60) == [(0, 2, 10.0), (1, 2, 10.0)]


def test_failing_rank_traceback_reaches_parent():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1.*ValueError: rank one says no"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=60)


def test_hang_is_killed_and_reported():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_distributed(_hang_on_rank_one, 2, timeout_s=8)
    assert time.monotonic() - start < 40
