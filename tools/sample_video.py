"""Generate videos from a trained SUV model: T2V from prompts, I2V from condition images.

    torchrun --nproc_per_node N tools/sample_video.py --config STAGE.yaml --weights final_ema.safetensors \
        --prompt "a red car drives down a street" [--image first.jpg [--image last.jpg]] \
        [--num-frames 9 --height 64 --width 64 --steps 20 --guidance-scale 4 --seed 0] --out-dir samples/

The stage config gives the model geometry, VAE, text encoder and parallel layout (tensor and
context parallel split one video over the ranks); every rank runs the sampler, rank 0 writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage config YAML (model, vae, text, parallel)")
    p.add_argument("--weights", required=True, help="flat export (.safetensors beside its .json)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument(
        "--image", action="append", default=[], help="condition image(s): one = i2v, two = transition"
    )
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--shift", type=float, default=7.0)
    p.add_argument("--linear-quadratic", action="store_true")
    p.add_argument("--guidance-scale", type=float, default=8.0)
    p.add_argument("--guidance-rescale", type=float, default=0.7)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--out-dir", default="samples")
    return p.parse_args(argv)


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """An image as [3, H, W] in [-1, 1], centre-cropped to the aspect and resized."""
    import numpy as np
    from PIL import Image

    from megatron_video.data.resolution import center_crop_resize

    img = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
    out = center_crop_resize(img, (height, width))
    return out[0].float() / 127.5 - 1 if out.dtype == torch.uint8 else out[0].float().clamp(-1, 1)


def main(argv=None) -> int:
    from megatron_video.config import load_config
    from megatron_video.inference.pipeline import SamplingConfig, generate, write_videos
    from megatron_video.training.export import load_flat, load_full_into
    from megatron_video.training.runtime import init_distributed, setup_parallel
    from megatron_video.training.stage import build_denoiser, build_text_encoder, build_vae

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("give --prompt or --prompts-file", file=sys.stderr)
        return 2
    if cfg.parallel.pipeline_parallel > 1:
        print(
            "sampling splits one video with tensor and context parallel; set parallel.pipeline_parallel=1",
            file=sys.stderr,
        )
        return 2
    runtime = setup_parallel(cfg, init_distributed(cfg))
    task = "i2v" if args.image else "t2v"
    model = build_denoiser(cfg, runtime, task).eval()
    full, _ = load_flat(args.weights)
    missing = load_full_into(model, runtime.plan, full)
    if missing:
        raise KeyError(f"{args.weights} lacks {sorted(missing)} (an I2V sample needs I2V weights)")
    vae = build_vae(cfg.vae, runtime.device)
    text = build_text_encoder(cfg, runtime.device)
    sc = SamplingConfig(
        num_frames=args.num_frames or cfg.data.num_frames,
        height=args.height or cfg.data.max_height,
        width=args.width or cfg.data.max_width,
        steps=args.steps,
        shift=args.shift,
        linear_quadratic=args.linear_quadratic,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        seed=args.seed,
        fps=args.fps or cfg.data.train_fps,
    )
    if args.negative_prompt is not None:
        sc.negative_prompt = args.negative_prompt
    frames = None
    if args.image:
        cond = torch.stack([load_image(p, sc.height, sc.width) for p in args.image])
        frames = [cond] * len(prompts)

    def progress(i, n):
        if runtime.is_main and (i == n or i % max(1, n // 5) == 0):
            print(f"  step {i}/{n}", flush=True)

    import time

    start = time.perf_counter()
    videos = generate(model, vae, text, prompts, sc, frames, progress)
    elapsed = time.perf_counter() - start
    if runtime.is_main:
        out = Path(args.out_dir)
        paths = write_videos(videos, [out / f"sample_{i:03d}.mp4" for i in range(len(prompts))], sc.fps)
        for path, prompt in zip(paths, prompts):
            print(f"wrote {path}: {prompt}")
        print(f"{elapsed:.1f} s for {len(prompts)} video(s), {elapsed / sc.steps:.2f} s per step")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
