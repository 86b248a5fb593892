"""The validation loss: held-out samples scored at fixed noise levels with fixed noise.

Every evaluation scores the same inputs: sample i (of the validation split, in its fixed order) at
noise level j (`training.validation.points`, mapped by the objective to a sigma or an integer
timestep) with noise drawn on the CPU from a generator keyed by (validation seed, i, j). Nothing
depends on the training RNG, the step, the data-loader position or the layout, so the curve is smooth
and a resumed run scores exactly what the original would have.

The held-out samples are encoded once per stage with the draws of epoch 0, no caption dropout and the
posterior mean. Each (sample, level) pair is one forward of batch 1 on every rank of its replica
(tensor / context parallel split it as in training); data-parallel replicas take samples i = r, r + n,
... and the per-pair losses are summed over the data-parallel group into a table that holds zeros
elsewhere, so the result equals one process's up to the parallel matmul reductions.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.distributed as dist

from megatron_video.config.schema import ExperimentConfig
from megatron_video.data.batches import EncodedBatches, TrainBatch
from megatron_video.data.collate import collate_samples
from megatron_video.data.dataset import VideoTextDataset
from megatron_video.data.holdout import validation_entries
from megatron_video.training.rng import derived_seed

logger = logging.getLogger(__name__)


def validation_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config the held-out samples are encoded with: no caption dropout or aesthetic phrase, the
    posterior mean, no condition noise (every other rule as in training)."""
    vcfg = copy.deepcopy(cfg)
    vcfg.captions = dataclasses.replace(vcfg.captions, caption_dropout=0.0, aesthetic_notice=False)
    vcfg.vae = dataclasses.replace(vcfg.vae, sample_posterior=False)
    vcfg.i2v = dataclasses.replace(vcfg.i2v, condition_noise=False)
    return vcfg


@torch.no_grad()
def build_validation_batches(cfg: ExperimentConfig, task: str, vae, text_encoder, device) -> list[TrainBatch]:
    """The encoded validation samples (one per batch, on the CPU), at most `training.validation.num_samples`."""
    vcfg = validation_config(cfg)
    geometry = dataclasses.replace(vcfg.sample_geometry, micro_batch_size=1)
    dataset = VideoTextDataset(vcfg.data, geometry, entries=validation_entries(vcfg.data))
    dataset.set_epoch(0)
    encoder = EncodedBatches(vcfg, dataset, vae, text_encoder, 0, 1, task, device=device)
    batches = []
    for index in range(min(cfg.training.validation.num_samples, len(dataset))):
        raw = collate_samples([dataset[index]], geometry.vae_stride_t, geometry.vae_stride_hw)
        batch = encoder.encode(raw, epoch=0)
        batches.append(
            TrainBatch(
                batch.x0_BCTHW.cpu(),
                {k: v.cpu() for k, v in batch.cond.items()},
                None if batch.loss_mask_BTHW is None else batch.loss_mask_BTHW.cpu(),
            )
        )
    return batches


def fixed_noise(shape_CTHW, seed: int, sample: int, level: int) -> torch.Tensor:
    """Noise [1, C, T, H, W] of validation sample `sample` at level index `level` (CPU, float32)."""
    gen = torch.Generator().manual_seed(derived_seed(seed, sample, level))
    return torch.randn((1, *shape_CTHW), generator=gen)


@torch.no_grad()
def validation_losses(
    model, objective, batches: list[TrainBatch], points, seed: int, plan, device
) -> torch.Tensor:
    """Loss table [samples, points] (float64, equal on every rank) of `model` on `batches`.

    `model(x_t, timesteps, **cond)` must return the full prediction on every rank of a replica, as
    the training forward does.
    """
    levels = [objective.level(p) for p in points]
    table = torch.zeros(len(batches), len(levels), dtype=torch.float64)
    dp_rank, dp_size = (plan.data_parallel_rank, plan.data_parallel) if plan is not None else (0, 1)
    for i in range(dp_rank, len(batches), dp_size):
        batch = batches[i]
        x0 = batch.x0_BCTHW.to(device)
        cond = {k: v.to(device) for k, v in batch.cond.items()}
        mask = None if batch.loss_mask_BTHW is None else batch.loss_mask_BTHW.to(device)
        for j, level in enumerate(levels):
            noise = fixed_noise(x0.shape[1:], seed, i, j).to(device)
            inputs = objective.noised_inputs_at(x0, noise, torch.tensor([level], dtype=torch.float32))
            pred = model(inputs.x_t, inputs.timesteps, **cond)
            table[i, j] = objective.loss(pred, inputs, mask).double().cpu()
    if plan is not None and dp_size > 1:
        dist.all_reduce(table, group=plan.data_parallel_group)  # other replicas' rows are zeros: exact
    return table


class Validator:
    """Scores the trainer's raw and / or EMA weights on the validation set (`training.validation`)."""

    def __init__(self, cfg: ExperimentConfig, batches: list[TrainBatch]):
        if not batches:
            raise ValueError("the validation split holds no sample that passes the data rules")
        self.cfg, self.batches = cfg, batches

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based, after the update) is evaluated."""
        v = self.cfg.training.validation
        return bool(v.interval) and (step % v.interval == 0 or step == self.cfg.training.steps)

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float]:
        """{"val_loss": raw weights, "val_loss_ema": EMA weights} (as configured); collective."""
        v = self.cfg.training.validation
        rt = trainer.runtime
        chunks = trainer.model if isinstance(trainer.model, list) else [trainer.model]
        modes = [c.training for c in chunks]
        for c in chunks:
            c.eval()

        def score() -> float:
            table = validation_losses(
                trainer.ddp, trainer.objective, self.batches, v.points, v.seed, rt.plan, rt.device
            )
            return float(table.mean())

        out = {}
        try:
            if v.weights in ("raw", "both"):
                out["val_loss"] = score()
            if v.weights in ("ema", "both"):
                with trainer.ema.swapped_in(trainer.ema_module):
                    out["val_loss_ema"] = score()
        finally:
            for c, mode in zip(chunks, modes):
                c.train(mode)
        return out
