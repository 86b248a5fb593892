"""The megabatch bucket sampler (reference 6.4): every micro-batch holds one shape, and every rank of
one model replica gets the same micro-batches.

One epoch, computed identically on every rank from (seed, epoch):

1. order: with `group_data`, buckets (frames x height x width) from most to least frequent (ties by
   key), indices shuffled inside each bucket, concatenated; otherwise one global permutation;
2. megabatches: consecutive chunks of dp_size x batch_size indices;
3. split: data-parallel rank r takes chunk[r::dp_size]. Padding: a rank's batch that comes up short
   (only in the last megabatch) is filled with random repeats of its own items; an empty one
   becomes a copy of a random earlier rank's batch. So the last megabatch can repeat samples;
4. shuffle the megabatches;
5. one shape per batch: where a rank's batch mixes shapes, the most frequent shape stays (ties: the
   one seen first) and each minority item is replaced by a random item of that shape from the same
   batch. The replaced samples are not seen this epoch; their slots repeat a batch-mate;
6. resume: consumed_samples = e x samples_per_epoch + k x dp_size x batch_size starts epoch e at its
   megabatch k (`samples_per_epoch` counts the padded slots).

Buckets with fewer than drop_threshold x global_batch_size samples are left out (logged).
Every random draw comes from one numpy generator seeded with (seed, epoch), so the sequence does not
depend on the rank, the process, or how often `__iter__` ran. The split is by data-parallel rank
only: tensor-, context- and pipeline-parallel ranks of one replica pass the same dp_rank and get
identical batches. Use it as `DataLoader(dataset, batch_sampler=sampler, ...)`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketIds:
    """The bucket of every dataset index as integer ids into `names` (shape keys, e.g. "33x256x256")."""

    ids: np.ndarray
    """Integer array [dataset size]; equal ids, equal shapes."""

    names: list[str]
    """Shape key of each id (distinct)."""

    @classmethod
    def from_keys(cls, keys: Sequence[str]) -> BucketIds:
        code_of: dict[str, int] = {}
        ids = np.fromiter((code_of.setdefault(k, len(code_of)) for k in keys), np.int32, count=len(keys))
        return cls(ids, list(code_of))


@dataclass(frozen=True)
class EpochPlan:
    """All micro-batches of one epoch for every data-parallel rank, and how many slots repeat."""

    batches: np.ndarray
    """int64 [megabatch, dp_rank, item]: dataset indices of each rank's micro-batch."""

    num_padded: int
    """Slots filled by step 3 (repeats that fill the last megabatch)."""

    num_replaced: int
    """Slots filled by step 5 (minority shapes replaced by a batch-mate)."""


class MegabatchBucketSampler:
    """Batch sampler yielding this data-parallel rank's micro-batches (lists of dataset indices).

    bucket_keys: one shape key per dataset index (e.g. "33x256x256"; equal keys = equal shapes), or
    the same as integer ids (`BucketIds`, what a sample index's plans give).
    batch_size: micro-batch per rank. dp_rank / dp_size: data-parallel coordinates (never read from
    global state). global_batch_size: the threshold's unit (default batch_size x dp_size; pass the
    trainer's global batch when it accumulates gradients). consumed_samples: samples all ranks
    consumed before a resume (a multiple of batch_size x dp_size); it also fixes the starting epoch.
    """

    def __init__(
        self,
        bucket_keys: Sequence[str] | BucketIds,
        *,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 42,
        group_data: bool = True,
        drop_threshold: float = 4.0,
        global_batch_size: int | None = None,
        consumed_samples: int = 0,
    ):
        if batch_size < 1 or dp_size < 1:
            raise ValueError(f"batch_size and dp_size must be >= 1, got {batch_size} and {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.seed, self.group_data = seed, group_data
        self.megabatch_size = batch_size * dp_size
        buckets = bucket_keys if isinstance(bucket_keys, BucketIds) else BucketIds.from_keys(bucket_keys)
        self.codes, self.names = buckets.ids, buckets.names  # equal ids, equal shapes
        counts = np.bincount(self.codes, minlength=len(self.names))
        min_count = math.ceil(drop_threshold * (global_batch_size or self.megabatch_size))
        kept_bucket = counts >= min_count
        dropped = {self.names[b]: int(counts[b]) for b in np.flatnonzero(~kept_bucket & (counts > 0))}
        self.dropped_samples = sum(dropped.values())
        self.indices = np.flatnonzero(kept_bucket[self.codes])
        self.bucket_counts = {
            self.names[b]: int(counts[b]) for b in np.flatnonzero(kept_bucket & (counts > 0))
        }
        if dropped:
            logger.info(
                "sampler: dropped %d samples in %d buckets with fewer than %d samples (%s x global batch): %s",
                self.dropped_samples,
                len(dropped),
                min_count,
                drop_threshold,
                dict(sorted(dropped.items(), key=lambda kv: -kv[1])[:10]),
            )
        if len(self.indices) == 0:
            largest = sorted(((int(counts[b]), self.names[b]) for b in np.flatnonzero(counts)), reverse=True)[
                :10
            ]
            raise ValueError(
                f"no bucket has {min_count} samples (drop_threshold {drop_threshold} x global batch); "
                f"bucket sizes: {dict((k, c) for c, k in largest)}. Lower data.bucket_drop_threshold or the batch size"
            )
        self.num_megabatches = math.ceil(len(self.indices) / self.megabatch_size)
        self.samples_per_epoch = self.num_megabatches * self.megabatch_size
        if consumed_samples < 0 or consumed_samples % self.megabatch_size:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"batch_size x dp_size = {self.megabatch_size}"
            )
        self.epoch, offset = divmod(consumed_samples, self.samples_per_epoch)
        self._skip = offset // self.megabatch_size
        self._plan_cache: tuple[int, EpochPlan] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch `epoch` from its start; the current epoch (e.g. a resumed one) keeps its offset."""
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def __len__(self) -> int:
        """Micro-batches this rank yields in the current epoch (after a resume offset)."""
        return self.num_megabatches - self._skip

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan(self.epoch)
        for megabatch in plan.batches[self._skip :]:
            yield megabatch[self.dp_rank].tolist()

    def plan(self, epoch: int) -> EpochPlan:
        """Every rank's micro-batches of `epoch` (steps 1-5; the same on every rank)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = self._order(rng)
        m, dp, b = self.megabatch_size, self.dp_size, self.batch_size
        # 2-3. full megabatches: rank r takes chunk[r::dp], i.e. column r of the chunk read as [b, dp]
        full = (self.num_megabatches - 1) * m
        batches = order[:full].reshape(-1, b, dp).transpose(0, 2, 1)
        tail, num_padded = self._pad_tail(order[full:], rng)
        batches = np.concatenate([batches, tail[None]])
        # 4. shuffle megabatches; 5. one shape per rank batch
        batches = batches[rng.permutation(len(batches))]
        codes = self.codes[batches]
        mixed = np.argwhere((codes != codes[..., :1]).any(axis=-1))
        num_replaced = sum(self._one_shape(batches[k, r], rng) for k, r in mixed.tolist())
        plan = EpochPlan(batches=batches, num_padded=num_padded, num_replaced=num_replaced)
        if num_replaced > 0.1 * batches.size:
            logger.warning(
                "sampler epoch %d: %d of %d slots replaced to keep one shape per batch; group_data=True "
                "avoids most of this",
                epoch,
                num_replaced,
                batches.size,
            )
        self._plan_cache = (epoch, plan)
        return plan

    def _pad_tail(self, chunk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The last megabatch [dp, b]: short rank batches padded from themselves, empty ones copied."""
        dp, b = self.dp_size, self.batch_size
        tail = np.empty((dp, b), dtype=np.int64)
        num_padded = 0
        for r in range(dp):
            own = chunk[r::dp]
            num_padded += b - len(own)
            if len(own) == b:
                tail[r] = own
            elif len(own):
                tail[r] = np.concatenate([own, rng.choice(own, b - len(own))])
            else:
                tail[r] = tail[int(rng.integers(0, r))]
        return tail, num_padded

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        if not self.group_data:
            return self.indices[rng.permutation(len(self.indices))]
        codes = self.codes[self.indices]
        counts = np.bincount(codes, minlength=len(self.names))
        present = np.flatnonzero(counts)
        ranked = sorted(present.tolist(), key=lambda b: (-int(counts[b]), self.names[b]))
        rank = np.empty(len(self.names), np.int64)
        rank[ranked] = np.arange(len(ranked))
        # members of each bucket in index order, buckets from most to least frequent (ties by key)
        order = self.indices[np.argsort(rank[codes], kind="stable")]
        del codes
        start = 0
        for b in ranked:
            end = start + int(counts[b])
            order[start:end] = order[start:end][rng.permutation(end - start)]
            start = end
        return order

    def _one_shape(self, batch: np.ndarray, rng: np.random.Generator) -> int:
        """Replace (in place) the items whose shape is not the batch's majority; returns how many."""
        codes = self.codes[batch].tolist()
        majority = Counter(codes).most_common(1)[0][0]  # ties: the shape seen first
        keep = batch[np.array(codes) == majority]
        minority = [pos for pos, code in enumerate(codes) if code != majority]
        batch[minority] = keep[rng.integers(0, len(keep), len(minority))]
        return len(minority)
