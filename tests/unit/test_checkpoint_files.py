"""The file side of checkpoints: the latest pointer, publishing, stale temp directories, pruning."""

from __future__ import annotations

import pytest

from megatron_video.training import checkpoint_files
from megatron_video.training.checkpoint import read_checkpoint_metadata
from megatron_video.training.checkpoint_files import (
    META_FILE,
    complete_checkpoints,
    iteration_dir_name,
    latest_checkpoint,
    prune_checkpoints,
    publish_checkpoint,
    remove_stale_temporaries,
    write_latest,
)


def _written(save_dir, iteration, tag="x"):
    """A temp directory as a finished dist_checkpointing save leaves it, metadata file last."""
    tmp = save_dir / f"{iteration_dir_name(iteration)}.tmp-{tag}"
    tmp.mkdir(parents=True)
    (tmp / "common.pt").write_bytes(b"payload")
    (tmp / META_FILE).write_text(f'{{"iteration": {iteration}, "layout": {{}}}}')
    return tmp


def _saved(save_dir, iteration):
    return publish_checkpoint(save_dir, _written(save_dir, iteration), iteration)


def test_names_and_empty_dir(tmp_path):
    assert iteration_dir_name(100) == "iter_0000100"
    assert iteration_dir_name(12345678) == "iter_12345678"
    with pytest.raises(ValueError):
        iteration_dir_name(-1)
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_publish_renames_and_points_latest(tmp_path):
    path = _saved(tmp_path, 100)
    assert path == tmp_path / "iter_0000100" and (path / "common.pt").read_bytes() == b"payload"
    assert (tmp_path / "latest").read_text() == "100\n"
    assert latest_checkpoint(tmp_path) == path
    assert read_checkpoint_metadata(tmp_path)["iteration"] == 100  # a save dir resolves to latest
    assert read_checkpoint_metadata(path)["path"] == str(path)
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_temp_directories_are_never_loaded(tmp_path):
    _saved(tmp_path, 100)
    _written(tmp_path, 200, "crashed")  # written, never published
    assert set(complete_checkpoints(tmp_path)) == {100}
    assert latest_checkpoint(tmp_path).name == "iter_0000100"
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == ["iter_0000200.tmp-crashed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000100", "latest"]


def test_crash_between_rename_and_pointer_keeps_previous(tmp_path):
    _saved(tmp_path, 100)
    # The new directory got its final name but `latest` was not replaced yet.
    _written(tmp_path, 200).rename(tmp_path / "iter_0000200")
    assert latest_checkpoint(tmp_path).name == "iter_0000100"


def test_latest_naming_a_missing_checkpoint_falls_back_to_newest(tmp_path):
    _saved(tmp_path, 100)
    _saved(tmp_path, 200)
    write_latest(tmp_path, 300)
    assert latest_checkpoint(tmp_path).name == "iter_0000200"
    (tmp_path / "latest").write_text("garbage")
    assert latest_checkpoint(tmp_path).name == "iter_0000200"


def test_saving_an_iteration_again_replaces_it(tmp_path):
    _saved(tmp_path, 100)
    tmp = _written(tmp_path, 100, "again")
    (tmp / "common.pt").write_bytes(b"new")
    publish_checkpoint(tmp_path, tmp, 100)
    assert (tmp_path / "iter_0000100" / "common.pt").read_bytes() == b"new"
    remove_stale_temporaries(tmp_path)  # the replaced copy was moved to a temp name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000100", "latest"]


def test_prune_keeps_newest_and_latest(tmp_path):
    for it in (100, 200, 300, 400):
        _saved(tmp_path, it)
    assert prune_checkpoints(tmp_path, keep_last=2) == [100, 200]
    assert set(complete_checkpoints(tmp_path)) == {300, 400}
    write_latest(tmp_path, 300)  # e.g. a newer save crashed after its rename
    assert prune_checkpoints(tmp_path, keep_last=1) == []
    assert set(complete_checkpoints(tmp_path)) == {300, 400}
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep_last=0)


def test_write_latest_is_atomic_replace(tmp_path, monkeypatch):
    write_latest(tmp_path, 1)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_files.os, "replace", fail)
    with pytest.raises(OSError):
        write_latest(tmp_path, 2)
    assert (tmp_path / "latest").read_text() == "1\n"  # the old pointer is intact
    monkeypatch.undo()
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
