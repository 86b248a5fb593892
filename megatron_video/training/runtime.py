"""Process start-up: launcher environment, device, process groups, the CPU adaptation, seeds.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), Ascend msrun
(RANK_ID or MS_NODE_ID, RANK_SIZE or MS_WORKER_NUM, LOCAL_RANK or DEVICE_ID, MS_SCHED_HOST,
MS_SCHED_PORT; the torch store uses MS_SCHED_PORT + 1), or a plain single process.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_video.config.schema import ExperimentConfig
from megatron_video.errors import ConfigError
from megatron_video.parallel.plan import ParallelPlan
from megatron_video.parallel.setup import build_parallel_plan, initialize_model_parallel


@dataclass
class Runtime:
    """Where this process runs and how it is placed in the parallel layout."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    plan: ParallelPlan | None = None
    dp_rank: int = 0
    dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the one that prints and writes shared files."""
        return self.rank == 0


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


def init_distributed(cfg: ExperimentConfig) -> Runtime:
    """Start (or join) the default process group for the launcher's world."""
    rank, world, local_rank, addr, port = launcher_env()
    if dist.is_initialized():  # started by the caller (tests, notebooks): take its world
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = select_device(cfg.runtime.device, local_rank)
    if not dist.is_initialized():
        backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=cfg.runtime.distributed_timeout_s),
        )
    if device.type == "cpu":
        from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation

        apply_megatron_cpu_adaptation()
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        )
    return Runtime(device=device, rank=rank, world_size=world, local_rank=local_rank)


def setup_parallel(cfg: ExperimentConfig, runtime: Runtime) -> Runtime:
    """(Re)build megatron's groups for this stage's layout and seed every generator."""
    p = cfg.parallel
    if runtime.world_size % p.model_parallel_size != 0:
        raise ConfigError(
            f"{runtime.world_size} processes cannot hold tensor x context x pipeline = {p.model_parallel_size} "
            "model-parallel ranks; change the parallel sizes or the number of processes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_model_parallel(cfg)
    runtime.plan = build_parallel_plan(cfg)
    runtime.dp_rank = parallel_state.get_data_parallel_rank()
    runtime.dp_size = parallel_state.get_data_parallel_world_size()
    runtime.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    runtime.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    seed = cfg.training.seed + 100 * runtime.pp_rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return runtime


def sample_generators(seed: int, step: int, positions: range) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, step, position in the global batch).

    Every TP / CP / PP rank of a replica draws the same noise and sigma, and the draws do not
    depend on how the global batch is split into micro-batches and data-parallel ranks.
    """
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + p) for p in positions]
