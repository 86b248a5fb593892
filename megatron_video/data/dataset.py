"""`VideoTextDataset`: annotated videos and images -> model-ready samples, bucketed by shape.

At construction, from annotation metadata only: the sample table (the memory-mapped index of
`data.index`, or the same table built in memory from `data.data_list`, see data/index/), then the
frame and resolution rules over its columns (`index.plans.plan_table`, equal to `plan_samples`, the
entry-by-entry reference), hence each sample's bucket "{frames}x{height}x{width}" as an integer id.
Entries the rules leave out are counted by reason (`build_counts`; the summary is
`index.report.data_summary`).

`dataset[i]` decodes the planned frames, applies the annotation crop and the resolution transform, and
returns:

    video       float32 [C, T, H, W] in [-1, 1] (T = 1 for images)
    captions    list of the raw captions (choosing one and CFG dropout belong to the text side)
    aesthetic   float or None
    path        str, the media file loaded
    bucket      str, e.g. "33x256x256"
    is_image    bool, the file is an image (T = 1)
    index       int, the dataset index loaded (differs from the one asked for after a replacement)
    load_failures  list of "path: reason" for files that failed before this one

A file that cannot be read (missing, corrupt, truncated, over the time limit, wrong annotated size)
is logged with its path, counted in `failure_counts` (per process), remembered (not opened again by
this process) and replaced by another sample of the same bucket, so the batch keeps one shape and the
job keeps going; `cfg.max_load_attempts` failed files in a row raise. Random choices (temporal crop,
replacement order) are drawn from (seed, epoch, index), so every rank and worker makes the same
ones; only a failure that happens on one rank and not another (a time-out, a flaky file system)
can make ranks of one replica load different samples, which the batch's `index` lets a trainer check.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megatron_video.data.annotations import Entry
from megatron_video.data.collate import VideoCollate
from megatron_video.data.config import DataConfig, SampleGeometry
from megatron_video.data.frames import FramePlan, Skipped, plan_video_frames
from megatron_video.data.index.build import table_from_data_list, table_from_entries
from megatron_video.data.index.plans import frame_plan, plan_table
from megatron_video.data.index.read import SampleTable, open_index
from megatron_video.data.index.report import all_failed_hint, no_sample_message
from megatron_video.data.index.sources import BuildOptions
from megatron_video.data.resolution import plan_resolution, to_model_input
from megatron_video.data.sampler import BucketIds, MegabatchBucketSampler
from megatron_video.data.video_io import DecodeTimeout, read_image, read_video_frames
from megatron_video.errors import ConfigError

logger = logging.getLogger(__name__)

HARD_TIMEOUT_GRACE_S = 5.0
"""Extra seconds the watchdog waits beyond `decode_timeout_s` before abandoning a load."""


def bucket_key(num_frames: int, height: int, width: int) -> str:
    """The shape key "{frames}x{height}x{width}" samples are grouped by."""
    return f"{num_frames}x{height}x{width}"


def parse_bucket_key(key: str) -> tuple[int, int, int]:
    """(frames, height, width) of a bucket key."""
    t, h, w = (int(v) for v in key.split("x"))
    return t, h, w


def bucket_members(bucket_keys: Sequence[str]) -> dict[str, list[int]]:
    """Dataset indices of each bucket, in index order."""
    members: dict[str, list[int]] = {}
    for i, key in enumerate(bucket_keys):
        members.setdefault(key, []).append(i)
    return members


def replacement_order(seed: int, epoch: int, index: int, members: Sequence[int]) -> Iterator[int]:
    """`index`, then the other members of its bucket (`members`, dataset indices) in an order fixed by
    (seed, epoch, index): the samples tried in turn when `index` cannot be loaded.

    The order does not depend on what failed before, so every process that meets the same
    unreadable files picks the same replacement (the feature cache replaces failed samples by it too).
    """
    yield index
    rng = np.random.default_rng([seed, epoch, index])
    for position in rng.permutation(len(members)).tolist():
        if members[position] != index:
            yield members[position]


@dataclass(frozen=True)
class SamplePlan:
    """What one entry becomes: its frames (None for images) and its target size."""

    entry: Entry
    frames: FramePlan | None
    height: int
    width: int

    @property
    def num_frames(self) -> int:
        return 1 if self.frames is None else self.frames.length

    @property
    def bucket(self) -> str:
        return bucket_key(self.num_frames, self.height, self.width)


class PlanView(Sequence):
    """`dataset.plans[i]`: the SamplePlan of sample i, built when asked (reads the row's strings)."""

    def __init__(self, dataset: VideoTextDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.dataset.plan(index)


class BucketKeys(Sequence):
    """`dataset.bucket_keys[i]`: the shape key of sample i, from the integer bucket ids."""

    def __init__(self, ids: np.ndarray, names: list[str]):
        self.ids, self.names = ids, names

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.names[b] for b in self.ids[index].tolist()]
        return self.names[int(self.ids[index])]


def plan_samples(
    entries: Sequence[Entry], cfg: DataConfig, geometry: SampleGeometry
) -> tuple[list[SamplePlan], Counter]:
    """Apply the frame and resolution rules to every entry; returns the plans and skip counts by reason.

    The drop-short draws come from one generator seeded with cfg.seed, in entry order, so every rank
    builds the same plans.
    """
    rng = np.random.default_rng(cfg.seed)
    plans: list[SamplePlan] = []
    skipped: Counter = Counter()
    for entry in entries:
        if (cfg.media == "videos" and entry.is_image) or (cfg.media == "images" and not entry.is_image):
            skipped["image_excluded" if entry.is_image else "video_excluded"] += 1
            continue
        crop = entry.crop if cfg.use_crop else None
        h, w = (crop[3] - crop[2], crop[1] - crop[0]) if crop else (entry.height, entry.width)
        size = plan_resolution(h, w, cfg)
        if isinstance(size, Skipped):
            skipped[("image_" if entry.is_image else "video_") + size.reason] += 1
            continue
        frames = None
        if not entry.is_image:
            start = entry.cut[0] if (entry.cut and cfg.use_cut) else 0
            frames = plan_video_frames(entry.num_frames, entry.fps, start, cfg, geometry, rng)
            if isinstance(frames, Skipped):
                skipped["video_" + frames.reason] += 1
                continue
        plans.append(SamplePlan(entry=entry, frames=frames, height=size[0], width=size[1]))
    return plans, skipped


class VideoTextDataset(Dataset):
    """Map-style dataset of annotated videos and images; see the module docstring for a sample."""

    def __init__(
        self,
        cfg: DataConfig,
        geometry: SampleGeometry,
        entries: Sequence[Entry] | None = None,
        table: SampleTable | None = None,
    ):
        """Open `cfg.index`, or read `cfg.data_list` (unless `entries` or a `table` are given), and plan
        every sample for `geometry` (VAE strides, context-parallel size and micro-batch, from
        `ExperimentConfig.sample_geometry`)."""
        cfg.validate(geometry)
        self.cfg, self.geometry = cfg, geometry
        if table is None:
            if entries is not None:
                table = table_from_entries(list(entries))
            elif cfg.index:
                table = open_index(cfg.index)
            elif cfg.data_list:
                options = BuildOptions(check_files=cfg.check_files_exist, probe=cfg.probe_media)
                table = table_from_data_list(cfg.data_list, options)
            else:
                raise ConfigError("neither data.data_list nor data.index is set; point one at your data")
        self.table = table
        self.build_counts: Counter = Counter({f"annotation_{k}": v for k, v in table.counts.items()})
        self.sample_plans = plan_table(table, cfg, geometry)
        self.build_counts.update({f"skipped_{k}": v for k, v in self.sample_plans.skipped.items()})
        self.build_counts["samples"] = len(self.sample_plans)
        if self.sample_plans.fps_defaulted:
            self.build_counts["fps_defaulted"] = self.sample_plans.fps_defaulted
        if not len(self.sample_plans):
            raise ConfigError(no_sample_message(self.build_counts))
        self.buckets = BucketIds(self.sample_plans.bucket_ids, self.sample_plans.bucket_names)
        self.bucket_keys = BucketKeys(self.buckets.ids, self.buckets.names)
        self.plans = PlanView(self)
        self._members: dict[int, np.ndarray] = {}
        self.epoch = 0
        self.failure_counts: Counter = Counter()
        self._known_bad: set[int] = set()
        # seconds after which a load stuck inside one decoder call is abandoned
        self.watchdog_timeout_s = cfg.decode_timeout_s + HARD_TIMEOUT_GRACE_S
        logger.info(
            "dataset: %d samples in %d buckets; build counts %s",
            len(self.sample_plans),
            len(self.buckets.names),
            dict(self.build_counts),
        )

    def plan(self, index: int) -> SamplePlan:
        """The SamplePlan of sample `index` (reads its row's path and captions)."""
        p = self.sample_plans
        row = int(p.rows[index])
        frames, height, width = (int(v) for v in p.bucket_shapes[p.bucket_ids[index]])
        entry = self.table.entry(row)
        frame = None if entry.is_image else frame_plan(self.table, row, self.cfg, frames)
        return SamplePlan(entry=entry, frames=frame, height=height, width=width)

    def bucket_members(self, index: int) -> np.ndarray:
        """Dataset indices of the bucket of sample `index`, in index order (cached per bucket)."""
        b = int(self.buckets.ids[index])
        if b not in self._members:
            self._members[b] = np.flatnonzero(self.buckets.ids == b)
        return self._members[b]

    def __len__(self) -> int:
        return len(self.sample_plans)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose temporal crops and replacements `__getitem__` draws."""
        self.epoch = epoch

    def path(self, index: int) -> str:
        """Media path of sample `index`."""
        return self.table.path(int(self.sample_plans.rows[index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        failures: list[str] = []
        bucket = self.bucket_keys[index]
        tries = 0
        for current in replacement_order(self.cfg.seed, self.epoch, int(index), self.bucket_members(index)):
            current = int(current)
            path = self.path(current)
            if current in self._known_bad:
                if current == index:
                    failures.append(f"{path}: failed earlier in this process")
                continue
            try:
                sample = self._load_with_time_limit(current)
            except Exception as e:  # one unreadable file must not stop training: count, log, replace
                tries += 1
                failures.append(f"{path}: {type(e).__name__}: {e}")
                self.failure_counts[type(e).__name__] += 1
                self._known_bad.add(current)
                logger.warning(
                    "could not load %s (%s: %s); replacing it within bucket %s",
                    path,
                    type(e).__name__,
                    e,
                    bucket,
                )
                if tries > self.cfg.max_load_attempts:
                    break
                continue
            sample["load_failures"] = failures
            return sample
        raise RuntimeError(
            f"could not load a sample of bucket {bucket} for index {index}: {tries} files failed "
            f"({len(self._known_bad)} known-bad files in this process). "
            + all_failed_hint(failures, self.cfg)
        )

    def load(self, index: int) -> dict[str, Any]:
        """Sample `index` without replacement or watchdog; raises on an unreadable file."""
        plan = self.plans[index]
        entry, cfg = plan.entry, self.cfg
        crop = entry.crop if cfg.use_crop else None
        rng = np.random.default_rng([cfg.seed, self.epoch, index])  # temporal, then spatial crop
        if plan.frames is None:
            frames_THWC = read_image(entry.path, crop=crop)
        else:
            frames_THWC = read_video_frames(
                entry.path, plan.frames.draw(rng), crop=crop, timeout_s=cfg.decode_timeout_s
            )
        video_TCHW = to_model_input(
            torch.from_numpy(frames_THWC).permute(0, 3, 1, 2), (plan.height, plan.width), cfg, rng
        )
        return {
            "video": video_TCHW.permute(1, 0, 2, 3).contiguous(),
            "captions": list(entry.captions),
            "aesthetic": entry.aesthetic,
            "path": entry.path,
            "bucket": plan.bucket,
            "is_image": entry.is_image,
            "index": index,
        }

    def _load_with_time_limit(self, index: int) -> dict[str, Any]:
        """`load` on a daemon watchdog thread: the decoder checks the limit itself between frames; this
        also catches a call that hangs inside libav (the stuck thread is left behind, it cannot be killed,
        and being a daemon it does not block the process from exiting)."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["sample"] = self.load(index)
            except Exception as e:  # handed to the caller's thread below
                result["error"] = e

        thread = threading.Thread(target=target, name=f"video-load-{index}", daemon=True)
        thread.start()
        thread.join(self.watchdog_timeout_s)
        if thread.is_alive():
            raise DecodeTimeout(f"{self.path(index)}: loading took over {self.watchdog_timeout_s:.1f} s")
        if "error" in result:
            raise result["error"]
        return result["sample"]


def build_dataloader(
    dataset: VideoTextDataset,
    *,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    global_batch_size: int | None = None,
    num_workers: int | None = None,
    collate_fn=None,
) -> DataLoader:
    """DataLoader over `dataset` with the megabatch bucket sampler and the one-shape collate.

    Settings come from `dataset.cfg` (seed, grouping, bucket threshold, workers) and
    `dataset.geometry` (micro-batch, VAE strides); `num_workers` overrides cfg.num_workers. Start each epoch with `set_epoch(loader, epoch)`.
    """
    cfg, geometry = dataset.cfg, dataset.geometry
    sampler = MegabatchBucketSampler(
        getattr(dataset, "buckets", None) or dataset.bucket_keys,  # integer ids when the dataset has them
        batch_size=geometry.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.seed,
        group_data=cfg.group_data,
        drop_threshold=cfg.bucket_drop_threshold,
        global_batch_size=global_batch_size,
        consumed_samples=consumed_samples,
    )
    dataset.set_epoch(sampler.epoch)
    workers = cfg.num_workers if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn or VideoCollate(geometry.vae_stride_t, geometry.vae_stride_hw),
        persistent_workers=False,
    )


class ResumableLoader:
    """This data-parallel rank's micro-batches, continuing from a count of samples consumed by all
    data-parallel ranks together; at the end of an epoch the sampler rolls into the next one.

    `build_dataloader` arguments are passed through; `restart(n)` continues after n samples.
    """

    def __init__(self, dataset, *, dp_rank: int, dp_size: int, consumed_samples: int = 0, **loader_kwargs):
        self.dataset, self.dp_rank, self.dp_size = dataset, dp_rank, dp_size
        self.loader_kwargs = loader_kwargs
        self.consumed_samples = consumed_samples
        self.epoch: int | None = None
        """Epoch of the batches being served (set when the underlying loader is built)."""
        self._iterator = None

    def restart(self, consumed_samples: int) -> None:
        """Serve from `consumed_samples` on (the sampler skips exactly that many)."""
        self.consumed_samples = consumed_samples
        self._iterator = None

    def next(self) -> dict[str, Any]:
        """The next collated micro-batch."""
        if self._iterator is None:
            loader = build_dataloader(
                self.dataset,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
                consumed_samples=self.consumed_samples,
                **self.loader_kwargs,
            )
            self.epoch = loader.batch_sampler.epoch
            self._iterator = iter(loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = None
            return self.next()
        self.consumed_samples += len(batch["index"]) * self.dp_size
        return batch


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of a `build_dataloader` loader's sampler and dataset (before iterating it)."""
    loader.batch_sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
