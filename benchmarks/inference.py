"""Time per denoising step: serial vs CFG-parallel vs Ulysses sequence parallel (and TP), as ratios.

For each flavor, every layout samples the same prompt with classifier-free guidance through
`megatron_video.inference.pipeline.sample_latents` (random weights, fp32 on CPU or the runtime
dtype on a GPU; a seeded stand-in replaces the text encoder, whose cost is outside the loop):

    serial        1 process: conditional and unconditional branch in one batch of 2
    cfg_parallel  2 processes: one branch each, predictions all-gathered every step
    sp2           2 processes: Ulysses context parallel over latent frames, batch of 2
    tp2           2 processes: tensor parallel (with sequence parallel), batch of 2

The layouts of one flavor run one after the other in this one invocation, with the same thread
budget in total (`--threads`, split evenly over a layout's processes on CPU), so the ratios
compare like with like. Each run's time is the median of its steps after `--warmup` untimed ones; every layout runs\n`--rounds` times, in a rotated order each round, and the median run is reported.

    python benchmarks/inference.py                          # tiny and 2B at 25x128x128, CPU
    python benchmarks/inference.py --flavors tiny --quick   # seconds: checks that the script works
    python benchmarks/inference.py --json out.json          # also write every number as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

LAYOUTS = {
    "serial": dict(world=1, tp=1, cp=1, cfg_parallel=False),
    "cfg_parallel": dict(world=2, tp=1, cp=1, cfg_parallel=True),
    "sp2": dict(world=2, tp=1, cp=2, cfg_parallel=False),
    "tp2": dict(world=2, tp=2, cp=1, cfg_parallel=False),
}

VAE_STRIDES = (8, 8)
"""Temporal and spatial compression of the WF-VAE the flavors are paired with (8x8x8)."""


class _RandomText:
    """Seeded text embeddings of a fixed length, standing in for the text encoder pair."""

    def __init__(self, length: int, channels: int, pooled: int):
        self.length, self.channels, self.pooled = length, channels, pooled

    def encode_texts(self, texts):
        from megatron_video.models.text.encoders import TextEmbeddings

        gen = torch.Generator().manual_seed(len(texts))
        b = len(texts)
        return TextEmbeddings(
            torch.randn(b, self.length, self.channels, generator=gen),
            torch.ones(b, self.length),
            torch.randn(b, self.pooled, generator=gen),
        )


def _worker(rank, world_size, flavor, layout, args):
    from megatron.core import parallel_state

    from megatron_video.config import build_config
    from megatron_video.inference.pipeline import (
        SamplingConfig,
        StepTimer,
        build_inference_groups,
        sample_latents,
    )
    from megatron_video.models.suv.model import SUVModel
    from megatron_video.parallel.setup import build_parallel_plan
    from megatron_video.testing.distributed import init_megatron_parallel

    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads // world_size))
    else:
        torch.cuda.set_device(device)
    init_megatron_parallel(tp=layout["tp"], cp=layout["cp"])
    cfg = build_config(
        {
            "model": {"flavor": flavor},
            "parallel": {
                "tensor_parallel": layout["tp"],
                "context_parallel": layout["cp"],
                "sequence_parallel": layout["tp"] > 1,
            },
            "runtime": {"dtype": "fp32" if device.type == "cpu" else args.gpu_dtype},
        }
    )
    build_start = time.perf_counter()
    model = SUVModel(cfg.model, build_parallel_plan(cfg), attention_backend="auto").to(device).eval()
    build_s = time.perf_counter() - build_start
    m = cfg.model
    lat_t = 1 + (args.frames - 1) // VAE_STRIDES[0]
    shape = (m.in_channels, lat_t, args.height // VAE_STRIDES[1], args.width // VAE_STRIDES[1])
    text = _RandomText(args.text_length, m.caption_channels, m.pooled_projection_dim)
    steps = args.warmup + args.steps
    sc = SamplingConfig(steps=steps, guidance_scale=7.0, guidance_rescale=0.7, shift=7.0)
    groups = build_inference_groups(model.plan, layout["cfg_parallel"])
    timer = StepTimer(steps, False)
    if device.type == "cuda":
        torch.cuda.synchronize()

        def progress(done, total):
            torch.cuda.synchronize()
            timer(done, total)
    else:
        progress = timer
    sample_latents(model, text, ["a benchmark prompt"], sc, shape, [0], None, groups, progress=progress)
    parallel_state.destroy_model_parallel()
    params = sum(p.numel() for p in model.parameters())
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "step_s": statistics.median(timer.times[args.warmup :]),
        "params_per_rank": params,
        "peak_gib": peak,
        "build_s": build_s,
        "tokens": lat_t * shape[2] * shape[3] // (m.patch_size**2 * m.patch_size_t),
    }


def main() -> None:
    from megatron_video.testing.distributed import run_distributed

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flavors", default="tiny,2B")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--frames", type=int, default=25, help="pixel frames (latent frames 1 + (F-1)/8)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--text-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every layout (median reported)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads over all processes"
    )
    parser.add_argument("--gpu-dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="tiny flavor, 2 steps, 9x64x64")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    if args.quick:
        args.flavors, args.steps, args.rounds = "tiny", 2, 1
        args.frames, args.height, args.width, args.text_length = 9, 64, 64, 16
    where = (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else (f"CPU, {args.threads} threads in total")
    )
    print(f"# {args.frames}x{args.height}x{args.width} px, text {args.text_length} tokens, CFG on; {where}")
    print(
        f"{'flavor':>6} {'layout':>13} {'procs':>5} {'tokens':>6} {'s/step':>9} {'speed-up':>8} {'peak GiB/rank':>13}"
    )
    rows = []
    names = args.layouts.split(",")
    for flavor in args.flavors.split(","):
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.rounds):
            # Rotate the order each round, so slow phases of a shared machine reach every layout.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                layout = LAYOUTS[name]
                results = run_distributed(_worker, layout["world"], flavor, layout, args, timeout_s=3600)
                # The slowest rank sets the pace.
                runs[name].append(
                    {
                        **results[0],
                        "step_s": max(x["step_s"] for x in results),
                        "peak_gib": max(x["peak_gib"] for x in results),
                    }
                )
        serial = statistics.median(x["step_s"] for x in runs["serial"]) if "serial" in runs else None
        for name in names:
            layout = LAYOUTS[name]
            step = statistics.median(x["step_s"] for x in runs[name])
            row = dict(flavor=flavor, layout=name, **layout, **runs[name][0])
            row.update(step_s=step, rounds=[x["step_s"] for x in runs[name]])
            row["speedup_vs_serial"] = serial / step if serial else None
            rows.append(row)
            ratio = f"{row['speedup_vs_serial']:.2f}x" if serial else "-"
            print(
                f"{flavor:>6} {name:>13} {layout['world']:>5} {row['tokens']:>6} {step:>9.4f} {ratio:>8} "
                f"{row['peak_gib']:>13.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
