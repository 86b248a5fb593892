"""Move weights between Open-Sora-Plan's released files, our training checkpoints and flat exports.

    # released v1.5 denoiser (model.pt / model_ema.pt / .safetensors, flat layout) -> our flat export
    python tools/convert_checkpoint.py osp-to-flat model_ema.pt out/suv --flavor 8.5B
    # our flat export -> released layout (.pt or .safetensors)
    python tools/convert_checkpoint.py flat-to-osp out/suv.safetensors model_ema.safetensors
    # our training checkpoint (any TP / DP it was saved with) -> flat export, raw or EMA weights
    python tools/convert_checkpoint.py checkpoint-to-flat run/checkpoints out/suv --ema --config stage.yaml
    # released WF-VAE (.ckpt or folder) <-> our flat VAE export
    python tools/convert_checkpoint.py vae-osp-to-flat wfvae_888_dim32.ckpt out/vae --flavor wfvae_8x8x8_d32
    python tools/convert_checkpoint.py vae-flat-to-osp out/vae.safetensors out/wfvae_folder

Loading is safe (safetensors, or torch.load with weights_only=True). Every mismatch is reported by
key and shape. Training checkpoints reshard on load, so a flat export from one layout loads into
any other; to change the TP / DP layout of a run, resume it with the new layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_video.models.suv.config import SUVConfig


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

    data = apply_overrides({"flavor": flavor}, overrides)
    from megatron_video.models.suv.config import FLAVORS

    return from_dict(SUVConfig, {**FLAVORS[flavor], **data})


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
    return write_weights(args.dst, to_open_sora_plan(state, SUVConfig(**cfg_dict)))


def checkpoint_to_flat(args) -> Path:
    """Load a training checkpoint into a one-process TP=1 model and export it."""
    from megatron_video.config import load_config
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.export import gather_full_state_dict, save_flat
    from megatron_video.training.loop import wrap_ddp
    from megatron_video.training.runtime import init_distributed, setup_parallel
    from megatron_video.training.stage import build_denoiser

    cfg = load_config(
        args.config, ["parallel.tensor_parallel=1", "parallel.context_parallel=1", "data.data_list=null"]
    )
    cfg.parallel.sequence_parallel = False
    runtime = setup_parallel(cfg, init_distributed(cfg))
    from megatron_video.training.ema import ParamEMA

    model = build_denoiser(cfg, runtime, args.task)
    ema = ParamEMA(model, 0.0)
    ckpt.load_checkpoint(
        args.src, [wrap_ddp(model, runtime.plan, False)], None, None, ema=ema, load_optimizer=False
    )
    tensors = ema.shadow if args.ema else None
    return save_flat(args.dst, gather_full_state_dict(model, runtime.plan, tensors), cfg.model)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    p = sub.add_parser("checkpoint-to-flat", help="our training checkpoint (any layout) -> flat export")
    p.add_argument("src", help="checkpoint directory (with `latest`)")
    p.add_argument("dst")
    p.add_argument("--config", required=True, help="the stage config the checkpoint was trained with")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--task", default="t2v", choices=["t2v", "i2v"])
    p.set_defaults(run=checkpoint_to_flat)
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
    args = parser.parse_args(argv)
    out = args.run(args)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
