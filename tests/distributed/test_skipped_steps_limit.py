"""A stage whose every step is skipped stops: after training.max_consecutive_skipped_steps NaN steps in
a row it saves the last good state and raises an error naming the count.

NaN gradients are forced the way tests/distributed/test_trainer_parity.py does (a hook that fills a
main_grad with NaN before the clipping decision); the stage runs end to end through `run_stage`
with synthetic batches.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

GOOD_STEPS = 3
LIMIT = 20


def _stage_with_nan_gradients(rank, world_size, stage_dir):
    from megatron_video.testing.models import tiny_config
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training import stage
    from megatron_video.training.loop import Trainer
    from tests.distributed.test_trainer_parity import _FixedBatches

    last_good = {}

    class NaNTrainer(Trainer):
        def __post_init__(self):
            super().__post_init__()
            self.before_optimizer_step = self._nan_after_good_steps

        def _nan_after_good_steps(self, trainer):
            if trainer.step == GOOD_STEPS:  # the parameters every later (skipped) step leaves alone
                last_good.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
            if trainer.step >= GOOD_STEPS:
                next(iter(trainer.model.parameters())).main_grad.fill_(float("nan"))

    cfg = tiny_config(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    cfg.training.steps = 100
    cfg.training.optimizer.lr = 1e-3
    cfg.training.ema_decay = 0.9
    cfg.training.checkpoint.save_interval = 1000
    cfg.training.logging.tensorboard_dir = None
    assert cfg.training.max_consecutive_skipped_steps == LIMIT  # the default
    stage.Trainer = NaNTrainer
    stage.build_batches = lambda cfg, runtime, task: _FixedBatches(
        cfg, runtime.data_parallel_rank, cfg.training.accumulation_steps(runtime.data_parallel), 1
    )
    try:
        stage.run_stage(cfg, "t2v", stage_dir)
        error = None
    except stage.TrainingDivergedError as exc:
        error = str(exc)
    saved, meta = ckpt.checkpoint_weights(stage_dir / "checkpoints", use_ema=False)
    return error, meta["iteration"], last_good, saved


def test_consecutive_nan_steps_stop_the_stage_after_saving(megatron_single, tmp_path):
    error, iteration, last_good, saved = run_distributed(
        _stage_with_nan_gradients, 1, tmp_path / "stage", timeout_s=500
    )[0]
    assert error is not None, "the stage ran to its end"
    assert f"{LIMIT} optimizer steps in a row were skipped" in error
    assert "learning rate" in error and "data" in error
    assert iteration == GOOD_STEPS + LIMIT
    assert not (tmp_path / "stage" / "final_model.safetensors").exists()
    for name, tensor in last_good.items():  # the checkpoint holds the last good parameters
        assert torch.equal(saved[name], tensor), name
