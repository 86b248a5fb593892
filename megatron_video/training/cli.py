"""Command lines of the entry scripts: pretrain_t2v.py and pretrain_i2v.py (`main`), pretrain_vae.py
(`vae_main`). Each parses a config path and dotted overrides, validates before any process group
starts, and exits with code 2 and the message on a ConfigError (`run_entry_point`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist


def _config_arguments(
    parser: argparse.ArgumentParser, what: str, example: str, optional: bool = False
) -> None:
    """The positional config YAML and its dotted overrides."""
    parser.add_argument(
        "config", nargs="?" if optional else None, help=f"{what} YAML (inherits with `base:`)"
    )
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


def run_entry_point(body: Callable[[], None]) -> int:
    """Run an entry script's body; return its exit code: 0 (also after a pre-emption that saved the
    run, see training/preemption.py), or 2 after printing a ConfigError.

    A default process group the body started is destroyed at the end; a caller's (notebook, test)
    is left alone.
    """
    from megatron_video.platform.megatron_import import import_megatron_core
    from megatron_video.platform.quiet import install_output_filters

    install_output_filters()  # before megatron is imported: its fall-back notices are known noise
    import_megatron_core()
    from megatron_video.errors import ConfigError
    from megatron_video.training.preemption import Preempted

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    caller_group = dist.is_initialized()
    try:
        body()
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"pre-empted by {e}", file=sys.stderr, flush=True)
        return 0
    finally:
        if dist.is_initialized() and not caller_group:
            dist.destroy_process_group()
    return 0


def parse_args(task: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"pretrain_{task}.py",
        description=f"Train the model.family denoiser ({task.upper()}) on Megatron core. Launch with torchrun or msrun.",
    )
    _config_arguments(parser, "stage config", "training.steps=100 parallel.tensor_parallel=2", optional=True)
    parser.add_argument("--curriculum", help="curriculum YAML listing stages to run in order")
    parser.add_argument(
        "--stage-dir", default=None, help="output folder of a single stage (default outputs/<config name>)"
    )
    args = parser.parse_args(argv)
    if not args.config and not args.curriculum:
        parser.error("give a stage config or --curriculum")
    if args.curriculum and args.config and "=" not in args.config:
        parser.error("give either a stage config or --curriculum, not both")
    return args


def check_inputs(cfg, produced: tuple[Path, ...] = ()) -> None:
    """Fail before any process group starts when a file the stage reads is missing, or a checkpoint
    path names something that is not one.

    `produced`: folders earlier stages of the same curriculum write (their outputs need not exist yet).
    """
    from megatron_video.errors import ConfigError
    from megatron_video.training.checkpoint_files import (
        checkpoint_source_problem,
        save_dir_problem,
        weights_source_problem,
    )

    def later(path: Path) -> bool:
        return any(path.resolve().is_relative_to(d.resolve()) for d in produced)

    wanted = []
    if cfg.vae.checkpoint and cfg.features.cache_dir is None:
        wanted.append(
            ("vae.checkpoint", cfg.vae.checkpoint, "train one with pretrain_vae.py, or set vae.checkpoint")
        )
    if cfg.data.data_list and cfg.features.cache_dir is None:
        wanted.append(
            ("data.data_list", cfg.data.data_list, "prepare the data list (tools/prepare_demo_data.py)")
        )
    if cfg.data.index and cfg.features.cache_dir is None:
        wanted.append(("data.index", cfg.data.index, "build it with tools/build_index.py DATA_TXT OUT_DIR"))
    for field, value, fix in wanted:
        path = Path(value)
        if field == "vae.checkpoint" and path.suffix == "" and path.with_suffix(".safetensors").is_file():
            continue
        if not path.exists() and not later(path):
            raise ConfigError(f"{field}={value} does not exist; {fix}")

    c = cfg.training.checkpoint
    problems = []
    if c.init_from and c.init_from != "previous" and not later(Path(c.init_from)):
        problems.append(weights_source_problem(c.init_from, "training.checkpoint.init_from"))
    if c.load_dir:
        problems.append(checkpoint_source_problem(c.load_dir, "training.checkpoint.load_dir"))
    if c.save_dir:
        problems.append(save_dir_problem(c.save_dir, "training.checkpoint.save_dir"))
    for problem in problems:
        if problem:
            raise ConfigError(problem)


def main(task: str, argv: list[str] | None = None) -> int:
    """Validate every config first, then train (a stage or a curriculum)."""
    args = parse_args(task, argv)

    def body() -> None:
        from megatron_video.config import load_config
        from megatron_video.training.denoisers import inpaint_mask_channels
        from megatron_video.training.stage import run_curriculum, run_stage, stage_configs

        if args.curriculum:
            overrides = [args.config, *args.overrides] if args.config else args.overrides
            produced: tuple[Path, ...] = ()
            for spec, cfg, stage_dir in stage_configs(args.curriculum, overrides):
                check_inputs(cfg, produced)
                inpaint_mask_channels(cfg, spec.task)  # the task's model fits the VAE (v1.2 I2V)
                produced += (stage_dir,)
            run_curriculum(args.curriculum, overrides)
        else:
            cfg = load_config(args.config, args.overrides)
            check_inputs(cfg)
            inpaint_mask_channels(cfg, task)
            run_stage(cfg, task, args.stage_dir or Path("outputs") / Path(args.config).stem)

    return run_entry_point(body)


def vae_main(argv: list[str] | None = None) -> int:
    """pretrain_vae.py: validate the config, join the launcher's process group, train the WF-VAE."""
    parser = argparse.ArgumentParser(
        prog="pretrain_vae.py",
        description="Train a WF-VAE (L1 + KL + wavelet + 3D PatchGAN) with data parallelism. "
        "Launch with torchrun or msrun.",
    )
    _config_arguments(parser, "VAE training config", "steps=200 optim.lr=1e-4 output_dir=outputs/vae")
    args = parser.parse_args(argv)

    def body() -> None:
        from megatron_video.config.vae_training import load_vae_train_config

        cfg = load_vae_train_config(args.config, args.overrides)  # before the heavy imports below
        from megatron_video.platform.launch import init_distributed
        from megatron_video.training.vae_trainer import run_training

        run_training(cfg, init_distributed(cfg.runtime).device)

    return run_entry_point(body)
