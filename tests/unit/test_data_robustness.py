"""No silent data loss: each awkward input gets a counted outcome naming file and line / index, on real
media files (H.264 mp4, MPEG-4 AVI written with PyAV) and real annotation bytes."""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from megatron_video.data.annotations import load_annotations
from megatron_video.data.batches import BatchStats
from megatron_video.data.config import DataConfig, SampleGeometry
from megatron_video.data.dataset import VideoTextDataset
from megatron_video.data.index.build import build_index, table_from_data_list
from megatron_video.data.index.read import open_index
from megatron_video.data.index.sources import BuildOptions
from megatron_video.data.text import clean_caption
from megatron_video.data.video_io import _decode_after_seek, read_video_frames, write_video
from megatron_video.errors import ConfigError
from megatron_video.training.data_metrics import announce_data, step_data_metrics
from megatron_video.training.metrics import MetricsLogger

GEOMETRY = SampleGeometry(vae_stride_t=4, vae_stride_hw=8, micro_batch_size=1)


def frames(t: int, h: int = 48, w: int = 80) -> np.ndarray:
    """Frames whose first pixel encodes the frame number (8 grey levels apart)."""
    out = np.zeros((t, h, w, 3), np.uint8)
    out[:] = (np.arange(t) * 8 % 256)[:, None, None, None]
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_video(root / "fps30.mp4", frames(40), 30, preset="ultrafast")
    write_video(root / "tall.mp4", frames(20, 80, 48), 24, preset="ultrafast")
    return root


def cfg_for(data_txt, **overrides) -> DataConfig:
    base = dict(
        data_list=str(data_txt), num_frames=9, min_num_frames=5, train_fps=15.0, force_resolution=False,
        max_hxw=80 * 80, min_hxw=None, hw_stride=16, min_h_div_w_ratio=0.2, max_h_div_w_ratio=3.0,
        bucket_drop_threshold=0.0, num_workers=0, drop_low_fps=False,
    )  # fmt: skip
    return DataConfig(**{**base, **overrides})


def write_list(root: Path, name: str, content: bytes) -> Path:
    (root / name).write_bytes(content)
    (root / "data.txt").write_text(f"{root / 'media'},{name}\n", encoding="utf-8")
    return root / "data.txt"


def good(path="fps30.mp4", **extra) -> dict:
    return {"path": path, "cap": "a clip", "resolution": {"height": 48, "width": 80}, "num_frames": 40,
            "fps": 30, **extra}  # fmt: skip


@pytest.fixture
def root(tmp_path, media) -> Path:
    (tmp_path / "media").symlink_to(media)
    return tmp_path


def test_lone_surrogate_and_non_utf8_bytes_are_skipped_by_line(root, caplog):
    lines = [
        json.dumps(good()).encode(),
        b'{"path": "fps30.mp4", "cap": "broken emoji \\ud83d here", "resolution": {"height": 48, "width": 80}, '
        b'"num_frames": 40, "fps": 30}',
        json.dumps(good(cap="caf\u00e9")).encode().replace(b"caf\\u00e9", b"caf\xe9"),  # latin-1 byte
        json.dumps(good(cap="ok again")).encode(),
    ]
    data_txt = write_list(root, "a.jsonl", b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING):
        table = table_from_data_list(data_txt, BuildOptions())
    assert len(table) == 2 and table.counts["bad_text"] == 1 and table.counts["not_utf8"] == 1
    report = {r["reason"]: r for r in table.skip_report()}
    assert report["bad_text"]["position"] == 2 and "U+D83D" in report["bad_text"]["message"]
    assert report["not_utf8"]["position"] == 3 and "0xe9 at column" in report["not_utf8"]["message"]
    assert f"{root / 'a.jsonl'}:2" in caplog.text and f"{root / 'a.jsonl'}:3" in caplog.text
    # the old reader names them too (file:line), and a .json list loses only the broken entry
    entries, old = load_annotations(data_txt)
    assert len(entries) == 2 and old.counts["bad_text"] == 1 and old.counts["not_utf8"] == 1
    listing = b"[" + b",\n".join(lines) + b"]"
    table = table_from_data_list(write_list(root, "b.json", listing), BuildOptions())
    assert len(table) == 2 and {r["position"]: r["reason"] for r in table.skip_report()} == {
        1: "bad_text",
        2: "not_utf8",
    }
    with pytest.raises(ConfigError, match=r"b.json: byte \d+ \(0xe9\) is not valid UTF-8"):
        load_annotations(root / "data.txt")


def test_missing_fps_is_read_from_the_file_and_a_default_is_counted(root, caplog):
    entry = good()
    del entry["fps"]
    data_txt = write_list(root, "a.json", json.dumps([entry, good()]).encode())
    ds = VideoTextDataset(cfg_for(data_txt), GEOMETRY)
    assert ds.table.counts["fps_probed"] == 1 and ds.table.columns["fps"][0] == pytest.approx(30.0)
    # 30 fps trained at 15: every second frame, the same plan as the annotated twin
    assert (
        ds.plans[0].frames.candidates.tolist()[:5]
        == [0, 2, 4, 6, 8]
        == ds.plans[1].frames.candidates.tolist()[:5]
    )
    sample = ds[0]
    assert sample["video"].shape[1] == 9
    # not probed: data.default_fps, counted and named in the start-up summary
    blind = VideoTextDataset(cfg_for(data_txt, probe_media="none", default_fps=15.0), GEOMETRY)
    assert blind.build_counts["fps_defaulted"] == 1 and blind.plans[0].frames.candidates.tolist()[:3] == [
        0,
        1,
        2,
    ]
    with caplog.at_level(logging.WARNING):
        announce_data(blind, 1, is_main=True)
    assert "fps_defaulted: 1 (data.default_fps was assumed" in caplog.text


def test_contradicting_resolution_is_corrected_from_the_file(root):
    transposed = good(
        "tall.mp4", num_frames=20, fps=24, resolution={"height": 48, "width": 80}
    )  # file is 80x48
    cropped = good(
        "tall.mp4", num_frames=20, fps=24, resolution={"height": 48, "width": 80}, crop=[0, 70, 0, 40]
    )
    data_txt = write_list(root, "a.json", json.dumps([transposed, cropped, good()]).encode())
    build_index(data_txt, root / "index", BuildOptions(probe="all"))
    table = open_index(root / "index")
    assert (
        len(table) == 2
        and table.counts["resolution_corrected"] == 1
        and table.counts["crop_outside_frame"] == 1
    )
    assert (table.columns["height"][0], table.columns["width"][0]) == (80, 48)
    skipped = json.loads((root / "index" / "skipped.jsonl").read_text(encoding="utf-8"))
    assert skipped["position"] == 1 and "does not fit the file's 80x48 frame" in skipped["message"]
    ds = VideoTextDataset(cfg_for(None, data_list=None, index=str(root / "index")), GEOMETRY)
    assert ds[0]["video"].shape[-2:] == (80, 48) and ds[0]["load_failures"] == []


def test_unprobed_contradiction_fails_every_replacement_with_a_hint_naming_the_cause(root):
    bad = good("tall.mp4", num_frames=20, fps=24, resolution={"height": 48, "width": 80})
    data_txt = write_list(root, "a.json", json.dumps([bad, bad]).encode())
    ds = VideoTextDataset(cfg_for(data_txt, probe_media="none"), GEOMETRY)
    with pytest.raises(
        RuntimeError,
        match=r"2 x the annotated resolution does not match the files \(build the index with --probe\)",
    ):
        ds[0]


def test_no_sample_left_names_the_rule_that_dropped_them(root):
    data_txt = write_list(root, "a.json", json.dumps([good(num_frames=400), good(num_frames=400)]).encode())
    with pytest.raises(ConfigError, match=r"skipped_video_too_long: 2 \(data.too_long_factor"):
        VideoTextDataset(cfg_for(data_txt), GEOMETRY)


def test_cjk_only_caption_is_kept_and_counted(root):
    data_txt = write_list(root, "a.json", json.dumps([good(cap="一只猫在草地上奔跑"), good()]).encode())
    table = table_from_data_list(data_txt, BuildOptions())
    assert len(table) == 2 and table.counts["cjk_only_caption"] == 1
    assert clean_caption(table.strings.captions(0)[0]) == "一只猫在草地上奔跑"
    assert clean_caption("A cat 一只猫 runs") == "a cat runs"


def test_avi_with_a_timestamp_gap_numbers_frames_the_same_with_and_without_seek(tmp_path):
    path = str(tmp_path / "gap.avi")
    with av.open(path, "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        stream.options = {"g": "10", "bf": "0", "qscale": "1"}
        for i in range(100):
            if i == 1:
                continue  # no frame (and no timestamp) 1
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 2, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    wanted = [70, 71, 90, 98]
    assert _decode_after_seek(path, sorted(wanted), None, None) is not None  # the seek path is used
    after_seek = read_video_frames(path, wanted, seek=True)
    from_start = read_video_frames(path, wanted, seek=False)
    np.testing.assert_array_equal(after_seek, from_start)
    # frame k is the k-th decoded frame: timestamp k + 1 after the gap, grey level 2 (k + 1)
    assert np.abs(from_start[:, 24, 32, 0].astype(int) - [142, 144, 182, 198]).max() <= 3


def test_skip_summary_reaches_metrics_jsonl_and_is_logged_at_warning(root, tmp_path, caplog):
    lines = [json.dumps(good()), json.dumps(good("gone.mp4")), "{not json", json.dumps(good(num_frames=400))]
    data_txt = write_list(root, "a.jsonl", ("\n".join(lines) + "\n").encode())
    ds = VideoTextDataset(cfg_for(data_txt), GEOMETRY)
    with caplog.at_level(logging.WARNING, logger="megatron_video.training.data_metrics"):
        metrics = announce_data(ds, global_batch_size=1, is_main=True)
    assert (
        "annotation_missing_file: 1" in caplog.text and f"{root / 'a.jsonl'}:2: missing_file" in caplog.text
    )
    # the stage adds the summary to its first step record (step_data_metrics), once
    source = type("Source", (), {"data_summary": metrics, "stats": BatchStats()})()
    log = MetricsLogger(True, jsonl_path=str(tmp_path / "metrics.jsonl"), resources=False)
    for step in (1, 2):
        log.log(step, {"loss": 0.5, **step_data_metrics(source, None, 1.0)})
    record, second = (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert "data/samples" not in second and second["load_failures"] == 0
    assert (
        record["step"] == 1 and record["data/annotation_entries"] == 4 and record["data/annotation_kept"] == 2
    )
    assert record["data/annotation_missing_file"] == 1 and record["data/annotation_malformed"] == 1
    assert record["data/skipped_video_too_long"] == 1 and record["data/samples"] == 1


def test_build_feature_cache_exits_2_on_a_data_configuration_error(tmp_path, capsys):
    import importlib.util

    root = Path(__file__).parents[2]
    spec = importlib.util.spec_from_file_location(
        "build_feature_cache", root / "tools" / "build_feature_cache.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = [
        str(root / "examples/tiny/t2v.yaml"),
        "vae.checkpoint=null",
        f"data.data_list={tmp_path / 'none.txt'}",
    ]
    assert tool.main([*args, "--out", str(tmp_path / "cache")]) == 2
    assert "configuration error: data list" in capsys.readouterr().err


def test_replica_ranks_that_loaded_different_samples_are_stopped(monkeypatch):
    import torch
    import torch.distributed as dist

    from megatron_video.data.batches import check_replica_indices

    def all_gather(out, mine, group=None):
        out[0].copy_(mine)
        out[1].copy_(torch.tensor([2, 5, 9]))  # the other rank replaced sample 7 by 9

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [4, 5])
    check_replica_indices([5, 9], group=object())
    with pytest.raises(RuntimeError, match=r"rank 4: \[5, 7\]; rank 5: \[5, 9\].*failures: x.mp4: timeout"):
        check_replica_indices([5, 7], group=object(), failures=["x.mp4: timeout"])

    class Source:
        stats = BatchStats()

    Source.stats.loaded({"load_failures": ["a", "b"]}, 0.5)
    Source.stats.encoded(0.25)
    metrics = step_data_metrics(Source, None, 2.0)
    assert metrics == {"load_failures": 2, "data_wait_s": 0.5, "data_wait_share": 0.25, "encode_s": 0.25,
                       "encode_share": 0.125}  # fmt: skip
