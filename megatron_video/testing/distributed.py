"""Multi-process gloo launcher for tests, and a megatron parallel-state helper for its workers."""

from __future__ import annotations

import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_video.platform.megatron_import import import_megatron_core

# A spawned rank unpickles `_worker` (importing this module) before the test's function, whose
# module may import megatron: import it here first, without its import-time compile wrappers.
import_megatron_core()

# How long a rank waits on its peers in a collective before failing, in seconds.
PROCESS_GROUP_TIMEOUT_S = 60
# After one rank fails, how long the others get to report before they are killed, in seconds.
_GRACE_AFTER_FAILURE_S = 3.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _destroy_parallel_state() -> None:
    """Tear down megatron's parallel groups (if megatron was used) and the default process group."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, results) -> None:
    """Entry point of one spawned rank: reports ("ok", pickled result) or ("error", traceback text)."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S),
        )
        # Plain pickle copies tensor data, so the result outlives this process.
        message = (rank, "ok", pickle.dumps(fn(rank, world_size, *args, **kwargs)))
    except BaseException:
        message = (rank, "error", traceback.format_exc())
    # Report before the teardown, which can block while a failed peer's collectives are pending.
    results.put(message)
    _destroy_parallel_state()


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 120, **kwargs) -> list:
    """Run fn(rank, world_size, *args, **kwargs) in `world_size` gloo processes; return results by rank.

    `fn` must be a module-level function and its arguments and result picklable. An exception in
    any rank is raised here as a RuntimeError carrying that rank's traceback; a run that has not
    finished after `timeout_s` seconds is killed and reported as a TimeoutError.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    processes = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, kwargs, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    values: dict[int, Any] = {}
    errors: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes) and not errors:
                    # A rank died without reporting (killed, segfault): stop waiting soon.
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
                continue
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors.append((rank, payload))
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    finally:
        finished = not errors and len(values) == world_size
        for process in processes:
            process.join(timeout=30 if finished else 0)
            if process.is_alive():
                process.kill()
                process.join()

    if errors:
        report = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in errors)
        raise RuntimeError(f"{len(errors)} of {world_size} ranks failed (first reported first):\n{report}")
    missing = [rank for rank in range(world_size) if rank not in values]
    if missing:
        exitcodes = {rank: processes[rank].exitcode for rank in missing}
        raise TimeoutError(
            f"ranks {missing} reported no result within {timeout_s} s (exit codes {exitcodes}; -9: killed here)"
        )
    return [values[rank] for rank in range(world_size)]


def init_megatron_parallel(
    tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None, seed: int = 1234
) -> None:
    """Initialise megatron's parallel groups and RNG inside a run_distributed worker.

    Applies the CPU adaptation when CUDA is not available. Seeds the CPU default generator (the
    stream dropout uses outside the RNG tracker on CPU) and megatron's tracker with `seed`.
    """
    if not torch.cuda.is_available():
        from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation

        apply_megatron_cpu_adaptation()
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
