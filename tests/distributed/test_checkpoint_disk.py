"""A full disk, on a real (small) tmpfs, with two gloo ranks running `run_stage`.

1. A save dir whose disk cannot hold another checkpoint as large as the last one: the save is
   refused before anything is written, on every rank, with the folder and the sizes in words; the
   previous checkpoint still verifies. With the space freed, the same run resumes from it and ends.
2. A first save into a disk that fills up while it is written (ENOSPC, which torch reports as
   "unexpected pos"): every rank raises the same CheckpointSpaceError, the partial folder is gone,
   and the retry succeeds once space is freed.

Needs permission to mount a tmpfs (root, as in CI); skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from megatron_video.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

TMPFS_MB = 96
"""The tiny model's checkpoint (weights, EMA, Adam moments) takes about 28 MB."""


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _stage(rank, world_size, stage_dir, save_dir, steps):
    """run_stage on fixed synthetic batches; returns the error text (None when the stage finished)."""
    from megatron_video.testing.models import tiny_config
    from megatron_video.training import stage
    from megatron_video.training.checkpoint_files import CheckpointSpaceError
    from tests.distributed.test_trainer_parity import _FixedBatches

    cfg = tiny_config(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    cfg.training.steps = steps
    cfg.training.ema_decay = 0.9
    cfg.training.global_batch_size = 2
    cfg.training.checkpoint.save_interval = 1
    cfg.training.checkpoint.keep_last = 1
    cfg.training.checkpoint.save_dir = str(save_dir)
    cfg.training.logging.tensorboard_dir = None
    cfg.training.logging.loss_curve_png = None
    stage.build_batches = lambda cfg, runtime, task: _FixedBatches(
        cfg, runtime.data_parallel_rank, cfg.training.accumulation_steps(runtime.data_parallel), 1
    )
    try:
        stage.run_stage(cfg, "t2v", stage_dir)
    except CheckpointSpaceError as exc:
        return str(exc)
    return None


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about `leave_bytes` free on `disk`."""
    ballast = disk / f"ballast-{uuid.uuid4().hex[:6]}"
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return ballast


def _leftovers(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.iterdir() if ".tmp-" in p.name) if save_dir.is_dir() else []


def test_a_disk_too_full_for_the_next_save_refuses_it_in_words_and_the_retry_resumes(small_disk, tmp_path):
    from megatron_video.training.checkpoint_files import (
        checkpoint_bytes,
        latest_checkpoint,
        verify_checkpoint,
    )

    stage_dir, save_dir = tmp_path / "stage", small_disk / "checkpoints"
    assert run_distributed(_stage, 2, stage_dir, save_dir, 2, timeout_s=240) == [None, None]
    previous = latest_checkpoint(save_dir)
    size = checkpoint_bytes(previous)
    assert previous.name == "iter_0000002" and 0 < size < TMPFS_MB * 2**20 // 3

    ballast = _fill(small_disk, size // 2)
    errors = run_distributed(_stage, 2, stage_dir, save_dir, 4, timeout_s=240)
    assert errors[0] == errors[1] and errors[0] is not None
    assert f"not enough disk space for the next checkpoint in {save_dir}" in errors[0]
    assert "iter_0000002 is intact" in errors[0] and "MiB needed" in errors[0]
    assert latest_checkpoint(save_dir) == previous and verify_checkpoint(previous).state == "ok"
    assert _leftovers(save_dir) == []

    os.remove(ballast)
    assert run_distributed(_stage, 2, stage_dir, save_dir, 4, timeout_s=240) == [None, None]
    assert latest_checkpoint(save_dir).name == "iter_0000004"


def test_a_disk_that_fills_during_the_first_save_is_named_and_the_retry_succeeds(small_disk, tmp_path):
    from megatron_video.training.checkpoint_files import latest_checkpoint, verify_checkpoint

    ballast = _fill(small_disk, 4 << 20)
    stage_dir, save_dir = tmp_path / "stage", small_disk / "checkpoints"
    errors = run_distributed(_stage, 2, stage_dir, save_dir, 1, timeout_s=240)
    assert errors[0] == errors[1] and errors[0] is not None
    assert f"the disk holding {save_dir} filled up while a checkpoint was written" in errors[0]
    assert "no earlier checkpoint exists" in errors[0]
    assert _leftovers(save_dir) == []

    os.remove(ballast)
    assert run_distributed(_stage, 2, stage_dir, save_dir, 1, timeout_s=240) == [None, None]
    assert verify_checkpoint(latest_checkpoint(save_dir)).state == "ok"
