"""Reading a feature cache: `FeatureCache` (index + shards opened on demand), `CachedFeatureDataset`
(dataset index -> cached features, with the online dataset's indices, buckets, replacements and
caption draw) and `CachedBatches` (the BatchSource giving the TrainBatch `EncodedBatches` gives).
The folder layout is described in `feature_cache/format.py`."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from megatron_video.config.schema import ExperimentConfig
from megatron_video.data.batches import (
    CAPTION_DRAWS,
    POSTERIOR_NOISE,
    BatchStats,
    TrainBatch,
    posterior_latents,
    sample_generator,
)
from megatron_video.data.config import DataConfig, FeatureCacheConfig, SampleGeometry
from megatron_video.data.dataset import ResumableLoader, bucket_members, replacement_order
from megatron_video.data.feature_cache.format import (
    COMMON,
    FORMAT_VERSION,
    I2V_UNSUPPORTED,
    INDEX,
    SHARDS,
    FeatureCacheError,
    check_compatible,
    read_json,
    sha256_file,
)
from megatron_video.data.text import CaptionProcessor, TextConfig
from megatron_video.errors import ConfigError

logger = logging.getLogger(__name__)


class FeatureCache:
    """The read side of a cache folder: index.json, shards opened on demand (a few kept open per
    process), and errors that name the file and the fix."""

    def __init__(self, cache_dir: str | os.PathLike, max_open_shards: int = 16):
        self.dir = Path(cache_dir)
        path = self.dir / INDEX
        if not path.is_file():
            raise FeatureCacheError(
                f"{path} does not exist: the cache build has not finished (rank 0 writes the index last). "
                "Run tools/build_feature_cache.py again with the same config: it resumes"
            )
        index = read_json(path)
        if index.get("format") != FORMAT_VERSION:
            raise FeatureCacheError(
                f"{path}: cache format {index.get('format')}, this code reads {FORMAT_VERSION}"
            )
        if index["missing"]:
            raise FeatureCacheError(
                f"{path}: {index['missing']} of {len(index['shard_of'])} samples are in no shard; finish the "
                "cache with tools/build_feature_cache.py (it resumes and rewrites the index)"
            )
        self.header: dict[str, Any] = index["header"]
        self.shards: list[dict] = index["shards"]
        self.shard_of: list[int] = index["shard_of"]
        self.bucket_keys: list[str] = [index["buckets"][b] for b in index["bucket_of"]]
        self.failed: dict[int, str] = {int(k): v for k, v in index["failed"].items()}
        self.common: dict = index["common"]
        self.shift = torch.tensor(self.header["vae_shift"], dtype=torch.float32).reshape(1, -1, 1, 1, 1)
        self.scale = torch.tensor(self.header["vae_scale"], dtype=torch.float32).reshape(1, -1, 1, 1, 1)
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[str, tuple[Any, dict, frozenset]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # file handles stay in the process that opened them
        return state

    def _path(self, name: str) -> Path:
        return self.dir / (name if name == COMMON else f"{SHARDS}/{name}")

    def _file(self, name: str, expected_bytes: int, meta_key: str) -> tuple[Any, dict, frozenset]:
        """(safe_open handle, parsed metadata[meta_key], tensor names) of a file, opened once per process."""
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        path = self._path(name)
        fix = (
            f"delete {path} and {path.with_suffix('.json')} and run tools/build_feature_cache.py again "
            "with the same config: it re-encodes that shard's samples and rewrites the index"
            if name != COMMON
            else f"delete {path} and run tools/build_feature_cache.py again (rank 0 rewrites it)"
        )
        if not path.is_file():
            raise FeatureCacheError(f"feature cache file {path} is missing; {fix}")
        size = path.stat().st_size
        if size != expected_bytes:
            raise FeatureCacheError(
                f"feature cache file {path} has {size} bytes, the index says {expected_bytes}: it is truncated "
                f"or was overwritten; {fix}"
            )
        try:
            handle = safe_open(str(path), framework="pt")
            meta = json.loads(handle.metadata()[meta_key])
            keys = frozenset(handle.keys())
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise FeatureCacheError(
                f"feature cache file {path} is corrupt ({type(e).__name__}: {e}); {fix}"
            ) from e
        self._open[name] = (handle, meta, keys)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return self._open[name]

    def _tensor(self, name: str, handle, key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise FeatureCacheError(
                f"feature cache file {self._path(name)}: cannot read tensor {key} ({e}); the file is corrupt"
            ) from e

    def sample(self, index: int) -> dict[str, Any]:
        """The metadata of cached sample `index` (path, bucket, captions, aesthetic, latents, shape, texts)."""
        sid = self.shard_of[index]
        if sid < 0:
            raise KeyError(f"sample {index} is not cached ({self.failed.get(index, 'not in any shard')})")
        shard = self.shards[sid]
        return self._file(shard["name"], shard["bytes"], "samples")[1][str(index)]

    def latent(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std [Z, T_lat, H_lat, W_lat] (float32) of sample `index` for `epoch`'s crop."""
        entry = self.sample(index)
        key = entry["latents"][epoch % len(entry["latents"])]
        shard = self.shards[self.shard_of[index]]
        handle = self._file(shard["name"], shard["bytes"], "samples")[0]
        return tuple(self._tensor(shard["name"], handle, f"{key}.{part}").float() for part in ("mean", "std"))

    def text(self, index: int, text: str) -> dict[str, torch.Tensor]:
        """Features of one final caption string of sample `index`: hidden [L, C], mask [L], pooled [P] or None."""
        entry = self.sample(index)
        key = entry["texts"].get(text)
        if key is not None:
            shard = self.shards[self.shard_of[index]]
            name = shard["name"]
            handle, _, names = self._file(name, shard["bytes"], "samples")
        else:
            handle, common, names = self._file(COMMON, self.common["bytes"], "texts")
            name, key = COMMON, common.get(text)
            if key is None:
                raise FeatureCacheError(
                    f"caption {text!r} of sample {index} ({entry['path']}) is not in the cache: the caption "
                    "settings differ from those it was built with (check_compatible compares them)"
                )
        out = {part: self._tensor(name, handle, f"{key}.{part}") for part in ("hidden", "mask")}
        out["pooled"] = self._tensor(name, handle, f"{key}.pooled") if f"{key}.pooled" in names else None
        return out

    def verify(self) -> list[str]:
        """Problems found by reading every file in full: sizes, sha256 checksums, metadata (empty = sound)."""
        problems = []
        files = [(COMMON, self.common, "texts")] + [(s["name"], s, "samples") for s in self.shards]
        for name, info, meta_key in files:
            path = self._path(name)
            try:
                self._file(name, info["bytes"], meta_key)
            except FeatureCacheError as e:
                problems.append(str(e))
                continue
            if sha256_file(path) != info["sha256"]:
                problems.append(f"feature cache file {path}: sha256 differs from the index (corrupt bytes)")
        return problems


class CachedFeatureDataset(Dataset):
    """Map-style dataset over a feature cache with the indices and bucket keys of the VideoTextDataset
    it was built from, so `build_dataloader` gives it the same sampler order.

    `dataset[i]` does at load time what the online path does per sample: replaces a failed sample by
    the next cached member of its bucket in the online order (`replacement_order`), draws the caption
    (aesthetic notice, cleanup, CFG dropout) with `sample_generator(seed, epoch, index, CAPTION_DRAWS)`, and returns

        mean, std     float32 [Z, T_lat, H_lat, W_lat]: the posterior of this epoch's crop (unnormalised)
        text_hidden   [L, C], text_mask int64 [L], pooled [P] or None: features of the drawn caption
        caption       the drawn string;   index, bucket, path, is_image, load_failures as VideoTextDataset
    """

    def __init__(
        self,
        cache: FeatureCache | str | os.PathLike,
        data_cfg: DataConfig,
        geometry: SampleGeometry,
        captions: TextConfig,
        seed: int,
    ):
        """`data_cfg` and `geometry` give the sampler settings (as for VideoTextDataset), `seed` is the
        training seed (caption draws). Nothing is checked against the cache's header: `from_config` does."""
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.cfg, self.geometry = data_cfg, geometry
        self.captions = CaptionProcessor(captions)
        self.seed = seed
        self.bucket_keys = self.cache.bucket_keys
        self.bucket_members = bucket_members(self.bucket_keys)
        self.epoch = 0

    @classmethod
    def from_config(
        cls, cache_dir: str | os.PathLike, cfg: ExperimentConfig, features: FeatureCacheConfig | None = None
    ) -> CachedFeatureDataset:
        """The cache at `cache_dir`, checked against `cfg` (ConfigError listing what differs)."""
        cache = FeatureCache(cache_dir)
        check_compatible(cache.header, cfg, features)
        return cls(cache, cfg.data, cfg.sample_geometry, cfg.captions, cfg.training.seed)

    def __len__(self) -> int:
        return len(self.bucket_keys)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops, caption draws and replacements `__getitem__` uses."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        failures = []
        members = self.bucket_members[self.bucket_keys[index]]
        for current in replacement_order(self.cfg.seed, self.epoch, index, members):
            if current in self.cache.failed:
                failures.append(self.cache.failed[current])
                continue
            sample = self.load(current)
            sample["load_failures"] = failures
            return sample
        raise RuntimeError(
            f"no cached sample of bucket {self.bucket_keys[index]} for index {index}: every member failed to load "
            f"when the cache was built; last: " + " | ".join(failures[-3:])
        )

    def load(self, index: int) -> dict[str, Any]:
        """Sample `index` without replacement (KeyError if it failed at build time)."""
        entry = self.cache.sample(index)
        mean, std = self.cache.latent(index, self.epoch)
        gen = sample_generator(self.seed, self.epoch, index, CAPTION_DRAWS)
        caption = self.captions.caption(
            entry["captions"], gen, aesthetic=entry["aesthetic"], is_video=not entry["is_image"]
        )
        text = self.cache.text(index, caption)
        return {
            "mean": mean,
            "std": std,
            "text_hidden": text["hidden"],
            "text_mask": text["mask"],
            "pooled": text["pooled"],
            "caption": caption,
            "index": index,
            "bucket": entry["bucket"],
            "path": entry["path"],
            "is_image": entry["is_image"],
        }


def collate_features(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cached samples -> batch: mean, std [B, Z, T, H, W], text_hidden_BLC, text_mask_BL, pooled_BP (or None),
    video_mask [B, T, H, W] int64 ones (as `collate_samples`), index [B], caption (the drawn strings), and
    path, is_image, bucket, load_failures as `collate_samples`."""
    if not samples:
        raise ValueError("collate got an empty batch")
    shapes = {tuple(s["mean"].shape) for s in samples}
    if len(shapes) != 1:
        listing = "; ".join(f"{s['path']}: {list(s['mean'].shape)}" for s in samples)
        raise ValueError(
            f"collate needs one latent shape per batch (use MegabatchBucketSampler); got {listing}"
        )
    _, t, h, w = samples[0]["mean"].shape
    pooled = [s["pooled"] for s in samples]
    return {
        "mean": torch.stack([s["mean"] for s in samples]),
        "std": torch.stack([s["std"] for s in samples]),
        "text_hidden_BLC": torch.stack([s["text_hidden"] for s in samples]),
        "text_mask_BL": torch.stack([s["text_mask"] for s in samples]),
        "pooled_BP": None if pooled[0] is None else torch.stack(pooled),
        "video_mask": torch.ones(len(samples), t, h, w, dtype=torch.int64),
        "caption": [s["caption"] for s in samples],
        "path": [s["path"] for s in samples],
        "is_image": [s["is_image"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "bucket": samples[0]["bucket"],
        "load_failures": [f for s in samples for f in s.get("load_failures", [])],
    }


class CachedBatches:
    """BatchSource over a feature cache: the TrainBatch `EncodedBatches` gives, without the encoders.

    Position, resume and epoch roll-over work as in EncodedBatches (`ResumableLoader`, counted in
    `consumed_samples`); the latents come from `posterior_latents`, as online, with the cached mean,
    std, shift and scale and the noise of `sample_generator(seed, epoch, index, POSTERIOR_NOISE)` (none when
    `vae.sample_posterior` is off).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        dataset: CachedFeatureDataset,
        dp_rank: int,
        dp_size: int,
        task: str = "t2v",
        consumed_samples: int = 0,
        device: torch.device | str = "cpu",
    ):
        if task == "i2v":
            raise ConfigError(I2V_UNSUPPORTED)
        self.cfg, self.dataset = cfg, dataset
        self.dp_rank, self.dp_size, self.task, self.device = dp_rank, dp_size, task, torch.device(device)
        self.stats = BatchStats()
        self.shift = dataset.cache.shift.to(self.device)
        self.scale = dataset.cache.scale.to(self.device)
        self._loader = ResumableLoader(
            dataset,
            dp_rank=dp_rank,
            dp_size=dp_size,
            consumed_samples=consumed_samples,
            global_batch_size=cfg.training.global_batch_size,
            collate_fn=collate_features,
        )

    # -- position (as EncodedBatches) ------------------------------------------------------------

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all data-parallel ranks together."""
        return self._loader.consumed_samples

    @property
    def epoch(self) -> int | None:
        """Epoch of the batches being served (None before the first one)."""
        return self._loader.epoch

    def state_dict(self) -> dict:
        """Samples consumed by all data-parallel ranks together."""
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `consumed_samples` (the sampler skips exactly that many)."""
        self._loader.restart(state["consumed_samples"])

    # -- batches ------------------------------------------------------------------------------------

    @torch.no_grad()
    def next_batch(self) -> TrainBatch:
        """This rank's next micro-batch, from the cache."""
        start = time.perf_counter()
        raw = self._loader.next()
        self.stats.loaded(raw, time.perf_counter() - start)
        for failure in raw.get("load_failures") or ():
            logger.warning("feature cache: %s; a sample of the same bucket replaced it", failure)
        epoch = self._loader.epoch or 0
        indices = [int(i) for i in raw["index"]]
        pooled = raw["pooled_BP"]
        cond = {
            "text_BLC": raw["text_hidden_BLC"].to(self.device),
            "text_mask_BL": raw["text_mask_BL"].to(self.device),
            "pooled_BP": None if pooled is None else pooled.to(self.device),
        }
        x0 = posterior_latents(
            raw["mean"].to(self.device),
            raw["std"].to(self.device),
            self.cfg.training.seed,
            epoch,
            indices,
            POSTERIOR_NOISE,
            self.cfg.vae.sample_posterior,
            self.shift,
            self.scale,
        )
        loss_mask = raw["video_mask"].to(self.device)
        cond["video_mask_BTHW"] = loss_mask
        return TrainBatch(x0, cond, loss_mask)


__all__ = ["CachedBatches", "CachedFeatureDataset", "FeatureCache", "collate_features"]
