"""Flat (TP-merged) weights: export from a running model, and load into any TP layout.

A flat export is `<name>.safetensors` (our key layout, full tensors) plus `<name>.json` with the
SUV config. Curriculum stages hand weights to each other this way, and it is the format other
tools read. Every rank of a tensor-parallel group must call `gather_full_state_dict` together.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_video.parallel.plan import ParallelPlan
from megatron_video.parallel.tensor_parallel_state import partition_dims, shard_state_dict, strip_extra_state


def gather_full_state_dict(model: torch.nn.Module, plan: ParallelPlan, tensors: dict | None = None) -> dict:
    """Full tensors of `model` (or of `tensors`, named like its parameters, e.g. EMA) on every TP rank."""
    dims = partition_dims(model)
    local = strip_extra_state(model.state_dict()) if tensors is None else dict(tensors)
    out = {}
    for name in sorted(local):
        t = local[name].detach().float().contiguous()
        if name in dims and plan.tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(plan.tp_size)]
            dist.all_gather(parts, t, group=plan.tp_group)
            t = torch.cat(parts, dim=dims[name])
        out[name] = t.clone()
    return out


def save_flat(path: str | Path, state: dict[str, torch.Tensor], model_cfg) -> Path:
    """Write `<path>.safetensors` and `<path>.json` (the model config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".safetensors.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path.with_suffix(".safetensors"))
    path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
    return path.with_suffix(".safetensors")


def load_flat(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and (if present) the saved model config of a flat export."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"no flat weights at {weights}")
    meta = weights.with_suffix(".json")
    return load_file(str(weights)), (json.loads(meta.read_text()) if meta.is_file() else None)


def load_full_into(
    model: torch.nn.Module, plan: ParallelPlan, full: dict[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Load full tensors into this rank's TP shard of `model`; return names the model kept as built.

    With `strict`, every tensor must be used and any missing one must belong to a module that is
    deliberately new (the caller lists those by prefix through the returned names).
    """
    dims = partition_dims(model)
    shard = shard_state_dict(full, dims, plan.tp_rank, plan.tp_size)
    missing, unexpected = model.load_state_dict(shard, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and unexpected:
        raise KeyError(f"weights not in the model: {sorted(unexpected)}")
    return missing
