"""Predicted vs measured peak memory of real training steps on CPU.

    python benchmarks/memory.py [--cases NAME,...] [--json out.json]

Each case builds the SUV at runtime.dtype=bf16 with Megatron's distributed optimizer and an EMA,
runs two Trainer steps (the first allocates the Adam moments, so the second is the steady state),
and compares the peak with `megatron_video.planning.memory` for the same layout. Multi-rank
layouts (TP, SP, CP, PP) run in gloo processes (`testing/distributed.py`); the busiest rank's peak
counts.

How the peak is measured: torch's profiler with `profile_memory=True` records every allocation
and free of the CPU allocator (c10) with the allocator's running total of live bytes
(`_ExtraFields_Allocation.total_allocated`). Profiling starts before the model is built, so the
total covers every tensor of the run (weights, DDP buffers, optimizer state, EMA, activations and
the temporaries inside kernels); the peak is its maximum, the CPU counterpart of
`torch.cuda.max_memory_allocated`. Memory outside the allocator (the Python heap, library code,
gloo buffers) is not a tensor and is not counted on either side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_video.testing.distributed import run_distributed  # noqa: E402

FLAVORS = {
    # The tiny flavor at 1,024 video tokens (activations dominate).
    "tiny": dict(flavor="tiny"),
    # A 48M-parameter SUV (D = 384, ten blocks): 191 MB as fp32, ~1 GB of weights, gradients, optimizer and EMA.
    "medium": dict(
        flavor="tiny",
        num_heads=6,
        head_dim=64,
        caption_channels=256,
        pooled_projection_dim=256,
        timestep_embed_dim=256,
    ),
}

SHAPES = {
    "tiny": dict(frames=4, height=32, width=32, text=16, micro_batch=2),
    "medium": dict(frames=4, height=32, width=32, text=32, micro_batch=1),
}

CASES: dict[str, dict] = {
    "tiny dense": dict(flavor="tiny", dense=True),
    "tiny skiparse": dict(flavor="tiny"),
    "tiny skiparse recompute=full": dict(flavor="tiny", recompute="full"),
    "tiny skiparse recompute=ffn": dict(flavor="tiny", recompute="ffn"),
    "tiny TP=2": dict(flavor="tiny", tp=2),
    "tiny TP=2 SP": dict(flavor="tiny", tp=2, sp=True),
    "tiny CP=2": dict(flavor="tiny", cp=2),
    "tiny PP=2 (2 micro-batches)": dict(flavor="tiny", pp=2, micro_batches=2),
    "medium skiparse": dict(flavor="medium"),
    "medium dense recompute=ffn": dict(flavor="medium", dense=True, recompute="ffn"),
    "medium skiparse recompute=full": dict(flavor="medium", recompute="full"),
    "medium TP=2 SP": dict(flavor="medium", tp=2, sp=True),
}
"""Name -> layout and model options of each measured case."""


def case_config(case: dict):
    """The ExperimentConfig of a case (world size = TP x CP x PP, DP = 1)."""
    from megatron_video.config import build_config

    shape = SHAPES[case["flavor"]]
    model = dict(FLAVORS[case["flavor"]], recompute=case.get("recompute", "none"))
    if case.get("dense"):
        model["sparse_n"] = [1, 1, 1, 1, 1]
    mb = shape["micro_batch"]
    data = {
        "model": model,
        "parallel": {
            "tensor_parallel": case.get("tp", 1),
            "sequence_parallel": case.get("sp", False),
            "context_parallel": case.get("cp", 1),
            "pipeline_parallel": case.get("pp", 1),
        },
        "runtime": {"dtype": "bf16"},
        "shape": {
            "num_frames": 1 + 8 * (shape["frames"] - 1),
            "height": shape["height"] * 8,
            "width": shape["width"] * 8,
            "text_length": shape["text"],
        },
        "training": {
            "micro_batch_size": mb,
            "global_batch_size": mb * case.get("micro_batches", 1),
            "ema_decay": 0.99,
            "optimizer": {"distributed_optimizer": True, "warmup_steps": 0},
        },
    }
    return build_config(data)


def world_size(case: dict) -> int:
    """Processes of a case."""
    return case.get("tp", 1) * case.get("cp", 1) * case.get("pp", 1)


class _Batches:
    """The same random micro-batch every time."""

    def __init__(self, cfg):
        from megatron_video.data.batches import TrainBatch

        m, s = cfg.model, cfg.shape
        t, h, w = cfg.latent_grid
        g = torch.Generator().manual_seed(0)
        mb = cfg.training.micro_batch_size
        self.batch = TrainBatch(
            torch.randn(mb, m.in_channels, t, h, w, generator=g),
            {
                "text_BLC": torch.randn(mb, s.text_length, m.caption_channels, generator=g),
                "pooled_BP": torch.randn(mb, m.pooled_projection_dim, generator=g),
            },
        )

    def next_batch(self):
        return self.batch


def _peak_bytes(prof) -> int:
    """Largest running total of live CPU-allocator bytes over the profiled region."""
    from torch._C._profiler import _EventType

    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            peak = max(peak, node.typed[1].total_allocated)
    return peak


def _measure(rank: int, world: int, case: dict) -> dict:
    """One rank of a case: build, two Trainer steps under the profiler; peak bytes and step seconds."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_video.parallel.pipeline import build_model_chunks
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import Runtime
    from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation
    from megatron_video.training.denoisers import build_model
    from megatron_video.training.loop import Trainer

    apply_megatron_cpu_adaptation()
    torch.set_num_threads(1)
    cfg = case_config(case)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rt = setup_parallel(cfg, Runtime(torch.device("cpu"), rank, world, rank))
        chunks = build_model_chunks(
            lambda blocks: build_model(cfg.model, rt.plan, "sdpa", None, blocks), cfg.model.total_layers
        )
        trainer = Trainer(cfg, rt, chunks if rt.pipeline_parallel > 1 else chunks[0])
        source = _Batches(cfg)
        trainer.train_step(source)
        start = time.perf_counter()
        trainer.train_step(source)
        seconds = time.perf_counter() - start
    return {"peak": _peak_bytes(prof), "step_s": seconds}


def predicted_bytes(case: dict) -> tuple[float, object]:
    """The planner's peak for a case, and its breakdown."""
    from megatron_video.planning.flops import video_tokens
    from megatron_video.planning.memory import memory_breakdown
    from megatron_video.planning.stage import layout_from_config

    cfg = case_config(case)
    # gloo copies the gradient bucket it reduce-scatters (NCCL / HCCL reduce in place)
    layout = dataclasses.replace(layout_from_config(cfg, world_size(case)), reduce_copies_bucket=True)
    breakdown = memory_breakdown(
        cfg.model, layout, video_tokens(cfg.model, cfg.latent_grid), cfg.shape.text_length
    )
    return breakdown.total, breakdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--json", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    rows = []
    print(f"{'case':34s} {'ranks':>5s} {'predicted MB':>13s} {'measured MB':>12s} {'error':>8s}", flush=True)
    for name in names:
        case = CASES[name]
        results = run_distributed(_measure, world_size(case), case, timeout_s=1800)
        measured = max(r["peak"] for r in results)
        predicted, _ = predicted_bytes(case)
        error = (predicted - measured) / measured
        rows.append(
            dict(case=name, ranks=world_size(case), predicted=predicted, measured=measured, error=error)
        )
        print(
            f"{name:34s} {world_size(case):5d} {predicted / 1e6:13.1f} {measured / 1e6:12.1f} {error:+8.1%}",
            flush=True,
        )
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"worst relative error: {worst['error']:+.1%} ({worst['case']}) over {len(rows)} cases")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
