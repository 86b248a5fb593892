"""training.checkpoint.optimizer_format=dp_reshardable: every rank writes its own optimizer shard (no
gather to data-parallel rank 0), a resume at the saving layout continues bitwise, and a resume at
another tensor-parallel size is refused with the reason (into the plain optimizer too:
`_optimizer_conversion`), and so is one with other gradient buckets. `run_stage` on 2 gloo ranks,
DP=2, with the communication overlap on (its default there) in 4000-parameter buckets."""

from __future__ import annotations

import json

import pytest

from megatron_video.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _stage(rank, world_size, stage_dir, steps, tensor_parallel=1, load_dir=None, overlap=None):
    from megatron_video.testing.models import tiny_config
    from megatron_video.training import stage
    from megatron_video.training.checkpoint import CheckpointMismatchError
    from tests.distributed.test_trainer_parity import _FixedBatches

    cfg = tiny_config(
        parallel={"tensor_parallel": tensor_parallel, "overlap_grad_reduce": overlap, "bucket_size": 4000},
        caption_channels=32,
        pooled_projection_dim=24,
        timestep_embed_dim=32,
    )
    t = cfg.training
    t.steps, t.global_batch_size, t.ema_decay = steps, 2, 0.9
    t.checkpoint.save_interval, t.checkpoint.optimizer_format = 2, "dp_reshardable"
    t.checkpoint.load_dir = str(load_dir) if load_dir else None
    t.logging.tensorboard_dir = t.logging.loss_curve_png = None
    stage.build_batches = lambda cfg, runtime, task: _FixedBatches(
        cfg, runtime.data_parallel_rank, cfg.training.accumulation_steps(runtime.data_parallel), 1
    )
    try:
        stage.run_stage(cfg, "t2v", stage_dir)
    except CheckpointMismatchError as exc:
        return str(exc)
    return None


def _losses(stage_dir):
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def test_dp_reshardable_writes_on_every_rank_and_resumes_exactly(tmp_path):
    assert run_distributed(_stage, 2, tmp_path / "full", 4, timeout_s=240) == [None, None]
    folder = tmp_path / "full" / "checkpoints" / "iter_0000002"
    meta = json.loads((folder / "checkpoint_meta.json").read_text())
    assert meta["optimizer"]["sharding_type"] == "dp_reshardable"
    (buffer,) = meta["ddp_buckets"]["0"][0]  # one chunk, one fp32 gradient buffer, in several buckets
    assert len(buffer) > 2, buffer
    written = {r: sum(p.stat().st_size for p in folder.glob(f"__{r}_*.distcp")) for r in (0, 1)}
    assert written[1] > 0.3 * written[0], written  # rank 1 writes its own optimizer shard

    # Steps 3 and 4 again, from the step-2 checkpoint in a fresh stage: bitwise the same.
    assert run_distributed(_stage, 2, tmp_path / "resumed", 4, 1, folder, timeout_s=240) == [None, None]
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and resumed == {k: full[k] for k in (3, 4)}

    # TP=2 x DP=2 on 4 ranks: the distributed optimizer again, but another tensor-parallel split.
    errors = run_distributed(_stage, 4, tmp_path / "tp2", 6, 2, folder, timeout_s=240)
    assert len(set(errors)) == 1 and "reshards over data parallel only" in errors[0], errors
    assert "tensor_parallel 1 -> 2" in errors[0]

    # Without the overlap the gradient buffer is one bucket: the per-bucket optimizer state does not fit.
    errors = run_distributed(_stage, 2, tmp_path / "one_bucket", 4, 1, folder, False, timeout_s=240)
    assert len(set(errors)) == 1 and "this run's buckets differ" in errors[0], errors
