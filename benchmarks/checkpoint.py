"""How long a checkpoint save blocks the training loop: synchronous vs background (async) saving.

Two gloo ranks (data parallel) train an SUV model of several hundred MB of
checkpoint (weights, EMA, Adam moments, fp32 main parameters) with `Trainer`, and save it with
`save_checkpoint`, alternately:

- sync: the loop waits for the whole save (write, flush, checksums, publish);
- async (`training.checkpoint.async_save`): the loop waits only for the snapshot and the fork of the
  writer process, then trains on, polling once per step; the time spent in those polls (and in the
  final publish) counts as blocked too.

Three cases are measured, one after the other: the distributed optimizer stored as
`fully_reshardable` (Megatron gathers each parameter's optimizer state to data-parallel rank 0 while
the state dict is built, inside the call, and that rank writes it all), the distributed optimizer as
`dp_reshardable` (`training.checkpoint.optimizer_format`: every rank writes its own shard, nothing is
gathered), and the plain optimizer (every rank holds its whole state; nothing is gathered).

Rounds alternate sync and async so that load from other processes reaches both alike; the table
gives medians over rounds, the blocking-time ratio async / sync, the steps trained while the
background write ran, and each rank's write throughput in the synchronous save (its share of the
checkpoint over its save time). On CPU both ranks share the cores with the writer processes, so the
loop's steps slow down while a background write runs; on a GPU node the writer uses host cores the
training step does not.

    python benchmarks/checkpoint.py                 # ~0.5 GB checkpoint, 3 rounds
    python benchmarks/checkpoint.py --quick         # small model, 1 round: checks that the script works
    python benchmarks/checkpoint.py --json out.json # also write every number as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_video.testing.distributed import run_distributed


class _SyntheticBatches:
    """Fixed random latents and captions (the data path is not what is measured)."""

    def __init__(self, cfg, dp_rank: int):
        from megatron_video.data.batches import TrainBatch

        m, g = cfg.model, torch.Generator().manual_seed(dp_rank)
        self.batch = TrainBatch(
            torch.randn(cfg.training.micro_batch_size, m.in_channels, 1, 8, 8, generator=g),
            {
                "text_BLC": torch.randn(cfg.training.micro_batch_size, 8, m.caption_channels, generator=g),
                "pooled_BP": torch.randn(cfg.training.micro_batch_size, m.pooled_projection_dim, generator=g),
            },
        )

    def next_batch(self):
        return self.batch


def _rank_main(
    rank,
    world_size,
    save_root: str,
    heads: int,
    head_dim: int,
    rounds: int,
    distributed_optimizer: bool,
    optimizer_format: str,
) -> dict:
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed
    from megatron_video.testing.models import tiny_config
    from megatron_video.training.async_save import BackgroundSaves
    from megatron_video.training.checkpoint import save_checkpoint
    from megatron_video.training.checkpoint_files import checkpoint_bytes
    from megatron_video.training.loop import Trainer
    from megatron_video.training.stage import build_denoiser

    cfg = tiny_config(num_heads=heads, head_dim=head_dim)
    cfg.training.global_batch_size = world_size
    cfg.training.ema_decay = 0.999
    cfg.training.optimizer.distributed_optimizer = distributed_optimizer
    runtime = setup_parallel(cfg, init_distributed(cfg.runtime))
    trainer = Trainer(cfg, runtime, build_denoiser(cfg, runtime, "t2v"))
    batches = _SyntheticBatches(cfg, runtime.data_parallel_rank)
    step_times = []
    for _ in range(2):  # warm-up; also creates the Adam state that the checkpoint holds
        start = time.perf_counter()
        trainer.train_step(batches)
        step_times.append(time.perf_counter() - start)

    def save(iteration: int, background=None):
        return save_checkpoint(
            save_root,
            iteration,
            trainer.model_chunks,
            trainer.optimizer,
            trainer.scheduler,
            trainer.train_state(),
            trainer.ema,
            keep_last=1,
            background=background,
            optimizer_format=optimizer_format,
        )

    background = BackgroundSaves()
    results = []
    iteration = 0
    for _ in range(rounds):
        iteration += 1
        dist.barrier()
        start = time.perf_counter()
        folder = save(iteration)
        sync_s = time.perf_counter() - start
        # This rank's data files, and the whole checkpoint (before the next save prunes it).
        written = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(f"__{rank}_"))
        size = checkpoint_bytes(folder)
        dist.barrier()

        iteration += 1
        dist.barrier()
        start = time.perf_counter()
        save(iteration, background)
        call_s = time.perf_counter() - start
        blocked, polls, last_poll = call_s, 0.0, 0.0
        steps = 0
        while background.in_flight:
            step_start = time.perf_counter()
            trainer.train_step(batches)
            steps += 1
            poll_start = time.perf_counter()
            background.poll()
            last_poll = time.perf_counter() - poll_start
            polls += last_poll
            step_times.append(poll_start - step_start)
        blocked += polls
        results.append(
            {
                "sync_s": sync_s,
                "async_blocked_s": blocked,
                "async_call_s": call_s,
                "async_publish_s": last_poll,
                "async_other_polls_s": polls - last_poll,
                "async_published_after_s": time.perf_counter() - start,
                "steps_during_write": steps,
                "rank_bytes": written,
                "checkpoint_bytes": size,
            }
        )
    background.wait()
    return {"rounds": results, "median_step_s": statistics.median(step_times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 1 round")
    parser.add_argument("--rounds", type=int, default=3, help="sync / async pairs (medians are reported)")
    parser.add_argument("--json", help="write every number here as JSON")
    args = parser.parse_args(argv)
    heads, head_dim, rounds = (4, 32, 1) if args.quick else (8, 64, args.rounds)

    report = {}
    cases = [
        ("distributed optimizer, fully_reshardable", True, "fully_reshardable"),
        ("distributed optimizer, dp_reshardable", True, "dp_reshardable"),
        ("plain optimizer", False, "fully_reshardable"),
    ]
    for name, distributed, optimizer_format in cases:
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as root:
            per_rank = run_distributed(
                _rank_main,
                2,
                str(Path(root) / "save"),
                heads,
                head_dim,
                rounds,
                distributed,
                optimizer_format,
                timeout_s=3600,
            )
        report[name] = per_rank
        _print_table(name, per_rank, rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _print_table(optimizer: str, per_rank: list[dict], rounds: int) -> None:
    def median(key: str, rank: int = 0) -> float:
        return statistics.median(r[key] for r in per_rank[rank]["rounds"])

    size = median("checkpoint_bytes")
    sync = max(median("sync_s", r) for r in range(2))  # the loop waits for the slower rank
    blocked = max(median("async_blocked_s", r) for r in range(2))
    print(f"\n{optimizer}: checkpoint {size / 2**20:.0f} MiB (2 ranks, DP=2), {rounds} round(s), medians")
    print(f"{'':32}{'seconds':>10}")
    print(f"{'sync save, loop blocked':32}{sync:>10.2f}")
    print(f"{'async save, loop blocked':32}{blocked:>10.2f}")
    print(f"{'  snapshot + fork (the call)':32}{median('async_call_s'):>10.2f}")
    print(f"{'  polls while writing':32}{median('async_other_polls_s'):>10.2f}")
    print(f"{'  publish (the last poll)':32}{median('async_publish_s'):>10.2f}")
    print(f"{'async save, published after':32}{median('async_published_after_s'):>10.2f}")
    print(f"blocking-time ratio async / sync: {blocked / sync:.3f} (goal <= 0.20)")
    print(
        f"steps trained during the background write: {median('steps_during_write'):.0f} "
        f"(median step {per_rank[0]['median_step_s']:.2f} s)"
    )
    for rank in range(2):
        rate = median("rank_bytes", rank) / median("sync_s", rank) / 2**20
        print(f"rank {rank} write throughput (sync save): {rate:.0f} MiB/s")


if __name__ == "__main__":
    main()
