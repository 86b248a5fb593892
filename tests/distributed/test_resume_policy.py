"""A resumed stage takes optimizer settings from its new config and says what changed.

Two launches of `run_stage` on 2 gloo ranks with fixed synthetic batches: 2 steps at lr 3e-4
(constant, global batch 2), then a resume to step 4 with lr 1e-3 on a cosine schedule, beta2 0.99,
fixed clipping and a global batch of 4. The resumed steps use the new learning rate at the restored
sample count, the optimizer's param groups carry the new betas, and every change is logged.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_video.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _stage(rank, world_size, stage_dir, overrides):
    import logging

    from megatron_video.testing.models import tiny_config
    from megatron_video.training import stage
    from tests.distributed.test_trainer_parity import _FixedBatches

    cfg = tiny_config(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    t = cfg.training
    t.ema_decay, t.checkpoint.save_interval = 0.9, 2
    t.logging.tensorboard_dir = t.logging.loss_curve_png = None
    for name, value in overrides.items():
        owner, _, field = name.rpartition(".")
        target = t
        for part in filter(None, owner.split(".")):
            target = getattr(target, part)
        setattr(target, field, value)
    stage.build_batches = lambda cfg, runtime, task: _FixedBatches(
        cfg, runtime.data_parallel_rank, cfg.training.accumulation_steps(runtime.data_parallel), 1
    )
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_video.training.resume_policy").addHandler(handler)
    captured = {}
    original = stage.apply_resume_policy

    def policy(cfg, trainer, state):
        changes = original(cfg, trainer, state)
        captured["betas"] = [tuple(g["betas"]) for g in trainer.optimizer.param_groups]
        captured["consumed"] = trainer.consumed_samples
        return changes

    stage.apply_resume_policy = policy
    stage.run_stage(cfg, "t2v", stage_dir)
    return records, captured


def test_changed_lr_schedule_betas_clip_and_batch_take_effect_and_are_logged(tmp_path):
    first = {"steps": 2, "global_batch_size": 2, "optimizer.lr": 3e-4, "clip.mode": "adaptive"}
    records, _ = run_distributed(_stage, 2, tmp_path, first, timeout_s=240)[0]
    assert records == []
    second = {
        "steps": 4,
        "global_batch_size": 4,
        "optimizer.lr": 1e-3,
        "optimizer.schedule": "cosine",
        "optimizer.beta2": 0.99,
        "clip.mode": "fixed",
    }
    results = run_distributed(_stage, 2, tmp_path, second, timeout_s=240)
    records, captured = results[0]
    assert results[1][0] == []  # logged once, by rank 0
    text = "\n".join(records)
    for line in (
        "training.optimizer.lr: 0.0003 -> 0.001",
        "training.optimizer.schedule: constant -> cosine",
        "training.optimizer.beta2: 0.999 -> 0.99",
        "training.clip.mode: adaptive -> fixed",
        "training.global_batch_size: 2 -> 4",
        "the adaptive clipping statistics were dropped",
        "continues after the 4 samples consumed so far",
    ):
        assert line in text, text
    assert captured["consumed"] == 4 and set(captured["betas"]) == {(0.9, 0.99)}

    metrics = {
        json.loads(line)["step"]: json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    }
    # The schedule counts samples: cosine over 4 steps x 4 samples, resumed at sample 4, then 8.
    for step, position in ((3, 4), (4, 8)):
        expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * position / 16))
        assert metrics[step]["lr"] == pytest.approx(expected, rel=1e-6), (step, metrics[step]["lr"], expected)
    assert metrics[2]["lr"] == pytest.approx(3e-4)
