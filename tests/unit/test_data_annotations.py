"""Annotation reading: valid entries parsed, bad ones reported with file and index and skipped."""

from __future__ import annotations

import json
import logging

import pytest

from megatron_video.data.annotations import EntryError, load_annotations, parse_entry, read_data_list
from megatron_video.errors import ConfigError

VIDEO = {
    "path": "a.mp4",
    "cap": "a cat",
    "resolution": {"height": 72, "width": 128},
    "num_frames": 40,
    "fps": 25,
}


def test_entry_fields_parsed(tmp_path):
    entry = parse_entry(
        {**VIDEO, "cap": ["one", "two"], "cut": [10, 50], "crop": [8, 120, 0, 64], "aes": 5.5},
        tmp_path,
        "f:0",
    )
    assert entry.path == str(tmp_path / "a.mp4") and entry.captions == ("one", "two")
    assert (entry.height, entry.width, entry.num_frames, entry.fps) == (72, 128, 40, 25.0)
    assert entry.cut == (10, 50) and entry.crop == (8, 120, 0, 64) and entry.aesthetic == 5.5
    assert not entry.is_image and entry.location == "f:0"
    image = parse_entry(
        {"path": "b.JPG", "cap": "x", "resolution": {"height": 5, "width": 6}, "aesthetic": 4}, tmp_path
    )
    assert image.is_image and image.num_frames is None and image.aesthetic == 4.0
    # num_frames may come from the cut
    assert (
        parse_entry({**{k: v for k, v in VIDEO.items() if k != "num_frames"}, "cut": [5, 30]}, "").num_frames
        == 25
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"path": ""}, "'path'"),
        ({"path": "a.gif"}, "unknown extension"),
        ({"cap": None}, "'cap'"),
        ({"cap": []}, "'cap'"),
        ({"cap": ["ok", 3]}, "'cap'"),
        ({"resolution": {"height": 72}}, "resolution.width"),
        ({"resolution": {"height": 0, "width": 4}}, "resolution.height"),
        ({"num_frames": None}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"fps": -1}, "'fps'"),
        ({"fps": "fast"}, "'fps'"),
        ({"cut": [30, 10]}, "cut"),
        ({"crop": [0, 200, 0, 10]}, "'crop'"),
        ({"crop": [0, 10]}, "'crop'"),
        ({"aesthetic": "high"}, "'aesthetic'"),
    ],
)
def test_malformed_fields_named(change, message):
    with pytest.raises(EntryError, match=message):
        parse_entry({**VIDEO, **change}, "")


def test_bad_entries_reported_with_file_and_index_and_skipped(tmp_path, caplog):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("a.mp4", "b.mp4", "c.jpg"):
        (media / name).write_bytes(b"x")
    good = [VIDEO, {**VIDEO, "path": "b.mp4"}]
    (tmp_path / "videos.json").write_text(
        json.dumps([good[0], {**VIDEO, "cap": None}, "not an object", good[1], {**VIDEO, "path": "gone.mp4"}])
    )
    lines = [
        json.dumps({"path": "c.jpg", "cap": "img", "resolution": {"height": 4, "width": 4}}),
        "{broken json",
        "",
        json.dumps({"path": "c.jpg", "cap": "img"}),
    ]
    (tmp_path / "images.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.txt").write_text("# demo\nmedia,videos.json\n\nmedia, images.jsonl\n")
    with caplog.at_level(logging.WARNING, logger="megatron_video.data.annotations"):
        entries, report = load_annotations(tmp_path / "data.txt")
    assert [e.path for e in entries] == [str(media / "a.mp4"), str(media / "b.mp4"), str(media / "c.jpg")]
    assert report.counts["entries"] == 8 and report.counts["kept"] == 3
    assert report.counts["malformed"] == 4 and report.counts["missing_file"] == 1
    videos, images = tmp_path / "videos.json", tmp_path / "images.jsonl"
    expected = [
        f"{videos}:1: 'cap'",
        f"{videos}:2: entry must be an object",
        f"{videos}:4: media file",
        f"{images}:2: not valid JSON",
        f"{images}:4: 'resolution'",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in report.problems), (prefix, report.problems)
        assert prefix.split(": ")[0] in caplog.text
    # without the existence check the missing file is kept (and would be replaced at load time)
    entries, _ = load_annotations(tmp_path / "data.txt", check_files_exist=False)
    assert len(entries) == 4


def test_data_list_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_data_list(tmp_path / "nope.txt")
    (tmp_path / "data.txt").write_text("media,missing.json\n")
    with pytest.raises(ConfigError, match=r"data.txt:1: annotation file .* does not exist"):
        read_data_list(tmp_path / "data.txt")
    (tmp_path / "data.txt").write_text("just-one-field\n")
    with pytest.raises(ConfigError, match="data.txt:1: expected"):
        read_data_list(tmp_path / "data.txt")
    (tmp_path / "bad.json").write_text('[{"path": "a.mp4",}]')
    (tmp_path / "data.txt").write_text("media,bad.json\n")
    with pytest.raises(ConfigError, match=r"bad.json:1:\d+: not valid JSON"):
        load_annotations(tmp_path / "data.txt")
