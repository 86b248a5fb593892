"""Quality signals of a training stage: the validation loss (`validation.py`) and samples at fixed
prompts and seeds (`checkpoint_samples.py`), run by the stage loop after each optimizer step."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from megatron_video.config.schema import ExperimentConfig
from megatron_video.platform.launch import Runtime


class StageQuality:
    """What a stage evaluates after its steps; `after_step` is collective (every rank calls it)."""

    def __init__(self, validator=None, samples=None):
        self.validator, self.samples = validator, samples

    @classmethod
    def build(
        cls, cfg: ExperimentConfig, runtime: Runtime, task: str, stage_dir: Path, batches, encoders: Callable
    ) -> StageQuality:
        """The configured signals; the frozen encoders come from the batch source, or from
        `encoders()` -> (vae, text encoder) when it has none (a feature-cache source)."""
        t = cfg.training
        if not t.validation.interval and not t.samples.interval:
            return cls()
        vae, text = getattr(batches, "vae", None), getattr(batches, "text", None)
        if vae is None or text is None:
            vae, text = encoders()
        validator = samples = None
        if t.validation.interval:
            from megatron_video.training.validation import Validator, build_validation_batches

            validator = Validator(cfg, build_validation_batches(cfg, task, vae, text, runtime.device))
        if t.samples.interval:
            from megatron_video.training.checkpoint_samples import CheckpointSamples

            samples = CheckpointSamples(cfg, runtime, task, stage_dir, vae, text)
        return cls(validator, samples)

    def after_step(self, trainer, log) -> dict[str, float]:
        """Validation metrics of this step (empty when none is due); writes samples when due. The
        time spent is left out of the step's throughput."""
        out: dict[str, float] = {}
        validate = self.validator is not None and self.validator.due(trainer.step)
        sample = self.samples is not None and self.samples.due(trainer.step)
        if validate or sample:
            trainer.sync_params()  # under overlap_param_gather the weights and EMA are gathered lazily
        if validate:
            start = time.perf_counter()
            out = self.validator.evaluate(trainer)
            log.pause(time.perf_counter() - start)
        if sample:
            self.samples.run(trainer, trainer.step, log)
        return out
