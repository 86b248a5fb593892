"""Training settings: objective, optimiser, schedule, clipping, EMA, checkpoints, logging."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Literal

from megatron_video.errors import ConfigError


@dataclass
class ObjectiveConfig:
    """The diffusion objective the denoiser is trained with."""

    kind: Literal["flow", "v_prediction", "epsilon"] = "flow"
    """flow: v1.5 rectified flow; v_prediction: v1.3 DDPM with zero-terminal SNR; epsilon: v1.2 DDPM."""

    weighting: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    """Flow: distribution of training sigmas before the shift."""

    shift: float | None = None
    """Flow: fixed sigma shift; None uses the resolution-dependent (Flux) shift of each batch."""

    snr_gamma: float | None = 5.0
    """DDPM: Min-SNR weighting gamma (None disables)."""

    zero_terminal_snr: bool = True
    """DDPM: rescale betas so the last step has zero SNR (v1.3)."""

    noise_offset: float = 0.0
    """DDPM: offset-noise scale (v1.2 used 0.02)."""


@dataclass
class OptimizerConfig:
    """AdamW through Megatron's optimizer (distributed or not) and the learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate."""

    min_lr: float = 0.0
    """Floor of the cosine / linear decay."""

    weight_decay: float = 1e-4
    """Decoupled weight decay (not applied to biases and 1-D parameters)."""

    beta1: float = 0.9
    """Adam beta1."""

    beta2: float = 0.999
    """Adam beta2."""

    eps: float = 1e-15
    """Adam epsilon (Open-Sora-Plan uses 1e-15)."""

    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up."""

    warmup_steps: int = 0
    """Linear warm-up steps from 0 to `lr`."""

    decay_steps: int | None = None
    """Steps over which the LR decays; None means the stage's `steps`."""

    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""


@dataclass
class ClipConfig:
    """Gradient clipping."""

    mode: Literal["adaptive", "fixed", "batch_drop", "none"] = "adaptive"
    """adaptive: v1.5 EMA mean + 3 sigma threshold, extreme steps skipped; fixed: clip to `max_norm`;
    batch_drop: v1.3 per-rank dropping of abnormal micro-batch gradients; none."""

    max_norm: float = 1.0
    """Threshold of the fixed mode."""

    ema_decay: float = 0.99
    """Decay of the gradient-norm statistics (adaptive and batch_drop)."""


@dataclass
class CheckpointConfig:
    """Where and how often training state is written."""

    save_dir: str | None = None
    """Directory of this run's checkpoints (iter_XXXXXXX folders and a `latest` pointer)."""

    save_interval: int = 1000
    """Save every N steps (and at the end, and on a pre-emption signal)."""

    keep_last: int | None = 3
    """Keep the newest N checkpoints; None keeps all."""

    load_dir: str | None = None
    """Start from this save directory's latest checkpoint, or from one checkpoint folder
    (`iter_XXXXXXX`), with its optimizer and data position. Used only while `save_dir` holds no
    checkpoint: once this run has saved, it resumes from its own (a re-run after a pre-emption
    continues, and another run's checkpoints in `save_dir` are never pruned away unread). A path that
    does not exist or holds no checkpoint is an error before launch."""

    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    """How the distributed optimizer's state is stored. fully_reshardable: loads at any TP / PP / CP /
    DP and into the plain optimizer, but each save gathers the optimizer state to data-parallel rank
    0, which writes it (slow at scale, and it blocks an async save while it runs). dp_reshardable:
    every rank writes its own shard with no gather; a resume must keep TP / PP / CP (DP may change)."""

    async_save: bool = False
    """Write periodic checkpoints in a background process per rank while training continues
    (Megatron core's async dist-checkpoint save); a checkpoint is published (`latest`) only after
    every rank's write finished. Costs host memory for the snapshot of this rank's state."""

    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    """Signals that mean "pre-empted": the step in flight finishes, a checkpoint of it is saved, and
    the run exits with code 0 (megatron_video/training/preemption.py)."""

    init_from: str | None = None
    """Start a new stage from these weights (a checkpoint directory or a safetensors file)."""

    init_from_ema: bool = True
    """When initialising from a checkpoint, take its EMA weights if it has them."""

    strict_integrity: bool = False
    """Resume only from the newest checkpoint: when it fails verification (a file missing, truncated
    or changed since the save, per the checksums in checkpoint_meta.json) the run stops with an error
    naming the file. False falls back to the newest checkpoint that verifies, with a warning naming
    each skipped one. (init_from and the tools' explicit checkpoint folders always refuse.)"""

    def preemption_signal_numbers(self) -> list[signal.Signals]:
        """The pre-emption signals as numbers; ConfigError naming one that cannot be caught."""
        out = []
        for name in self.preemption_signals:
            number = getattr(signal, name, None) if str(name).startswith("SIG") else None
            if not isinstance(number, signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(
                    f"training.checkpoint.preemption_signals: {name!r} is not a signal that can be caught; "
                    "use names such as SIGTERM, SIGINT, SIGUSR1"
                )
            out.append(number)
        return out


@dataclass
class LoggingConfig:
    """What is reported and where."""

    log_interval: int = 1
    """Print a line every N steps."""

    tensorboard_dir: str | None = None
    """TensorBoard event directory; None disables."""

    loss_curve_png: str | None = None
    """Write a loss-curve PNG here at the end of the run; None disables."""

    device_peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one device for MFU / HFU; None takes it from the device's name
    (megatron_video/planning/devices.py: H100 / H200 989, A100 312, B200 2250, Ascend 910B 354) and
    omits them on devices not in that table (the CPU)."""

    eta_min_steps: int = 50
    """Stages of at least this many steps add the elapsed time and an ETA to each console line; 0 always."""


VALIDATION_WEIGHTS = ("ema", "raw", "both")


@dataclass
class ValidationConfig:
    """A validation loss on held-out samples (`data.validation_fraction` or `data.validation_data_list`)
    at fixed noise levels and fixed noise, so every evaluation scores the same inputs: the curve is
    smooth, comparable across runs and resumes, and equal for every parallel layout."""

    interval: int = 0
    """Evaluate every N optimizer steps (and after the last step); 0 disables validation."""

    num_samples: int = 8
    """Held-out samples scored (the first N of the split, in a fixed order); fewer when the split is smaller."""

    points: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    """Noise levels, as fractions of the schedule in (0, 1): flow scores sigma = point (unshifted),
    DDPM objectives timestep round(point x (steps - 1)). Every sample is scored at every point."""

    seed: int = 0
    """Seed of the fixed noise: sample i at point j draws from a generator keyed by (seed, i, j),
    independent of training.seed, of the step and of the layout."""

    weights: Literal["ema", "raw", "both"] = "both"
    """Which weights are scored: the EMA (`val_loss_ema`), the raw trained weights (`val_loss`), or both."""

    def validate(self, ema_enabled: bool) -> None:
        """Raise ConfigError for a negative interval, empty points or points outside (0, 1)."""
        if self.interval < 0:
            raise ConfigError(f"training.validation.interval must be >= 0 (0 disables), got {self.interval}")
        if self.num_samples < 1:
            raise ConfigError(f"training.validation.num_samples must be >= 1, got {self.num_samples}")
        if not self.points or not all(0.0 < p < 1.0 for p in self.points):
            raise ConfigError(
                f"training.validation.points must be a non-empty list of numbers in (0, 1), got {self.points}"
            )
        if self.weights not in VALIDATION_WEIGHTS:
            raise ConfigError(
                f"training.validation.weights must be one of {list(VALIDATION_WEIGHTS)}, got {self.weights!r}"
            )
        if self.interval and self.weights != "raw" and not ema_enabled:
            raise ConfigError(
                f"training.validation.weights={self.weights} needs an EMA; set training.ema_decay or "
                "training.validation.weights=raw"
            )


@dataclass
class SamplesConfig:
    """Videos sampled with the EMA weights during training, for a fixed list of prompts and seeds:
    mp4s and a contact sheet under `<stage>/samples/step_XXXXXXX/`, and TensorBoard videos / images."""

    interval: int = 0
    """Sample every N optimizer steps and after the last step; 0 disables sampling."""

    prompts: list[str] = field(default_factory=list)
    """Prompts sampled each time (required when `interval` > 0)."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Noise seeds: every prompt is sampled once per seed."""

    condition_images: list[str] = field(default_factory=list)
    """I2V stages: one condition image per prompt (its first frame); empty samples I2V models from text
    alone (every frame masked). Ignored by T2V stages."""

    steps: int = 20
    """Denoising steps."""

    guidance_scale: float = 4.0
    """Classifier-free guidance scale (1 disables the unconditional branch)."""

    shift: float | None = None
    """Flow objectives: static sigma shift of the sampling schedule. None samples with the shift training
    draws its sigmas with at this sample size (`training.objective.shift`, else the resolution-dependent
    shift), so a small model is not sampled on a schedule tuned for 576 x 1024 (v1.5 samples with 7.0)."""

    prompt_template: str = "{}"
    """Template each prompt is put into ("{}": as written, like the training captions; the v1.5
    release samples with "high quality, {}")."""

    fps: float | None = None
    """Frame rate of the mp4s; None uses data.train_fps."""

    frames_in_sheet: int = 5
    """Frames per video shown in the contact sheet (evenly spaced)."""

    def validate(self) -> None:
        """Raise ConfigError for sampling that is on but has nothing to sample, or bad sizes."""
        if self.interval < 0:
            raise ConfigError(f"training.samples.interval must be >= 0 (0 disables), got {self.interval}")
        if self.interval and not self.prompts:
            raise ConfigError(
                "training.samples.interval > 0 needs training.samples.prompts (a list of prompts)"
            )
        if not self.seeds:
            raise ConfigError("training.samples.seeds must list at least one seed")
        if self.steps < 1 or self.frames_in_sheet < 1:
            raise ConfigError("training.samples.steps and frames_in_sheet must be >= 1")
        if self.shift is not None and not self.shift > 0:
            raise ConfigError(
                f"training.samples.shift must be > 0 (None: the training shift), got {self.shift}"
            )
        if "{}" not in self.prompt_template:
            raise ConfigError(
                f"training.samples.prompt_template {self.prompt_template!r} has no '{{}}' for the prompt"
            )
        if self.condition_images and len(self.condition_images) != len(self.prompts):
            raise ConfigError(
                f"training.samples.condition_images lists {len(self.condition_images)} images for "
                f"{len(self.prompts)} prompts; give one per prompt (or none)"
            )


@dataclass
class TrainingConfig:
    """One training stage."""

    steps: int = 1000
    """Optimizer steps of this stage."""

    micro_batch_size: int = 1
    """Samples per forward pass per data-parallel rank."""

    global_batch_size: int = 1
    """Samples per optimizer step over all data-parallel ranks (micro batch x DP x accumulation)."""

    seed: int = 1234
    """Seed of noise, sigma and data order."""

    ema_decay: float | None = 0.9999
    """EMA decay of the weights; None disables EMA."""

    max_consecutive_skipped_steps: int = 20
    """Stop the stage after this many optimizer steps in a row were skipped by the clipping rule (NaN /
    Inf or extreme gradient norms): a checkpoint of the last good state (skipped steps leave the
    parameters unchanged) is saved, then the run ends with an error pointing at the learning rate
    and the data."""

    encoder_data_parallel: bool = False
    """Spread VAE / text encoding over the TP x CP ranks of a replica (each encodes a different
    micro-batch, then they exchange); the batches are identical to encoding on every rank."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Diffusion objective."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimiser and learning-rate schedule."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    """Gradient clipping."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Validation loss on held-out samples (off unless `interval` > 0)."""

    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """Videos sampled at fixed prompts and seeds during training (off unless `interval` > 0)."""

    def accumulation_steps(self, data_parallel_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step != 0:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x "
                f"data-parallel size = {self.micro_batch_size} x {data_parallel_size}"
            )
        return self.global_batch_size // per_step

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot run."""
        if self.steps < 1:
            raise ConfigError(f"training.steps must be >= 1, got {self.steps}")
        if self.micro_batch_size < 1 or self.global_batch_size < self.micro_batch_size:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} must be >= micro_batch_size="
                f"{self.micro_batch_size} >= 1"
            )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"training.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.clip.mode == "fixed" and self.clip.max_norm <= 0:
            raise ConfigError("training.clip.max_norm must be > 0 in fixed mode")
        if not 0.0 < self.clip.ema_decay < 1.0:
            raise ConfigError(f"training.clip.ema_decay must be in (0, 1), got {self.clip.ema_decay}")
        if self.optimizer.lr <= 0 or self.optimizer.min_lr < 0 or self.optimizer.min_lr > self.optimizer.lr:
            raise ConfigError(
                f"training.optimizer needs 0 <= min_lr <= lr and lr > 0 (lr={self.optimizer.lr}, "
                f"min_lr={self.optimizer.min_lr})"
            )
        if self.optimizer.warmup_steps < 0 or self.optimizer.warmup_steps > self.steps:
            raise ConfigError(
                f"training.optimizer.warmup_steps={self.optimizer.warmup_steps} must be in [0, steps={self.steps}]"
            )
        if self.max_consecutive_skipped_steps < 1:
            raise ConfigError(
                f"training.max_consecutive_skipped_steps must be >= 1, got {self.max_consecutive_skipped_steps}"
            )
        if self.checkpoint.save_interval < 1:
            raise ConfigError("training.checkpoint.save_interval must be >= 1")
        self.checkpoint.preemption_signal_numbers()
        if self.logging.log_interval < 1:
            raise ConfigError("training.logging.log_interval must be >= 1")
        if self.logging.eta_min_steps < 0:
            raise ConfigError("training.logging.eta_min_steps must be >= 0")
        self.validation.validate(self.ema_decay is not None)
        self.samples.validate()
