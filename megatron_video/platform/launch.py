"""Process start-up: launcher environment, device, the default process group, the CPU adaptation.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), Ascend msrun
(RANK_ID or MS_NODE_ID, RANK_SIZE or MS_WORKER_NUM, LOCAL_RANK or DEVICE_ID, MS_SCHED_HOST,
MS_SCHED_PORT; the torch store uses MS_SCHED_PORT + 1), or a plain single process. Every entry
point (training stages, the VAE trainer, sampling and conversion tools) starts here; the parallel
layout on top of the default group is `megatron_video.parallel.setup.setup_parallel`.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_video.config.schema import RuntimeConfig
from megatron_video.errors import ConfigError
from megatron_video.parallel.plan import ParallelPlan


@dataclass
class Runtime:
    """Where this process runs and how it is placed in the parallel layout."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    """The parallel layout of the current stage (`parallel.setup.setup_parallel` sets it)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the one that prints and writes shared files."""
        return self.rank == 0

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel replica."""
        return self.plan.data_parallel_rank

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas."""
        return self.plan.data_parallel

    @property
    def pipeline_parallel_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.plan.pipeline_parallel_rank

    @property
    def pipeline_parallel(self) -> int:
        """Pipeline stages."""
        return self.plan.pipeline_parallel


def launcher_env() -> tuple[int, int, int, str, str]:
    """(rank, world size, local rank, master addr, master port) from torchrun, msrun or defaults."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return (
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            env.get("MASTER_PORT", "29500"),
        )
    if "MS_SCHED_HOST" in env or "RANK_ID" in env:  # msrun (MindSpore dynamic cluster)
        # msrun's scheduler listens on MS_SCHED_PORT, so our rendezvous store takes the next port.
        port = int(env.get("MS_SCHED_PORT", env.get("MASTER_PORT", "29500"))) + 1
        return (
            int(env.get("RANK_ID", env.get("MS_NODE_ID", 0))),
            int(env.get("RANK_SIZE", env.get("MS_WORKER_NUM", 1))),
            int(env.get("LOCAL_RANK", env.get("DEVICE_ID", 0))),
            env.get("MS_SCHED_HOST", env.get("MASTER_ADDR", "127.0.0.1")),
            str(port),
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return 0, 1, 0, "127.0.0.1", port


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator (seed mod 2**32) and torch's CPU and device
    generators with `seed`, in that order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str, local_rank: int) -> torch.device:
    """cuda / npu / cpu, or the first available for 'auto'."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name in ("auto", "npu"):
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            if name == "npu":
                raise ConfigError(
                    "runtime.device=npu needs torch_npu (pip install 'megatron_video[npu]' on an Ascend machine)"
                ) from None
        else:
            torch.npu.set_device(local_rank)
            return torch.device("npu", local_rank)
    if name == "cuda":
        raise ConfigError("runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu or auto")
    return torch.device("cpu")


def init_distributed(runtime_cfg: RuntimeConfig) -> Runtime:
    """Start (or join) the default process group for the launcher's world, on the device
    `runtime_cfg.device` names, with `runtime_cfg.distributed_timeout_s` for collectives. A torchrun
    worker also starts the watchdog that ends it when torchrun dies (platform/processes.py)."""
    from megatron_video.platform.processes import exit_with_launcher

    exit_with_launcher()
    rank, world, local_rank, addr, port = launcher_env()
    if dist.is_initialized():  # started by the caller (tests, notebooks): take its world
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = select_device(runtime_cfg.device, local_rank)
    if not dist.is_initialized():
        backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=runtime_cfg.distributed_timeout_s),
        )
    if device.type == "cpu":
        from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation

        apply_megatron_cpu_adaptation()
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        )
    return Runtime(device=device, rank=rank, world_size=world, local_rank=local_rank)
