"""Command line shared by pretrain_t2v.py and pretrain_i2v.py."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch.distributed as dist


def parse_args(task: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"pretrain_{task}.py",
        description=f"Train the SUV denoiser ({task.upper()}) on Megatron core. Launch with torchrun or msrun.",
    )
    parser.add_argument("config", nargs="?", help="stage config YAML (inherits with `base:`)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. training.steps=100 parallel.tensor_parallel=2"
    )
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


def main(task: str, argv: list[str] | None = None) -> int:
    """Validate every config first, then train (a stage or a curriculum)."""
    from megatron_video.config import load_config
    from megatron_video.errors import ConfigError
    from megatron_video.training.stage import run_curriculum, run_stage

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(task, argv)
    try:
        if args.curriculum:
            overrides = [args.config, *args.overrides] if args.config else args.overrides
            run_curriculum(args.curriculum, overrides)
        else:
            cfg = load_config(args.config, args.overrides)
            run_stage(cfg, task, args.stage_dir or Path("outputs") / Path(args.config).stem)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
