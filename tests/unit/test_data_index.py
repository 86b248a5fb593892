"""The columnar sample index: vectorised plans and the sampler equal the scalar JSON path, and folder
builds are resumable, atomic and refused when incomplete."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_video.data.annotations import load_annotations
from megatron_video.data.config import DataConfig, SampleGeometry
from megatron_video.data.dataset import VideoTextDataset, plan_samples
from megatron_video.data.index.build import build_index, table_from_data_list, table_from_entries
from megatron_video.data.index.format import SampleIndexError
from megatron_video.data.index.plans import plan_table
from megatron_video.data.index.read import open_index
from megatron_video.data.index.sources import BuildOptions
from megatron_video.data.sampler import BucketIds, MegabatchBucketSampler

ROOT = Path(__file__).parents[2]


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sizes = [
        (720, 1280),
        (1080, 1920),
        (480, 854),
        (576, 1024),
        (1280, 720),
        (300, 1000),
        (64, 64),
        (270, 480),
    ]
    fps_choices = [None, 23.976, 24.0, 24.05, 25.0, 29.97, 30.0, 60.0, 12.0, 8.0]
    records = []
    for i in range(n):
        h, w = sizes[rng.integers(len(sizes))]
        if rng.random() < 0.2:
            records.append(
                {"path": f"i{i}.jpg", "cap": f"image {i}", "resolution": {"height": h, "width": w}}
            )
            continue
        r = {"path": f"v{i}.mp4", "cap": [f"video {i}", "alt"], "resolution": {"height": h, "width": w}}
        frames = int(rng.integers(5, 900))
        if rng.random() < 0.3:
            start = int(rng.integers(0, 5000))
            r["cut"] = [start, start + frames]
        else:
            r["num_frames"] = frames
        fps = fps_choices[rng.integers(len(fps_choices))]
        if fps is not None:
            r["fps"] = fps
        if rng.random() < 0.2:
            r["crop"] = [0, w - int(rng.integers(0, w // 3)), int(rng.integers(0, h // 4)), h]
        if rng.random() < 0.5:
            r["aesthetic"] = float(rng.normal(5, 1))
        records.append(r)
    return records


def write_list(root: Path, records: list[dict], jsonl_too: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    half = len(records) // 2
    (root / "a.json").write_text(json.dumps(records[:half]), encoding="utf-8")
    if jsonl_too:
        (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[half:]), encoding="utf-8")
        (root / "data.txt").write_text("media,a.json\nmedia,b.jsonl\n")
    else:
        (root / "data.txt").write_text("media,a.json\n")
    return root / "data.txt"


CONFIGS = [
    dict(
        num_frames=33,
        min_num_frames=9,
        train_fps=24.0,
        force_resolution=True,
        max_height=256,
        max_width=448,
        min_hxw=256 * 256,
        drop_short_ratio=0.5,
    ),
    dict(
        num_frames=33,
        min_num_frames=17,
        train_fps=25.0,
        force_resolution=False,
        max_hxw=256 * 256,
        min_hxw=None,
        drop_short_ratio=0.0,
        speed_factor=1.5,
        drop_low_fps=False,
        max_h_div_w_ratio=2.0,
        use_cut=False,
    ),
    dict(
        num_frames=121,
        min_num_frames=29,
        force_resolution=False,
        max_hxw=384 * 384,
        min_hxw=128 * 128,
        force_5_ratio=True,
        drop_short_ratio=0.3,
        use_crop=False,
        media="videos",
        default_fps=30.0,
    ),
]
GEOMETRIES = [SampleGeometry(8, 8, 1, 2), SampleGeometry(4, 8, 2, 1), SampleGeometry(8, 8, 1, 1)]


def assert_same_plans(entries, table, cfg, geometry, check_candidates=50):
    scalar, skipped = plan_samples(entries, cfg, geometry)
    vector = plan_table(table, cfg, geometry)
    assert len(vector) == len(scalar) > 0
    assert vector.skipped == {k: v for k, v in skipped.items() if v}
    keys = [p.bucket for p in scalar]
    assert [vector.bucket_names[b] for b in vector.bucket_ids.tolist()] == keys
    rows = [table.location(int(r)) for r in vector.rows]
    assert rows == [p.entry.location for p in scalar]
    for i in range(0, len(scalar), max(1, len(scalar) // check_candidates)):
        if scalar[i].frames is not None:
            from megatron_video.data.index.plans import frame_plan

            f = frame_plan(table, int(vector.rows[i]), cfg, scalar[i].frames.length)
            np.testing.assert_array_equal(f.candidates, scalar[i].frames.candidates)
            assert f.window == scalar[i].frames.window
    return keys, vector


@pytest.mark.parametrize("case", range(len(CONFIGS)))
def test_vectorised_plans_and_epoch_order_equal_the_scalar_path(tmp_path, case):
    data_txt = write_list(tmp_path, synthetic_records(3000, seed=case))
    cfg = DataConfig(data_list=str(data_txt), bucket_drop_threshold=0.0, **CONFIGS[case])
    geometry = GEOMETRIES[case]
    entries, report = load_annotations(data_txt, check_files_exist=False)
    table = table_from_data_list(data_txt, BuildOptions(check_files=False, probe="none"))
    assert table.counts["kept"] == report.counts["kept"] == len(entries)
    keys, vector = assert_same_plans(entries, table, cfg, geometry)
    for group_data in (True, False):
        kw = dict(batch_size=2, dp_rank=1, dp_size=4, seed=7, group_data=group_data, drop_threshold=1.0)
        a = MegabatchBucketSampler(keys, **kw)
        b = MegabatchBucketSampler(BucketIds(vector.bucket_ids, vector.bucket_names), **kw)
        for epoch in (0, 3):
            pa_, pb = a.plan(epoch), b.plan(epoch)
            np.testing.assert_array_equal(pa_.batches, pb.batches)
            assert (pa_.num_padded, pa_.num_replaced) == (pb.num_padded, pb.num_replaced)
        assert a.dropped_samples == b.dropped_samples > 0 and list(a) == list(b)


def test_folder_index_equals_the_in_memory_table_and_resumes_after_a_kill(tmp_path, monkeypatch):
    records = synthetic_records(1500, seed=5)
    data_txt = write_list(tmp_path / "data", records)
    out = tmp_path / "index"
    options = BuildOptions(check_files=False, probe="none")
    from megatron_video.data.index import build as build_module

    real, calls = build_module._run_chunk, []

    def dies_after_two(args):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(args[2])
        return real(args)

    monkeypatch.setattr(build_module, "_run_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(data_txt, out, options, chunk_bytes=40_000)
    assert not out.exists() and (tmp_path / "index.partial").is_dir()
    with pytest.raises(SampleIndexError, match="did not finish"):
        open_index(out)
    monkeypatch.setattr(build_module, "_run_chunk", lambda args: calls.append(args[2]) or real(args))
    manifest = build_index(data_txt, out, options, chunk_bytes=40_000)
    assert calls[:2] == [0, 1] and calls[2] == 2 and len(calls) == manifest["chunks"] > 3  # 0, 1 not redone
    assert not (tmp_path / "index.partial").exists()
    memory = table_from_data_list(data_txt, options)
    index = open_index(out)
    assert len(index) == len(memory) == manifest["rows"] == len(records)
    for name, column in memory.columns.items():
        np.testing.assert_array_equal(index.columns[name], column)
    assert [index.path(i) for i in (0, 700, 1499)] == [memory.path(i) for i in (0, 700, 1499)]
    assert index.strings.captions(1499) == memory.strings.captions(1499)
    assert not index.columns["fps"].flags.owndata  # a view of the memory-mapped file
    with pytest.raises(SampleIndexError, match="already holds an index"):
        build_index(data_txt, out, options)
    (out / "manifest.json").unlink()
    with pytest.raises(SampleIndexError, match="no manifest.json"):
        open_index(out)


def test_dataset_from_index_matches_data_list_and_entries(tmp_path):
    records = synthetic_records(400, seed=9)
    data_txt = write_list(tmp_path / "data", records, jsonl_too=False)
    build_index(data_txt, tmp_path / "index", BuildOptions(check_files=False, probe="none"))
    kw = dict(**CONFIGS[0], bucket_drop_threshold=0.0, check_files_exist=False, probe_media="none")
    by_list = VideoTextDataset(DataConfig(data_list=str(data_txt), **kw), GEOMETRIES[0])
    by_index = VideoTextDataset(DataConfig(index=str(tmp_path / "index"), **kw), GEOMETRIES[0])
    entries, _ = load_annotations(data_txt, check_files_exist=False)
    by_entries = VideoTextDataset(DataConfig(**kw), GEOMETRIES[0], entries=entries)
    assert list(by_list.bucket_keys) == list(by_index.bucket_keys) == list(by_entries.bucket_keys)
    for i in (0, len(by_list) // 2, len(by_list) - 1):
        a, b = by_list.plans[i], by_index.plans[i]
        assert a.entry == b.entry and a.bucket == b.bucket
        assert by_entries.plans[i].entry.path == a.entry.path
    with pytest.raises(Exception, match="set one"):
        DataConfig(data_list=str(data_txt), index=str(tmp_path / "index")).validate(SampleGeometry())


def test_demo_data_plans_equal_through_the_index(tmp_path):
    if importlib.util.find_spec("skvideo") is None or importlib.util.find_spec("skimage") is None:
        pytest.skip("demo extras not installed")
    spec = importlib.util.spec_from_file_location(
        "prepare_demo_data", ROOT / "tools" / "prepare_demo_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data_txt = tool.prepare_demo_data(tmp_path / "demo")
    build_index(data_txt, tmp_path / "index", BuildOptions(check_files=True, probe="all"), workers=1)
    table = open_index(tmp_path / "index")
    entries, _ = load_annotations(data_txt)
    assert table.counts["kept"] == len(entries) == 20 and table.counts.get("resolution_corrected", 0) == 0
    for overrides, geometry in [
        (
            dict(
                num_frames=25,
                min_num_frames=9,
                force_resolution=False,
                max_hxw=128 * 160,
                min_hxw=None,
                drop_short_ratio=0.0,
                max_h_div_w_ratio=1.0,
            ),
            SampleGeometry(8, 8, 1, 2),
        ),
        (
            dict(
                num_frames=17,
                min_num_frames=9,
                max_height=96,
                max_width=128,
                min_hxw=None,
                train_fps=12.0,
                drop_short_ratio=0.5,
                min_h_div_w_ratio=0.3,
            ),
            SampleGeometry(4, 8, 1, 2),
        ),
    ]:
        cfg = dataclasses.replace(DataConfig(), **overrides)
        keys, vector = assert_same_plans(entries, table, cfg, geometry)
        kw = dict(batch_size=2, dp_rank=0, dp_size=2, seed=1, drop_threshold=0.0)
        np.testing.assert_array_equal(
            MegabatchBucketSampler(keys, **kw).plan(1).batches,
            MegabatchBucketSampler(BucketIds(vector.bucket_ids, vector.bucket_names), **kw).plan(1).batches,
        )


def test_table_from_entries_round_trips(tmp_path):
    entries, _ = load_annotations(write_list(tmp_path, synthetic_records(50)), check_files_exist=False)
    table = table_from_entries(entries)
    assert [dataclasses.replace(table.entry(i), location="") for i in range(len(entries))] == [
        dataclasses.replace(e, location="") for e in entries
    ]


def test_ranks_share_the_chunks_and_rank_0_finalises(tmp_path):
    import threading

    data_txt = write_list(tmp_path / "data", synthetic_records(600, seed=2))
    out, options = tmp_path / "index", BuildOptions(check_files=False, probe="none")
    results = {}
    other = threading.Thread(
        target=lambda: results.update(
            r1=build_index(data_txt, out, options, chunk_bytes=20_000, rank=1, world_size=2)
        )
    )
    other.start()
    manifest = build_index(data_txt, out, options, chunk_bytes=20_000, rank=0, world_size=2)
    other.join()
    assert results == {"r1": None} and manifest["rows"] == 600 and manifest["chunks"] > 2
    memory = table_from_data_list(data_txt, options)
    np.testing.assert_array_equal(open_index(out).columns["position"], memory.columns["position"])


def test_vectorised_resampled_length_equals_numpy_arange_filtering():
    from megatron_video.data.frames import frame_interval, resample_indices
    from megatron_video.data.index.plans import _resampled_lengths

    rng = np.random.default_rng(3)
    fps = np.array([23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 59.94, 60.0, 12.5, 7.0, 119.88, 14.985])
    train = np.array([24.0, 25.0, 16.0, 8.0, 23.976, 30.0])
    n, start = rng.integers(1, 3000, 30000), rng.integers(0, 10**6, 30000)
    start[:10000] = rng.integers(0, 50, 10000)
    interval = np.array(
        [frame_interval(f, t) for f, t in zip(rng.choice(fps, 30000), rng.choice(train, 30000))]
    )
    expected = [len(resample_indices(int(s), int(k), float(i))) for s, k, i in zip(start, n, interval)]
    np.testing.assert_array_equal(_resampled_lengths(n, start, interval), expected)
