"""Run megatron-core 0.16 on CPU with gloo: one explicit, reversible adaptation.

megatron-core reaches the accelerator through ``torch.cuda`` (``current_device()`` at about 175 call
sites, ``device="cuda"`` factories, ``torch.cuda.synchronize``, the CUDA RNG) and compares tensor
type names with ``'torch.cuda.FloatTensor'``. On a CPU build of torch every one of those calls
raises. ``apply_megatron_cpu_adaptation()`` replaces them with CPU equivalents so that tensor and
sequence parallel layers, pipeline schedules, DDP, the distributed optimizer, the RNG tracker,
recompute and ``dist_checkpointing`` run on CPU (see ``reference/megatron_on_cpu.md``).

Scope: the adaptation acts for megatron and nobody else.
- The replaced ``torch.cuda`` functions and ``Tensor.type``/``Tensor.cuda`` check their caller: called
  from a ``megatron.*`` module they answer for the CPU, otherwise they run the original torch code.
- ``device="cuda"`` factories are redirected only inside the megatron modules that use them, by
  replacing those modules' ``torch`` name; ``torch.zeros`` & co. themselves are untouched.
- Nothing happens at import time; ``apply`` is explicit, idempotent, refuses to run when CUDA is
  available, and ``remove`` restores every replaced attribute exactly.

Not covered (megatron features our CPU runs do not use): megatron's local-spec ``WrappedTorchNorm``
with sequence parallelism (our models bring their own norms and tag them ``sequence_parallel``),
context parallelism through megatron's attention (needs TransformerEngine), CUDA streams and
events (several distributed-optimizer instances, CUDA graphs, offloading, timers), all-gather of
unequal sizes (gloo rejects it), and the fp16 grad scaler (redirected, not tested).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

SUPPORTED_MEGATRON_CORE = "0.16"

_CPU = torch.device("cpu")
_MISSING = object()

# (owner, attribute, value in owner.__dict__ before patching, or _MISSING when inherited)
_registry: list[tuple[Any, str, Any]] = []
_applied = False
# Plays the role of the CUDA default generator: megatron's RNG tracker saves, seeds and restores it.
# It keeps its state across remove/apply.
_device_rng = torch.Generator(device="cpu")


# -- 1. Version check -----------------------------------------------------------------------------


def installed_megatron_core_version() -> str:
    """The version string of the installed megatron-core."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        from megatron.core import package_info

        return package_info.__version__


def check_megatron_core_version() -> None:
    """Raise RuntimeError unless the installed megatron-core is the supported 0.16.x series."""
    version = installed_megatron_core_version()
    if version != SUPPORTED_MEGATRON_CORE and not version.startswith(SUPPORTED_MEGATRON_CORE + "."):
        raise RuntimeError(
            f"megatron_video's CPU adaptation supports megatron-core {SUPPORTED_MEGATRON_CORE}.x, "
            f"but megatron-core {version} is installed. Install a supported version "
            f"(pip install 'megatron-core>={SUPPORTED_MEGATRON_CORE},<0.17') or re-check every "
            "call site in megatron_video/platform/megatron_cpu.py against the new release and "
            "update SUPPORTED_MEGATRON_CORE."
        )


# -- 2. Patch registry and caller filter ----------------------------------------------------------


def _patch(owner: Any, name: str, value: Any) -> None:
    """Set owner.name = value and remember what to put back."""
    _registry.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, value)


def _called_from_megatron(depth: int = 2) -> bool:
    """Whether the frame `depth` levels up (the caller of a replaced function) runs megatron code."""
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("megatron.")


def _megatron_only(original: Callable, replacement: Callable) -> Callable:
    """A function that runs `replacement` for callers inside megatron and `original` otherwise."""

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        if _called_from_megatron():
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    return dispatch


def _patch_for_megatron(owner: Any, name: str, replacement: Callable) -> None:
    _patch(owner, name, _megatron_only(getattr(owner, name), replacement))


# -- 3. Devices: current_device, device="cuda" factories, Tensor.cuda -----------------------------
# `device=torch.cuda.current_device()` (about 175 sites): GlobalMemoryBuffer (utils.py:631), SP
# gather/scatter and reduce-scatter buffers (tensor_parallel/mappings.py:91/141/148/181/442,
# layers.py:552), DDP grad and param buffers (distributed/param_and_grad_buffer.py:783-806), p2p shape
# and receive buffers (pipeline_parallel/p2p_communication.py:190-202/313/321), distributed optimizer
# buffers. torch.cuda.current_device answers the CPU device to megatron callers.
# `device="cuda"` in factory calls: the modules below see, under the name `torch`, a stand-in whose
# factories build on the CPU when asked for "cuda". torch itself is left alone, so code outside these
# modules (and TorchScript, which resolves torch.zeros & co. by identity) is unaffected.
# `.cuda()`: tensor_parallel/data.py:84 (broadcast_data), utils.py:898, distrib_optimizer.py:1089,
# dist_checkpointing/exchange_utils.py:336/499; Tensor.cuda returns the CPU tensor to megatron callers.

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like", "ones_like")

_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.utils",  # :1207 local_multi_tensor_l2_norm (clip_grads without apex/TE)
    "megatron.core.tensor_parallel.data",  # :37 broadcast_data sizes
    "megatron.core.pipeline_parallel.schedules",  # :596/983/2138 total_num_tokens
    "megatron.core.optimizer.optimizer",  # :473-485/907 found_inf, scale tensors
    "megatron.core.optimizer.clip_grads",  # :90/103/115/174/207 norms and counts
    "megatron.core.optimizer.grad_scaler",  # :15/88-94 fp16 loss scale
    "megatron.core.dist_checkpointing.mapping",  # ShardedTensor.init_data("cuda") from exchange_utils
    "megatron.core.dist_checkpointing.exchange_utils",  # :104/110/326 fully parallel save/load
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # :204 save plan reuse check
)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _factory_on_cpu(factory: Callable) -> Callable:
    """Wrap a torch factory so that device="cuda" means the CPU."""

    @functools.wraps(factory)
    def create(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return create


class _TorchWithCpuFactories(types.ModuleType):
    """`torch` as seen by a megatron module that creates tensors with device="cuda"."""

    def __init__(self) -> None:
        super().__init__("torch", torch.__doc__)
        for name in _FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _patch_devices() -> None:
    _patch_for_megatron(torch.cuda, "current_device", lambda: _CPU)
    torch_for_megatron = _TorchWithCpuFactories()
    for module_name in _MODULES_WITH_CUDA_FACTORIES:
        _patch(importlib.import_module(module_name), "torch", torch_for_megatron)
    _patch_for_megatron(torch.Tensor, "cuda", lambda self, *args, **kwargs: self.to(_CPU))


# -- 4. Synchronisation and memory ----------------------------------------------------------------
# CPU ops are synchronous: torch.cuda.synchronize (p2p_communication.py:242/398 after batched
# isend/irecv, filesystem_async.py:230 preload_tensors in dist_checkpointing.save, parallel_state.py)
# and torch.cuda.empty_cache (DDP buffer free, optimizer offload) become no-ops. CUDA streams are left
# alone: megatron only creates and waits on them on paths the CPU runs do not take (several
# distributed-optimizer instances, CPU and activation offloading, CUDA graphs).


def _patch_synchronisation() -> None:
    _patch_for_megatron(torch.cuda, "synchronize", lambda device=None: None)
    _patch_for_megatron(torch.cuda, "empty_cache", lambda: None)


# -- 5. RNG ---------------------------------------------------------------------------------------
# On GPU, megatron's CudaRNGStatesTracker swaps the state of the CUDA default generator: fork() loads
# the tracked state (different per TP rank), the dropout inside draws from it, and the state is saved
# back on exit (tensor_parallel/random.py:244-278). model_parallel_cuda_manual_seed (:422) and
# tracker.add (:235-240) seed it through torch.cuda.manual_seed/get_rng_state, and recompute saves
# and restores it through _get_cuda_rng_state/_set_cuda_rng_state (:446-460).
# On CPU, _device_rng (a dedicated torch.Generator) holds that state. Because CPU random ops always
# draw from the CPU default generator, fork() additionally loads the forked state into the default
# generator for the duration of the context and afterwards puts the advanced state back into
# _device_rng and the default generator's own state back where it was. Megatron's check that the CPU
# state is unchanged by a fork (random.py:264) therefore holds.


def _get_device_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    """CPU stand-in for tensor_parallel.random._get_cuda_rng_state."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG states do not exist on CPU")
    return _device_rng.get_state()


def _set_device_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU stand-in for tensor_parallel.random._set_cuda_rng_state."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG states do not exist on CPU")
    _device_rng.set_state(new_state)


def _fork_on_default_generator(original_fork: Callable) -> Callable:
    """Wrap CudaRNGStatesTracker.fork so that CPU random ops inside it use the forked state."""

    @functools.wraps(original_fork)
    @contextlib.contextmanager
    def fork(self, *args, **kwargs):
        with original_fork(self, *args, **kwargs):
            default_state = torch.get_rng_state()
            torch.set_rng_state(_device_rng.get_state())
            try:
                yield
            finally:
                _device_rng.set_state(torch.get_rng_state())
                torch.set_rng_state(default_state)

    return fork


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    _patch(mcore_random, "_get_cuda_rng_state", _get_device_rng_state)
    _patch(mcore_random, "_set_cuda_rng_state", _set_device_rng_state)
    tracker_cls = mcore_random.CudaRNGStatesTracker
    _patch(tracker_cls, "fork", _fork_on_default_generator(tracker_cls.fork))
    _patch_for_megatron(torch.cuda, "get_rng_state", lambda device="cuda": _device_rng.get_state())
    _patch_for_megatron(
        torch.cuda, "set_rng_state", lambda new_state, device="cuda": _device_rng.set_state(new_state)
    )
    _patch_for_megatron(torch.cuda, "manual_seed", lambda seed: _device_rng.manual_seed(int(seed)))


# -- 6. Tensor type names -------------------------------------------------------------------------
# The optimizers sort parameters by `param.type()` and accept only CUDA names
# (optimizer/optimizer.py:671/690, optimizer/distrib_optimizer.py:361/420/582), and clip_grads.py:167
# asserts `grad.type() == 'torch.cuda.FloatTensor'`. For megatron, CPU float/half/bf16 tensors answer
# with the CUDA name of the same dtype; with an argument, type() converts as usual.

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _patch_type_names() -> None:
    original_type = torch.Tensor.type

    def type_as_cuda(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs:
            return name
        return _CUDA_TYPE_NAMES.get(name, name)

    _patch_for_megatron(torch.Tensor, "type", type_as_cuda)


# -- 7. Apply and remove --------------------------------------------------------------------------


def apply_megatron_cpu_adaptation(force: bool = False) -> None:
    """Make megatron-core 0.16 run on CPU with gloo; a second call does nothing.

    Refuses when CUDA is available (a GPU run must use megatron unchanged); `force=True` skips that
    check, for tests only.
    """
    global _applied
    if _applied:
        return
    check_megatron_core_version()
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "apply_megatron_cpu_adaptation() is for CPU-only runs, but CUDA is available: run "
            "megatron-core unchanged on the GPU (or hide the GPUs with CUDA_VISIBLE_DEVICES='')."
        )
    try:
        _patch_devices()
        _patch_synchronisation()
        _patch_rng()
        _patch_type_names()
    except BaseException:
        _restore_all()
        raise
    _applied = True


def remove_megatron_cpu_adaptation() -> None:
    """Undo apply_megatron_cpu_adaptation(), restoring every replaced attribute exactly."""
    global _applied
    _restore_all()
    _applied = False


def is_applied() -> bool:
    """Whether the CPU adaptation is currently in effect."""
    return _applied


def _restore_all() -> None:
    while _registry:
        owner, name, original = _registry.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
