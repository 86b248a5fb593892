"""WF-VAE encode and decode: time and peak memory, causal-cache chunked vs unchunked, by clip length.

Every cell (frames x encode/decode x chunked/unchunked) runs in a fresh Python process, so one
cell's allocations cannot hide another's. Memory is a resident-set (RSS) delta read from Linux
/proc: after one untimed warm-up call of the same cell (so one-time kernel setup is not counted),
the peak-RSS counter is reset (`/proc/self/clear_refs` <- 5), then the measured call runs and
memory = peak RSS during it (VmHWM) minus RSS just before it. It covers activations, the causal
caches and the output, but not the weights or the input. Workers run with a fixed glibc mmap
threshold, so freed tensors leave the resident set. Time is the wall time of that second call. fp32, `torch.set_num_threads(--threads)`.

    python benchmarks/vae.py                        # 17, 33, 65, 129 frames at 128x128, a few minutes
    python benchmarks/vae.py --quick                # 9 and 17 frames at 32x32: checks the script runs
    python benchmarks/vae.py --base-channels 160 --energy-flow 128   # the released WF-VAE-M width

The default network is the released WF-VAE-M (8x8x8, 32 latent channels) at a quarter of its width
(base 40 instead of 160), so the full table fits a 2-core CPU; chunk sizes are chosen per clip
length as Open-Sora-Plan v1.5 does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from megatron_video.models.wfvae.config import WFVAEConfig
from megatron_video.models.wfvae.model import WFVAE, auto_chunk_sizes
from megatron_video.testing.vae import randomize_vae


def _build(args) -> WFVAE:
    cfg = WFVAEConfig.from_flavor(
        args.flavor,
        base_channels=args.base_channels,
        encoder_energy_flow_hidden_size=args.energy_flow,
        decoder_energy_flow_hidden_size=args.energy_flow,
    )
    model = WFVAE(cfg)
    randomize_vae(model, seed=0)
    return model.eval()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(args) -> dict:
    """Run one cell in this process and return its measurements."""
    torch.set_num_threads(args.threads)
    model = _build(args)
    stride, z = model.temporal_stride, model.latent_channels
    h = w = args.size
    gen = torch.Generator().manual_seed(0)
    if args.op == "encode":
        x = torch.rand(1, 3, args.frames, h, w, generator=gen) * 2 - 1

        def call(inp):
            return model.encode(inp, chunked=args.chunked).moments

    else:
        t_lat = 1 + (args.frames - 1) // stride
        x = torch.randn(1, z, t_lat, h // 8, w // 8, generator=gen)

        def call(inp):
            return model.decode(inp, chunked=args.chunked)

    with torch.no_grad():
        out = call(x)  # warm-up: the same call, untimed
        del out
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        rss_before = _proc_status_bytes("VmRSS")
        start = time.perf_counter()
        out = call(x)
        seconds = time.perf_counter() - start
    peak = _proc_status_bytes("VmHWM")
    enc, dec = auto_chunk_sizes(args.frames, stride)
    return {
        "seconds": seconds,
        "peak_delta_mb": max(0, peak - rss_before) / 2**20,
        "output_mb": out.numel() * out.element_size() / 2**20,
        "chunk": (enc if args.op == "encode" else dec) if args.chunked else None,
    }


def run_cell(args, frames: int, op: str, chunked: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"--frames={frames}",
        f"--op={op}",
        f"--chunked={int(chunked)}",
        f"--size={args.size}",
        f"--flavor={args.flavor}",
        f"--base-channels={args.base_channels}",
        f"--energy-flow={args.energy_flow}",
        f"--threads={args.threads}",
    ]
    # Fixed glibc mmap threshold: large tensors are mmapped and unmapped when freed, so RSS tracks
    # live memory (glibc's default threshold grows after frees and keeps freed blocks resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"cell {frames} {op} chunked={chunked} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65, 129])
    parser.add_argument("--size", type=int, default=128, help="height = width in pixels (multiple of 8)")
    parser.add_argument("--flavor", default="wfvae_8x8x8_d32")
    parser.add_argument("--base-channels", type=int, default=40)
    parser.add_argument("--energy-flow", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=["encode", "decode"], help=argparse.SUPPRESS)
    parser.add_argument("--chunked", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.chunked, args.frames = bool(args.chunked), args.frames[0]
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.frames, args.size = [9, 17], 32

    print(
        f"WF-VAE {args.flavor} at base_channels={args.base_channels}, energy_flow={args.energy_flow}; "
        f"{args.size}x{args.size} pixels, batch 1, fp32, {args.threads} thread(s), torch {torch.__version__}"
    )
    print("MB = peak RSS during the call minus RSS before it (/proc VmHWM after a reset; fresh process per")
    print("cell, second call of the cell timed and measured after an untimed warm-up call)")
    print()
    header = f"{'frames':>6} {'op':>6} | {'unchunked s':>11} {'MB':>8} | {'chunked s':>9} {'MB':>8} {'chunk':>5} | {'output MB':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for op in ("encode", "decode"):
        for frames in args.frames:
            full = run_cell(args, frames, op, chunked=False)
            chunked = run_cell(args, frames, op, chunked=True)
            rows.append({"frames": frames, "op": op, "unchunked": full, "chunked": chunked})
            print(
                f"{frames:>6} {op:>6} | {full['seconds']:>11.2f} {full['peak_delta_mb']:>8.1f} | "
                f"{chunked['seconds']:>9.2f} {chunked['peak_delta_mb']:>8.1f} {chunked['chunk']:>5} | "
                f"{full['output_mb']:>9.1f}",
                flush=True,
            )
    print()
    print("chunk: pixel frames per encoder chunk / latent frames per decoder chunk (after frame 0).")
    print("Chunked memory is bounded by one chunk's activations plus the output (last column);")
    print("unchunked memory grows with every activation.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
