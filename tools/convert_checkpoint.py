"""Move weights between Open-Sora-Plan's released files, our training checkpoints and flat exports.

Commands (SRC, then DST; trailing `section.field=value` words override the --config YAML):

    # released v1.5 denoiser (model.pt / model_ema.pt / .safetensors, flat layout) -> our flat export
    python tools/convert_checkpoint.py osp-to-flat model_ema.pt out/suv --flavor 8.5B
    # our flat export -> released layout (.pt or .safetensors)
    python tools/convert_checkpoint.py flat-to-osp out/suv.safetensors model_ema.safetensors
    # released denoiser -> a training checkpoint of ours (step 0), in the layout it is launched with
    torchrun --nproc_per_node 8 tools/convert_checkpoint.py osp-to-checkpoint model.pt \\
        outputs/video_s1/checkpoints --config examples/opensoraplan1.5/video_s1.yaml --ema-src model_ema.pt
    # our flat export -> a training checkpoint of ours (step 0); one process is TP = 1
    python tools/convert_checkpoint.py flat-to-checkpoint out/suv.safetensors outputs/t2v/checkpoints \\
        --config examples/tiny/t2v.yaml parallel.tensor_parallel=1 parallel.sequence_parallel=false
    # our training checkpoint (any TP / PP / CP / DP) -> flat export, TP and PP merged, raw or --ema
    python tools/convert_checkpoint.py checkpoint-to-flat outputs/t2v/checkpoints out/suv --ema
    # check that a checkpoint loads under the layout launched with; --out rewrites it for that layout
    torchrun --nproc_per_node 2 tools/convert_checkpoint.py reshard outputs/t2v/checkpoints \\
        --config examples/tiny/t2v.yaml parallel.tensor_parallel=1 parallel.sequence_parallel=false \\
        parallel.pipeline_parallel=2 --out outputs/t2v_pp2/checkpoints
    # the state of every checkpoint under a save dir (ok / corrupt file X / incomplete / no checksums);
    # exits 1 when the newest one is not good
    python tools/convert_checkpoint.py verify outputs/t2v/checkpoints
    # released WF-VAE (.ckpt or diffusers folder) <-> our flat VAE export
    python tools/convert_checkpoint.py vae-osp-to-flat wfvae_888_dim32.ckpt out/vae --flavor wfvae_8x8x8_d32
    python tools/convert_checkpoint.py vae-flat-to-osp out/vae.safetensors out/wfvae_folder
    # Open-Sora-Plan v1.2 / v1.3 DiT (model.family=opensora_dit): released diffusers folder
    # (config.json + diffusion_pytorch_model.safetensors / .bin) <-> our flat export
    python tools/convert_checkpoint.py dit-folder-to-flat Open-Sora-Plan-v1.3.0/any93x640x640 out/dit
    python tools/convert_checkpoint.py dit-flat-to-folder out/dit.safetensors out/any93x640x640
    # released folder -> a training checkpoint of ours (step 0) at the launched TP / PP (I2V folders: I2V)
    torchrun --nproc_per_node 8 tools/convert_checkpoint.py dit-folder-to-checkpoint \
        Open-Sora-Plan-v1.3.0/any93x640x640 outputs/s3/checkpoints --config examples/opensoraplan1.3/s3_any93x640x640.yaml
    # our DiT checkpoints and flat exports go through checkpoint-to-flat / reshard / flat-to-checkpoint above
    # (the model is rebuilt from the family the checkpoint or export records)

A flat export is `<name>.safetensors` (our key layout, full tensors) plus `<name>.json` (the model
config). Loading is safe (safetensors, or torch.load with weights_only=True). Every mismatch is
reported by key and shape (`missing:`, `unexpected:`, `shape:` lines of a CheckpointMismatch).
I2V checkpoints need `--task i2v` (and --config for checkpoint-to-flat, whose default model comes
from the checkpoint's metadata); T2V weights converted for I2V keep the zero-initialised inpainting
embeddings as built.

osp-to-checkpoint / flat-to-checkpoint write what a stage that has not stepped yet would save:
model weights and EMA equal to the given weights (the EMA from --ema-src when given), iteration 0,
train state at step 0, and a freshly initialised optimizer (zero moments, step 0) and LR schedule
built from --config. A resume takes the optimizer hyperparameters and the schedule from the
checkpoint, so convert with the stage config you will train with. Resume it by writing DST as the
stage's own `<stage dir>/checkpoints`, or with `training.checkpoint.load_dir=DST`. The geometry
must be the config's (stage transitions such as dense -> SUV are `training.checkpoint.init_from`'s
job, on flat exports). Every rank reads the whole source file.

Our checkpoints are layout-independent: every tensor (model, EMA, optimizer moments) is stored
under its global name and full shape, and dist_checkpointing reshards on load over TP, PP, CP and
DP (the distributed optimizer uses the fully reshardable format), so any layout resumes from any
checkpoint directly. Only two things belong to the layout that saved: the layout record in
`checkpoint_meta.json` and each rank's random streams, which a resume on another layout reseeds
from (seed, iteration, data-parallel rank, pipeline rank). `reshard` therefore loads everything
(model, EMA, optimizer, schedule, train state) under the target layout and reports any mismatch;
with --out it writes that state back as a checkpoint of the target layout, at the same iteration,
whose random streams are the reseeded ones: resuming it equals resuming the original there.

Every command that reads a training checkpoint verifies it first (the checksums of
`checkpoint_meta.json`, and every pickle in the folder through a restricted reader, so a crafted
file is refused before anything is unpickled): given one `iter_*` folder a bad checkpoint is refused;
given a save dir the newest good one is used, with a warning naming what is wrong with newer ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_video.errors import CheckpointMismatch, ConfigError
from megatron_video.models.suv.config import SUVConfig

# Overrides that make a one-model-replica-per-process layout (checkpoint-to-flat loads at TP = PP = 1).
ONE_PROCESS_LAYOUT = (
    "parallel.tensor_parallel=1",
    "parallel.context_parallel=1",
    "parallel.pipeline_parallel=1",
    "parallel.virtual_pipeline=null",
    "parallel.sequence_parallel=false",
)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat tensor dict from .safetensors or a torch file (unwrapping 'model' / 'state_dict')."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    return obj


def write_weights(path: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """.safetensors or .pt, by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def suv_config(flavor: str, overrides: list[str]) -> SUVConfig:
    """SUV config from a flavor and `field=value` overrides."""
    from megatron_video.config.loader import apply_overrides, from_dict
    from megatron_video.models.suv.config import with_flavor

    return from_dict(SUVConfig, with_flavor(apply_overrides({"flavor": flavor}, overrides)))


# -- shared pieces of the checkpoint commands ------------------------------------------------------


def _stage_config(config: str, overrides: list[str]):
    """The validated stage config (no data is read, so data.data_list is dropped, whatever it says)."""
    from megatron_video.config import load_config

    return load_config(config, [*overrides, "data.data_list=null"])


def _runtime(cfg):
    """Process groups for cfg's layout over the launcher's world (a single process is a world of 1)."""
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed

    return setup_parallel(cfg, init_distributed(cfg.runtime))


def _chunks(model) -> list:
    return model if isinstance(model, list) else [model]


def _global_shapes(chunks: list, trainable_only: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> full (TP-merged) shape of every tensor of the whole model, gathered over all ranks.

    The names and shapes are those the checkpoint records (`model_sharded_state_dict`), so with
    pipeline parallelism the union over ranks is the whole model.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_video.training.checkpoint import model_sharded_state_dict

    local = {}
    for chunk in chunks:
        trainable = {n for n, p in chunk.named_parameters() if p.requires_grad}
        for sharded in model_sharded_state_dict(chunk).values():
            if isinstance(sharded, ShardedTensor) and (not trainable_only or sharded.key in trainable):
                local[sharded.key] = tuple(sharded.global_shape)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _mismatches(
    given: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], new_ok: tuple[str, ...] = ()
) -> list[str]:
    """'missing:', 'unexpected:' and 'shape:' lines; names starting with `new_ok` may be missing."""
    problems = [
        f"missing: {k} {list(s)}"
        for k, s in sorted(expected.items())
        if k not in given and not k.startswith(new_ok)
    ]
    problems += [f"unexpected: {k} {list(s)}" for k, s in sorted(given.items()) if k not in expected]
    problems += [
        f"shape: {k} source {list(given[k])} vs model {list(s)}"
        for k, s in sorted(expected.items())
        if k in given and tuple(given[k]) != tuple(s)
    ]
    return problems


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise CheckpointMismatch(f"{what} does not fit the model:\n  " + "\n  ".join(problems))


def _new_modules(task: str) -> tuple[str, ...]:
    """Modules a T2V source does not have and the model keeps as built (zero-initialised)."""
    return ("inpaint.",) if task == "i2v" else ()


def _check_geometry(saved: dict, model_cfg, where: str) -> None:
    """Raise ConfigError naming every model field of a saved config that differs from the stage's."""
    from megatron_video.training.checkpoint import MODEL_FIELDS_FREE_TO_CHANGE

    current = dataclasses.asdict(model_cfg)
    diffs = [
        f"model.{k}: {where} {saved.get(k)!r}, --config {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in MODEL_FIELDS_FREE_TO_CHANGE and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ConfigError(f"{where} was exported from another model geometry: " + "; ".join(diffs))


def _refuse_existing(save_dir: str | Path) -> None:
    from megatron_video.training.checkpoint_files import complete_checkpoints

    found = complete_checkpoints(save_dir)
    if found:
        raise FileExistsError(
            f"{save_dir} already holds checkpoints (iterations {sorted(found)}); write to an empty directory"
        )


def _load_full(chunks: list, plan, full: dict[str, torch.Tensor]) -> None:
    """Full (TP-merged) tensors into this rank's shards of its pipeline chunks."""
    from megatron_video.parallel.tensor_parallel_state import strip_extra_state
    from megatron_video.training.export import load_full_into

    for chunk in chunks:
        names = set(strip_extra_state(chunk.state_dict()))
        load_full_into(chunk, plan, {k: v for k, v in full.items() if k in names})


def _set_ema(ema, chunks: list, plan, full: dict[str, torch.Tensor]) -> None:
    """The EMA's shards from full tensors (fp32, so bf16 models keep the source's precision)."""
    from megatron_video.parallel.tensor_parallel_state import partition_dims, shard_state_dict

    with torch.no_grad():
        for chunk in chunks:
            names = [n for n, _ in chunk.named_parameters() if n in ema.shadow and n in full]
            shards = shard_state_dict(
                {n: full[n] for n in names},
                partition_dims(chunk),
                plan.tensor_parallel_rank,
                plan.tensor_parallel,
            )
            for name, tensor in shards.items():
                ema.shadow[name].copy_(tensor)


def _weights_to_checkpoint(args, cfg, full: dict, ema_full: dict | None) -> Path:
    """Write `full` (and `ema_full` as the EMA) as an iteration-0 training checkpoint of cfg's layout."""
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.loop import Trainer
    from megatron_video.training.stage import build_denoiser

    runtime = _runtime(cfg)
    _refuse_existing(args.dst)
    if ema_full is not None and cfg.training.ema_decay is None:
        raise ConfigError("--ema-src given, but the stage keeps no EMA (training.ema_decay is null)")
    model = build_denoiser(cfg, runtime, args.task)
    chunks = _chunks(model)
    expected = _global_shapes(chunks)
    new_ok = _new_modules(args.task)
    _raise_if(_mismatches({k: tuple(v.shape) for k, v in full.items()}, expected, new_ok), str(args.src))
    if ema_full is not None:
        _raise_if(
            _mismatches({k: tuple(v.shape) for k, v in ema_full.items()}, expected, new_ok), args.ema_src
        )
    _load_full(chunks, runtime.plan, full)
    # Built after the weights are in place: optimizer main parameters and the EMA copy them.
    trainer = Trainer(cfg, runtime, model)
    if trainer.ema is not None:
        _set_ema(trainer.ema, chunks, runtime.plan, full if ema_full is None else ema_full)
    state = trainer.train_state()
    state.update(
        data={"consumed_samples": 0},
        config=dataclasses.asdict(cfg.model),
        parallel=dataclasses.asdict(cfg.parallel),
        converted_from=str(args.src),
    )
    return ckpt.save_checkpoint(
        args.dst, 0, trainer.model_chunks, trainer.optimizer, trainer.scheduler, state, ema=trainer.ema
    )


def _check_checkpoint(meta: dict, chunks: list, with_ema: bool) -> None:
    """Compare a checkpoint's model (and EMA) tensors with the model by key and global shape."""
    from megatron.core import dist_checkpointing

    from megatron_video.training.checkpoint import EMA_PREFIX

    saved = {
        k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(meta["path"]).items()
    }
    model_saved = {k: s for k, s in saved.items() if not k.startswith(("optimizer.", EMA_PREFIX))}
    problems = _mismatches(model_saved, _global_shapes(chunks))
    if with_ema and meta["has_ema"]:
        ema_saved = {k[len(EMA_PREFIX) :]: s for k, s in saved.items() if k.startswith(EMA_PREFIX)}
        problems += [f"EMA {p}" for p in _mismatches(ema_saved, _global_shapes(chunks, trainable_only=True))]
    _raise_if(problems, f"checkpoint {meta['path']}")


def _layout(layout: dict) -> str:
    """'TP 2 x CP 1 x PP 2 (VPP None) x DP 1' from a checkpoint layout record."""
    return (
        f"TP {layout['tensor_parallel']} x CP {layout['context_parallel']} x PP {layout['pipeline_parallel']} "
        f"(VPP {layout['virtual_pipeline']}) x DP {layout['data_parallel']}"
    )


def _main_print(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# -- the commands ----------------------------------------------------------------------------------


def osp_to_flat(args) -> Path:
    from megatron_video.models.suv.state_dict_adapter import from_open_sora_plan
    from megatron_video.training.export import save_flat

    cfg = suv_config(args.flavor, args.set)
    # Strict: every missing or unexpected key is named; shapes are checked when the export is loaded.
    ours = from_open_sora_plan(read_weights(args.src), cfg)
    return save_flat(args.dst, ours, cfg)


def flat_to_osp(args) -> Path:
    from megatron_video.models.suv.state_dict_adapter import to_open_sora_plan
    from megatron_video.training.export import load_flat

    state, cfg_dict = load_flat(args.src)
    if cfg_dict is None:
        raise ValueError(f"{args.src} has no .json config beside it; it is not a flat export of ours")
    if cfg_dict.get("family", "suv") != "suv":
        raise ConfigError(f"{args.src} is a model.family={cfg_dict['family']} export; use dit-flat-to-folder")
    return write_weights(args.dst, to_open_sora_plan(state, SUVConfig(**cfg_dict)))


def _released_dit(path: str | Path, strict: bool = True, **overrides):
    """(config, I2V mask channels or None, our full state) of a released v1.2 / v1.3 DiT folder; with
    `strict` every missing or unexpected released key is named (CheckpointMismatch)."""
    from megatron_video.models.opensora_dit.state_dict_adapter import load_open_sora_plan

    return load_open_sora_plan(path, strict, **overrides)


def dit_folder_to_flat(args) -> Path:
    """Released v1.2 / v1.3 DiT folder -> our flat export (its config.json becomes our model config)."""
    from megatron_video.config.loader import apply_overrides
    from megatron_video.training.export import save_flat

    cfg, _, state = _released_dit(args.src, **apply_overrides({}, args.set))
    return save_flat(args.dst, state, cfg)


def dit_flat_to_folder(args) -> Path:
    """Our flat DiT export -> a released folder (config.json + diffusion_pytorch_model.safetensors)."""
    from megatron_video.models.opensora_dit.state_dict_adapter import save_open_sora_plan_folder
    from megatron_video.training.denoisers import saved_model_config
    from megatron_video.training.export import load_flat

    state, saved = load_flat(args.src)
    cfg = saved_model_config(saved)
    if cfg is None or cfg.family != "opensora_dit":
        raise ConfigError(
            f"{args.src} is not a flat export of an opensora_dit model (its .json records "
            f"model.family={getattr(cfg, 'family', None)}); SUV exports go through flat-to-osp"
        )
    mask = state.get("inpaint.mask_embed.proj.weight")
    save_open_sora_plan_folder(args.dst, state, cfg, None if mask is None else mask.shape[1])
    return Path(args.dst)


def dit_folder_to_checkpoint(args) -> Path:
    """Released v1.2 / v1.3 DiT folder -> an iteration-0 training checkpoint in this launch's layout."""
    cfg = _stage_config(args.config, args.overrides)
    released_cfg, mask_channels, full = _released_dit(args.src)
    _check_geometry(dataclasses.asdict(released_cfg), cfg.model, str(args.src))
    task = "i2v" if mask_channels is not None else "t2v"
    if args.task != task:
        raise ConfigError(f"{args.src} holds a {task.upper()} model (its config.json); pass --task {task}")
    ema = None
    if args.ema_src:
        ema_cfg, _, ema = _released_dit(args.ema_src)
        _check_geometry(dataclasses.asdict(ema_cfg), cfg.model, str(args.ema_src))
    return _weights_to_checkpoint(args, cfg, full, ema)


def osp_to_checkpoint(args) -> Path:
    """Released denoiser weights -> an iteration-0 training checkpoint in this launch's layout."""
    from megatron_video.models.suv.state_dict_adapter import from_open_sora_plan

    cfg = _stage_config(args.config, args.overrides)
    # Strict: every missing or unexpected released key is named before any tensor is placed.
    full = from_open_sora_plan(read_weights(args.src), cfg.model)
    ema = from_open_sora_plan(read_weights(args.ema_src), cfg.model) if args.ema_src else None
    return _weights_to_checkpoint(args, cfg, full, ema)


def flat_to_checkpoint(args) -> Path:
    """Our flat export -> an iteration-0 training checkpoint in this launch's layout."""
    from megatron_video.training.export import load_flat

    cfg = _stage_config(args.config, args.overrides)
    full, saved = load_flat(args.src)
    if saved is not None:
        _check_geometry(saved, cfg.model, str(args.src))
    ema = None
    if args.ema_src:
        ema, ema_saved = load_flat(args.ema_src)
        if ema_saved is not None:
            _check_geometry(ema_saved, cfg.model, str(args.ema_src))
    return _weights_to_checkpoint(args, cfg, full, ema)


def checkpoint_to_flat(args) -> Path:
    """Load a training checkpoint (any layout) into one TP = PP = 1 model per process and export it."""
    import torch.distributed as dist

    from megatron_video.config import build_config
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.ema import ParamEMA
    from megatron_video.training.export import gather_full_state_dict, save_flat
    from megatron_video.training.loop import wrap_ddp
    from megatron_video.training.stage import build_denoiser

    meta = ckpt.read_checkpoint_metadata(args.src)
    if args.config:
        cfg = _stage_config(args.config, [*args.overrides, *ONE_PROCESS_LAYOUT])
    else:  # the model geometry the checkpoint recorded
        cfg = build_config({"model": meta["model"]["config"]}, [*args.overrides, *ONE_PROCESS_LAYOUT])
    runtime = _runtime(cfg)
    model = build_denoiser(cfg, runtime, args.task)
    ema = ParamEMA(model, 0.0) if args.ema else None
    _check_checkpoint(meta, [model], with_ema=args.ema)
    ckpt.load_checkpoint(
        meta["path"], [wrap_ddp(model, runtime.plan, False)], None, None, ema=ema, load_optimizer=False
    )
    full = gather_full_state_dict(model, runtime.plan, ema.shadow if ema is not None else None)
    out = Path(args.dst).with_suffix(".safetensors")
    if runtime.is_main:
        out = save_flat(args.dst, full, cfg.model)
    if dist.get_world_size() > 1:
        dist.barrier()
    return out


def reshard(args) -> Path:
    """Load a checkpoint (model, EMA, optimizer, schedule) under this launch's layout; --out rewrites it."""
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.loop import Trainer
    from megatron_video.training.stage import build_denoiser

    meta = ckpt.read_checkpoint_metadata(args.src)
    cfg = _stage_config(args.config, args.overrides)
    runtime = _runtime(cfg)
    if args.out:
        _refuse_existing(args.out)
    model = build_denoiser(cfg, runtime, args.task)
    trainer = Trainer(cfg, runtime, model)
    if args.out and meta["has_ema"] and trainer.ema is None:
        raise ConfigError(
            f"{meta['path']} holds EMA weights but --config keeps no EMA (training.ema_decay is null); "
            "the rewritten checkpoint would lose them. Set training.ema_decay"
        )
    _check_checkpoint(meta, _chunks(model), with_ema=trainer.ema is not None)
    state = ckpt.load_checkpoint(
        meta["path"], trainer.model_chunks, trainer.optimizer, trainer.scheduler, trainer.ema
    )
    _main_print(
        f"{meta['path']}: iteration {meta['iteration']} saved at {_layout(meta['layout'])} loads at "
        f"{_layout(ckpt.current_layout(ckpt.model_plan(trainer.model_chunks)))}"
        + ("" if state["rng_restored"] else " (random streams reseeded)")
    )
    if not args.out:
        return Path(meta["path"])
    state = {k: v for k, v in state.items() if k not in ("rng_restored", "rng_reseeded_from")}
    state["parallel"] = dataclasses.asdict(cfg.parallel)
    return ckpt.save_checkpoint(
        args.out,
        meta["iteration"],
        trainer.model_chunks,
        trainer.optimizer,
        trainer.scheduler,
        state,
        trainer.ema,
    )


def verify(args) -> int:
    """Print the state of every checkpoint under a save dir (or of one checkpoint folder); 0 if the newest is good."""
    from megatron_video.training.checkpoint_files import (
        LATEST_FILE,
        checkpoint_folders,
        is_checkpoint_folder,
        verify_checkpoint,
    )
    from megatron_video.training.safe_load import UnsafeCheckpointError, check_dist_checkpoint

    src = Path(args.src)
    folders = {0: src} if is_checkpoint_folder(src) else checkpoint_folders(src)
    if not folders:
        print(f"{src}: no checkpoints", flush=True)
        return 1
    states = {}
    for iteration in sorted(folders, reverse=True):
        try:
            status = verify_checkpoint(folders[iteration], check_dist_checkpoint)
            line = status.describe()
        except UnsafeCheckpointError as exc:
            status, line = None, f"{folders[iteration].name}: unsafe ({exc})"
        states[iteration] = status
        print(line, flush=True)
    if (src / LATEST_FILE).is_file():
        print(f"{LATEST_FILE}: {(src / LATEST_FILE).read_text().strip()}", flush=True)
    newest = states[max(states)]
    return 0 if newest is not None and newest.loadable else 1


def vae_osp_to_flat(args) -> Path:
    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.state_dict_adapter import load_open_sora_plan
    from megatron_video.training.export import save_flat

    cfg = WFVAEConfig.from_flavor(args.flavor) if args.flavor else None
    cfg, state = load_open_sora_plan(args.src, cfg, prefer_ema=not args.raw)
    return save_flat(args.dst, state, cfg)


def vae_flat_to_osp(args) -> Path:
    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.state_dict_adapter import save_open_sora_plan_folder
    from megatron_video.training.export import load_flat

    state, cfg_dict = load_flat(args.src)
    if cfg_dict is None:
        raise ValueError(f"{args.src} has no .json config beside it; it is not a flat VAE export of ours")
    save_open_sora_plan_folder(args.dst, state, WFVAEConfig(**cfg_dict))
    return Path(args.dst)


def _stage_arguments(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument(
        "--config",
        required=config_required,
        help="stage config YAML: model geometry, parallel layout, optimizer, EMA",
    )
    p.add_argument("--task", default="t2v", choices=["t2v", "i2v"])
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor_parallel=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("osp-to-flat", help="released v1.5 denoiser -> our flat export")
    p.add_argument("src")
    p.add_argument("dst", help="output path without suffix (writes .safetensors and .json)")
    p.add_argument("--flavor", default="8.5B")
    p.add_argument("--set", action="append", default=[], help="SUV config override field=value")
    p.set_defaults(run=osp_to_flat)
    p = sub.add_parser("flat-to-osp", help="our flat export -> released layout")
    p.add_argument("src")
    p.add_argument("dst", help=".pt or .safetensors")
    p.set_defaults(run=flat_to_osp)
    for name, run, what in (
        ("osp-to-checkpoint", osp_to_checkpoint, "released v1.5 denoiser (.pt / .safetensors)"),
        ("flat-to-checkpoint", flat_to_checkpoint, "our flat export (.safetensors + .json)"),
        ("dit-folder-to-checkpoint", dit_folder_to_checkpoint, "released v1.2 / v1.3 DiT folder"),
    ):
        p = sub.add_parser(name, help=f"{what} -> our training checkpoint (step 0) in the launched layout")
        p.add_argument("src", help=what)
        p.add_argument("dst", help="checkpoint directory to create (e.g. <stage dir>/checkpoints)")
        p.add_argument("--ema-src", default=None, help="EMA weights in the same format (default: SRC)")
        _stage_arguments(p)
        p.set_defaults(run=run)
    p = sub.add_parser("dit-folder-to-flat", help="released v1.2 / v1.3 DiT folder -> our flat export")
    p.add_argument("src", help="folder with config.json and diffusion_pytorch_model.safetensors (or .bin)")
    p.add_argument("dst", help="output path without suffix (writes .safetensors and .json)")
    p.add_argument("--set", action="append", default=[], help="DiT config override field=value")
    p.set_defaults(run=dit_folder_to_flat)
    p = sub.add_parser("dit-flat-to-folder", help="our flat DiT export -> released folder")
    p.add_argument("src")
    p.add_argument("dst", help="folder to write (config.json + diffusion_pytorch_model.safetensors)")
    p.set_defaults(run=dit_flat_to_folder)
    p = sub.add_parser("checkpoint-to-flat", help="our training checkpoint (any layout) -> flat export")
    p.add_argument("src", help="checkpoint directory (with `latest`) or one iter_* directory")
    p.add_argument("dst", help="output path without suffix (writes .safetensors and .json)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    _stage_arguments(p, config_required=False)
    p.set_defaults(run=checkpoint_to_flat)
    p = sub.add_parser("reshard", help="load a checkpoint under the launched layout; --out rewrites it")
    p.add_argument("src", help="checkpoint directory (with `latest`) or one iter_* directory")
    p.add_argument("--out", default=None, help="checkpoint directory to write for the launched layout")
    _stage_arguments(p)
    p.set_defaults(run=reshard)
    p = sub.add_parser("verify", help="report the state of every checkpoint under a save dir")
    p.add_argument("src", help="checkpoint directory (with `latest`) or one iter_* directory")
    p.set_defaults(run=verify)
    p = sub.add_parser("vae-osp-to-flat", help="released WF-VAE (.ckpt or folder) -> our flat VAE export")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--flavor", default=None, help="needed for a .ckpt (a folder carries its config)")
    p.add_argument("--raw", action="store_true", help="take the raw weights, not the EMA ones")
    p.set_defaults(run=vae_osp_to_flat)
    p = sub.add_parser(
        "vae-flat-to-osp", help="our flat VAE export -> released folder (config.json + weights)"
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(run=vae_flat_to_osp)
    return parser


def main(argv=None) -> int:
    """Run one command; errors propagate (CheckpointMismatch, ConfigError, FileNotFoundError, ...)."""
    parser = build_parser()
    # Overrides may come before or after the options (argparse alone takes them only before).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    out = args.run(args)
    if args.command == "verify":
        return out
    _main_print(f"wrote {out}" if getattr(args, "out", True) is not None else f"{out} loads")
    return 0


def _cli() -> int:
    import torch.distributed as dist

    from megatron_video.training.checkpoint_files import CheckpointIntegrityError
    from megatron_video.training.safe_load import UnsafeCheckpointError

    try:
        return main()
    except (
        CheckpointMismatch,
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        CheckpointIntegrityError,
        UnsafeCheckpointError,
    ) as e:
        print(f"convert_checkpoint: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_cli())
