"""What the data pipeline kept and left out, in words and numbers: the start-up summary (printed at
WARNING on the main rank and recorded as `data/...` metrics), the message when no sample is left,
and the hint when every replacement of a sample fails."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from megatron_video.data.config import DataConfig
from megatron_video.data.index.sources import FIX_REASONS, NOTE_REASONS, SKIP_REASONS

RULE_OF: dict[str, str] = {
    "annotation_malformed": "fix the entries named in the skip report (the format is in data/annotations.py)",
    "annotation_not_utf8": "re-encode the annotation file as UTF-8",
    "annotation_bad_text": "replace the lone surrogates (broken emoji escapes) in those captions or paths",
    "annotation_missing_file": "the media root of data.txt, or data.check_files_exist",
    "annotation_unreadable_media": "the files named in the skip report are not readable media",
    "annotation_crop_outside_frame": "the entry's crop does not fit the file's real frame",
    "skipped_image_excluded": "data.media",
    "skipped_video_excluded": "data.media",
    "skipped_video_too_long": "data.too_long_factor (clips over too_long_factor x num_frames x fps / train_fps)",
    "skipped_video_fps_too_low": "data.drop_low_fps / data.train_fps",
    "skipped_video_too_short": "data.drop_short_ratio / data.num_frames",
    "skipped_video_too_short_for_vae": "data.min_num_frames",
    "skipped_video_aspect": "data.min_h_div_w_ratio / data.max_h_div_w_ratio",
    "skipped_image_aspect": "data.min_h_div_w_ratio / data.max_h_div_w_ratio",
    "skipped_video_too_small": "data.min_hxw",
    "skipped_image_too_small": "data.min_hxw",
    "skipped_video_below_stride": "data.max_hxw / data.hw_stride",
    "skipped_image_below_stride": "data.max_hxw / data.hw_stride",
    "dropped_small_buckets": "data.bucket_drop_threshold (x global batch)",
    "fps_defaulted": "data.default_fps was assumed; build the index with --probe to read each file's rate",
}
"""The setting (or the fix) behind each count of `VideoTextDataset.build_counts`."""


def _rule(key: str) -> str:
    return RULE_OF.get(key, "")


def no_sample_message(build_counts: Counter) -> str:
    """Why no sample is left: the counts that removed them, largest first, each with its rule."""
    losses = sorted(
        ((v, k) for k, v in build_counts.items() if v and (k.startswith("skipped_") or k in RULE_OF)),
        reverse=True,
    )
    if not losses:
        return f"no sample passes the data rules ({dict(build_counts)}); the data list holds no entry"
    parts = [f"{k}: {v} ({_rule(k)})" if _rule(k) else f"{k}: {v}" for v, k in losses]
    return (
        f"no sample passes the data rules: {build_counts.get('annotation_entries', 0)} entries read; "
        + "; ".join(parts)
    )


FAILURE_CAUSES = (
    (
        "does not match the file",
        "the annotated resolution does not match the files (build the index with --probe)",
    ),
    ("video ended after", "the files have fewer frames than annotated (build the index with --probe)"),
    ("DecodeTimeout", "loading exceeded data.decode_timeout_s"),
    ("does not exist", "missing files (data.check_files_exist or tools/build_index.py --check-files)"),
    ("No such file", "missing files (data.check_files_exist or tools/build_index.py --check-files)"),
    ("does not fit", "the annotation crop does not fit the frames"),
)


def all_failed_hint(failures: list[str], cfg: DataConfig) -> str:
    """The causes of a run of failed loads, counted, with the setting or fix for each."""
    causes: Counter = Counter()
    for failure in failures:
        cause = next((c for needle, c in FAILURE_CAUSES if needle in failure), "unreadable or corrupt files")
        causes[cause] += 1
    listed = "; ".join(f"{n} x {c}" for c, n in causes.most_common())
    return (
        f"Causes: {listed}. Every candidate of the bucket failed (data.max_load_attempts={cfg.max_load_attempts}); "
        "last: " + " | ".join(failures[-3:])
    )


def dropped_by_bucket_threshold(bucket_ids: np.ndarray, threshold: float, global_batch_size: int) -> int:
    """Samples in buckets the sampler leaves out (fewer than threshold x global batch members)."""
    counts = np.bincount(bucket_ids)
    return int(counts[counts < math.ceil(threshold * global_batch_size)].sum())


def data_summary(dataset: Any, global_batch_size: int) -> tuple[str, dict[str, float]]:
    """(the start-up summary in words, its numbers as `data/<key>` metrics) of a VideoTextDataset."""
    counts = Counter(dataset.build_counts)
    dropped = dropped_by_bucket_threshold(
        dataset.buckets.ids, dataset.cfg.bucket_drop_threshold, global_batch_size
    )
    if dropped:
        counts["dropped_small_buckets"] = dropped
    table = dataset.table
    lines = [
        f"data from {table.origin}: {counts.get('annotation_entries', 0)} entries, "
        f"{counts.get('annotation_kept', 0)} kept by the annotation checks, {counts['samples']} samples after "
        f"the frame / resolution rules in {len(dataset.buckets.names)} buckets, "
        f"{counts['samples'] - dropped} trained on"
    ]
    left_out = {
        k: v for k, v in counts.items() if v and (k.startswith("skipped_") or k == "dropped_small_buckets")
    }
    left_out.update(
        {f"annotation_{r}": counts[f"annotation_{r}"] for r in SKIP_REASONS if counts[f"annotation_{r}"]}
    )
    if left_out:
        lines.append("  left out:")
    for key, value in sorted(left_out.items(), key=lambda kv: -kv[1]):
        rule = _rule(key)
        lines.append(f"    {key}: {value}" + (f" ({rule})" if rule else ""))
    kept = {r: counts[f"annotation_{r}"] for r in FIX_REASONS + NOTE_REASONS if counts[f"annotation_{r}"]}
    if kept:
        lines.append("  kept, fixed or noted: " + ", ".join(f"{k}: {v}" for k, v in kept.items()))
    if counts.get("fps_defaulted"):
        lines.append(f"  fps_defaulted: {counts['fps_defaulted']} ({_rule('fps_defaulted')})")
    examples = table.skip_report(5)
    if examples:
        lines.append("  first entries left out:")
        lines += [f"    {e['file']}:{e['position']}: {e['reason']}: {e['message']}" for e in examples]
    metrics = {f"data/{k}": float(v) for k, v in sorted(counts.items())}
    return "\n".join(lines), metrics
