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


# -- one run per save dir; paths checked before launch ----------------------------------------------


def test_save_dir_lock_refuses_a_second_holder_and_frees_with_the_first(tmp_path):
    from megatron_video.training.checkpoint_files import SaveDirInUseError, SaveDirLock

    first = SaveDirLock(tmp_path / "save")
    first.acquire()
    with pytest.raises(SaveDirInUseError, match=r"being written by another run \(\{\"host\".*\"pid\""):
        SaveDirLock(tmp_path / "save").acquire()
    first.release()
    with SaveDirLock(tmp_path / "save"):  # free again; the lock file stays, naming the new holder
        assert (tmp_path / "save" / "run.lock").is_file()


def test_save_dir_lock_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    from megatron_video.training.checkpoint_files import SaveDirLock

    holder = subprocess.Popen(
        [sys.executable, "-c", f"from megatron_video.training.checkpoint_files import SaveDirLock; "
         f"SaveDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with SaveDirLock(tmp_path):
        pass


def test_checkpoint_paths_are_described_when_wrong(tmp_path):
    from megatron_video.training.checkpoint_files import (
        checkpoint_source_problem,
        save_dir_problem,
        weights_source_problem,
    )

    save = tmp_path / "save"
    _saved(save, 2)
    (save / "iter_0000004.tmp-abc").mkdir()
    assert checkpoint_source_problem(save, "f") is None
    assert checkpoint_source_problem(save / "iter_0000002", "f") is None
    assert "nothing (the path does not exist)" in checkpoint_source_problem(tmp_path / "nope", "f")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    problem = checkpoint_source_problem(tmp_path / "other", "training.checkpoint.load_dir")
    assert problem.startswith("training.checkpoint.load_dir=") and "a folder holding a.txt" in problem
    unfinished = tmp_path / "unfinished"
    (unfinished / "iter_0000003").mkdir(parents=True)
    assert "only unfinished saves (iter_0000003" in checkpoint_source_problem(unfinished, "f")

    assert weights_source_problem(save, "init_from") is None
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert weights_source_problem(tmp_path / "w.safetensors", "init_from") is None
    assert weights_source_problem(tmp_path / "w", "init_from") is None  # the suffix may be left out
    assert "neither weights nor a checkpoint: found a file" in weights_source_problem(
        tmp_path / "other" / "a.txt", "init_from"
    )
    assert "is one checkpoint, not a save dir" in save_dir_problem(save / "iter_0000002", "save_dir")
    assert "is a file" in save_dir_problem(tmp_path / "w.safetensors", "save_dir")
    assert save_dir_problem(tmp_path / "new", "save_dir") is None and save_dir_problem(save, "s") is None


def test_free_space_check_compares_with_the_last_checkpoint(tmp_path, monkeypatch):
    import shutil

    from megatron_video.training import checkpoint_files as files

    save = tmp_path / "save"
    files.check_free_space(save)  # nothing saved yet: nothing to compare with
    _saved(save, 2)
    (save / "iter_0000002" / "payload.bin").write_bytes(b"\0" * 10_000)
    size = files.checkpoint_bytes(save / "iter_0000002")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=size))
    with pytest.raises(files.CheckpointSpaceError, match=r"not enough disk space .* iter_0000002 is intact"):
        files.check_free_space(save)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=2 * size))
    files.check_free_space(save)


def test_out_of_space_is_recognised_through_wrappers():
    import errno

    from megatron_video.training.checkpoint_files import is_out_of_space

    assert is_out_of_space(OSError(errno.ENOSPC, "x"))
    assert is_out_of_space(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    )
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert is_out_of_space(outer)
    assert not is_out_of_space(ValueError("bad value"))
