"""Latent and text-feature cache: encode a data list once, then train without the frozen encoders.

Open-Sora-Plan v1.5 reports ~30% less step time and ~20% less memory with a latent cache; its
release left the dataset side unimplemented (reference 6.6). Here:

    tools/build_feature_cache.py   stage config -> CACHE/ (ranks split the samples, resumable)
    CachedFeatureDataset           dataset index -> cached features, same indices and bucket keys
    CachedBatches                  BatchSource giving the TrainBatch that EncodedBatches gives

What a cached run sees is what an online run (`EncodedBatches`) sees for the same config and seed:
the same MegabatchBucketSampler order (built from the same bucket keys), the same caption draw and
CFG dropout (`CaptionProcessor.caption` runs at load time with the same keyed generator), and the
same posterior sample `mean + std * noise` (the noise comes from the same `sample_generator` key,
so only the mean and std are stored). Exactness limits, all measured by
tests/unit/test_feature_cache.py:
- the VAE encodes one clip per call here and a whole micro-batch online; CPU convolutions give
  results that differ in the last bits with the batch size (~1e-6 for the tiny WF-VAE), so latents
  match bit for bit at micro-batch 1 and to ~1e-6 otherwise (text encoders batch strings in both
  paths; MiniLM's features came out bit-identical);
- temporal crops are drawn per (data seed, epoch, index). The cache stores the crops of epochs
  0 .. crop_epochs - 1 (one latent per distinct crop) and epoch e reads crop e mod crop_epochs;
  with the default of 1 every epoch trains on the epoch-0 crop (frozen crops);
- an unreadable file is recorded as failed and replaced at load time by the next sample of its
  bucket in the online order, so cached and online runs agree when the same files fail.

Aesthetic notices: cached, not switched off. With `captions.aesthetic_notice` on, a sample whose
score is outside (aesthetic_low, aesthetic_high) can see 4 phrases x 2 positions per caption, and
all 8 variants of every caption are encoded (only for such samples), so the caption draw stays
exactly the online one. Set `captions.aesthetic_notice=false` to cache one string per caption.
Dropout strings ("" and the two default sentences) are encoded once, in common.safetensors.

I2V is not supported: its condition is the VAE latent of the *masked* video, whose mask type,
kept frames and condition noise are drawn per sample and epoch. A causal VAE's latent of a masked
clip cannot be derived from the full clip's latent (every latent frame mixes all earlier pixel
frames, and masked frames are black pixels, not dropped frames), so the cache has nothing to build
it from; `CachedBatches` raises for task="i2v".

Storage (per sample): posterior mean and std [Z, T_lat, H_lat, W_lat] in `latent_dtype` (float32
by default: bf16 rounds the mean by ~2^-9 relative, which can be as large as the posterior std, so
sampled latents would no longer equal the online ones; float32 is exact whatever the VAE ran in),
and per caption string the token states [L, C] and pooled vector [P] in the dtype the text encoder
produced (exact), with the int64 mask [L].

Folder layout (every file is written to a temporary name, then renamed):

    header.json                build settings and fingerprints; a resumed build must match it
    common.safetensors         features of the dropout strings; metadata {"texts": {string: key}}
    shards/rRRRR-SSSSSS.safetensors   tensors "<index>.e<epoch>.{mean,std}", "<index>.t<j>.{hidden,mask,pooled}";
                               metadata {"samples": {index: path, bucket, captions, aesthetic,
                               latents (key per crop epoch), shape, texts {string: key}}}
    shards/rRRRR-SSSSSS.json   sidecar written after its shard: bytes, sha256, samples {index: bucket},
                               failed {index: [bucket, reason]}; a shard is complete iff its sidecar
                               exists and the sizes agree
    index.json                 written last (rank 0): header, shard list with sizes and checksums,
                               per dataset index its shard and bucket, failed samples

The index stays small (two integers per sample) so every DataLoader worker can hold it; a sample's
details are read from its shard's metadata when the shard is first opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from megatron_video.data.annotations import read_data_list
from megatron_video.data.config import DataConfig
from megatron_video.data.dataset import ResumableLoader, SamplePlan, VideoTextDataset
from megatron_video.data.text import (
    HIGH_AESTHETIC_NOTICES,
    LOW_AESTHETIC_NOTICES,
    CaptionProcessor,
    TextConfig,
    clean_caption,
)
from megatron_video.errors import ConfigError

if TYPE_CHECKING:
    from megatron_video.config.schema import ExperimentConfig
    from megatron_video.training.loop import TrainBatch

# The training layer (sample_generator, TrainBatch) is imported where it is used: the config schema
# imports this module for FeatureCacheConfig, and the training modules import the schema.

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Layout version written to header.json and index.json; readers refuse other versions."""

LOADER_FIELDS = (
    "data_list",
    "check_files_exist",
    "batch_size",
    "group_data",
    "bucket_drop_threshold",
    "num_workers",
    "decode_timeout_s",
    "max_load_attempts",
)
"""DataConfig fields that change how samples are ordered or loaded, not what a sample holds; a cache
serves any value of them (the data list's contents are checked by checksum instead)."""

CAPTION_FIELDS = (
    "aesthetic_notice",
    "aesthetic_low",
    "aesthetic_high",
    "clean",
    "lowercase",
    "keep_cjk",
    "fix_unicode",
    "default_text_video",
    "default_text_image",
)
"""TextConfig fields that decide which caption strings exist; the dropout probabilities act at load
time and may change freely."""

VAE_FIELDS = ("kind", "flavor", "checkpoint", "use_ema")
"""VAESection fields that decide the latents (`sample_posterior` acts at load time)."""

I2V_UNSUPPORTED = (
    "the feature cache cannot feed I2V training: the I2V condition is the VAE latent of the masked "
    "video, whose mask (type, kept frames, condition noise) is drawn per sample and epoch, and a causal "
    "VAE's latent of a masked clip cannot be derived from the full clip's cached latent (each latent "
    "frame mixes all earlier pixel frames; masked frames are black, not dropped). Train I2V stages with "
    "online encoding (features.cache_dir=null); T2V/T2I stages can use the cache"
)
"""The error for task="i2v" with a cache."""


class FeatureCacheError(RuntimeError):
    """A cache file is missing, corrupt or incomplete, or a build does not match its folder; the
    message names the file and the fix."""


@dataclass
class FeatureCacheConfig:
    """Training from pre-computed VAE latents and text features (the `features` config section)."""

    cache_dir: str | None = None
    """Folder of a cache written by tools/build_feature_cache.py. Set: T2V stages read latents and
    text features from it and load neither the VAE nor the text encoder. None: encode online. I2V
    stages cannot use a cache (see the feature_cache module docstring)."""

    crop_epochs: int = 1
    """Temporal crops cached per video: epoch e trains on the crop of epoch e mod crop_epochs, so
    epochs below this value see exactly the online crops. 1 freezes every clip to its epoch-0 crop.
    A clip with a single possible window (and every image) stores one latent whatever the value."""

    latent_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage of the posterior mean and std. float32 reproduces the online latents exactly;
    bfloat16 halves the latent bytes (most of the cache) at ~0.4% relative rounding of mean and std,
    which is exact only when the VAE itself ran in bfloat16."""

    samples_per_shard: int = 64
    """Samples per shard file while building: the unit of resume (a stopped build redoes at most one
    shard per rank) and of the open-file cache while reading."""

    text_batch_size: int = 64
    """Caption strings per text-encoder call while building."""

    def validate(self) -> None:
        """Raise ConfigError for sizes below 1 or an unknown dtype."""
        for name in ("crop_epochs", "samples_per_shard", "text_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"features.{name} must be >= 1, got {getattr(self, name)}")
        if self.latent_dtype not in _LATENT_DTYPES:
            raise ConfigError(
                f"features.latent_dtype must be one of {sorted(_LATENT_DTYPES)}, got {self.latent_dtype!r}"
            )


_LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# What a sample can become: caption strings and temporal crops


def caption_variants(
    captions: Sequence[str], aesthetic: float | None, is_video: bool, cfg: TextConfig
) -> list[str]:
    """Every string `CaptionProcessor.caption` can return for a sample before CFG dropout (each caption,
    with every aesthetic phrase before and after it when a notice applies, cleaned), without repeats."""
    notices: tuple[str, ...] = ()
    if (
        cfg.aesthetic_notice
        and aesthetic is not None
        and not cfg.aesthetic_low < aesthetic < cfg.aesthetic_high
    ):
        table = LOW_AESTHETIC_NOTICES if aesthetic <= cfg.aesthetic_low else HIGH_AESTHETIC_NOTICES
        notices = table["video" if is_video else "image"]
    texts: dict[str, None] = {}
    for caption in captions:
        raw = (
            [f"{n} {caption}" for n in notices] + [f"{caption} {n}" for n in notices]
            if notices
            else [caption]
        )
        for text in raw:
            if cfg.clean:
                text = clean_caption(
                    text, lowercase=cfg.lowercase, keep_cjk=cfg.keep_cjk, fix_unicode=cfg.fix_unicode
                )
            texts.setdefault(text, None)
    return list(texts)


def dropout_texts(cfg: TextConfig) -> list[str]:
    """The strings CFG dropout can give any sample: "" and the default video and image sentences."""
    return list(dict.fromkeys(["", cfg.default_text_video, cfg.default_text_image]))


# ---------------------------------------------------------------------------------------------
# Header: what the cache was built from


def _sha256_file(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def annotations_sha256(data_list: str | os.PathLike) -> str:
    """Checksum of a data.txt and every annotation file it names (their bytes, in order)."""
    h = hashlib.sha256(Path(data_list).read_bytes())
    for _, annotation in read_data_list(data_list):
        _sha256_file(annotation, h)
    return h.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Checksum of a module's state dict (names, shapes, dtypes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so settings compare equal to a file's."""
    return json.loads(json.dumps(value))


def _data_fields(cfg: DataConfig) -> dict[str, Any]:
    return _jsonable({k: v for k, v in dataclasses.asdict(cfg).items() if k not in LOADER_FIELDS})


def _caption_fields(cfg: TextConfig) -> dict[str, Any]:
    return _jsonable({k: getattr(cfg, k) for k in CAPTION_FIELDS})


def _vae_fields(cfg: ExperimentConfig) -> dict[str, Any]:
    return _jsonable({k: getattr(cfg.vae, k) for k in VAE_FIELDS})


def cache_header(
    cfg: ExperimentConfig, features: FeatureCacheConfig, vae, text_encoder, dataset: VideoTextDataset
) -> dict[str, Any]:
    """The settings and fingerprints a cache is built from (header.json)."""
    plans = hashlib.sha256()
    for plan in dataset.plans:
        plans.update(f"{plan.entry.path}|{plan.bucket}\n".encode())
    return _jsonable(
        {
            "format": FORMAT_VERSION,
            "num_samples": len(dataset),
            "plans_sha256": plans.hexdigest(),
            "annotations_sha256": annotations_sha256(cfg.data.data_list),
            "data_list": str(cfg.data.data_list),
            "data": _data_fields(cfg.data),
            "captions": _caption_fields(cfg.captions),
            "text": dataclasses.asdict(cfg.text),
            "text_hidden_size": text_encoder.hidden_size,
            "text_pooled_size": text_encoder.pooled_size,
            "vae": _vae_fields(cfg),
            "vae_weights_sha256": state_dict_sha256(vae),
            "vae_shift": vae.shift.detach().cpu().float().flatten().tolist(),
            "vae_scale": vae.scale.detach().cpu().float().flatten().tolist(),
            "crop_epochs": features.crop_epochs,
            "latent_dtype": features.latent_dtype,
        }
    )


def _differences(cached: dict, current: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(cached) | set(current)):
        a, b = cached.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{prefix}{key}: cache {_short(a)}, now {_short(b)}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_compatible(
    header: dict[str, Any], cfg: ExperimentConfig, features: FeatureCacheConfig | None = None
) -> None:
    """Raise ConfigError listing every setting the cache was built with that `cfg` changes.

    Compared: the data fields that shape a sample (not LOADER_FIELDS), the caption fields that shape
    strings, the text encoders, the VAE choice, the model's text widths against the cached features,
    and (with `features`) crop_epochs and latent_dtype.
    The annotation files are compared by checksum when `cfg.data.data_list` is readable here.
    """
    diffs = _differences(header["data"], _data_fields(cfg.data), "data.")
    diffs += _differences(header["captions"], _caption_fields(cfg.captions), "captions.")
    diffs += _differences(
        _flatten(header["text"]), _flatten(_jsonable(dataclasses.asdict(cfg.text))), "text."
    )
    diffs += _differences(header["vae"], _vae_fields(cfg), "vae.")
    widths = {
        "caption_channels": header["text_hidden_size"],
        "pooled_projection_dim": header["text_pooled_size"],
    }
    diffs += _differences(
        {k: v for k, v in widths.items() if v is not None},
        {k: getattr(cfg.model, k) for k, v in widths.items() if v is not None},
        "model.",
    )
    if features is not None:
        diffs += _differences(
            {k: header[k] for k in ("crop_epochs", "latent_dtype")},
            {"crop_epochs": features.crop_epochs, "latent_dtype": features.latent_dtype},
            "features.",
        )
    data_list = cfg.data.data_list
    if data_list and Path(data_list).is_file():
        if annotations_sha256(data_list) != header["annotations_sha256"]:
            diffs.append(
                f"data.data_list: the annotations of {data_list} differ from those the cache was built from "
                f"({header['data_list']})"
            )
    else:
        logger.info("feature cache: data list %s not readable here; annotations not compared", data_list)
    if diffs:
        raise ConfigError(
            "the feature cache was built with other settings than this config:\n  "
            + "\n  ".join(diffs)
            + "\nrebuild it with tools/build_feature_cache.py or train with the settings it was built with"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# Files


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """Write a safetensors file under a temporary name, sync, rename; returns (bytes, sha256)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # save_file creates 0600; give shards the mode other files get
    digest = _sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return size, digest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FeatureCacheError(f"{path} is not valid JSON ({e}); the file is corrupt") from e


SHARDS = "shards"
HEADER, INDEX, COMMON = "header.json", "index.json", "common.safetensors"


def shard_name(rank: int, seq: int) -> str:
    """Stem of a rank's seq-th shard: rRRRR-SSSSSS."""
    return f"r{rank:04d}-{seq:06d}"


def _complete_shards(shards_dir: Path, seen: dict[str, dict | None] | None = None) -> dict[str, dict]:
    """Sidecars (by stem) of the complete shards: sidecar present and shard size as recorded.

    `seen` (stem -> sidecar, None when invalid) carries what earlier calls read, for polling.
    """
    seen = {} if seen is None else seen
    out = {}
    for sidecar in sorted(shards_dir.glob("r*-*.json")):
        stem = sidecar.stem
        if stem not in seen:
            seen[stem] = _read_sidecar(shards_dir, sidecar)
        if seen[stem] is not None:
            out[stem] = seen[stem]
    return out


def _read_sidecar(shards_dir: Path, sidecar: Path) -> dict | None:
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, OSError) as e:
        logger.warning("feature cache: ignoring unreadable sidecar %s (%s)", sidecar, e)
        return None
    shard = shards_dir / info["shard"]
    if not shard.is_file() or shard.stat().st_size != info["bytes"]:
        logger.warning(
            "feature cache: %s does not match its shard %s; its samples will be redone", sidecar, shard
        )
        return None
    return info


def _remove_partial(shards_dir: Path, prefix: str, complete: dict[str, dict]) -> int:
    """Delete files of shards starting with `prefix` that are not complete (temporary files, shards
    without a valid sidecar, sidecars of missing shards); returns how many."""
    removed = 0
    for path in shards_dir.glob(f"{prefix}*"):
        stem = path.name.split(".", 1)[0]
        if ".tmp-" in path.name or stem not in complete:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# Building


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
        size, digest = _atomic_save(path, self.tensors, {"samples": json.dumps(self.samples)})
        sidecar = {"shard": path.name, "bytes": size, "sha256": digest, "samples": self.buckets}
        _atomic_write_json(self.dir / f"{self.stem}.json", {**sidecar, "failed": self.failed})


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
        diffs = _differences(_flatten(_read_json(path)), _flatten(header), "")
        if diffs:
            raise FeatureCacheError(
                f"{path}: this folder holds a cache built with other settings:\n  "
                + "\n  ".join(diffs)
                + "\nuse another features.cache_dir, or delete the folder to rebuild it"
            )
        return
    _atomic_write_json(path, header)


def _write_common(out: Path, captions: TextConfig, text_encoder) -> None:
    path = out / COMMON
    if path.is_file():
        return
    texts = dropout_texts(captions)
    keys = [f"c{j}" for j in range(len(texts))]
    tensors = _text_tensors(keys, text_encoder.encode_texts(texts))
    _atomic_save(path, tensors, {"texts": json.dumps(dict(zip(texts, keys)))})


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
    dataset = dataset or VideoTextDataset(cfg.data)
    _write_or_check_header(out, cache_header(cfg, features, vae, text_encoder, dataset))
    if rank == 0:
        _write_common(out, cfg.captions, text_encoder)

    prefix = f"r{rank:04d}-"
    complete = _complete_shards(shards_dir)
    removed = _remove_partial(shards_dir, prefix, complete)
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
    dtype = _LATENT_DTYPES[features.latent_dtype]
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
    total = _read_json(out / HEADER)["num_samples"]
    seen: dict[str, dict | None] = {}
    last = -1
    while True:
        complete = _complete_shards(out / SHARDS, seen)
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
    header = _read_json(out / HEADER)
    shards_dir = out / SHARDS
    complete = _complete_shards(shards_dir)
    _remove_partial(shards_dir, "r", complete)
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
        "common": {"name": COMMON, "bytes": common.stat().st_size, "sha256": _sha256_file(common)},
        "shards": shards,
        "buckets": list(buckets),
        "bucket_of": bucket_of,
        "shard_of": shard_of,
        "failed": failed,
        "missing": sum(1 for i in range(n) if shard_of[i] < 0 and str(i) not in failed),
    }
    _atomic_write_json(out / INDEX, index)
    return index


# ---------------------------------------------------------------------------------------------
# Reading


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
        index = _read_json(path)
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
            if _sha256_file(path) != info["sha256"]:
                problems.append(f"feature cache file {path}: sha256 differs from the index (corrupt bytes)")
        return problems


class CachedFeatureDataset(Dataset):
    """Map-style dataset over a feature cache with the indices and bucket keys of the VideoTextDataset
    it was built from, so `build_dataloader` gives it the same sampler order.

    `dataset[i]` does at load time what the online path does per sample: replaces a failed sample by
    the next cached member of its bucket in the online order, draws the caption (aesthetic notice,
    cleanup, CFG dropout) with `sample_generator(seed, epoch, index, 1)`, and returns

        mean, std     float32 [Z, T_lat, H_lat, W_lat]: the posterior of this epoch's crop (unnormalised)
        text_hidden   [L, C], text_mask int64 [L], pooled [P] or None: features of the drawn caption
        caption       the drawn string;   index, bucket, path, is_image, load_failures as VideoTextDataset
    """

    def __init__(
        self, cache: FeatureCache | str | os.PathLike, data_cfg: DataConfig, captions: TextConfig, seed: int
    ):
        """`seed` is the training seed (caption draws); `data_cfg` gives the sampler settings."""
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.cfg = data_cfg
        self.captions = CaptionProcessor(captions)
        self.seed = seed
        self.bucket_keys = self.cache.bucket_keys
        self.bucket_members: dict[str, list[int]] = {}
        for i, key in enumerate(self.bucket_keys):
            self.bucket_members.setdefault(key, []).append(i)
        self.epoch = 0

    @classmethod
    def from_config(
        cls, cache_dir: str | os.PathLike, cfg: ExperimentConfig, features: FeatureCacheConfig | None = None
    ) -> CachedFeatureDataset:
        """The cache at `cache_dir`, checked against `cfg` (ConfigError listing what differs)."""
        cache = FeatureCache(cache_dir)
        check_compatible(cache.header, cfg, features)
        return cls(cache, cfg.data, cfg.captions, cfg.training.seed)

    def __len__(self) -> int:
        return len(self.bucket_keys)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops, caption draws and replacements `__getitem__` uses."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        failures = []
        for current in self._candidates(int(index)):
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

    def _candidates(self, index: int):
        """`index`, then the other members of its bucket in `VideoTextDataset._candidates`' order."""
        yield index
        members = self.bucket_members[self.bucket_keys[index]]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, index])
        for position in rng.permutation(len(members)).tolist():
            if members[position] != index:
                yield members[position]

    def load(self, index: int) -> dict[str, Any]:
        """Sample `index` without replacement (KeyError if it failed at build time)."""
        from megatron_video.training.batches import sample_generator

        entry = self.cache.sample(index)
        mean, std = self.cache.latent(index, self.epoch)
        gen = sample_generator(self.seed, self.epoch, index, 1)
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

    Position, resume and epoch roll-over work as in EncodedBatches (`consumed_samples`); the latents
    are `((mean + std * noise) - shift) * scale` with the noise of `sample_generator(seed, epoch,
    index, 2)` (or the mean when `vae.sample_posterior` is off), shift and scale from the cache.
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
        from megatron_video.training.loop import TrainBatch

        raw = self._loader.next()
        epoch = self._loader.epoch or 0
        indices = [int(i) for i in raw["index"]]
        pooled = raw["pooled_BP"]
        cond = {
            "text_BLC": raw["text_hidden_BLC"].to(self.device),
            "text_mask_BL": raw["text_mask_BL"].to(self.device),
            "pooled_BP": None if pooled is None else pooled.to(self.device),
        }
        x0 = self._latents(raw["mean"], raw["std"], indices, epoch)
        loss_mask = raw["video_mask"].to(self.device)
        cond["video_mask_BTHW"] = loss_mask
        return TrainBatch(x0, cond, loss_mask)

    def _latents(self, mean, std, indices, epoch):
        """Normalised latents from cached posteriors, drawn as `EncodedBatches._encode` draws them."""
        from megatron_video.training.batches import sample_generator

        mean, std = mean.to(self.device), std.to(self.device)
        if not self.cfg.vae.sample_posterior:
            z = mean
        else:
            noise = torch.cat(
                [
                    torch.randn(
                        (1, *mean.shape[1:]),
                        generator=sample_generator(self.cfg.training.seed, epoch, index, 2),
                    )
                    for index in indices
                ]
            ).to(self.device)
            z = mean + std * noise
        return (z - self.shift) * self.scale


__all__ = [
    "BuildStats",
    "CachedBatches",
    "CachedFeatureDataset",
    "FeatureCache",
    "FeatureCacheConfig",
    "FeatureCacheError",
    "build_feature_cache",
    "caption_variants",
    "check_compatible",
    "collate_features",
    "dropout_texts",
    "merge_index",
    "wait_for_shards",
]
