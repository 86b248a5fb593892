"""Shared fixtures: a one-process megatron group for single-process model tests."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from megatron_video.platform.megatron_import import import_megatron_core

import_megatron_core()  # before any test module imports megatron (see platform/megatron_import.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single():
    """Default gloo group of size 1 with megatron's parallel state (all sizes 1)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation

    apply_megatron_cpu_adaptation()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
