"""Training checkpoints: Megatron dist_checkpointing (torch_dist), atomic, exact to resume, reshardable.

On disk::

    <save_dir>/latest                    the iteration of the newest complete checkpoint (text)
    <save_dir>/iter_0000100/             one checkpoint: dist_checkpointing files and
                 checkpoint_meta.json    iteration, parallel layout, model geometry, config snapshot
    <save_dir>/iter_0000200.tmp-<id>/    a save in progress or interrupted; never loaded

What one checkpoint holds: the model chunks (``model``, or ``model0``, ``model1`` ... for virtual
pipeline chunks, keyed like their ``state_dict()``) and the optimizer, both sharded so that
dist_checkpointing reshards them across TP, PP, virtual chunks and DP (keys are global parameter
names, never chunk positions); the EMA of every chunk's parameters under ``ema.<model key>``,
sharded exactly like the model; the scheduler state and the loop's ``train_state`` (rank 0's, as a
JSON string; older checkpoints hold it pickled and are read with a plain-builtins unpickler); and
every rank's random streams. A checkpoint of the distributed optimizer loads into the plain one and
back (a run that switches the distributed optimizer off at DP = 1 changes both at once).

A save writes into a ``.tmp-<id>`` directory, waits for every rank (each flushes its files), then rank
0 hashes every file into ``checkpoint_meta.json`` (written last, flushed with the folder), renames it
to ``iter_<7 digits>`` and replaces ``latest`` (temp file + ``os.replace``). Every read verifies first
(`resolve_checkpoint`): checksums, then every pickle in the folder through `safe_load` before
torch or megatron unpickles it; a save dir falls back to its newest good checkpoint with a warning
(unless ``strict_integrity``), an explicitly named checkpoint is refused. A crash at any point
leaves the previous checkpoint complete and ``latest`` naming it; stale temp directories are
ignored by the loader and removed before the next save, which first checks
that the disk has room for a checkpoint as large as the last one.

Resuming on the layout the checkpoint was saved with is bit-exact, random streams included. On a
different layout the random streams cannot be restored (they belong to ranks that no longer exist):
every rank is reseeded from (seed, iteration, data-parallel rank, pipeline rank) and the returned
train_state says ``rng_restored = False``.

The distributed optimizer on torch Adam needs help to save and resume (trap 2 of
``reference/megatron_on_cpu.md``); that help lives in `optimizer_state.py`.

Two more megatron behaviours are worked around here: ``OptimizerParamScheduler.load_state_dict``
adds the saved step count to the current one (right only for a fresh scheduler), and the generic
``MegatronModule.sharded_state_dict`` records the Megatron linears nested in plain modules as
replicated (see `model_sharded_state_dict`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_video.parallel.plan import ParallelPlan
from megatron_video.platform.processes import shield_checkpoint_writer
from megatron_video.training.checkpoint_files import (
    META_FILE,
    CheckpointSpaceError,
    check_free_space,
    describe_write_error,
    file_entries,
    fsync_files,
    good_checkpoint,
    is_out_of_space,
    iteration_dir_name,
    prune_checkpoints,
    publish_checkpoint,
    remove_stale_temporaries,
    temporary_dir_name,
    write_meta_file,
    write_synced,
)
from megatron_video.training.ema import ParamEMA
from megatron_video.training.optimizer_state import (
    CheckpointMismatchError,
    init_torch_adam_state,
    load_distributed_from_plain,
    load_optimizer_state,
    load_plain_from_distributed,
    optimizer_parts,
    untie_steps,
)
from megatron_video.training.overlap import check_bucket_layout, gather_bucket_layouts
from megatron_video.training.rng import capture_rng_state, reseed_rng, restore_rng_state
from megatron_video.training.safe_load import check_dist_checkpoint, loads_plain

logger = logging.getLogger(__name__)

FORMAT = "megatron_video.checkpoint/1"
EMA_PREFIX = "ema."

DISTRIBUTED_OPTIMIZER_SHARDING = "fully_reshardable"
"""Megatron's sharding type for the distributed optimizer by default: reshardable over TP, PP and DP.
At save it gathers each parameter's optimizer state over the data-parallel group to DP rank 0
(megatron's default, non-memory-efficient variant), which then writes it. The other format,
'dp_reshardable' (`training.checkpoint.optimizer_format`), has every rank write its own shard
without any gather, and reshards over DP only."""

OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")

MODEL_FIELDS_FREE_TO_CHANGE = frozenset({"family", "flavor", "recompute", "recompute_num_layers", "init_std"})
"""Model config fields that do not change the saved tensors; every other field must match. (`family`
is checked through the model class; checkpoints from before families have none.)"""


# -- 1. Files: names, `latest`, publishing and pruning are in checkpoint_files.py ----------------


_VERIFIED: dict[Path, tuple] = {}
"""Checkpoint folder -> the (name, size, mtime) of its files when this process verified it, so that a
tool that reads the metadata and then loads hashes the files once."""


def _signature(folder: Path) -> tuple:
    return tuple(
        sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())
    )


def verify_on_this_rank(
    load_dir: str | Path, iteration: int | None = None, fall_back: bool = True
) -> Path | None:
    """The verified checkpoint `load_dir` names (see `resolve_checkpoint`), checked by this process alone."""
    folder = Path(load_dir).resolve()
    if iteration is None and folder in _VERIFIED and _VERIFIED[folder] == _signature(folder):
        return Path(load_dir)
    path = good_checkpoint(load_dir, iteration, fall_back, extra_check=check_dist_checkpoint)
    if path is not None:
        _VERIFIED[path.resolve()] = _signature(path)
    return path


def resolve_checkpoint(
    load_dir: str | Path, iteration: int | None = None, fall_back: bool = True
) -> Path | None:
    """The checkpoint to read from `load_dir`, verified before anything unpickles it; None if none.

    One checkpoint folder (or `iteration`'s) that fails verification is refused; a save dir gives
    its newest good checkpoint, with a warning naming each skipped one's fault (`fall_back`, else
    CheckpointIntegrityError). Verification: every file against the checksums of META_FILE, then
    every pickle in the folder through `safe_load` (UnsafeCheckpointError refuses, always). With a
    process group, rank 0 verifies and every rank gets its answer (collective).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return verify_on_this_rank(load_dir, iteration, fall_back)
    outcome: Any = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", verify_on_this_rank(load_dir, iteration, fall_back))
        except Exception as exc:
            outcome = ("error", exc)
    outcome = _broadcast_from_rank0(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def _read_meta(path: Path) -> dict:
    meta = json.loads((path / META_FILE).read_text())
    meta.pop("checksums", None)
    meta["path"] = str(path)
    return meta


def read_checkpoint_metadata(path: str | Path) -> dict:
    """Metadata of a checkpoint directory (or of the newest good checkpoint of a save directory), verified.

    Keys: iteration, layout (the parallel sizes it was saved with), optimizer, model (class and
    config), config (the snapshot given as train_state["config"], or None), has_ema, format.
    Reads on this process alone (no collective); CheckpointIntegrityError as `resolve_checkpoint`.
    """
    resolved = verify_on_this_rank(path)
    if resolved is None:
        raise FileNotFoundError(f"no checkpoint at {path} (no {META_FILE}, no complete iter_* inside)")
    return _read_meta(resolved)


def checkpoint_weights(load_dir: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Full (unsharded) model weights of a checkpoint, keyed like the model's state dict, and its metadata.

    The EMA weights when `use_ema` and the checkpoint has them, else the raw ones; nothing of the
    optimizer is read. Every rank reads whole tensors, so the result does not depend on the layout
    that saved or the one that loads (collective: every rank of the default group calls it).
    """
    from megatron.core import dist_checkpointing

    resolved = resolve_checkpoint(load_dir, fall_back=False)
    if resolved is None:
        raise FileNotFoundError(f"no checkpoint at {load_dir} (no {META_FILE}, no complete iter_* inside)")
    meta = _read_meta(resolved)
    path = meta["path"]
    ema = use_ema and meta.get("has_ema", False)
    wanted = {}
    for key, entry in dist_checkpointing.load_tensors_metadata(path).items():
        if key.startswith("optimizer"):
            continue
        if key.startswith(EMA_PREFIX) == ema:
            wanted[key] = entry
    loaded = dist_checkpointing.load(wanted, path, validate_access_integrity=False)
    n = len(EMA_PREFIX) if ema else 0
    return {key[n:]: loaded[key] for key in wanted}, meta  # `loaded` also holds the common part


# -- 2. What the run looks like: layout, model description ---------------------------------------


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def current_layout(plan: ParallelPlan) -> dict[str, Any]:
    """Parallel sizes of the run `plan` describes."""
    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": plan.tensor_parallel,
        "pipeline_parallel": plan.pipeline_parallel,
        "virtual_pipeline": plan.virtual_pipeline,
        "context_parallel": plan.context_parallel,
        "data_parallel": plan.data_parallel,
        "expert_parallel": 1,
    }


def model_plan(model_chunks: list) -> ParallelPlan:
    """The ParallelPlan the model chunks were built with."""
    return _unwrap(model_chunks[0]).plan


def _describe_model(model_chunks: list) -> dict[str, Any]:
    model = _unwrap(model_chunks[0])
    cfg = getattr(model, "cfg", None)
    return {
        "class": type(model).__name__,
        "num_chunks": len(model_chunks),
        "config": _jsonable(cfg) if dataclasses.is_dataclass(cfg) else None,
        "param_dtypes": sorted({str(p.dtype) for chunk in model_chunks for p in chunk.parameters()}),
    }


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer import DistributedOptimizer

    return any(isinstance(part, DistributedOptimizer) for part in optimizer_parts(optimizer))


def _describe_optimizer(optimizer, sharding: str) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    distributed = _is_distributed(optimizer)
    return {
        "distributed": distributed,
        "sharding_type": sharding if distributed else None,
        "parts": [_optimizer_kind(part) for part in optimizer_parts(optimizer)],
    }


def _optimizer_kind(part) -> str:
    """'DistributedOptimizer', 'FP32Optimizer', ... with '+torch_adam' when torch Adam is inside."""
    inner = getattr(part, "optimizer", None)
    torch_adam = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
    return type(part).__name__ + ("+torch_adam" if torch_adam else "")


_CROSS_KIND = {"DistributedOptimizer+torch_adam", "FP32Optimizer+torch_adam"}


def _optimizer_conversion(saved: dict, optimizer) -> str | None:
    """None (same kind), 'to_plain' or 'to_distributed'; raise when the kinds cannot be converted.

    Converted: one torch-Adam DistributedOptimizer (fully_reshardable) <-> one fp32 FP32Optimizer,
    what a run gets when it switches the distributed optimizer off at DP = 1. Both name their
    moments 'optimizer.state.<exp_avg|exp_avg_sq>.<model key>' with the model's shapes; only the
    non-tensor part (param groups, step) and the distributed optimizer's fp32 'param' differ.
    """
    current = [_optimizer_kind(part) for part in optimizer_parts(optimizer)]
    saved_parts = saved.get("parts", [])
    if saved["distributed"] == _is_distributed(optimizer):
        return None
    convertible = (
        len(current) == 1
        and len(saved_parts) == 1
        and {current[0], saved_parts[0]} == _CROSS_KIND
        and (not saved["distributed"] or saved["sharding_type"] == "fully_reshardable")
    )
    if saved["distributed"] and saved["sharding_type"] != "fully_reshardable":
        raise CheckpointMismatchError(
            f"the checkpoint stores the distributed optimizer as {saved['sharding_type']} (training.checkpoint."
            "optimizer_format), which does not convert to the plain optimizer this run uses (data parallel "
            "1, or distributed_optimizer=false); resume with the distributed optimizer at data parallel > 1, "
            "or load without the optimizer"
        )
    if not convertible:
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer {saved_parts} (use_distributed_optimizer={saved['distributed']}) "
            f"cannot be loaded into {current}; only a torch-Adam DistributedOptimizer <-> FP32Optimizer "
            "switch is converted. Match optimizer.use_distributed_optimizer or load with "
            "load_optimizer=False"
        )
    return "to_distributed" if _is_distributed(optimizer) else "to_plain"


def _check_compatible(meta: dict, model_chunks: list, optimizer, ema, strict: bool) -> None:
    """Raise CheckpointMismatchError naming every field that cannot change between save and load."""
    where = meta["path"]
    saved, current = meta["model"], _describe_model(model_chunks)
    if saved["class"] != current["class"]:
        raise CheckpointMismatchError(
            f"checkpoint {where} holds a {saved['class']}, the current model is a {current['class']}"
        )
    if saved["config"] is not None and current["config"] is not None:
        fields = sorted(set(saved["config"]) | set(current["config"]))
        diffs = [
            f"model.{name}: checkpoint {saved['config'].get(name)!r}, current {current['config'].get(name)!r}"
            for name in fields
            if name not in MODEL_FIELDS_FREE_TO_CHANGE
            and saved["config"].get(name) != current["config"].get(name)
        ]
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {where} does not fit the current model geometry: " + "; ".join(diffs)
            )
    if optimizer is not None:
        saved_opt = meta["optimizer"]
        if saved_opt is None:
            raise CheckpointMismatchError(
                f"checkpoint {where} has no optimizer state; load it with load_optimizer=False"
            )
        _optimizer_conversion(saved_opt, optimizer)
        saved_dtypes = saved.get("param_dtypes")
        if saved_dtypes is not None and saved_dtypes != current["param_dtypes"]:
            raise CheckpointMismatchError(
                f"checkpoint {where} was saved with parameter dtypes {saved_dtypes}, the current model has "
                f"{current['param_dtypes']} (runtime.dtype changed); the optimizer state cannot change precision: "
                "resume with the runtime.dtype it was saved with, or start a new stage from its weights "
                "(training.checkpoint.init_from)"
            )
    if ema is not None and not meta["has_ema"] and strict:
        raise CheckpointMismatchError(
            f"checkpoint {where} has no EMA weights; pass ema=None, or strict=False to start the "
            "EMA from the loaded weights"
        )


# -- 4. The sharded state dict ---------------------------------------------------------------------


def _model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """Sharded entries of a model's state dict, keyed like `model.state_dict()`.

    Tensor-parallel splits are read from Megatron's partition attributes of each parameter
    (`tensor_model_parallel`, `partition_dim`; the rule `parallel/tensor_parallel_state.py` uses),
    everything else is replicated over TP and DP x CP, `_extra_state` entries become ShardedObjects.
    A parameter tagged `shared` (a pipeline chunk's copy of a parameter another chunk holds, as
    `parallel/pipeline.py` marks them) is recorded as a replica, so only the primary copy is saved.
    Megatron's generic `MegatronModule.sharded_state_dict` is not used: it treats every plain
    `nn.Module` child (ModuleList, AdaLN, FFN, attention) with all Megatron linears inside as
    replicated, which records wrong global shapes at TP > 1 (and saves only TP rank 0's shards).
    """
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from megatron_video.parallel.tensor_parallel_state import partition_dims

    state = make_sharded_tensors_for_checkpoint(model.state_dict(keep_vars=True), "", partition_dims(model))
    for name, p in model.named_parameters():
        if getattr(p, "shared", False) and name in state:
            state[name] = dataclasses.replace(state[name], replica_id=(1, *state[name].replica_id[1:]))
    return state


def _ema_names(model_chunks: list, ema: ParamEMA) -> dict[int, str]:
    """id(parameter) -> EMA name over all model chunks, at whichever wrapper level the EMA was built on.

    A name several chunks hold (the conditioning embedder every pipeline chunk replicates) maps to
    the first chunk's parameter, the copy the EMA tracks (`training.loop.UniqueParameters`).
    """
    modules = list(model_chunks)
    while True:
        names: dict[int, str] = {}
        seen: set[str] = set()
        for module in modules:
            for n, p in module.named_parameters():
                if p.requires_grad and n not in seen:
                    seen.add(n)
                    names[id(p)] = n
        if seen == set(ema.shadow):
            return names
        inner = [getattr(module, "module", None) for module in modules]
        if not all(isinstance(m, torch.nn.Module) for m in inner):
            raise ValueError(
                "the EMA's parameter names match no wrapper level of the model chunks; build ParamEMA "
                "on the model (or UniqueParameters of the chunks) being checkpointed"
            )
        modules = inner


def _ema_sharded_state(model_chunks: list, ema: ParamEMA) -> dict[str, Any]:
    """EMA name -> the model parameter's sharded entry with the EMA tensor and key 'ema.<key>'.

    Every chunk contributes the entries of its parameters, so the EMA is sharded and resharded
    exactly like the model (keys are global parameter names, independent of the layout).
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    names = _ema_names(model_chunks, ema)
    entries = {}
    for chunk in model_chunks:
        for sharded in model_sharded_state_dict(_unwrap(chunk)).values():
            name = names.get(id(sharded.data)) if isinstance(sharded, ShardedTensor) else None
            if name is not None:
                shadow = ema.shadow[name]
                entries[name] = dataclasses.replace(
                    sharded, key=EMA_PREFIX + sharded.key, data=shadow, dtype=shadow.dtype
                )
    missing = sorted(set(ema.shadow) - set(entries))
    if missing:
        raise ValueError(f"EMA tensors without a sharded model entry: {missing}")
    return entries


def _sharded_state(
    model_chunks, optimizer, ema, rng_state: dict | None, is_loading: bool, sharding: str
) -> dict[str, Any]:
    """The sharded part: model chunks, optimizer (distributed: in format `sharding`), EMA, this rank's
    RNG streams (when given)."""
    from megatron.core.dist_checkpointing import ShardedObject

    state: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        state[key] = model_sharded_state_dict(_unwrap(chunk))
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state),
            is_loading=is_loading,
            metadata={
                "distrib_optim_sharding_type": sharding,
                "chained_optim_avoid_prefix": True,
            },
        )
    if ema is not None:
        state["ema"] = _ema_sharded_state(model_chunks, ema)
    if rng_state is not None:
        state["rng_state"] = ShardedObject(
            "rng_state", rng_state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0
        )
    return state


# -- 5. Save and load ------------------------------------------------------------------------------


def _broadcast_from_rank0(value: Any) -> Any:
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model_chunks: list,
    optimizer,
    scheduler,
    train_state: dict,
    ema: ParamEMA | None = None,
    keep_last: int | None = None,
    background=None,
    optimizer_format: str = DISTRIBUTED_OPTIMIZER_SHARDING,
) -> Path:
    """Save a checkpoint of iteration `iteration` on every rank (collective); return its directory.

    model_chunks: the Megatron-DDP-wrapped model chunks; optimizer: what get_megatron_optimizer
    returned (or None); scheduler: an OptimizerParamScheduler (or None); train_state: a
    JSON-serialisable dict from the loop (rank 0's is saved; "config" in it is also written to the metadata file);
    keep_last: delete all but the newest `keep_last` checkpoints after this one is published.
    background: a `BackgroundSaves` (training/async_save.py): the state is snapshotted now, the
    files are written by a forked process while training goes on, and the checkpoint is verified and
    published when the queue finalizes it on every rank (the returned directory exists only then).
    optimizer_format: how a distributed optimizer's state is stored (OPTIMIZER_FORMATS).

    A failure on any rank (a full disk, a write error) raises on every rank, with the same message,
    after the partial folder was removed; the previous checkpoint and `latest` are untouched. A disk
    too full for a checkpoint as large as the last one is refused before anything is written
    (CheckpointSpaceError).
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format must be one of {OPTIMIZER_FORMATS}, got {optimizer_format!r}")
    save_dir = Path(save_dir)
    rank = dist.get_rank()
    # Megatron's writer keeps a manager process; ours follows this process's life and survives a
    # pre-emption signal (a no-op when a stage already set it up with its configured signals).
    shield_checkpoint_writer((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1))
    if background is not None:
        background.wait()  # one save in flight at a time; its clean-up must not meet this one

    # 0. Room for it: rank 0 clears what interrupted saves left and checks the free space.
    tmp, error = None, None
    if rank == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(save_dir)
            check_free_space(save_dir)
            tmp = save_dir / temporary_dir_name(iteration)
            tmp.mkdir()
        except Exception as exc:
            error = exc
    _raise_on_every_rank(error, save_dir)
    tmp = _broadcast_from_rank0(tmp)

    # 1. The sharded part (every rank) and the common part (rank 0). Saving leaves every random
    # stream as it found it, so a run that saves continues exactly like a run that does not.
    rng_before_save = capture_rng_state()
    request = None
    try:
        if optimizer is not None:
            init_torch_adam_state(optimizer)
        state = _sharded_state(model_chunks, optimizer, ema, rng_before_save, False, optimizer_format)
        state["iteration"] = iteration
        state["train_state"] = _train_state_json(train_state)  # a string: nothing to unpickle at load
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=background is not None)
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        error = exc
    finally:
        restore_rng_state(rng_before_save)
    _raise_on_every_rank(error, save_dir, partial=tmp)

    meta = {
        "format": FORMAT,
        "iteration": iteration,
        "layout": current_layout(model_plan(model_chunks)),
        "optimizer": _describe_optimizer(optimizer, optimizer_format),
        "ddp_buckets": gather_bucket_layouts(model_chunks, model_plan(model_chunks).pipeline_parallel_rank),
        "model": _describe_model(model_chunks),
        "has_ema": ema is not None,
        "has_scheduler": scheduler is not None,
        "config": _jsonable(train_state.get("config")),
    }
    if request is None:
        _publish_written(save_dir, tmp, iteration, meta, keep_last, writer_finalize=[])
    else:
        # The writer process also flushes and hashes what it wrote; megatron's finalize step
        # (torch's .metadata) and then ours run once every rank's writer has finished. Until then
        # `latest` names the previous checkpoint.
        finalize = list(request.finalize_fns)
        request = request._replace(
            finalize_fns=[lambda: _publish_written(save_dir, tmp, iteration, meta, keep_last, finalize)]
        )
        if request.async_fn is not None:
            request = request._replace(async_fn=_then_hash(request.async_fn, tmp, rank))
        background.schedule(request, iteration)
    return save_dir / iteration_dir_name(iteration)


def _checksums_file(folder: Path, rank: int) -> Path:
    return folder / f".checksums-{rank}.json"


def _then_hash(write, folder: Path, rank: int):
    """`write`, then flush and hash this rank's files into a side file (in the writer process)."""

    def write_and_hash(*args, **kwargs):
        write(*args, **kwargs)
        fsync_files(folder, only=_written_by(rank))
        entries = json.dumps(file_entries(folder, only=_written_by(rank)))
        write_synced(_checksums_file(folder, rank), lambda f: f.write(entries.encode()))

    return write_and_hash


def _own_entries(folder: Path, rank: int) -> dict[str, dict]:
    """Checksums of this rank's files: from the writer's side file (removed), or computed here."""
    side = _checksums_file(folder, rank)
    if side.is_file():
        entries = json.loads(side.read_text())
        side.unlink()
        return entries
    fsync_files(folder, only=_written_by(rank))
    return file_entries(folder, only=_written_by(rank))


def _publish_written(
    save_dir: Path, tmp: Path, iteration: int, meta: dict, keep_last: int | None, writer_finalize: list
) -> None:
    """Collective, once every rank's files are written: flush and hash them, write META_FILE last
    (rank 0), publish, prune. A failure on any rank removes the folder and raises on every rank.
    `writer_finalize`: megatron's finalize steps of a background save (empty for a synchronous
    one, whose pruning then also finishes before returning)."""
    synchronous = not writer_finalize
    from torch.distributed.checkpoint.api import CheckpointException

    rank, entries, error = dist.get_rank(), None, None
    try:
        for fn in writer_finalize:
            fn()
        entries = _own_entries(tmp, rank)  # the data files this rank wrote, flushed and hashed
    except (Exception, CheckpointException) as exc:
        error = exc
    _raise_on_every_rank(error, save_dir, partial=tmp)

    # Rank 0 hashes the rest, writes META_FILE last with every checksum, and publishes.
    hashed = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(entries, hashed, dst=0)
    if rank == 0:
        try:
            write_meta_file(tmp, meta, {name: entry for part in hashed for name, entry in part.items()})
            _publish(save_dir, tmp, iteration)
        except Exception as exc:
            error = exc
    _raise_on_every_rank(error, save_dir, partial=tmp)

    # Housekeeping on rank 0, then every rank returns with the checkpoint visible.
    if rank == 0:
        remove_stale_temporaries(save_dir)
        if keep_last is not None:
            prune_checkpoints(save_dir, keep_last, in_background=not synchronous)
    dist.barrier()


def _written_by(rank: int):
    """Whether a file of a dist-checkpoint folder was written by `rank` ('__<rank>_<n>.distcp')."""
    return lambda name: name.startswith(f"__{rank}_")


def _raise_on_every_rank(error: BaseException | None, save_dir: Path, partial: Path | None = None) -> None:
    """Collective: when any rank failed, remove the partial folder (rank 0) and raise on every rank.

    A full disk is reported as one CheckpointSpaceError (folder and sizes) on every rank, also on
    ranks whose own write went through.
    """
    if isinstance(error, CheckpointSpaceError):
        report = ("space", error.strerror)
    elif error is not None:
        report = ("space" if is_out_of_space(error) else "error", None)
    else:
        report = None
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    failed = [r for r in reports if r is not None]
    if not failed:
        return
    if partial is not None and dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if any(kind == "space" for kind, _ in failed):
        words = next((message for _, message in failed if message), None)
        if words is None and dist.get_rank() == 0:  # after the partial folder is gone
            words = describe_write_error(save_dir, OSError(errno.ENOSPC, "No space left on device")).strerror
        raise CheckpointSpaceError(errno.ENOSPC, _broadcast_from_rank0(words)) from error
    if error is not None:
        raise error
    raise RuntimeError(f"another rank failed while saving a checkpoint into {save_dir}; see its log")


def _publish(save_dir: Path, tmp: Path, iteration: int) -> Path:
    """The commit point of a save (a seam for tests that interrupt a save)."""
    return publish_checkpoint(save_dir, tmp, iteration)


_CONFIG_TAG = "__experiment_config__"
"""Marks an ExperimentConfig inside a JSON train_state (the one object besides plain data it may hold)."""


def _encode_config(value: Any) -> Any:
    from megatron_video.config.loader import to_dict
    from megatron_video.config.schema import ExperimentConfig

    if isinstance(value, ExperimentConfig):
        return {_CONFIG_TAG: to_dict(value)}
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _decode_config(value: dict) -> Any:
    from megatron_video.config.loader import from_dict
    from megatron_video.config.schema import ExperimentConfig

    return from_dict(ExperimentConfig, value[_CONFIG_TAG]) if set(value) == {_CONFIG_TAG} else value


def _train_state_json(train_state: dict) -> str:
    """JSON of a train_state: plain data, and an ExperimentConfig (tagged; rebuilt by from_dict)."""
    try:
        return json.dumps(train_state, default=_encode_config)
    except TypeError as exc:
        raise TypeError(f"the train_state of a checkpoint must be JSON-serialisable: {exc}") from None


def _read_train_state(value: Any, path: Path) -> dict:
    """The saved train_state: JSON, or (checkpoints before JSON) a pickle of plain builtins only."""
    if isinstance(value, bytes):
        return dict(loads_plain(value, f"{path} (train_state)"))
    return dict(json.loads(value, object_hook=_decode_config))


def _load_sharding(meta: dict, plan: ParallelPlan, conversion: str | None) -> str:
    """The distributed-optimizer format to request: the saved one; 'dp_reshardable' state only into
    the model-parallel layout that wrote it."""
    saved = (meta["optimizer"] or {}).get("sharding_type") or DISTRIBUTED_OPTIMIZER_SHARDING
    if conversion is not None or saved == DISTRIBUTED_OPTIMIZER_SHARDING:
        return DISTRIBUTED_OPTIMIZER_SHARDING
    fixed = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline", "context_parallel")
    now = current_layout(plan)
    changed = [f"{k} {meta['layout'][k]} -> {now[k]}" for k in fixed if meta["layout"].get(k) != now[k]]
    if changed:
        raise CheckpointMismatchError(
            f"checkpoint {meta['path']} stores the distributed optimizer as {saved} (training.checkpoint."
            f"optimizer_format), which reshards over data parallel only; this run changes {', '.join(changed)}. "
            "Resume at the saving layout (and save once with optimizer_format=fully_reshardable to change it), "
            "or load without the optimizer"
        )
    return saved


def _request_moments_only(state: dict, num_chunks: int) -> dict[int, torch.Tensor]:
    """Drop the main parameters from a distributed optimizer's load request; return their params.

    An FP32Optimizer checkpoint has no main parameters: an fp32 optimizer's main parameter is the
    model parameter, so the distributed optimizer takes it from the loaded model instead.
    """
    params = {sh.key: sh.data for key in _model_keys(num_chunks) for sh in state[key].values()}
    return {
        idx: params[tensors.pop("param").key.removeprefix("optimizer.state.param.")]
        for idx, tensors in state["optimizer"]["param_state"].items()
    }


def _reseed_seed(train_state: dict) -> int:
    if "seed" in train_state:
        return int(train_state["seed"])
    config = _jsonable(train_state.get("config"))
    if isinstance(config, dict) and isinstance(config.get("runtime"), dict) and "seed" in config["runtime"]:
        return int(config["runtime"]["seed"])
    return 0


def load_checkpoint(
    load_dir: str | Path,
    model_chunks: list,
    optimizer=None,
    scheduler=None,
    ema: ParamEMA | None = None,
    iteration: int | None = None,
    load_optimizer: bool = True,
    strict: bool = True,
    strict_integrity: bool = False,
) -> dict | None:
    """Load a checkpoint into the given objects on every rank (collective); return its train_state.

    load_dir: a save directory (its `latest` checkpoint, or `iteration`'s) or one checkpoint
    directory. Returns None when there is no checkpoint. The checkpoint is verified first
    (`resolve_checkpoint`): a save directory whose newest checkpoint fails falls back to the newest
    good one with a warning, or raises CheckpointIntegrityError with `strict_integrity`; one named
    checkpoint that fails is refused. With load_optimizer=False neither the
    optimizer nor the scheduler is restored (the optimizer's main parameters follow the loaded
    model). The parallel layout may differ from the saved one (dist_checkpointing reshards); the
    model geometry may not (CheckpointMismatchError names the field). The returned train_state has
    "rng_restored": True when every random stream continues exactly, False when the layout
    changed and the streams were reseeded from (seed, iteration, data-parallel rank, pipeline
    rank) instead ("rng_reseeded_from" then holds seed and iteration).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = resolve_checkpoint(load_dir, iteration, fall_back=not strict_integrity)
    if path is None:
        return None
    meta = _read_meta(path)
    wanted_optimizer = optimizer if load_optimizer else None
    _check_compatible(meta, model_chunks, wanted_optimizer, ema, strict)
    load_ema = ema is not None and meta["has_ema"]
    plan = model_plan(model_chunks)
    same_layout = meta["layout"] == current_layout(plan)

    conversion = None
    if wanted_optimizer is not None:
        conversion = _optimizer_conversion(meta["optimizer"], wanted_optimizer)
        init_torch_adam_state(wanted_optimizer)
    sharding = (
        _load_sharding(meta, plan, conversion)
        if wanted_optimizer is not None
        else DISTRIBUTED_OPTIMIZER_SHARDING
    )
    if sharding == "dp_reshardable":
        check_bucket_layout(meta, model_chunks, plan.pipeline_parallel_rank)
    rng_template = capture_rng_state() if same_layout else None
    state = _sharded_state(
        model_chunks, wanted_optimizer, ema if load_ema else None, rng_template, True, sharding
    )
    fp32_params = _request_moments_only(state, len(model_chunks)) if conversion == "to_distributed" else {}
    loaded = dist_checkpointing.load(
        state,
        str(path),
        strict=StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED,
    )

    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if wanted_optimizer is not None:
        if conversion == "to_plain":
            load_plain_from_distributed(optimizer_parts(wanted_optimizer)[0], loaded["optimizer"])
            untie_steps(wanted_optimizer)
        elif conversion == "to_distributed":
            load_distributed_from_plain(
                optimizer_parts(wanted_optimizer)[0], loaded["optimizer"], fp32_params
            )
        else:
            load_optimizer_state(wanted_optimizer, loaded["optimizer"])
        if scheduler is not None and loaded.get("scheduler") is not None:
            # OptimizerParamScheduler.load_state_dict advances num_steps BY the saved count (it
            # assumes a fresh scheduler); start from 0 so that loading into a used one is right too.
            scheduler.num_steps = 0
            scheduler.load_state_dict(loaded["scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if ema is not None:
        if load_ema:
            with torch.no_grad():
                for name, tensor in loaded["ema"].items():
                    ema.shadow[name].copy_(tensor)
        else:
            logger.warning("checkpoint %s has no EMA; the EMA starts from the loaded weights", path)
            names = _ema_names(model_chunks, ema)
            with torch.no_grad():
                for p in (p for chunk in model_chunks for p in chunk.parameters()):
                    if id(p) in names:
                        ema.shadow[names[id(p)]].copy_(p.detach().float())

    train_state = _read_train_state(loaded["train_state"], path)
    if same_layout:
        restore_rng_state(loaded["rng_state"])
        train_state["rng_restored"] = True
    else:
        seed, saved_iteration = _reseed_seed(train_state), meta["iteration"]
        reseed_rng(seed, saved_iteration, plan.data_parallel_rank, plan.pipeline_parallel_rank)
        train_state["rng_restored"] = False
        train_state["rng_reseeded_from"] = {"seed": seed, "iteration": saved_iteration}
        if dist.get_rank() == 0:
            logger.warning(
                "checkpoint %s was saved with layout %s, this run is %s: random streams reseeded",
                path,
                meta["layout"],
                current_layout(plan),
            )
    return train_state
