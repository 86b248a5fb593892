"""Split a full (TP = 1) state dict into tensor-parallel shards and merge shards back.

Which dimension a parameter is split along is read from the Megatron attributes of the model's
parameters (`tensor_model_parallel`, `partition_dim`), so the rule lives where the layer is
built. Column-parallel weights and biases split on dim 0, row-parallel weights on dim 1; every
other tensor is replicated.
"""

from __future__ import annotations

import torch
from torch import nn


def strip_extra_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop Megatron's `_extra_state` entries (empty placeholders of its linears)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}


def partition_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> tensor-parallel partition dim, for split parameters only."""
    return {
        name: int(p.partition_dim)
        for name, p in model.named_parameters()
        if getattr(p, "tensor_model_parallel", False)
    }


def shard_state_dict(
    full: dict[str, torch.Tensor], dims: dict[str, int], tensor_parallel_rank: int, tensor_parallel: int
) -> dict[str, torch.Tensor]:
    """This TP rank's shard of a full state dict (contiguous chunks along each partition dim)."""
    out = {}
    for name, tensor in strip_extra_state(full).items():
        if name in dims and tensor_parallel > 1:
            dim = dims[name]
            if tensor.shape[dim] % tensor_parallel != 0:
                raise ValueError(
                    f"'{name}' has {tensor.shape[dim]} entries along dim {dim}, not divisible by TP={tensor_parallel}"
                )
            tensor = tensor.chunk(tensor_parallel, dim=dim)[tensor_parallel_rank]
        out[name] = tensor.clone()
    return out


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """Full state dict from the shards of TP ranks 0..n-1 (replicated entries taken from rank 0)."""
    shards = [strip_extra_state(s) for s in shards]
    out = {}
    for name, tensor in shards[0].items():
        if name in dims and len(shards) > 1:
            out[name] = torch.cat([s[name] for s in shards], dim=dims[name])
        else:
            out[name] = tensor.clone()
    return out
