"""Latent and text-feature cache: encode a data list once, then train without the frozen encoders.

Open-Sora-Plan v1.5 reports ~30% less step time and ~20% less memory with a latent cache; its
release left the dataset side unimplemented (reference 6.6). Here:

    tools/build_feature_cache.py   stage config -> CACHE/ (ranks split the samples, resumable)
    CachedFeatureDataset           dataset index -> cached features, same indices and bucket keys
    CachedBatches                  BatchSource giving the TrainBatch that EncodedBatches gives

This module holds the format: folder layout, header and compatibility check, file writes and reads,
and which caption strings a sample can become. `build.py` writes a cache (`build_feature_cache`,
`merge_index`), `read.py` serves it (`FeatureCache`, `CachedFeatureDataset`, `CachedBatches`).

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

    header.json                build settings and fingerprints (data, captions, text encoders, VAE,
                               the sample geometry: VAE strides and context-parallel size); a resumed
                               build must match it
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_video.config.schema import ExperimentConfig
from megatron_video.data.annotations import read_data_list
from megatron_video.data.config import DataConfig, FeatureCacheConfig, SampleGeometry
from megatron_video.data.dataset import VideoTextDataset
from megatron_video.data.text import TextConfig, aesthetic_notices, clean_caption, place_notice
from megatron_video.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Layout version written to header.json and index.json; readers refuse other versions."""

LOADER_FIELDS = (
    "data_list",
    "check_files_exist",
    "group_data",
    "bucket_drop_threshold",
    "num_workers",
    "decode_timeout_s",
    "max_load_attempts",
)
"""DataConfig fields that change how samples are ordered or loaded, not what a sample holds; a cache
serves any value of them (the data list's contents are checked by checksum instead)."""

GEOMETRY_FIELDS = ("vae_stride_t", "vae_stride_hw", "context_parallel")
"""SampleGeometry fields that decide which samples and temporal crops exist (video lengths snap to
them); `micro_batch_size` is a loader setting and may change freely."""

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

LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""`features.latent_dtype` -> the storage dtype of posterior mean and std."""

SHARDS = "shards"
HEADER, INDEX, COMMON = "header.json", "index.json", "common.safetensors"


class FeatureCacheError(RuntimeError):
    """A cache file is missing, corrupt or incomplete, or a build does not match its folder; the
    message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# What a sample can become: caption strings


def caption_variants(
    captions: Sequence[str], aesthetic: float | None, is_video: bool, cfg: TextConfig
) -> list[str]:
    """Every string `CaptionProcessor.caption` can return for a sample before CFG dropout (each caption,
    with every aesthetic phrase before and after it when a notice applies, cleaned), without repeats."""
    notices: tuple[str, ...] = ()
    if cfg.aesthetic_notice:
        notices = aesthetic_notices(
            aesthetic, is_video=is_video, low=cfg.aesthetic_low, high=cfg.aesthetic_high
        )
    texts: dict[str, None] = {}
    for caption in captions:
        raw = (
            [place_notice(caption, n, before) for before in (True, False) for n in notices]
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


def sha256_file(path: Path, h=None) -> str:
    """Hex sha256 of a file's bytes (fed into `h` when given, which then covers earlier data too)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def annotations_sha256(data_list: str | os.PathLike) -> str:
    """Checksum of a data.txt and every annotation file it names (their bytes, in order)."""
    h = hashlib.sha256(Path(data_list).read_bytes())
    for _, annotation in read_data_list(data_list):
        sha256_file(annotation, h)
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


def _geometry_fields(geometry: SampleGeometry) -> dict[str, Any]:
    return _jsonable({k: getattr(geometry, k) for k in GEOMETRY_FIELDS})


def _caption_fields(cfg: TextConfig) -> dict[str, Any]:
    return _jsonable({k: getattr(cfg, k) for k in CAPTION_FIELDS})


def _vae_fields(cfg: ExperimentConfig) -> dict[str, Any]:
    return _jsonable({k: getattr(cfg.vae, k) for k in VAE_FIELDS})


def cache_header(
    cfg: ExperimentConfig, features: FeatureCacheConfig, vae, text_encoder, dataset: VideoTextDataset
) -> dict[str, Any]:
    """The settings and fingerprints a cache is built from (header.json); the sample geometry is the
    one `dataset` was planned with."""
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
            "sample_geometry": _geometry_fields(dataset.geometry),
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


def differences(cached: dict, current: dict, prefix: str) -> list[str]:
    """ "<prefix><key>: cache <value>, now <value>" for every key whose values differ (or is absent)."""
    out = []
    for key in sorted(set(cached) | set(current)):
        a, b = cached.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{prefix}{key}: cache {_short(a)}, now {_short(b)}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(
    header: dict[str, Any], cfg: ExperimentConfig, features: FeatureCacheConfig | None = None
) -> None:
    """Raise ConfigError listing every setting the cache was built with that `cfg` changes.

    Compared: the data fields that shape a sample (not LOADER_FIELDS), the sample geometry
    (GEOMETRY_FIELDS of `cfg.sample_geometry`: VAE strides, context-parallel size), the caption
    fields that shape strings, the text encoders, the VAE choice, the model's text widths against the
    cached features, and (with `features`) crop_epochs and latent_dtype.
    The annotation files are compared by checksum when `cfg.data.data_list` is readable here.
    """
    diffs = differences(header["data"], _data_fields(cfg.data), "data.")
    diffs += differences(
        header.get("sample_geometry", {}), _geometry_fields(cfg.sample_geometry), "sample_geometry."
    )
    diffs += differences(header["captions"], _caption_fields(cfg.captions), "captions.")
    diffs += differences(flatten(header["text"]), flatten(_jsonable(dataclasses.asdict(cfg.text))), "text.")
    diffs += differences(header["vae"], _vae_fields(cfg), "vae.")
    widths = {
        "caption_channels": header["text_hidden_size"],
        "pooled_projection_dim": header["text_pooled_size"],
    }
    diffs += differences(
        {k: v for k, v in widths.items() if v is not None},
        {k: getattr(cfg.model, k) for k, v in widths.items() if v is not None},
        "model.",
    )
    if features is not None:
        diffs += differences(
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
            + (
                " (sample_geometry comes from vae.kind / vae.flavor and parallel.context_parallel)"
                if any(d.startswith("sample_geometry.") for d in diffs)
                else ""
            )
        )


# ---------------------------------------------------------------------------------------------
# Files


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON under a temporary name, sync, rename to `path`."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """Write a safetensors file under a temporary name, sync, rename; returns (bytes, sha256)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # save_file creates 0600; give shards the mode other files get
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return size, digest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path) -> Any:
    """A cache JSON file (FeatureCacheError naming it when it is not valid JSON)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FeatureCacheError(f"{path} is not valid JSON ({e}); the file is corrupt") from e


def shard_name(rank: int, seq: int) -> str:
    """Stem of a rank's seq-th shard: rRRRR-SSSSSS."""
    return f"r{rank:04d}-{seq:06d}"


def complete_shards(shards_dir: Path, seen: dict[str, dict | None] | None = None) -> dict[str, dict]:
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


def remove_partial(shards_dir: Path, prefix: str, complete: dict[str, dict]) -> int:
    """Delete files of shards starting with `prefix` that are not complete (temporary files, shards
    without a valid sidecar, sidecars of missing shards); returns how many."""
    removed = 0
    for path in shards_dir.glob(f"{prefix}*"):
        stem = path.name.split(".", 1)[0]
        if ".tmp-" in path.name or stem not in complete:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


__all__ = [
    "COMMON",
    "FORMAT_VERSION",
    "HEADER",
    "I2V_UNSUPPORTED",
    "INDEX",
    "LATENT_DTYPES",
    "SHARDS",
    "FeatureCacheError",
    "annotations_sha256",
    "cache_header",
    "caption_variants",
    "check_compatible",
    "dropout_texts",
    "shard_name",
    "state_dict_sha256",
]
