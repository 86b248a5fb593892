"""Reconstruction quality and speed of a WF-VAE: PSNR, SSIM (torchmetrics' definition), LPIPS (local weights only).

    python tools/eval_vae.py --weights outputs/tiny/vae/final_ema.safetensors \
        --data-list outputs/tiny/data/data.txt --num-frames 9 --short-side 64 --crop 64
    python tools/eval_vae.py --weights /path/to/open_sora_plan/vae --videos /path/to/clips/   # report protocol

Protocol (Open-Sora-Plan report defaults): the first `--num-frames` (33) consecutive frames of each
clip, resized so the short side is `--short-side` (256, bilinear, antialiased), centre-cropped to
`--crop` x `--crop` (256); encode, take the posterior mean, decode, clamp to [-1, 1]. PSNR and SSIM
are computed per frame on [0, 1] (SSIM: Gaussian window 11, sigma 1.5) and averaged over frames,
then clips. LPIPS (AlexNet by default, as the report's metric) needs `--lpips-backbone`, a local
torchvision ImageNet state dict; nothing is downloaded. Clips shorter than the protocol are skipped
and counted. Images are evaluated only with --num-frames 1.

Weights: our flat export (`.safetensors` beside its `.json`), one of our training checkpoints
(`checkpoints/iter_<n>/vae_train_state.pt`), an Open-Sora-Plan folder (config.json + weights) or an Open-Sora-Plan
training `.ckpt` (give `--flavor`). Timings exclude a warm-up pass and are per clip at batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass
class Clip:
    """One source to evaluate: a video (first frame `start`, `frames` long, or 0 if unknown) or an image."""

    path: str
    start: int = 0
    frames: int = 0
    crop: tuple[int, int, int, int] | None = None
    is_image: bool = False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="flat export, training checkpoint, OSP folder or .ckpt")
    p.add_argument("--flavor", default=None, help="WF-VAE preset for weights without a config (OSP .ckpt)")
    p.add_argument("--no-ema", action="store_true", help="take the non-EMA weights of a checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder of videos (searched recursively)")
    src.add_argument("--data-list", help="annotation data.txt (as for training)")
    p.add_argument("--num-frames", type=int, default=33, help="consecutive frames per clip (1 + k * stride)")
    p.add_argument("--short-side", type=int, default=256, help="resize the short side to this, in pixels")
    p.add_argument("--crop", type=int, default=256, help="centre crop size in pixels (multiple of 8)")
    p.add_argument("--max-clips", type=int, default=None, help="evaluate at most this many clips")
    p.add_argument("--lpips-backbone", default=None, help="local torchvision alexnet/vgg16 state dict")
    p.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex")
    p.add_argument("--lpips-heads", default=None, help="LPIPS v0.1 heads (default: torchmetrics' copy)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--no-chunked", action="store_true", help="encode/decode whole clips (no causal chunks)")
    p.add_argument("--name", default=None, help="model label in the table (default: the weights' name)")
    p.add_argument("--per-clip", action="store_true", help="also print one row per clip")
    p.add_argument("--latent-stats", action="store_true", help="print per-channel latent shift / scale")
    p.add_argument("--save-dir", default=None, help="write the reconstructions here as mp4")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.crop % 8 or args.crop > args.short_side:
        p.error(f"--crop {args.crop} must be a multiple of 8 and at most --short-side {args.short_side}")
    return args


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def load_vae(weights: str | Path, flavor: str | None = None, use_ema: bool = True):
    """(WFVAE in eval mode, its config) from any supported weights format."""
    from megatron_video.errors import ConfigError
    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.model import WFVAE
    from megatron_video.models.wfvae.state_dict_adapter import load_open_sora_plan

    path = Path(weights)
    if path.suffix == ".safetensors" or path.with_suffix(".safetensors").is_file():
        from megatron_video.training.export import load_flat

        state, saved = load_flat(path)
        if saved is not None:
            cfg = WFVAEConfig(**saved)
        elif flavor:
            cfg = WFVAEConfig.from_flavor(flavor)
        else:
            raise ConfigError(f"{path} has no .json config beside it; pass --flavor")
    elif path.suffix == ".pt":
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = WFVAEConfig(**ckpt["wfvae_config"])
        state = dict(ckpt["generator"])
        if use_ema and ckpt.get("ema"):
            state.update(ckpt["ema"])
    elif path.is_dir():
        cfg, state = load_open_sora_plan(path, prefer_ema=use_ema)
    else:
        if not flavor:
            raise ConfigError(f"{path} carries no config; pass --flavor (e.g. wfvae_8x8x8_d32)")
        cfg, state = load_open_sora_plan(path, WFVAEConfig.from_flavor(flavor), prefer_ema=use_ema)
    vae = WFVAE(cfg)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return vae.eval().requires_grad_(False), cfg


# --------------------------------------------------------------------------------------------------
# Clips
# --------------------------------------------------------------------------------------------------


def list_clips(videos: str | None, data_list: str | None) -> list[Clip]:
    """Clips of a folder (sorted paths) or of an annotation data list (entry order)."""
    if videos is not None:
        root = Path(videos)
        if not root.is_dir():
            raise FileNotFoundError(f"--videos: no folder at {root}")
        return [Clip(str(p)) for p in sorted(root.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES]
    from megatron_video.data.annotations import load_annotations

    entries, _ = load_annotations(data_list)
    return [Clip(e.path, e.cut[0] if e.cut else 0, e.num_frames or 0, e.crop, e.is_image) for e in entries]


def read_clip(clip: Clip, num_frames: int, short_side: int, crop: int) -> torch.Tensor | None:
    """[3, T, crop, crop] in [-1, 1] by the protocol, or None when the clip is too short."""
    from megatron_video.data.resolution import crop as crop_box
    from megatron_video.data.resolution import resize
    from megatron_video.data.video_io import probe_video, read_image, read_video_frames

    if clip.is_image:
        frames = read_image(clip.path, crop=clip.crop)
    else:
        available = clip.frames or probe_video(clip.path).num_frames
        if 0 < available < num_frames:
            return None
        frames = read_video_frames(clip.path, range(clip.start, clip.start + num_frames), crop=clip.crop)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)  # [T, 3, H, W]
    h, w = video.shape[-2:]
    scale = short_side / min(h, w)
    size = (max(short_side, round(h * scale)), max(short_side, round(w * scale)))
    video = resize(video, size, mode="bilinear")
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    video = crop_box(video, (top, left, crop, crop)).clamp(0.0, 1.0)
    return video.mul(2.0).sub(1.0).permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frame_metrics(video_CTHW: torch.Tensor, recon_CTHW: torch.Tensor, lpips=None) -> dict[str, float]:
    """Per-frame PSNR / SSIM (/ LPIPS) averaged over frames; inputs in [-1, 1]."""
    from megatron_video.evaluation.image_metrics import psnr, ssim

    x = (video_CTHW.transpose(0, 1).float() + 1) / 2  # [T, 3, H, W] in [0, 1]
    y = (recon_CTHW.transpose(0, 1).float().clamp(-1, 1) + 1) / 2
    out = {"psnr": psnr(y, x).mean().item(), "ssim": ssim(y, x).mean().item()}
    if lpips is not None:
        out["lpips"] = lpips(x * 2 - 1, y * 2 - 1).mean().item()
    return out


def evaluate(args: argparse.Namespace) -> dict:
    """Run the protocol over every clip; returns the summary, per-clip rows and skip counts."""
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    from megatron_video.data.video_io import MediaReadError

    vae, cfg = load_vae(args.weights, args.flavor, use_ema=not args.no_ema)
    vae.to(device)
    lpips = None
    if args.lpips_backbone:
        from megatron_video.training.vae_losses import load_lpips

        lpips = load_lpips(args.lpips_net, args.lpips_backbone, args.lpips_heads).to(device)
    if not vae.valid_num_frames(args.num_frames):
        raise SystemExit(
            f"--num-frames {args.num_frames}: this VAE takes 1 + k * {vae.temporal_stride} frames"
        )
    chunked = False if args.no_chunked else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    skipped: dict[str, int] = {}
    rows, times, latents = [], {"encode": [], "decode": []}, []
    clips = list_clips(args.videos, args.data_list)
    for clip in clips:
        if args.max_clips is not None and len(rows) >= args.max_clips:
            break
        if clip.is_image and args.num_frames != 1:
            skipped["images"] = skipped.get("images", 0) + 1
            continue
        try:
            video = read_clip(clip, args.num_frames, args.short_side, args.crop)
        except MediaReadError as e:
            print(f"skipping {clip.path}: {e}", file=sys.stderr)
            video, why = None, "unreadable"
        else:
            why = f"shorter than {args.num_frames} frames"
        if video is None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        x = video[None].to(device)
        with torch.no_grad(), autocast:
            if not rows:  # warm-up pass, not timed
                vae.decode(vae.encode(x, chunked=chunked).mean, chunked=chunked)
            _sync(device)
            t0 = time.perf_counter()
            z = vae.encode(x, chunked=chunked).mean
            _sync(device)
            t1 = time.perf_counter()
            recon = vae.decode(z, chunked=chunked)
            _sync(device)
            t2 = time.perf_counter()
        times["encode"].append(t1 - t0)
        times["decode"].append(t2 - t1)
        latents.append(z.float().cpu())
        row = {"clip": clip.path, **frame_metrics(x[0], recon[0], lpips)}
        rows.append(row)
        if args.save_dir:
            from megatron_video.data.video_io import video_to_uint8, write_video

            out = Path(args.save_dir) / f"{len(rows):03d}_{Path(clip.path).stem}.mp4"
            write_video(out, torch.cat([video_to_uint8(x[0]), video_to_uint8(recon[0])], dim=2), 8.0)
    if not rows:
        raise SystemExit(f"no clip fits the protocol ({skipped or 'no clips found'})")
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "lpips") if k in rows[0]}
    summary["encode_s"] = sum(times["encode"]) / len(rows)
    summary["decode_s"] = sum(times["decode"]) / len(rows)
    summary["encode_fps"] = args.num_frames / summary["encode_s"]
    summary["decode_fps"] = args.num_frames / summary["decode_s"]
    result = {
        "model": args.name or Path(args.weights).stem,
        "flavor": cfg.flavor,
        "compression": f"{cfg.temporal_stride}x{cfg.spatial_stride}x{cfg.spatial_stride}",
        "latent_dim": cfg.latent_dim,
        "clips": len(rows),
        "skipped": skipped,
        "protocol": {
            "num_frames": args.num_frames,
            "short_side": args.short_side,
            "crop": args.crop,
            "dtype": args.dtype,
            "device": device.type,
            "chunked": not args.no_chunked and cfg.chunked,
        },
        "summary": summary,
        "per_clip": rows,
    }
    if args.latent_stats:
        flat = torch.cat([z.transpose(0, 1).reshape(z.shape[1], -1) for z in latents], dim=1)
        result["latent_shift"] = flat.mean(dim=1).tolist()
        result["latent_scale"] = (1.0 / flat.std(dim=1)).tolist()
    return result


def format_report(result: dict, per_clip: bool = False) -> str:
    """The Open-Sora-Plan-style table (and optional per-clip rows) as markdown text."""
    p, s = result["protocol"], result["summary"]
    skipped = ", ".join(f"{n} {why}" for why, n in result["skipped"].items())
    lpips = f"{s['lpips']:.4f}" if "lpips" in s else "n/a"
    lines = [
        f"WF-VAE reconstruction: {result['clips']} clips" + (f" (skipped: {skipped})" if skipped else ""),
        f"protocol: first {p['num_frames']} frames, short side {p['short_side']}, centre crop "
        f"{p['crop']}x{p['crop']}, posterior mean, {p['dtype']} on {p['device']}"
        f"{', chunked' if p['chunked'] else ''}",
        "",
        "| Model | Compress | Chn | PSNR ↑ | SSIM ↑ | LPIPS ↓ | Encode s/clip | Decode s/clip |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['model']} ({result['flavor']}) | {result['compression']} | {result['latent_dim']} | "
        f"{s['psnr']:.2f} | {s['ssim']:.4f} | {lpips} | {s['encode_s']:.3f} | {s['decode_s']:.3f} |",
        "",
        f"throughput (batch 1): encode {s['encode_fps']:.1f} frames/s, decode {s['decode_fps']:.1f} frames/s",
    ]
    if "lpips" not in s:
        lines.append("LPIPS: n/a (give --lpips-backbone, a local torchvision alexnet / vgg16 state dict)")
    if per_clip:
        lines += ["", "| Clip | PSNR | SSIM | LPIPS |", "|---|---|---|---|"]
        for r in result["per_clip"]:
            lp = f"{r['lpips']:.4f}" if "lpips" in r else "n/a"
            lines.append(f"| {Path(r['clip']).name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {lp} |")
    if "latent_shift" in result:
        fmt = lambda v: "[" + ", ".join(f"{x:.4f}" for x in v) + "]"  # noqa: E731
        lines += [
            "",
            f"latent shift: {fmt(result['latent_shift'])}",
            f"latent scale: {fmt(result['latent_scale'])}",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_video.platform.quiet import install_output_filters

    install_output_filters()  # known third-party fall-back notices, once per process
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args)
    print(format_report(result, args.per_clip))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
