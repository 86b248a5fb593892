"""Torch Adam state under Megatron's optimizers: what a save and a resume need beyond megatron.

The distributed optimizer on torch Adam (megatron's fallback without TransformerEngine or apex, so
every CPU run) cannot save or resume through megatron alone (``reference/megatron_on_cpu.md``,
trap 2). Megatron's code assumes a fused Adam that keeps ``step`` in the param groups, but torch
Adam keeps a ``step`` tensor per parameter:

1. ``DistributedOptimizer.state_dict()`` asserts ``len(steps) == 1`` (distrib_optimizer.py:642)
   and so fails on an optimizer that has not stepped yet, which is every optimizer about to load;
2. its ``load_state_dict`` writes ONE shared ``step`` tensor into every parameter's state, and
   torch's ``Optimizer.load_state_dict`` keeps ``step`` uncopied, so after a resume each
   ``optimizer.step()`` adds 1 to that tensor once per parameter: bias correction goes wrong and
   the loss departs from the uninterrupted run;
3. ``_set_main_param_and_optimizer_states`` copies every key of the live state, ``step`` included,
   from the loaded tensors, which never carry ``step`` (every resharding format drops it):
   ``KeyError: 'step'`` for ``fully_reshardable``, ``fully_sharded_model_space`` and
   ``dp_zero_gather_scatter``.

Here (composition only, megatron unchanged): before a sharded state dict is built, an optimizer
that has not stepped gets the state torch Adam would create at its first step (step 0, zero
moments), which is numerically the same thing; on load, the param-group part (lr, betas, the common
step) goes through megatron's ``load_state_dict``, the ``step`` entries are set aside while
megatron's public ``load_parameter_state_from_<format>`` fills main parameters and moments, and
each parameter then gets its own copy of the step. A TransformerEngine / apex fused Adam is left to
megatron unchanged.
"""

from __future__ import annotations

import torch


class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be loaded into the current model or optimizer; names what differs."""


def optimizer_parts(optimizer) -> list:
    """The parts of a (possibly chained) Megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    inner = [getattr(part, "optimizer", None) for part in optimizer_parts(optimizer)]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def init_torch_adam_state(optimizer) -> None:
    """Give a torch Adam that has not stepped the state its first step would create (step 0, zeros).

    Megatron's DistributedOptimizer.state_dict() needs a per-parameter `step` to exist; an optimizer
    that already has state is left alone.
    """
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for adam in _torch_adams(optimizer):
        if any(adam.state.values()):
            continue
        for group in adam.param_groups:
            on_param_device = group.get("capturable", False) or group.get("fused", False)
            for p in group["params"]:
                device = p.device if on_param_device else torch.device("cpu")
                state = adam.state[p]
                state["step"] = torch.zeros((), dtype=step_dtype, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad", False):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def untie_steps(optimizer) -> None:
    """One `step` tensor per parameter (megatron's load shares one); a missing step means 0."""
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            if "exp_avg" in state:
                step = state.get("step", torch.zeros((), dtype=torch.float32))
                state["step"] = step.detach().clone()


def _load_distributed_part(part, state: dict) -> None:
    """DistributedOptimizer over torch Adam: megatron's load, with `step` kept out of its way."""
    state = dict(state)
    param_state = state.pop("param_state", None)
    sharding_type = state.pop("param_state_sharding_type", None)
    # Param groups (lr, betas, wd), the grad scaler, and the common step written into every state.
    part.load_state_dict(state)
    if param_state is None:
        return
    adam = part.optimizer
    steps = {p: s.pop("step") for p, s in adam.state.items() if "step" in s}
    loaders = {
        "fully_reshardable": part.load_parameter_state_from_fully_reshardable,
        "fully_sharded_model_space": part.load_parameter_state_from_fs_model_space,
        "dp_reshardable": part.load_parameter_state_from_dp_reshardable,
        "dp_zero_gather_scatter": part.load_parameter_state_from_dp_zero,
    }
    if sharding_type not in loaders:
        raise CheckpointMismatchError(f"unknown distributed-optimizer sharding type {sharding_type!r}")
    with torch.no_grad():  # the dp_reshardable loader copies into main parameters outside no_grad
        loaders[sharding_type](param_state)
    for p, step in steps.items():
        adam.state[p]["step"] = step.detach().clone()


def _fill_zero_common_step(part_state: dict) -> None:
    """Put back the step 0 that megatron leaves out of a plain optimizer saved before its first step.

    Megatron's FP32 / Float16 optimizers save the shared step only `if step:`, so a checkpoint
    written at step 0 (tools/convert_checkpoint.py *-to-checkpoint) has zero moments but no step,
    and torch Adam refuses a parameter state without one.
    """
    inner = part_state.get("optimizer", part_state)
    state = inner.get("state") if isinstance(inner, dict) else None
    if isinstance(state, dict) and "common_step" not in state and any(isinstance(k, int) for k in state):
        state["common_step"] = torch.zeros((), dtype=torch.float32)


def load_optimizer_state(optimizer, state) -> None:
    from megatron.core.optimizer import DistributedOptimizer

    parts = optimizer_parts(optimizer)
    if len(parts) == 1:
        states = [state]
    else:
        states = [state[i] for i in range(len(parts))] if isinstance(state, dict) else list(state)
    for part, part_state in zip(parts, states, strict=True):
        uses_torch_adam = isinstance(getattr(part, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))
        if isinstance(part, DistributedOptimizer) and uses_torch_adam:
            _load_distributed_part(part, part_state)
        else:
            if uses_torch_adam:
                _fill_zero_common_step(part_state)
            part.load_state_dict(part_state)
    untie_steps(optimizer)
    if len(parts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


def _matching_group(saved_groups: list[dict], group: dict) -> dict:
    """The saved param group with the same megatron identity (wd_mult, lr_mult, ...) as `group`."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    ident = tuple(group[k] for k in param_group_identifier_keys)
    for saved in saved_groups:
        if tuple(saved[k] for k in param_group_identifier_keys) == ident:
            return saved
    raise CheckpointMismatchError(
        f"no saved optimizer param group matches {dict(zip(param_group_identifier_keys, ident))}"
    )


def load_plain_from_distributed(part, loaded: dict) -> None:
    """FP32Optimizer (torch Adam) <- a distributed-optimizer checkpoint, converted."""
    saved_groups = loaded["optimizer"]["param_groups"]
    steps = {float(g["step"]) for g in saved_groups if g.get("step") is not None}
    if len(steps) > 1:
        raise CheckpointMismatchError(f"the saved param groups disagree on the optimizer step: {steps}")
    step = steps.pop() if steps else 0.0
    groups = []
    for group in part.optimizer.state_dict()["param_groups"]:
        saved = {k: v for k, v in _matching_group(saved_groups, group).items() if k != "step"}
        groups.append({**saved, "params": group["params"]})
    state = {
        pid: {"step": torch.tensor(step), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
        for pid, s in loaded["state"].items()
        if isinstance(pid, int)
    }
    part.optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_distributed_from_plain(part, loaded: dict, fp32_params: dict[int, torch.Tensor]) -> None:
    """DistributedOptimizer (torch Adam) <- an FP32Optimizer checkpoint, converted.

    fp32_params: param_state index -> the loaded model parameter (an fp32 optimizer's main
    parameter is the model parameter itself).
    """
    step = float(loaded.get("state", {}).get("common_step", 0))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": step} for g in loaded["param_groups"]]
    param_state = {
        idx: {
            "exp_avg": t["exp_avg"],
            "exp_avg_sq": t["exp_avg_sq"],
            "param": fp32_params[idx].detach().float(),
        }
        for idx, t in loaded["param_state"].items()
    }
    _load_distributed_part(
        part,
        {
            "optimizer": {"param_groups": groups},
            "param_state": param_state,
            "param_state_sharding_type": "fully_reshardable",
        },
    )
