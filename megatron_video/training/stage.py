"""One training stage end to end, and curricula of stages.

A stage: validated config -> process groups -> frozen VAE and text encoder -> the `model.family`
denoiser (`denoisers.py`; initialised from the previous stage's exported weights through the needed
transition) -> Trainer -> resume from the stage's own checkpoints if any -> steps with periodic checkpoints
(and one on a pre-emption signal) -> final checkpoint, flat export of raw and EMA weights, loss curve.

Transitions between stages happen on flat (TP-merged) weights, so any two layouts connect:
image -> video and fps / resolution changes need no weight change; dense -> SUV re-stages the
blocks and adds identity-initialised skips; T2V -> I2V adds the zero-initialised inpainting
embeddings, so the I2V model starts equal to the T2V one (the v1.2 / v1.3 DiT also copies the patch
embedding into the masked-video embedding, as the release does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_video.config.encoders import VAESection
from megatron_video.config.loader import read_yaml_with_bases
from megatron_video.config.schema import ExperimentConfig, build_config
from megatron_video.errors import ConfigError
from megatron_video.parallel.plan import ParallelPlan
from megatron_video.parallel.setup import setup_parallel
from megatron_video.planning.flops import sample_flops, video_tokens
from megatron_video.platform.launch import Runtime, init_distributed
from megatron_video.training import checkpoint as ckpt
from megatron_video.training import denoisers
from megatron_video.training.async_save import BackgroundSaves
from megatron_video.training.checkpoint_files import SaveDirInUseError, SaveDirLock, latest_checkpoint
from megatron_video.training.data_metrics import announce_data, step_data_metrics
from megatron_video.training.export import (
    gather_full_state_dict,
    load_flat,
    load_full_into,
    main_params,
    save_flat,
)
from megatron_video.training.loop import Trainer
from megatron_video.training.metrics import MetricsLogger, device_peak_tflops
from megatron_video.training.preemption import Preempted, PreemptionSignals
from megatron_video.training.quality import StageQuality
from megatron_video.training.resume_policy import SETTINGS_KEY, apply_resume_policy, settings_snapshot

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row were skipped (training.max_consecutive_skipped_steps)."""


# -- frozen encoders ------------------------------------------------------------------------------


def build_vae(section: VAESection, device: torch.device):
    """The frozen VAE with its weights (eval, no gradients)."""
    if section.kind == "causal_vae":
        from megatron_video.models.causal_vae.model import CausalVAE
        from megatron_video.models.causal_vae.state_dict_adapter import load_open_sora_plan as load_osp

        cfg = section.model_config()
        vae = CausalVAE(cfg)
    else:
        from megatron_video.models.wfvae.model import WFVAE
        from megatron_video.models.wfvae.state_dict_adapter import load_open_sora_plan as load_osp

        cfg = section.model_config()
        vae = WFVAE(cfg)
    if section.checkpoint:
        path = Path(section.checkpoint)
        if path.suffix == ".safetensors" or path.with_suffix(".safetensors").is_file():
            state, saved = load_flat(path)
            if saved is not None:  # the export's own geometry and latent statistics win over the flavor
                cfg = type(cfg)(**{**saved, "chunked": section.chunked} if "chunked" in saved else saved)
                vae = type(vae)(cfg)
        else:
            _, state = load_osp(path, cfg, prefer_ema=section.use_ema)
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"VAE weights {path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    vae.eval().requires_grad_(False)
    return vae.to(device)


def build_text_encoder(cfg: ExperimentConfig, device: torch.device):
    """The frozen text encoder pair."""
    from megatron_video.models.text.encoders import TextEncoderPair

    return TextEncoderPair.from_config(cfg.text, device)


# -- the denoiser and its initial weights -----------------------------------------------------------


def build_denoiser(cfg: ExperimentConfig, runtime: Runtime, task: str):
    """The `model.family` denoiser for this rank (I2V adds the inpainting conditioning); its list of
    pipeline chunks when pipeline_parallel > 1."""
    mask_channels = denoisers.inpaint_mask_channels(cfg, task)

    def make(blocks: range | None = None):
        model = denoisers.build_model(
            cfg.model, runtime.plan, cfg.runtime.attention_backend, mask_channels, blocks
        )
        return model.to(runtime.device)

    if runtime.pipeline_parallel == 1:
        return make()
    from megatron_video.parallel.pipeline import build_model_chunks

    return build_model_chunks(make, cfg.model.total_layers)


def initialize_from(model, runtime: Runtime, cfg: ExperimentConfig, source: str) -> None:
    """Load weights exported by an earlier stage (any flat export, or a training checkpoint folder)
    into this rank's model or pipeline chunks, applying the transition."""
    chunks = model if isinstance(model, list) else [model]
    if Path(source).is_dir():  # a training checkpoint (its EMA weights unless init_from_ema is off)
        full, meta = ckpt.checkpoint_weights(source, cfg.training.checkpoint.init_from_ema)
        prev = denoisers.saved_model_config(
            (meta.get("model") or {}).get("config"), (meta.get("model") or {}).get("class")
        )
    else:
        full, saved_cfg = load_flat(source)
        prev = denoisers.saved_model_config(saved_cfg)
    fresh = {k: v for chunk in chunks for k, v in chunk.state_dict().items()}
    full, may_stay_new = denoisers.transition_weights(full, prev, cfg, fresh, source)
    new = []
    for chunk in chunks:
        names = set(chunk.state_dict())
        new += load_full_into(chunk, runtime.plan, {k: v for k, v in full.items() if k in names})
    unexpected_new = [k for k in new if not k.startswith(may_stay_new)]
    if unexpected_new:
        raise KeyError(f"{source} lacks weights for {sorted(unexpected_new)}")
    if runtime.is_main:
        logger.info(
            "initialised from %s (new modules kept as built: %s)",
            source,
            sorted({k.split(".")[0] for k in new}),
        )


# -- one stage ---------------------------------------------------------------------------------------


@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    stage_dir: Path
    final_model: Path
    final_ema: Path | None
    losses: list[float] = field(default_factory=list)


def run_stage(
    cfg: ExperimentConfig, task: str, stage_dir: str | Path, runtime: Runtime | None = None
) -> StageResult:
    """Train one stage into `stage_dir` (checkpoints/, tensorboard/, final_*.safetensors).

    Raises Preempted after saving when a pre-emption signal arrived (the entry scripts exit 0), and
    TrainingDivergedError after too many skipped steps in a row.
    """
    stage_dir = Path(stage_dir)
    if cfg.features.cache_dir and task == "i2v":
        from megatron_video.data.feature_cache.format import I2V_UNSUPPORTED

        raise ConfigError(I2V_UNSUPPORTED)
    t = cfg.training
    t.checkpoint.save_dir = t.checkpoint.save_dir or str(stage_dir / "checkpoints")
    t.logging.tensorboard_dir = t.logging.tensorboard_dir or str(stage_dir / "tensorboard")
    t.logging.loss_curve_png = t.logging.loss_curve_png or str(stage_dir / "loss_curve.png")
    stop = PreemptionSignals(t.checkpoint.preemption_signal_numbers())  # from here on: save, then exit 0
    runtime = setup_parallel(cfg, runtime or init_distributed(cfg.runtime))
    lock = _lock_save_dir(t.checkpoint.save_dir, runtime)
    try:
        return _train(cfg, task, stage_dir, runtime, stop)
    finally:
        stop.restore()
        lock.release()


def _lock_save_dir(save_dir: str, runtime: Runtime) -> SaveDirLock:
    """Rank 0 takes the save dir's lock; every rank raises ConfigError when another run holds it."""
    lock, problem = SaveDirLock(save_dir), None
    if runtime.is_main:
        try:
            lock.acquire()
        except SaveDirInUseError as exc:
            problem = str(exc)
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ConfigError(problem)
    return lock


def resume_source(save_dir: str, load_dir: str | None) -> Path | None:
    """Where a stage resumes from: its own save dir once it holds a checkpoint, else `load_dir`."""
    if latest_checkpoint(save_dir) is not None:
        return Path(save_dir)
    return Path(load_dir) if load_dir else None


def _train(cfg: ExperimentConfig, task: str, stage_dir: Path, runtime: Runtime, stop) -> StageResult:
    t = cfg.training
    cfg.micro_batches_per_step(runtime.data_parallel)  # the world size is known only now
    torch.manual_seed(t.seed)

    model = build_denoiser(cfg, runtime, task)
    resume_dir = resume_source(t.checkpoint.save_dir, t.checkpoint.load_dir)
    ignored_load_dir = t.checkpoint.load_dir and resume_dir != Path(t.checkpoint.load_dir)
    if resume_dir is not None and ignored_load_dir and runtime.is_main:
        logger.warning(
            "%s holds this run's checkpoints: resuming from them, not from training.checkpoint.load_dir=%s",
            resume_dir,
            t.checkpoint.load_dir,
        )
    if t.checkpoint.init_from and resume_dir is None:
        initialize_from(model, runtime, cfg, t.checkpoint.init_from)
    trainer = Trainer(cfg, runtime, model)
    batches = build_batches(cfg, runtime, task)

    if resume_dir is not None:
        state = ckpt.load_checkpoint(
            resume_dir,
            trainer.model_chunks,
            trainer.optimizer,
            trainer.scheduler,
            trainer.ema,
            strict_integrity=t.checkpoint.strict_integrity,
        )
        trainer.load_train_state(state)
        batches.load_state_dict(state["data"])
        apply_resume_policy(cfg, trainer, state)
        if runtime.is_main:
            print(f"resumed from {resume_dir} at step {trainer.step}", flush=True)

    log = MetricsLogger(
        runtime.is_main,
        t.logging.tensorboard_dir,
        t.logging.log_interval,
        str(stage_dir / "metrics.jsonl"),
        total_steps=t.steps if t.steps >= t.logging.eta_min_steps else None,
    )
    quality = StageQuality.build(
        cfg,
        runtime,
        task,
        stage_dir,
        batches,
        lambda: (build_vae(cfg.vae, runtime.device), build_text_encoder(cfg, runtime.device)),
    )
    tokens, flops, hardware_flops = _step_work(cfg)  # per optimizer step, at the configured largest shape
    peak_tflops = device_peak_tflops(runtime.device, t.logging.device_peak_tflops)
    losses = []
    background = BackgroundSaves() if t.checkpoint.async_save else None
    try:
        if stop.agreed():  # a signal during start-up: nothing new to save
            raise Preempted(stop.name, trainer.step, None)
        while trainer.step < t.steps:
            started = time.perf_counter()
            metrics = trainer.train_step(batches)
            metrics.update(
                step_data_metrics(batches, runtime.plan.data_parallel_group, time.perf_counter() - started)
            )
            metrics.update(quality.after_step(trainer, log))  # validation loss, samples (when due)
            losses.append(metrics["loss"])
            log.log(trainer.step, metrics, t.global_batch_size, tokens, flops, peak_tflops, hardware_flops)
            if background is not None:
                background.poll()  # publishes a background save whose writers have all finished
            stopping = stop.agreed()
            diverged = trainer.consecutive_skipped_steps >= t.max_consecutive_skipped_steps
            if (
                trainer.step % t.checkpoint.save_interval == 0
                or trainer.step == t.steps
                or stopping
                or diverged
            ):
                _save(trainer, batches, cfg, background)
                if background is not None and (stopping or diverged or trainer.step == t.steps):
                    background.wait()
                stopping = stopping or stop.agreed()  # a signal during the save: this step is saved
            if diverged:
                raise TrainingDivergedError(
                    f"{trainer.consecutive_skipped_steps} optimizer steps in a row were skipped (NaN / Inf or "
                    f"extreme gradient norms; training.max_consecutive_skipped_steps="
                    f"{t.max_consecutive_skipped_steps}), up to step {trainer.step}. The parameters are those of "
                    f"the last good step, saved in {t.checkpoint.save_dir}. Lower the learning rate "
                    "(training.optimizer.lr, warmup_steps) or check the data (NaN / broken samples) before resuming"
                )
            if stopping:
                if background is not None:
                    background.wait()
                raise Preempted(stop.name, trainer.step, t.checkpoint.save_dir)
    except BaseException:
        try:  # the loss curve so far; the error that ends the stage matters more than this file
            log.close(t.logging.loss_curve_png, f"{stage_dir.name} loss")
        except Exception as close_error:
            logger.warning("could not write the loss curve or metrics: %s", close_error)
        raise
    log.close(t.logging.loss_curve_png, f"{stage_dir.name} loss")

    final_model, final_ema = _export(trainer, runtime, cfg, stage_dir)
    return StageResult(stage_dir, final_model, final_ema, losses)


def build_batches(cfg: ExperimentConfig, runtime: Runtime, task: str):
    """The stage's BatchSource: the feature cache when features.cache_dir is set, else online encoding."""
    if cfg.features.cache_dir:
        from megatron_video.data.feature_cache.read import CachedBatches, CachedFeatureDataset

        dataset = CachedFeatureDataset.from_config(cfg.features.cache_dir, cfg, cfg.features)
        return CachedBatches(
            cfg, dataset, runtime.data_parallel_rank, runtime.data_parallel, task, device=runtime.device
        )
    from megatron_video.data.batches import EncodedBatches
    from megatron_video.data.dataset import VideoTextDataset
    from megatron_video.data.holdout import training_entries

    dataset = VideoTextDataset(cfg.data, cfg.sample_geometry, training_entries(cfg.data))
    summary = announce_data(dataset, cfg.training.global_batch_size, runtime.is_main)
    torch.manual_seed(cfg.training.seed)  # a random-init VAE (tests) is then the same in every layout
    vae = build_vae(cfg.vae, runtime.device)
    text = build_text_encoder(cfg, runtime.device)
    batches = EncodedBatches(
        cfg,
        dataset,
        vae,
        text,
        runtime.data_parallel_rank,
        runtime.data_parallel,
        task,
        device=runtime.device,
        encoder_group=encoder_group(cfg, runtime.plan),
        replica_group=runtime.plan.tensor_context_parallel_group,
    )
    batches.data_summary = summary
    return batches


def encoder_group(cfg: ExperimentConfig, plan: ParallelPlan):
    """The TP x CP group that shares encoding work, or None when encoder data parallel is off."""
    if not cfg.training.encoder_data_parallel or plan.tensor_parallel * plan.context_parallel == 1:
        return None
    return plan.tensor_context_parallel_group


def _step_work(cfg: ExperimentConfig) -> tuple[int, float, float]:
    """(video tokens, model FLOPs, hardware FLOPs) of one global batch at the configured largest
    shape (planning/flops.py: Skiparse at N^2/k, recompute counted as hardware FLOPs only)."""
    n = video_tokens(cfg.model, cfg.latent_grid)
    per_sample = sample_flops(cfg.model, n, cfg.shape.text_length)
    batch = cfg.training.global_batch_size
    return n * batch, per_sample.model * batch, per_sample.hardware * batch


def _save(trainer: Trainer, batches, cfg: ExperimentConfig, background: BackgroundSaves | None) -> None:
    trainer.sync_params()  # parameters and EMA as of this step (overlapped gathers finish lazily)
    state = trainer.train_state()
    state["data"] = batches.state_dict()
    state["config"] = dataclasses.asdict(cfg.model)
    state["parallel"] = dataclasses.asdict(cfg.parallel)
    state[SETTINGS_KEY] = settings_snapshot(cfg)
    ckpt.save_checkpoint(
        cfg.training.checkpoint.save_dir,
        trainer.step,
        trainer.model_chunks,
        trainer.optimizer,
        trainer.scheduler,
        state,
        ema=trainer.ema,
        keep_last=cfg.training.checkpoint.keep_last,
        background=background,
        optimizer_format=cfg.training.checkpoint.optimizer_format,
    )


def _export(
    trainer: Trainer, runtime: Runtime, cfg: ExperimentConfig, stage_dir: Path
) -> tuple[Path, Path | None]:
    """Flat raw and EMA weights of the final model, merged over TP and PP (rank 0 writes)."""
    trainer.sync_params()
    chunks = trainer.model if isinstance(trainer.model, list) else [trainer.model]
    raw, ema = {}, ({} if trainer.ema else None)
    for chunk in chunks:
        # fp32 main parameters: under bf16 the optimizer's originals, not the bf16 forward copies.
        raw.update(gather_full_state_dict(chunk, runtime.plan, main_params(chunk, trainer.optimizer)))
        if ema is not None:
            names = {n for n, _ in chunk.named_parameters()}
            shadow = {k: v for k, v in trainer.ema.shadow.items() if k in names}
            ema.update(gather_full_state_dict(chunk, runtime.plan, shadow))
    if runtime.pipeline_parallel > 1:
        group = runtime.plan.pipeline_parallel_group
        parts = [None] * runtime.pipeline_parallel
        dist.all_gather_object(parts, (raw, ema), group=group)
        raw, ema = {}, ({} if ema is not None else None)
        for part_raw, part_ema in parts:
            raw.update(part_raw)
            if ema is not None:
                ema.update(part_ema)
    model_path, ema_path = stage_dir / "final_model.safetensors", stage_dir / "final_ema.safetensors"
    if runtime.is_main:
        save_flat(model_path, raw, cfg.model)
        if ema is not None:
            save_flat(ema_path, ema, cfg.model)
    if dist.is_initialized():
        dist.barrier()
    return model_path, (ema_path if ema is not None else None)


# -- curricula --------------------------------------------------------------------------------------


@dataclass
class StageSpec:
    """One entry of a curriculum file."""

    name: str
    config: str
    task: str = "t2v"
    steps: int | None = None
    init_from: str | None = "previous"
    use_ema: bool = True
    overrides: list[str] = field(default_factory=list)


def read_curriculum(path: str | Path) -> tuple[list[StageSpec], Path]:
    """Stages and output directory of a curriculum YAML (stage configs relative to it)."""
    path = Path(path)
    data = read_yaml_with_bases(path)
    unknown = set(data) - {"stages", "output_dir"}
    if unknown:
        raise ConfigError(f"{path}: unknown curriculum keys {sorted(unknown)}; use 'stages' and 'output_dir'")
    stages = []
    for i, entry in enumerate(data.get("stages") or []):
        try:
            spec = StageSpec(**entry)
        except TypeError as e:
            raise ConfigError(f"{path}: stage {i}: {e}") from None
        if spec.task not in ("t2v", "i2v"):
            raise ConfigError(f"{path}: stage '{spec.name}' has task '{spec.task}'; use t2v or i2v")
        spec.config = str((path.parent / spec.config).resolve())
        stages.append(spec)
    if not stages:
        raise ConfigError(f"{path}: no stages listed")
    return stages, Path(data.get("output_dir", "outputs") or "outputs")


def stage_configs(
    path: str | Path, extra_overrides: list[str] | None = None
) -> list[tuple[StageSpec, ExperimentConfig, Path]]:
    """Every stage's validated config (all checked before any process group starts)."""
    stages, out = read_curriculum(path)
    result, previous = [], None
    for spec in stages:
        stage_dir = out / spec.name
        overrides = list(spec.overrides) + list(extra_overrides or [])
        if spec.steps is not None:
            overrides.append(f"training.steps={spec.steps}")
        if spec.init_from == "previous" and previous is not None:
            weights = "final_ema.safetensors" if spec.use_ema else "final_model.safetensors"
            overrides.append(f"training.checkpoint.init_from={previous / weights}")
        elif spec.init_from not in (None, "previous"):
            overrides.append(f"training.checkpoint.init_from={spec.init_from}")
        cfg = build_config(read_yaml_with_bases(spec.config), overrides)
        result.append((spec, cfg, stage_dir))
        previous = stage_dir
    return result


def run_curriculum(path: str | Path, extra_overrides: list[str] | None = None) -> list[StageResult]:
    """Run the stages in order; a stage that already exported its final weights is skipped."""
    plans = stage_configs(path, extra_overrides)
    runtime, results = None, []
    for spec, cfg, stage_dir in plans:
        done = stage_dir / "final_model.safetensors"
        if done.is_file():
            if runtime is None or runtime.is_main:
                print(f"stage {spec.name}: already finished ({done})", flush=True)
            results.append(StageResult(stage_dir, done, stage_dir / "final_ema.safetensors"))
            continue
        if runtime is None:
            runtime = init_distributed(cfg.runtime)
        if runtime.is_main:
            print(
                f"=== stage {spec.name} ({spec.task}): {cfg.training.steps} steps -> {stage_dir}", flush=True
            )
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / "config.yaml").write_text(
                yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))))
            )
        results.append(run_stage(cfg, spec.task, stage_dir, runtime))
    return results
