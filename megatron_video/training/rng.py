"""Every random stream a training rank draws from: capture, restore, and deterministic reseeding.

The streams are python `random`, numpy's global generator, torch's CPU default generator, the
accelerator's default generator (CUDA, or the CPU stand-in of `platform/megatron_cpu.py`) and the
named states of megatron's RNG tracker (tensor-parallel dropout and friends). A state captured on a
rank and restored on the same rank of the same layout continues every stream bit-exactly.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

from megatron_video.platform.launch import seed_everything


def _has_device_rng() -> bool:
    """Whether megatron's device-RNG helpers work here (CUDA, or the CPU adaptation is applied)."""
    if torch.cuda.is_available():
        return True
    from megatron_video.platform.megatron_cpu import is_applied

    return is_applied()


def _copy_state(state: Any) -> torch.Tensor:
    # Tracker states are byte tensors, or generators when megatron runs CUDA-graph-safe RNG.
    if isinstance(state, torch.Generator):
        return state.get_state()
    return state.detach().clone()


def capture_rng_state() -> dict[str, Any]:
    """A picklable snapshot of this rank's random streams."""
    from megatron.core.tensor_parallel import random as mcore_random

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "device": None,
        "tracker": {},
    }
    if _has_device_rng():
        # Megatron's own accessor: torch.cuda on a GPU, the adaptation's generator on CPU.
        state["device"] = _copy_state(mcore_random._get_cuda_rng_state())
        tracker = mcore_random.get_cuda_rng_tracker()
        state["tracker"] = {name: _copy_state(s) for name, s in tracker.get_states().items()}
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back a snapshot taken by `capture_rng_state` on the same rank and layout."""
    from megatron.core.tensor_parallel import random as mcore_random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state["device"] is not None:
        if not _has_device_rng():
            raise RuntimeError("the checkpoint holds a device RNG state but this process has no device RNG")
        mcore_random._set_cuda_rng_state(state["device"])
    if state["tracker"]:
        tracker = mcore_random.get_cuda_rng_tracker()
        tracker.set_states({name: s.clone() for name, s in state["tracker"].items()})


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across processes and python versions)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def reseed_rng(seed: int, iteration: int, data_parallel_rank: int, pipeline_rank: int) -> None:
    """Seed every stream from (seed, iteration, data-parallel rank, pipeline rank).

    Ranks that hold the same samples (the tensor- and context-parallel peers of one data-parallel
    rank) get the same python / numpy / torch / device streams, as they must to draw the same noise;
    megatron's tracker is seeded as `model_parallel_cuda_manual_seed` does (one seed per pipeline
    stage, offset by the tensor-parallel rank inside the tracker).
    """
    seed_everything(derived_seed(seed, iteration, pipeline_rank, data_parallel_rank))
    if _has_device_rng():
        from megatron.core import tensor_parallel

        # Megatron adds offsets up to 2718 + tp + 1024 + 100 ep to this seed; keep it well below 2**63.
        tensor_parallel.model_parallel_cuda_manual_seed(derived_seed(seed, iteration, pipeline_rank) % 2**62)
