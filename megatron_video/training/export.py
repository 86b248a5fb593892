"""Flat (TP-merged) weights: export from a running model, and load into any TP layout.

A flat export is `<name>.safetensors` (our key layout, full tensors) plus `<name>.json` with the
model config, whose `family` field (suv / opensora_dit) says which model to rebuild. Curriculum
stages hand weights to each other this way, and it is the format other
tools read. Every rank of a tensor-parallel group must call `gather_full_state_dict` together.

Exports are fp32 whatever runtime.dtype: under bf16 the raw weights are the optimizer's fp32 main
parameters (`main_params`), not the bf16 copies the forward uses, and the EMA is its fp32 shadow.
Loading an fp32 export into a bf16 model (`load_full_into`) rounds the bf16 weights to nearest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_video.parallel.tensor_parallel_state import partition_dims, shard_state_dict, strip_extra_state

if TYPE_CHECKING:  # megatron core is not imported to read or write a flat export
    from megatron_video.parallel.plan import ParallelPlan


def gather_full_state_dict(model: torch.nn.Module, plan: ParallelPlan, tensors: dict | None = None) -> dict:
    """Full tensors of `model` (or of `tensors`, named like its parameters, e.g. EMA) on every TP rank."""
    dims = partition_dims(model)
    local = strip_extra_state(model.state_dict()) if tensors is None else dict(tensors)
    out = {}
    for name in sorted(local):
        t = local[name].detach().float().contiguous()
        if name in dims and plan.tensor_parallel > 1:
            parts = [torch.empty_like(t) for _ in range(plan.tensor_parallel)]
            dist.all_gather(parts, t, group=plan.tensor_parallel_group)
            t = torch.cat(parts, dim=dims[name])
        out[name] = t.clone()
    return out


def main_params(model: torch.nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """fp32 values of `model`'s parameters as `optimizer` keeps them (its main parameters), by name.

    Megatron's mixed-precision optimizers keep an fp32 main copy of each bf16 parameter in
    `param.main_param`; the distributed optimizer keeps only this data-parallel rank's range of it
    (`main_param_sharded`), so the call is collective over that optimizer's data-parallel group
    (one group: every part of a chained distributed optimizer shards over the same ranks).
    An fp32 parameter is its own main parameter and is returned as it is (no communication).
    """
    from megatron.core.optimizer import DistributedOptimizer

    parts = [
        o
        for o in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(o, DistributedOptimizer)
    ]
    if len({id(o.data_parallel_group) for o in parts}) > 1:
        raise NotImplementedError("distributed optimizer parts over different data-parallel groups")
    out = {}
    for name, p in model.named_parameters():
        if p.dtype == torch.float32 or not hasattr(p, "main_param"):
            out[name] = p.detach().float()
        elif not getattr(p, "main_param_sharded", False):
            out[name] = p.main_param.detach().float()
        else:
            # This rank's range of the flattened parameter (if any), zeros elsewhere, summed over the
            # data-parallel group; a rank holding none of it knows no part for it, and contributes 0.
            owner = next((o for o in parts if p in o.model_param_gbuf_map), None)
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if owner is not None and p.main_param is not None:
                r = owner._get_model_param_range_map(p)["param"]
                full[r.start : r.end] = p.main_param.detach()
            dist.all_reduce(full, group=parts[0].data_parallel_group)
            out[name] = full.view(p.shape)
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


def load_flat_config(path: str | Path) -> dict | None:
    """The model config saved beside a flat export (its `.json`), without reading the tensors."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else None


def load_full_into(
    model: torch.nn.Module, plan: ParallelPlan, full: dict[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Load full tensors into this rank's TP shard of `model`; return names the model kept as built.

    With `strict`, every tensor must be used and any missing one must belong to a module that is
    deliberately new (the caller lists those by prefix through the returned names).
    """
    dims = partition_dims(model)
    shard = shard_state_dict(full, dims, plan.tensor_parallel_rank, plan.tensor_parallel)
    missing, unexpected = model.load_state_dict(shard, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and unexpected:
        raise KeyError(f"weights not in the model: {sorted(unexpected)}")
    return missing
