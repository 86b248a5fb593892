"""The frame and resolution rules (frames.py, resolution.py) over whole columns of a `SampleTable`.

`plan_table` gives exactly what `dataset.plan_samples` gives entry by entry (the same samples, frame
counts, sizes, skip counts and drop-short draws), as integer arrays:

- sizes: `resolution.plan_resolution` runs once per distinct source (height, width) after crop;
- frames: too-long, low-fps and the resampled length are computed per row in float64 with the
  scalar code's operation order; the resampled length repeats numpy's `arange` arithmetic (length,
  step, last values and the filter of `resample_indices`) on whole columns;
- the drop-short draws come from one generator seeded with cfg.seed, one draw per short clip in row
  order, as the scalar loop draws them;
- buckets are integer ids into `bucket_shapes` / `bucket_names`.

A loaded sample's candidate frames come from `frame_plan` (deterministic for a kept row).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from megatron_video.data.config import DataConfig, SampleGeometry, snap_num_frames
from megatron_video.data.frames import FramePlan, Skipped, frame_interval, resample_indices, speed_up
from megatron_video.data.index.read import SampleTable
from megatron_video.data.resolution import plan_resolution


@dataclass
class TablePlans:
    """Every sample the rules keep, as arrays (sample i is table row `rows[i]`)."""

    rows: np.ndarray
    """int32 (int64 past 2^31 rows): table row of each sample."""

    bucket_ids: np.ndarray
    """int32: bucket of each sample, an index into bucket_shapes / bucket_names."""

    bucket_shapes: np.ndarray
    """int64 [buckets, 3]: (frames, height, width) of each bucket."""

    bucket_names: list[str]
    """"{frames}x{height}x{width}" of each bucket."""

    skipped: Counter
    """Entries the rules left out, by reason (the keys of plan_samples)."""

    fps_defaulted: int
    """Kept videos without an fps, planned at data.default_fps."""

    def __len__(self) -> int:
        return len(self.rows)


def _sizes(
    h: np.ndarray, w: np.ndarray, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(target size id per row (-1 when skipped), target (height, width) per id [ids, 2], reason code
    per row (-1 kept) into the returned reasons list); plan_resolution runs once per distinct size."""
    key = (h.astype(np.int64) << 32) | w.astype(np.int64)
    if len(key) and h.max() < 2**15 and w.max() < 2**16 and min(h.min(), w.min()) >= 0:
        key = ((h.astype(np.int64) << 16) | w).astype(np.int32)  # sorts faster; same order
    unique, inverse = np.unique(key, return_inverse=True)
    inverse = inverse.reshape(-1)
    targets: dict[tuple[int, int], int] = {}
    size_id = np.full(len(unique), -1, np.int32)
    code = np.full(len(unique), -1, np.int8)
    reasons: list[str] = []
    shift = 16 if unique.dtype == np.int32 else 32
    for k, packed in enumerate(unique.tolist()):
        size = plan_resolution(packed >> shift, packed & ((1 << shift) - 1), cfg)
        if isinstance(size, Skipped):
            if size.reason not in reasons:
                reasons.append(size.reason)
            code[k] = reasons.index(size.reason)
        else:
            size_id[k] = targets.setdefault(tuple(size), len(targets))
    table = np.array(list(targets) or np.zeros((0, 2)), np.int64).reshape(-1, 2)
    return size_id[inverse], table, code[inverse], reasons


def _resampled_lengths(nf: np.ndarray, start: np.ndarray, interval: np.ndarray) -> np.ndarray:
    """len(resample_indices(start, n, interval)) per row, as numpy's arange computes it: length
    ceil((stop - start) / step), values start + i x delta with delta = (start + step) - start, then
    truncated to integers and filtered to < start + n (only a last value or two can fail the filter)."""
    first = start.astype(np.float64)
    length = np.ceil(((first + nf) - first) / interval).astype(np.int64)
    delta = (first + interval) - first
    stop = start + nf
    dropped = np.zeros(len(length), np.int64)
    for back in (1, 2, 3):  # the values are increasing: the filter drops a suffix
        i = length - back
        ok = i >= 1  # value 0 is start itself, always kept
        value = first + np.where(ok, i, 0) * delta
        dropped += ok & (value.astype(np.int64) >= stop)
    return length - dropped


def plan_table(table: SampleTable, cfg: DataConfig, geometry: SampleGeometry) -> TablePlans:
    """Apply the frame and resolution rules to every row; see the module docstring."""
    c = table.columns
    n = len(table)
    is_image = c["is_image"].view(np.bool_)
    skipped: Counter = Counter()
    keep = np.ones(n, np.bool_)
    if cfg.media == "videos":
        keep &= ~is_image
        skipped["image_excluded"] = int(is_image.sum())
    elif cfg.media == "images":
        keep &= is_image
        skipped["video_excluded"] = int(n - is_image.sum())
    rows = np.flatnonzero(keep)
    image = is_image[rows]

    # sizes, from the source size after the annotation crop
    if cfg.use_crop:
        cropped = c["crop_x0"][rows] >= 0
        h = np.where(cropped, c["crop_y1"][rows] - c["crop_y0"][rows], c["height"][rows])
        w = np.where(cropped, c["crop_x1"][rows] - c["crop_x0"][rows], c["width"][rows])
        del cropped
    else:
        h, w = c["height"][rows], c["width"][rows]
    size_id, target_sizes, code, reasons = _sizes(h, w, cfg)
    del h, w
    for k, reason in enumerate(reasons):
        hit = code == k
        skipped[f"image_{reason}"] += int((hit & image).sum())
        skipped[f"video_{reason}"] += int((hit & ~image).sum())
    sized = code < 0
    frames = np.ones(len(rows), np.int32)

    # frames of the videos that got a size
    vid = np.flatnonzero(sized & ~image)
    vrows = rows[vid]
    nf = c["num_frames"][vrows].astype(np.int64)
    fps_raw = c["fps"][vrows]
    missing_fps = np.isnan(fps_raw)
    fps = np.where(missing_fps, cfg.default_fps, fps_raw)
    if cfg.use_cut:
        start = np.maximum(c["cut_start"][vrows], 0).astype(np.int64)
    else:
        start = np.zeros(len(vrows), np.int64)
    target = cfg.num_frames
    too_long = nf > cfg.too_long_factor * (target * fps / cfg.train_fps * cfg.speed_factor)
    interval = np.where(np.abs(fps - cfg.train_fps) < 0.1, 1.0, fps / cfg.train_fps)
    low_fps = ~too_long & (interval < 1.0) if cfg.drop_low_fps else np.zeros(len(vrows), np.bool_)
    reach = ~too_long & ~low_fps
    length = np.zeros(len(vrows), np.int64)
    length[reach] = _resampled_lengths(nf[reach], start[reach], interval[reach])
    short = reach & (length < target)
    draws = np.random.default_rng(cfg.seed).random(int(short.sum()))
    dropped = np.zeros(len(vrows), np.bool_)
    dropped[np.flatnonzero(short)] = draws < cfg.drop_short_ratio
    window = np.minimum(length, target)
    snap = np.array(
        [0]
        + [
            snap_num_frames(y, geometry.vae_stride_t, geometry.context_parallel, cfg.min_num_frames) or 0
            for y in range(1, target + 1)
        ],
        np.int32,
    )
    video_frames = snap[np.clip(window, 0, target)]
    no_length = reach & ~dropped & (video_frames == 0)
    skipped["video_too_long"] += int(too_long.sum())
    skipped["video_fps_too_low"] += int(low_fps.sum())
    skipped["video_too_short"] += int(dropped.sum())
    skipped["video_too_short_for_vae"] += int(no_length.sum())
    video_ok = reach & ~dropped & ~no_length
    frames[vid] = video_frames
    sized[vid[~video_ok]] = False
    fps_defaulted = int((missing_fps & video_ok).sum())
    del nf, fps, fps_raw, start, interval, length, window, too_long, low_fps, reach, short, dropped

    final = np.flatnonzero(sized)
    # bucket = (target size, frames): a dense code, counted without sorting
    span = cfg.num_frames + 1
    dense = size_id[final].astype(np.int64) * span + frames[final]
    present = np.flatnonzero(np.bincount(dense, minlength=len(target_sizes) * span))
    lookup = np.full(len(target_sizes) * span, -1, np.int32)
    lookup[present] = np.arange(len(present), dtype=np.int32)
    bucket_ids = lookup[dense]
    del dense
    shapes = np.column_stack([present % span, target_sizes[present // span]]).astype(np.int64)
    row_dtype = np.int32 if n < 2**31 else np.int64
    return TablePlans(
        rows=rows[final].astype(row_dtype),
        bucket_ids=bucket_ids,
        bucket_shapes=shapes,
        bucket_names=[f"{t}x{h}x{w}" for t, h, w in shapes.tolist()],
        skipped=Counter({k: v for k, v in skipped.items() if v}),
        fps_defaulted=fps_defaulted,
    )


def frame_plan(table: SampleTable, row: int, cfg: DataConfig, length: int) -> FramePlan:
    """The candidate frames of a kept video row whose sample has `length` frames."""
    c = table.columns
    fps = float(c["fps"][row])
    fps = cfg.default_fps if np.isnan(fps) else fps
    start = int(c["cut_start"][row]) if (cfg.use_cut and c["cut_start"][row] >= 0) else 0
    indices = resample_indices(start, int(c["num_frames"][row]), frame_interval(fps, cfg.train_fps))
    indices = speed_up(indices, cfg.speed_factor, cfg.num_frames)
    return FramePlan(candidates=indices, window=min(len(indices), cfg.num_frames), length=length)
