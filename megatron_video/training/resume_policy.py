"""What a resumed run takes from its checkpoint and what from its (possibly edited) config.

Users edit a config between pre-emptions: a higher learning rate, a longer warm-up, another
schedule, a larger global batch once more devices are free. The rule:

- From the checkpoint: parameters, optimizer moments, EMA, random streams, the step, the samples
  consumed (the data position, and the position on the LR schedule, both counted in samples).
- From the new config: learning rate, minimum LR, schedule, warm-up, decay length, weight decay,
  Adam betas and epsilon, the clipping rule. Each value that differs from the saved run's is logged
  as changed. (The scheduler is built with Megatron's `override_opt_param_scheduler`, so its saved
  settings never replace the configured ones; only its sample count is restored.)
- The count of skipped steps in a row (training.max_consecutive_skipped_steps) carries over a
  resume, so pre-emptions cannot hide a diverged run; changed optimizer settings restart it.
- A changed global batch size keeps the consumed-sample position (the next batch starts right after
  the samples already trained on) and is logged with the step it corresponds to.
- What cannot change (model geometry, dtype) stays an error (checkpoint.CheckpointMismatchError).
"""

from __future__ import annotations

import dataclasses
import logging

from megatron_video.config.schema import ExperimentConfig
from megatron_video.training.grad_clip import build_clipper

logger = logging.getLogger(__name__)

SETTINGS_KEY = "settings"
"""Key of the training settings snapshot in a checkpoint's train_state."""


def settings_snapshot(cfg: ExperimentConfig) -> dict:
    """The settings a resume compares: optimizer, clipping, batch sizes (JSON-serialisable)."""
    t = cfg.training
    return {
        "optimizer": dataclasses.asdict(t.optimizer),
        "clip": dataclasses.asdict(t.clip),
        "global_batch_size": t.global_batch_size,
        "micro_batch_size": t.micro_batch_size,
    }


def _differences(saved: dict, now: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(saved) & set(now)):
        if isinstance(now[key], dict) and isinstance(saved[key], dict):
            out += _differences(saved[key], now[key], f"{prefix}{key}.")
        elif saved[key] != now[key]:
            out.append(f"{prefix}{key}: {saved[key]} -> {now[key]}")
    return out


def apply_resume_policy(cfg: ExperimentConfig, trainer, train_state: dict) -> list[str]:
    """After a checkpoint was loaded into `trainer`: put the config's optimizer settings into effect
    and return one line per setting that differs from the saved run's (also logged on rank 0)."""
    t, o = cfg.training, cfg.training.optimizer
    saved = train_state.get(SETTINGS_KEY)
    changes = _differences(saved, settings_snapshot(cfg), "training.") if saved else []

    # Betas, epsilon and Megatron's per-group LR bounds live in the optimizer's param groups, which
    # the checkpoint restored (no group of ours scales the learning rate).
    for group in trainer.optimizer.param_groups:
        group["betas"] = (o.beta1, o.beta2)
        group["eps"] = o.eps
        for key, value in (("max_lr", o.lr), ("min_lr", o.min_lr)):
            if key in group:
                group[key] = value
    # The scheduler kept its configured settings; recompute LR and weight decay at the restored count.
    trainer.scheduler.step(increment=0)

    optimizer_changed = any(line.startswith("training.optimizer.") for line in changes)
    if optimizer_changed and trainer.consecutive_skipped_steps:
        changes.append(
            f"the count of {trainer.consecutive_skipped_steps} skipped steps in a row restarts from 0 "
            "under the new optimizer settings"
        )
        trainer.consecutive_skipped_steps = 0
    if saved and saved["clip"]["mode"] != t.clip.mode:
        trainer.clipper = build_clipper(t.clip.mode, t.clip.max_norm, t.clip.ema_decay)
        changes.append(
            f"the {saved['clip']['mode']} clipping statistics were dropped: {t.clip.mode} starts afresh"
        )
    if saved and saved["global_batch_size"] != t.global_batch_size:
        consumed = trainer.consumed_samples
        changes.append(
            f"the run continues after the {consumed} samples consumed so far: step {trainer.step} at "
            f"{saved['global_batch_size']} samples per step, step {consumed / t.global_batch_size:g} at "
            f"{t.global_batch_size}; steps from here on take {t.global_batch_size} samples"
        )
    if changes and trainer.runtime.is_main:
        logger.warning(
            "resumed with changed settings (the new config's values apply):\n  %s", "\n  ".join(changes)
        )
    return changes
