"""Writing a feature cache: every rank encodes its share of the samples into shards (resumable), then
one process merges the shards' sidecars into index.json. The folder layout is described in
`feature_cache/format.py`."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from megatron_video.config.schema import ExperimentConfig
from megatron_video.data.config import FeatureCacheConfig
from megatron_video.data.dataset import SamplePlan, VideoTextDataset
from megatron_video.data.feature_cache.format import (
    COMMON,
    FORMAT_VERSION,
    HEADER,
    INDEX,
    LATENT_DTYPES,
    SHARDS,
    FeatureCacheError,
    atomic_save,
    atomic_write_json,
    cache_header,
    caption_variants,
    complete_shards,
    differences,
    dropout_texts,
    flatten,
    read_json,
    remove_partial,
    sha256_file,
    shard_name,
)
from megatron_video.data.text import TextConfig
from megatron_video.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class BuildStats:
    """What one rank's build did."""

    encoded: int
    """Samples encoded now."""

    failed: int
    """Samples whose file could not be read (recorded; replaced at load time like online)."""

    skipped: int
    """Samples of this rank found in complete shards of an earlier run."""

    shards: int
    """Shards written now."""

    seconds: float
    """Wall time of the call."""


class _ClipLoads(Dataset):
    """The decoded clips of the samples to encode: one per distinct temporal crop (runs in workers)."""

    def __init__(self, dataset: VideoTextDataset, indices: Sequence[int], crop_epochs: int):
        self.dataset, self.indices, self.crop_epochs = dataset, list(indices), crop_epochs

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        """{"index", "epochs": for each epoch < crop_epochs the first epoch with the same pixels,
        "clips": {that epoch: video [C, T, H, W]}}, or {"index", "error"} for an unreadable file.

        Each epoch's clip is loaded by `VideoTextDataset.load` itself (so its temporal crop is the
        one training draws) and compared by content, so equal crops are encoded once."""
        index = self.indices[k]
        plan = self.dataset.plans[index]
        epochs, clips, previous = [], {}, self.dataset.epoch
        try:
            for epoch in range(1 if plan.frames is None else self.crop_epochs):
                self.dataset.set_epoch(epoch)
                video = self.dataset.load(index)["video"]
                same = next((e for e, clip in clips.items() if torch.equal(clip, video)), None)
                if same is None:
                    clips[epoch] = video
                epochs.append(epoch if same is None else same)
        except Exception as e:  # an unreadable file is recorded, as training would replace it
            return {"index": index, "error": f"{plan.entry.path}: {type(e).__name__}: {e}"}
        finally:
            self.dataset.set_epoch(previous)
        return {"index": index, "epochs": epochs, "clips": clips}


def _as_is(item):
    return item


class _ShardWriter:
    """Collects one shard's samples; `commit` encodes their captions and writes shard + sidecar."""

    def __init__(self, shards_dir: Path, stem: str):
        self.dir, self.stem = shards_dir, stem
        self.tensors: dict[str, torch.Tensor] = {}
        self.samples: dict[str, dict] = {}
        self.buckets: dict[str, str] = {}
        self.failed: dict[str, list[str]] = {}
        self.texts: list[tuple[str, str]] = []  # (key, string) still to encode

    def __len__(self) -> int:
        return len(self.buckets) + len(self.failed)

    def add(self, index: int, plan: SamplePlan, epochs: list[int], latents: dict, texts: list[str]) -> None:
        for epoch, (mean, std) in latents.items():
            self.tensors[f"{index}.e{epoch}.mean"] = mean
            self.tensors[f"{index}.e{epoch}.std"] = std
        keys = {text: f"{index}.t{j}" for j, text in enumerate(texts)}
        self.texts += [(key, text) for text, key in keys.items()]
        entry = plan.entry
        self.samples[str(index)] = {
            "path": entry.path,
            "bucket": plan.bucket,
            "is_image": entry.is_image,
            "aesthetic": entry.aesthetic,
            "captions": list(entry.captions),
            "latents": [f"{index}.e{e}" for e in epochs],
            "shape": list(next(iter(latents.values()))[0].shape),
            "texts": keys,
        }
        self.buckets[str(index)] = plan.bucket

    def add_failure(self, index: int, bucket: str, reason: str) -> None:
        self.failed[str(index)] = [bucket, reason]

    def commit(self, encode_texts: Callable, batch_size: int) -> None:
        for start in range(0, len(self.texts), batch_size):
            chunk = self.texts[start : start + batch_size]
            self.tensors.update(_text_tensors([k for k, _ in chunk], encode_texts([t for _, t in chunk])))
        path = self.dir / f"{self.stem}.safetensors"
        size, digest = atomic_save(path, self.tensors, {"samples": json.dumps(self.samples)})
        sidecar = {"shard": path.name, "bytes": size, "sha256": digest, "samples": self.buckets}
        atomic_write_json(self.dir / f"{self.stem}.json", {**sidecar, "failed": self.failed})


def _text_tensors(keys: Sequence[str], emb) -> dict[str, torch.Tensor]:
    """Per-string tensors `<key>.hidden` [L, C], `<key>.mask` [L] int64, `<key>.pooled` [P] (own storage)."""
    out = {}
    for j, key in enumerate(keys):
        out[f"{key}.hidden"] = emb.hidden_BLC[j].detach().cpu().clone()
        out[f"{key}.mask"] = emb.mask_BL[j].detach().cpu().to(torch.int64).clone()
        if emb.pooled_BP is not None:
            out[f"{key}.pooled"] = emb.pooled_BP[j].detach().cpu().clone()
    return out


def _write_or_check_header(out: Path, header: dict[str, Any]) -> None:
    path = out / HEADER
    if path.is_file():
        diffs = differences(flatten(read_json(path)), flatten(header), "")
        if diffs:
            raise FeatureCacheError(
                f"{path}: this folder holds a cache built with other settings:\n  "
                + "\n  ".join(diffs)
                + "\nuse another features.cache_dir, or delete the folder to rebuild it"
            )
        return
    atomic_write_json(path, header)


def _write_common(out: Path, captions: TextConfig, text_encoder) -> None:
    path = out / COMMON
    if path.is_file():
        return
    texts = dropout_texts(captions)
    keys = [f"c{j}" for j in range(len(texts))]
    tensors = _text_tensors(keys, text_encoder.encode_texts(texts))
    atomic_save(path, tensors, {"texts": json.dumps(dict(zip(texts, keys)))})


@torch.inference_mode()
def build_feature_cache(
    cfg: ExperimentConfig,
    features: FeatureCacheConfig,
    vae,
    text_encoder,
    *,
    rank: int = 0,
    world_size: int = 1,
    dataset: VideoTextDataset | None = None,
    progress: Callable[[str], None] | None = None,
) -> BuildStats:
    """Encode this rank's samples (dataset indices rank, rank + world_size, ...) into shards under
    `features.cache_dir`, skipping samples in complete shards of earlier runs.

    Needs no process group: ranks only share the folder. Rank 0 also writes common.safetensors; after
    every rank has finished, one process calls `merge_index` (see `wait_for_shards`). Clips are
    decoded by `cfg.data.num_workers` DataLoader workers; the VAE and text encoder run where their
    weights are.
    """
    start = time.perf_counter()
    features.validate()
    if not features.cache_dir:
        raise ConfigError("features.cache_dir is not set: the folder to write the cache to")
    say = progress or logger.info
    out = Path(features.cache_dir)
    shards_dir = out / SHARDS
    shards_dir.mkdir(parents=True, exist_ok=True)
    dataset = dataset or VideoTextDataset(cfg.data, cfg.sample_geometry)
    _write_or_check_header(out, cache_header(cfg, features, vae, text_encoder, dataset))
    if rank == 0:
        _write_common(out, cfg.captions, text_encoder)

    prefix = f"r{rank:04d}-"
    complete = complete_shards(shards_dir)
    removed = remove_partial(shards_dir, prefix, complete)
    done = {int(i) for info in complete.values() for i in (*info["samples"], *info["failed"])}
    mine = range(rank, len(dataset), world_size)
    pending = [i for i in mine if i not in done]
    if rank == 0 and len(done) < len(dataset):
        (out / INDEX).unlink(missing_ok=True)  # an index of an earlier run would name shards being redone
    seq = 1 + max((int(stem.split("-")[1]) for stem in complete if stem.startswith(prefix)), default=0)
    say(
        f"feature cache rank {rank}/{world_size}: {len(pending)} of {len(mine)} samples to encode "
        f"({len(mine) - len(pending)} done earlier, {removed} partial files removed) -> {out}"
    )

    device = next(vae.parameters()).device
    dtype = LATENT_DTYPES[features.latent_dtype]
    loader = DataLoader(
        _ClipLoads(dataset, pending, features.crop_epochs),
        batch_size=None,
        num_workers=cfg.data.num_workers,
        collate_fn=_as_is,
    )
    writer = _ShardWriter(shards_dir, shard_name(rank, seq))
    encoded = failed = shards = 0
    for item in loader:
        index = item["index"]
        plan = dataset.plans[index]
        if "error" in item:
            logger.warning("feature cache: could not load sample %d: %s", index, item["error"])
            writer.add_failure(index, plan.bucket, item["error"])
            failed += 1
        else:
            latents = {}
            for epoch, clip in item["clips"].items():
                posterior = vae.encode(clip[None].to(device))
                latents[epoch] = tuple(t[0].to("cpu", dtype).clone() for t in (posterior.mean, posterior.std))
            entry = plan.entry
            texts = caption_variants(entry.captions, entry.aesthetic, not entry.is_image, cfg.captions)
            writer.add(index, plan, item["epochs"], latents, texts)
            encoded += 1
        if len(writer) >= features.samples_per_shard:
            writer.commit(text_encoder.encode_texts, features.text_batch_size)
            shards, seq = shards + 1, seq + 1
            writer = _ShardWriter(shards_dir, shard_name(rank, seq))
            _report(say, rank, encoded + failed, len(pending), start)
    if len(writer):
        writer.commit(text_encoder.encode_texts, features.text_batch_size)
        shards += 1
    _report(say, rank, encoded + failed, len(pending), start)
    return BuildStats(encoded, failed, len(mine) - len(pending), shards, time.perf_counter() - start)


def _report(say: Callable[[str], None], rank: int, n: int, total: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    rate = n / elapsed if elapsed > 0 else 0.0
    eta = (total - n) / rate if rate > 0 else float("nan")
    say(
        f"feature cache rank {rank}: {n}/{total} samples, {rate:.2f} samples/s, {elapsed:.0f} s, ETA {eta:.0f} s"
    )


def wait_for_shards(
    cache_dir: str | os.PathLike, poll_s: float = 5.0, progress: Callable[[str], None] | None = None
) -> None:
    """Block until complete shards cover every sample of the header (the other ranks finished)."""
    out = Path(cache_dir)
    total = read_json(out / HEADER)["num_samples"]
    seen: dict[str, dict | None] = {}
    last = -1
    while True:
        complete = complete_shards(out / SHARDS, seen)
        covered = {i for info in complete.values() for i in (*info["samples"], *info["failed"])}
        if len(covered) >= total:
            return
        if len(covered) != last and progress:
            progress(f"feature cache: waiting for other ranks, {total - len(covered)} samples left")
        last = len(covered)
        time.sleep(poll_s)


def merge_index(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Write index.json from the complete shards' sidecars (call once every rank has finished);
    deletes partial files. Returns the index; its "missing" counts samples no shard holds."""
    out = Path(cache_dir)
    header = read_json(out / HEADER)
    shards_dir = out / SHARDS
    complete = complete_shards(shards_dir)
    remove_partial(shards_dir, "r", complete)
    n = header["num_samples"]
    shard_of, bucket_of = [-1] * n, [-1] * n
    buckets: dict[str, int] = {}
    failed: dict[str, str] = {}
    shards, duplicates = [], 0
    for stem, info in complete.items():
        sid = len(shards)
        shards.append({"name": info["shard"], "bytes": info["bytes"], "sha256": info["sha256"]})
        for key, bucket in info["samples"].items():
            if shard_of[int(key)] >= 0 or key in failed:
                duplicates += 1
                continue
            shard_of[int(key)], bucket_of[int(key)] = sid, buckets.setdefault(bucket, len(buckets))
        for key, (bucket, reason) in info["failed"].items():
            if shard_of[int(key)] >= 0 or key in failed:
                duplicates += 1
                continue
            failed[key], bucket_of[int(key)] = reason, buckets.setdefault(bucket, len(buckets))
        logger.debug("feature cache: merged %s", stem)
    if duplicates:
        logger.warning(
            "feature cache: %d samples appear in more than one shard; the first is used", duplicates
        )
    common = out / COMMON
    index = {
        "format": FORMAT_VERSION,
        "header": header,
        "common": {"name": COMMON, "bytes": common.stat().st_size, "sha256": sha256_file(common)},
        "shards": shards,
        "buckets": list(buckets),
        "bucket_of": bucket_of,
        "shard_of": shard_of,
        "failed": failed,
        "missing": sum(1 for i in range(n) if shard_of[i] < 0 and str(i) not in failed),
    }
    atomic_write_json(out / INDEX, index)
    return index


__all__ = ["BuildStats", "build_feature_cache", "merge_index", "wait_for_shards"]
