"""Asynchronous checkpoint saving (training.checkpoint.async_save) through `run_stage`, 2 gloo ranks.

- The same 4 steps with synchronous and with background saves: identical losses, and identical
  checkpoints (every tensor of iteration 2 and 4 bitwise, both verified against their checksums).
- A background write that fails (the writer process raises, as on an I/O error) fails the run on
  every rank at the next poll; `latest` still names the previous checkpoint, which verifies, and no
  partial folder is left.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_video.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _stage(rank, world_size, stage_dir, async_save, fail_second_write=False):
    from megatron_video.testing.models import tiny_config
    from megatron_video.training import stage
    from tests.distributed.test_trainer_parity import _FixedBatches

    cfg = tiny_config(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    t = cfg.training
    t.steps, t.global_batch_size, t.ema_decay = 4, 2, 0.9
    t.checkpoint.save_interval, t.checkpoint.keep_last = 2, None
    t.checkpoint.async_save = async_save
    t.logging.tensorboard_dir = t.logging.loss_curve_png = None
    stage.build_batches = lambda cfg, runtime, task: _FixedBatches(
        cfg, runtime.data_parallel_rank, cfg.training.accumulation_steps(runtime.data_parallel), 1
    )
    if fail_second_write:
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        original = FileSystemWriterAsync.write_preloaded_data_multiproc

        def failing(*args, **kwargs):  # runs in the forked writer process
            if "iter_0000004" in str(args[3][0][0]):
                raise OSError("simulated I/O error in the background writer")
            return original(*args, **kwargs)

        FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(failing)
    try:
        stage.run_stage(cfg, "t2v", stage_dir)
    except BaseException as exc:  # noqa: BLE001 - the test reports what reached the caller
        return f"{type(exc).__name__}: {exc}"
    return None


def _read_weights(rank, world_size, folders):
    """Raw and EMA weights of each checkpoint folder (read in a one-process group)."""
    from megatron_video.training.checkpoint import checkpoint_weights

    return [[checkpoint_weights(folder, use_ema=ema)[0] for ema in (False, True)] for folder in folders]


def _losses(stage_dir):
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_background_saves_equal_synchronous_ones(tmp_path):
    from megatron_video.training.checkpoint_files import verify_checkpoint

    assert run_distributed(_stage, 2, tmp_path / "sync", False, timeout_s=240) == [None, None]
    assert run_distributed(_stage, 2, tmp_path / "async", True, timeout_s=240) == [None, None]
    assert _losses(tmp_path / "sync") == _losses(tmp_path / "async")
    folders = {
        (kind, iteration): tmp_path / kind / "checkpoints" / f"iter_{iteration:07d}"
        for kind in ("sync", "async")
        for iteration in (2, 4)
    }
    for folder in folders.values():
        assert verify_checkpoint(folder).state == "ok", folder
    weights = dict(zip(folders, run_distributed(_read_weights, 1, list(folders.values()), timeout_s=240)[0]))
    for iteration in (2, 4):
        for a, b in zip(weights["sync", iteration], weights["async", iteration]):  # raw, then EMA
            assert a.keys() == b.keys() and len(a) > 10
            for name in a:
                assert torch.equal(a[name], b[name]), (iteration, name)
    assert (tmp_path / "async" / "checkpoints" / "latest").read_text().strip() == "4"


def test_a_failed_background_write_keeps_the_previous_checkpoint(tmp_path):
    from megatron_video.training.checkpoint_files import latest_checkpoint, verify_checkpoint

    errors = run_distributed(_stage, 2, tmp_path, True, True, timeout_s=240)
    # The writer died without a result: megatron's finalize names it on every rank.
    assert all(e is not None and e.startswith("CheckpointException") for e in errors), errors
    save_dir = tmp_path / "checkpoints"
    assert latest_checkpoint(save_dir).name == "iter_0000002"
    assert verify_checkpoint(save_dir / "iter_0000002").state == "ok"
    assert sorted(p.name for p in save_dir.iterdir() if ".tmp-" in p.name) == []
