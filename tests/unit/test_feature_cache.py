"""Latent / text-feature cache on the real demo data (tiny random WF-VAE, MiniLM).

The cache must give what online encoding gives: the VAE's posterior for the same clip (and crop),
the same sampled latents and text features batch for batch, and a latent that decodes to the same
video. Builds resume; damaged files fail with an error that names them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_video.config import load_config
from megatron_video.config.loader import field_docs
from megatron_video.data.batches import EncodedBatches
from megatron_video.data.config import FeatureCacheConfig
from megatron_video.data.dataset import VideoTextDataset
from megatron_video.data.feature_cache.build import build_feature_cache, merge_index
from megatron_video.data.feature_cache.format import (
    FeatureCacheError,
    caption_variants,
    check_compatible,
    dropout_texts,
)
from megatron_video.data.feature_cache.read import CachedBatches, CachedFeatureDataset, FeatureCache
from megatron_video.data.text import CaptionProcessor, TextConfig
from megatron_video.errors import ConfigError
from megatron_video.testing.vae import tiny_wfvae
from megatron_video.training.stage import build_text_encoder

ROOT = Path(__file__).parents[2]
SHIFT = [0.1 * c - 0.3 for c in range(8)]
SCALE = [0.5 + 0.2 * c for c in range(8)]
CROP_EPOCHS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine two OpenMP threads make the tiny convolutions ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory) -> Path:
    if importlib.util.find_spec("skvideo") is None or importlib.util.find_spec("skimage") is None:
        pytest.skip("demo extras not installed (pip install -e '.[demo]')")
    spec = importlib.util.spec_from_file_location(
        "prepare_demo_data", ROOT / "tools" / "prepare_demo_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.prepare_demo_data(tmp_path_factory.mktemp("demo") / "data")


def make_cfg(data_txt, *overrides):
    """The tiny T2V stage on the demo videos and images (two buckets), dropout often."""
    return load_config(
        ROOT / "examples" / "tiny" / "t2v.yaml",
        [
            "vae.checkpoint=null",
            f"data.data_list={data_txt}",
            "data.media=all",
            "data.max_height=64",  # small latents keep the cache tests quick
            "data.max_width=64",
            "captions.caption_dropout=0.5",
            "captions.default_text_ratio=0.5",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def cfg(data_txt):
    return make_cfg(data_txt)


@pytest.fixture(scope="module")
def vae():
    """Seeded tiny WF-VAE with a non-trivial latent normalisation."""
    return tiny_wfvae(seed=0, shift=SHIFT, scale=SCALE)


@pytest.fixture(scope="module")
def text(cfg):
    return build_text_encoder(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def dataset(cfg):
    return VideoTextDataset(cfg.data, cfg.sample_geometry)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, cfg, vae, text, dataset) -> Path:
    out = tmp_path_factory.mktemp("cache")
    features = FeatureCacheConfig(cache_dir=str(out), crop_epochs=CROP_EPOCHS, samples_per_shard=6)
    stats = build_feature_cache(cfg, features, vae, text, dataset=dataset)
    assert (stats.encoded, stats.failed, stats.skipped) == (len(dataset), 0, 0)
    index = merge_index(out)
    assert (
        index["missing"] == 0
        and len(index["shards"]) == 4
        and sorted(index["buckets"]) == ["1x64x64", "9x64x64"]
    )
    return out


def features_of(cache_dir) -> FeatureCacheConfig:
    return FeatureCacheConfig(cache_dir=str(cache_dir), crop_epochs=CROP_EPOCHS)


# -- what is cached ------------------------------------------------------------------------------


def test_cached_posterior_is_the_vae_encoder_output_for_each_crop(cache_dir, dataset, vae):
    cache = FeatureCache(cache_dir)
    videos = [i for i, p in enumerate(dataset.plans) if p.frames is not None]
    crops_differ = 0
    for index in [videos[0], videos[3], videos[-1], len(dataset) - 1]:
        for epoch in range(CROP_EPOCHS + 1):
            dataset.set_epoch(epoch)
            clip = dataset.load(index)["video"]
            with torch.no_grad():
                posterior = vae.encode(clip[None])
            mean, std = cache.latent(index, epoch)
            assert mean.dtype == torch.float32 and mean.shape == posterior.mean.shape[1:]
            if epoch < CROP_EPOCHS:  # epochs beyond the cached crops reuse crop epoch % CROP_EPOCHS
                assert torch.equal(mean, posterior.mean[0]) and torch.equal(std, posterior.std[0])
            assert torch.equal(mean, cache.latent(index, epoch % CROP_EPOCHS)[0])
        crops_differ += not torch.equal(cache.latent(index, 0)[0], cache.latent(index, 1)[0])
    dataset.set_epoch(0)
    assert crops_differ >= 2, "the demo clips are longer than 9 frames, so epoch crops should differ"


def test_text_features_are_the_encoder_output_for_every_caption(cache_dir, dataset, text, cfg):
    cache = FeatureCache(cache_dir)
    for index in (0, len(dataset) - 1):
        entry = dataset.plans[index].entry
        cached = cache.sample(index)
        assert cached["captions"] == list(entry.captions) and cached["bucket"] == dataset.plans[index].bucket
        strings = caption_variants(entry.captions, entry.aesthetic, not entry.is_image, cfg.captions)
        assert list(cached["texts"]) == strings and len(strings) == len(entry.captions)
        emb = text.encode_texts(strings + dropout_texts(cfg.captions))
        for j, s in enumerate(strings + dropout_texts(cfg.captions)):
            got = cache.text(index, s)
            torch.testing.assert_close(got["hidden"], emb.hidden_BLC[j], rtol=0, atol=1e-6)
            torch.testing.assert_close(got["pooled"], emb.pooled_BP[j], rtol=0, atol=1e-6)
            assert torch.equal(got["mask"], emb.mask_BL[j])


def test_caption_variants_cover_every_draw_with_aesthetic_notices():
    cfg = TextConfig(caption_dropout=0.3, default_text_ratio=0.5, aesthetic_notice=True)
    processor = CaptionProcessor(cfg)
    captions = ("A <b>Red</b> car drives by", "a dog \u2014 running on grass")
    for aesthetic, per_caption in ((3.0, 8), (6.5, 8), (5.0, 1), (None, 1)):
        for is_video in (True, False):
            variants = caption_variants(captions, aesthetic, is_video, cfg)
            assert len(variants) == 2 * per_caption
            seen = set()
            for seed in range(400):
                s = processor.caption(
                    captions, torch.Generator().manual_seed(seed), aesthetic=aesthetic, is_video=is_video
                )
                assert s in variants or s in dropout_texts(cfg), s
                seen.add(s)
            assert set(variants) <= seen


# -- batches equal the online ones ------------------------------------------------------------------


@pytest.mark.parametrize(("micro_batch", "dp_rank", "dp_size"), [(1, 0, 1), (2, 1, 2)])
def test_cached_batches_equal_online_batches_across_an_epoch(
    data_txt, cache_dir, vae, text, micro_batch, dp_rank, dp_size
):
    cfg = make_cfg(
        data_txt,
        f"training.micro_batch_size={micro_batch}",
        f"training.global_batch_size={micro_batch * dp_size}",
    )
    online = EncodedBatches(cfg, VideoTextDataset(cfg.data, cfg.sample_geometry), vae, text, dp_rank, dp_size)
    cached_ds = CachedFeatureDataset.from_config(cache_dir, cfg, features_of(cache_dir))
    cached = CachedBatches(cfg, cached_ds, dp_rank, dp_size)
    steps_per_epoch = -(-20 // (micro_batch * dp_size))
    dropped = 0
    for step in range(steps_per_epoch + 3):  # into epoch 1: the second cached crop
        a, b = online.next_batch(), cached.next_batch()
        assert list(b.cond) == list(a.cond) == ["text_BLC", "text_mask_BL", "pooled_BP", "video_mask_BTHW"]
        if micro_batch == 1:  # the VAE saw the same one-clip batch: bit for bit
            assert torch.equal(b.x0_BCTHW, a.x0_BCTHW), step
        else:  # online encodes two clips at once; CPU convolutions differ in the last bits
            torch.testing.assert_close(b.x0_BCTHW, a.x0_BCTHW, rtol=1e-5, atol=1e-5)
        for key in ("text_BLC", "pooled_BP"):
            torch.testing.assert_close(b.cond[key], a.cond[key], rtol=0, atol=1e-6)
        for key in ("text_mask_BL", "video_mask_BTHW"):
            assert b.cond[key].dtype == a.cond[key].dtype and torch.equal(b.cond[key], a.cond[key])
        assert torch.equal(b.loss_mask_BTHW, a.loss_mask_BTHW)
        dropped += int((b.cond["text_mask_BL"].sum(1) <= 2).sum())  # "" tokenises to [CLS] [SEP]
    assert cached.state_dict() == online.state_dict()
    assert cached.epoch == online.epoch == 1
    assert dropped > 0, "caption_dropout=0.5 should have dropped some captions"

    # A resumed source continues with the batch the running one gives next.
    resumed = CachedBatches(cfg, CachedFeatureDataset.from_config(cache_dir, cfg), dp_rank, dp_size)
    resumed.load_state_dict(cached.state_dict())
    assert torch.equal(resumed.next_batch().x0_BCTHW, cached.next_batch().x0_BCTHW)


def test_cached_latent_decodes_to_the_video_of_the_fresh_latent(cfg, cache_dir, dataset, vae):
    cache = FeatureCache(cache_dir)
    index = next(i for i, p in enumerate(dataset.plans) if p.frames is not None)
    clip = dataset.load(index)["video"]
    with torch.no_grad():
        fresh = vae.encode(clip[None])
        mean, std = cache.latent(index, 0)
        decoded_cached = vae.decode(mean[None])
        decoded_fresh = vae.decode(fresh.mean)
        # the normalised latent a training step sees, decoded the way the sampler decodes
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        z_cached = (mean + std * noise)[None]
        z_fresh = fresh.mean + fresh.std * noise[None]
        video_cached = vae.decode_latents((z_cached - vae.shift) * vae.scale)
        video_fresh = vae.decode_latents((z_fresh - vae.shift) * vae.scale)
    assert decoded_cached.shape == clip[None].shape
    assert torch.equal(decoded_cached, decoded_fresh)
    torch.testing.assert_close(video_cached, video_fresh, rtol=0, atol=1e-6)


def test_i2v_is_refused_with_the_reason(cfg, cache_dir):
    ds = CachedFeatureDataset.from_config(cache_dir, cfg)
    with pytest.raises(ConfigError, match=r"masked video.*cannot be derived"):
        CachedBatches(cfg, ds, 0, 1, task="i2v")


def test_settings_that_change_the_features_are_rejected(data_txt, cache_dir):
    changed = make_cfg(
        data_txt, "data.num_frames=17", "captions.aesthetic_notice=true", "text.context.max_length=64"
    )
    with pytest.raises(ConfigError) as err:
        CachedFeatureDataset.from_config(cache_dir, changed, FeatureCacheConfig(crop_epochs=1))
    for line in (
        "data.num_frames: cache 9, now 17",
        "captions.aesthetic_notice: cache False, now True",
        "text.context.max_length: cache 32, now 64",
        "features.crop_epochs: cache 2, now 1",
    ):
        assert line in str(err.value)
    # loading and dropout settings may change freely
    loose = make_cfg(data_txt, "data.num_workers=1", "data.group_data=false", "captions.caption_dropout=0.0")
    CachedFeatureDataset.from_config(cache_dir, loose, features_of(cache_dir))


def test_a_cache_of_another_sample_geometry_is_rejected(data_txt, cache_dir):
    """The context-parallel size snaps video lengths, so it decides which samples and crops exist;
    the micro-batch only groups them (the cache was built at 2, the online-equality test reads it at 1)."""
    cfg = make_cfg(data_txt, "parallel.context_parallel=2", "data.media=videos")
    assert (cfg.sample_geometry.context_parallel, cfg.sample_geometry.vae_stride_t) == (2, 8)
    header = FeatureCache(cache_dir).header
    assert header["sample_geometry"] == {"vae_stride_t": 8, "vae_stride_hw": 8, "context_parallel": 1}
    with pytest.raises(ConfigError) as err:
        CachedFeatureDataset.from_config(cache_dir, cfg, features_of(cache_dir))
    assert "sample_geometry.context_parallel: cache 1, now 2" in str(err.value)
    assert "data.media: cache 'all', now 'videos'" in str(err.value)
    assert "micro_batch_size" not in str(err.value)
    # a header written with other VAE strides lists them too
    other = {
        **header,
        "sample_geometry": {**header["sample_geometry"], "vae_stride_t": 4, "vae_stride_hw": 16},
    }
    with pytest.raises(ConfigError) as err:
        check_compatible(other, make_cfg(data_txt))
    for line in (
        "sample_geometry.vae_stride_t: cache 4, now 8",
        "sample_geometry.vae_stride_hw: cache 16, now 8",
    ):
        assert line in str(err.value)


def test_config_fields_are_documented():
    import dataclasses

    docs = field_docs(FeatureCacheConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(FeatureCacheConfig))
    with pytest.raises(ConfigError, match="features.crop_epochs must be >= 1"):
        FeatureCacheConfig(crop_epochs=0).validate()


# -- building: resume, ranks, damaged files ----------------------------------------------------------


def test_interrupted_build_resumes_over_two_ranks(tmp_path, cfg, cache_dir, vae, text, dataset, monkeypatch):
    out = tmp_path / "cache"
    features = FeatureCacheConfig(cache_dir=str(out), samples_per_shard=3, crop_epochs=CROP_EPOCHS)
    calls = []
    encode = vae.encode

    def crashing(video):
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return encode(video)

    monkeypatch.setattr(vae, "encode", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_feature_cache(cfg, features, vae, text, dataset=dataset)
    complete = sorted(p.name for p in (out / "shards").glob("*.json"))
    assert complete == ["r0000-000001.json"]  # 3 samples; the second shard never committed
    (out / "shards" / "r0000-000002.safetensors.tmp-999").write_bytes(b"partial")
    (out / "shards" / "r0001-000005.safetensors").write_bytes(b"orphan without a sidecar")
    with pytest.raises(FeatureCacheError, match=r"index.json does not exist.*resumes"):
        FeatureCache(out)

    calls.clear()
    monkeypatch.setattr(vae, "encode", lambda video: calls.append(1) or encode(video))
    stats = [
        build_feature_cache(cfg, features, vae, text, rank=r, world_size=2, dataset=dataset) for r in (1, 0)
    ]
    assert sum(s.encoded for s in stats) == len(dataset) - 3 and sum(s.skipped for s in stats) == 3
    index = merge_index(out)
    assert index["missing"] == 0 and not list((out / "shards").glob("*tmp*"))
    assert not (out / "shards" / "r0001-000005.safetensors").exists()
    names = [s["name"] for s in index["shards"]]
    for i, sid in enumerate(index["shard_of"]):  # rank r took indices r::2 (except the resumed shard)
        assert names[sid].startswith("r0000-000001") or names[sid].startswith(f"r000{i % 2}-")
    resumed, reference = FeatureCache(out), FeatureCache(cache_dir)
    for i in range(len(dataset)):
        for epoch in range(CROP_EPOCHS):
            assert all(
                torch.equal(a, b) for a, b in zip(resumed.latent(i, epoch), reference.latent(i, epoch))
            )
    assert resumed.verify() == []

    # a folder built with other settings is not silently extended
    other = FeatureCacheConfig(cache_dir=str(out), crop_epochs=1)
    with pytest.raises(
        FeatureCacheError, match=r"header.json: this folder holds a cache built with other settings"
    ):
        build_feature_cache(cfg, other, vae, text, dataset=dataset)


def test_missing_or_corrupt_files_are_named(tmp_path, cfg, cache_dir):
    def damaged(damage) -> tuple[Path, CachedFeatureDataset]:
        out = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(cache_dir, out)
        shard = out / "shards" / "r0000-000001.safetensors"
        damage(out, shard)
        return shard, CachedFeatureDataset(
            out, cfg.data, cfg.sample_geometry, cfg.captions, cfg.training.seed
        )

    shard, ds = damaged(lambda out, shard: shard.unlink())
    with pytest.raises(
        FeatureCacheError, match=rf"{shard} is missing.*run tools/build_feature_cache.py again"
    ):
        ds[0]
    assert ds[len(ds) - 1]["mean"].ndim == 4  # other shards still load

    shard, ds = damaged(lambda out, shard: shard.write_bytes(shard.read_bytes()[:-100]))
    with pytest.raises(
        FeatureCacheError, match=rf"{shard} has \d+ bytes, the index says \d+: it is truncated"
    ):
        ds[0]

    shard, ds = damaged(lambda out, shard: shard.write_bytes(b"\0" * shard.stat().st_size))
    with pytest.raises(FeatureCacheError, match=rf"{shard} is corrupt \(SafetensorError"):
        ds[0]

    def flip_last_byte(out, shard):
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))

    shard, ds = damaged(flip_last_byte)
    assert ds.cache.verify() == [f"feature cache file {shard}: sha256 differs from the index (corrupt bytes)"]

    out = tmp_path / "noindex"
    shutil.copytree(cache_dir, out)
    (out / "index.json").write_text("{not json")
    with pytest.raises(FeatureCacheError, match=rf"{out / 'index.json'} is not valid JSON"):
        FeatureCache(out)
    (out / "index.json").unlink()
    with pytest.raises(FeatureCacheError, match=rf"{out / 'index.json'} does not exist"):
        FeatureCache(out)


def test_failed_files_are_replaced_as_online(tmp_path, data_txt, vae, text):
    """A clip that cannot be decoded is recorded at build time and replaced at load time by the
    sample the online dataset picks for it."""
    data = tmp_path / "data"
    shutil.copytree(data_txt.parent, data)
    broken = sorted((data / "media" / "videos").glob("*.mp4"))[1]
    broken.write_bytes(broken.read_bytes()[:2000])
    cfg = make_cfg(data / "data.txt", "data.media=videos")
    features = FeatureCacheConfig(cache_dir=str(tmp_path / "cache"))
    stats = build_feature_cache(cfg, features, vae, text)
    assert stats.failed == 1
    index = merge_index(features.cache_dir)
    (failed,) = index["failed"]
    assert str(broken) in index["failed"][failed]
    online = VideoTextDataset(cfg.data, cfg.sample_geometry)
    cached = CachedFeatureDataset.from_config(features.cache_dir, cfg, features)
    for epoch in (0, 1):
        online.set_epoch(epoch)
        cached.set_epoch(epoch)
        got, want = cached[int(failed)], online[int(failed)]
        assert got["index"] == want["index"] != int(failed)
        assert str(broken) in got["load_failures"][0]


# -- the command line over torchrun ------------------------------------------------------------------


@pytest.mark.distributed
def test_tool_builds_and_resumes_over_torchrun(tmp_path, data_txt):
    out = tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
        "tools/build_feature_cache.py", "examples/tiny/t2i.yaml",
        "vae.checkpoint=null", f"data.data_list={data_txt}", "--out", str(out), "--samples-per-shard", "2", "--verify",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "verify: 0 problems" in run.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["missing"] == 0 and {s["name"][:5] for s in index["shards"]} == {"r0000", "r0001"}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 of 5 samples to encode" in again.stdout
