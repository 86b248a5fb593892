"""The data side of a stage's reporting: the start-up summary of what was kept and skipped (WARNING on
the main rank; its numbers as `data/...` keys of the run's first step record in metrics.jsonl and
TensorBoard) and per-step data metrics.

Per step (as torchtitan and Megatron log them): `data_wait_s` (seconds the step waited for loaded
micro-batches; the slowest data-parallel rank), `data_wait_share` (of the step's wall time),
`encode_s` / `encode_share` (the frozen VAE and text encoder, when they run in the step), and
`load_failures` (samples that failed to load and were replaced, counted in the DataLoader workers,
summed over data-parallel ranks).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megatron_video.data.index.report import data_summary

logger = logging.getLogger(__name__)


def announce_data(dataset, global_batch_size: int, is_main: bool) -> dict[str, float]:
    """Log the summary of `dataset` (a VideoTextDataset) at WARNING on the main rank; its metrics."""
    text, metrics = data_summary(dataset, global_batch_size)
    if is_main:
        logger.warning("%s", text)
    return metrics


def step_data_metrics(batches, group, step_seconds: float) -> dict[str, float]:
    """Data metrics of the step just taken from `batches.stats` (empty when the source keeps none),
    plus, on the first call, the start-up summary `batches.data_summary`; a collective over `group`
    (the data-parallel group): every rank calls it."""
    summary = getattr(batches, "data_summary", None) or {}
    if summary:
        batches.data_summary = None
    stats = getattr(batches, "stats", None)
    if stats is None:
        return dict(summary)
    values = stats.take()
    failures = torch.tensor([float(values.get("load_failures", 0))], dtype=torch.float64)
    times = torch.tensor([values.get("data_wait_s", 0.0), values.get("encode_s", 0.0)], dtype=torch.float64)
    if dist.is_initialized() and group is not None:
        dist.all_reduce(failures, group=group)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    wait, encode = times.tolist()
    metrics = {
        "load_failures": int(failures.item()),
        "data_wait_s": wait,
        "data_wait_share": wait / max(step_seconds, 1e-9),
    }
    if "encode_s" in values:
        metrics["encode_s"] = encode
        metrics["encode_share"] = encode / max(step_seconds, 1e-9)
    return {**metrics, **summary}
