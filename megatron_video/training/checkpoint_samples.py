"""Videos sampled during training (`training.samples`): fixed prompts and seeds, EMA weights.

Every `interval` steps and after the last step, each (prompt, seed) pair is sampled with the
inference pipeline on the model being trained, its EMA average swapped in (raw weights without an
EMA). Every rank takes part: tensor / context parallel ranks split each video as in training,
data-parallel replicas take every n-th pair, the first rank of each replica decodes and writes its
mp4s under `<stage>/samples/step_XXXXXXX/` named as VBench names them (`{prompt}-{seed index}.mp4`,
`inference/naming.py`). Rank 0 gathers a few frames of every video and writes `contact_sheet.png`
beside them, and puts the sheet (and the videos it sampled itself) in TensorBoard.

Sampling draws from its own generators only (per-seed CPU generators), so the training random
streams, and with them a resumed run, are unchanged by it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from megatron_video.config.schema import ExperimentConfig
from megatron_video.diffusion.flow import resolution_shift
from megatron_video.inference.contact_sheet import SheetRow, evenly_spaced, write_contact_sheet
from megatron_video.inference.naming import video_file_name, write_manifest
from megatron_video.inference.pipeline import (
    FLOW_SAMPLER,
    RELEASE_DEFAULTS,
    SamplingConfig,
    build_inference_groups,
    encode_condition,
    latent_shape,
    sample_latents,
)
from megatron_video.platform.launch import Runtime


def load_condition_image(path: str, height: int, width: int) -> torch.Tensor:
    """An image as [3, H, W] in [-1, 1], centre-cropped to the aspect and resized."""
    from megatron_video.data.resolution import center_crop_resize
    from megatron_video.data.video_io import read_image

    img = torch.from_numpy(read_image(path)).permute(0, 3, 1, 2).float()
    return (center_crop_resize(img, (height, width))[0] / 127.5 - 1).clamp(-1, 1)


def sampling_config(cfg: ExperimentConfig) -> SamplingConfig:
    """The SamplingConfig of `training.samples` at the stage's sample size."""
    s, flow = cfg.training.samples, cfg.training.objective.kind == "flow"
    defaults = RELEASE_DEFAULTS["flow" if flow else "ddpm"]
    shift = s.shift if s.shift is not None else cfg.training.objective.shift
    if shift is None and flow:  # the resolution-dependent shift training used at this size
        _, stride_hw = cfg.vae.strides
        shift = resolution_shift(
            cfg.data.max_height // stride_hw, cfg.data.max_width // stride_hw, cfg.model.patch_size
        )
    return SamplingConfig(
        num_frames=cfg.data.num_frames,
        height=cfg.data.max_height,
        width=cfg.data.max_width,
        steps=s.steps,
        sampler=FLOW_SAMPLER if flow else "euler_ancestral",
        guidance_scale=s.guidance_scale,
        guidance_rescale=defaults["guidance_rescale"],
        shift=shift if shift is not None else SamplingConfig.shift,
        prompt_template=s.prompt_template,
        fps=s.fps or cfg.data.train_fps,
    )


class CheckpointSamples:
    """Samples the configured prompts and seeds at the configured steps (collective)."""

    def __init__(
        self, cfg: ExperimentConfig, runtime: Runtime, task: str, stage_dir: Path, vae, text_encoder
    ):
        self.cfg, self.runtime, self.task = cfg, runtime, task
        self.out = Path(stage_dir) / "samples"
        self.vae, self.text = vae, text_encoder
        self.sampling = sampling_config(cfg)
        s = cfg.training.samples
        # (prompt index, seed index) of every video, in a fixed order.
        self.jobs = [(p, k) for p in range(len(s.prompts)) for k in range(len(s.seeds))]
        self.names = [video_file_name(s.prompts[p], k) for p, k in self.jobs]
        self.groups = build_inference_groups(runtime.plan, cfg_parallel=False)
        self.conditions = None
        if task == "i2v":
            sc = self.sampling
            self.conditions = [
                load_condition_image(path, sc.height, sc.width)[None] for path in s.condition_images
            ] or None

    def due(self, step: int) -> bool:
        """Whether step `step` is sampled."""
        s = self.cfg.training.samples
        return bool(s.interval) and (step % s.interval == 0 or step == self.cfg.training.steps)

    def _condition(self, prompt: int, seed: int) -> dict | None:
        """The inpainting inputs of an I2V model: the prompt's condition image, or none (t2iv)."""
        if self.task != "i2v":
            return None
        sc = self.sampling
        frames = (
            self.conditions[prompt] if self.conditions is not None else torch.empty(0, 3, sc.height, sc.width)
        )
        return encode_condition(self.vae, [frames], sc.num_frames, (sc.height, sc.width), 0.0, [seed])

    @torch.no_grad()
    def run(self, trainer, step: int, log) -> Path | None:
        """Sample, write the mp4s and (rank 0) the contact sheet; returns the step's folder."""
        from megatron_video.data.video_io import video_to_uint8, write_video

        start = time.perf_counter()
        s, sc, rt = self.cfg.training.samples, self.sampling, self.runtime
        folder = self.out / f"step_{step:07d}"
        shape = latent_shape(self.vae, sc)
        chunks = trainer.model if isinstance(trainer.model, list) else [trainer.model]
        modes = [c.training for c in chunks]
        weights = (
            trainer.ema.swapped_in(trainer.ema_module)
            if trainer.ema is not None
            else contextlib.nullcontext()
        )
        mine: dict[int, torch.Tensor] = {}
        if self.groups.writer:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            for c in chunks:
                c.eval()
            with weights:
                for j in self.groups.prompt_indices(len(self.jobs)):
                    p, k = self.jobs[j]
                    seed = s.seeds[k]
                    latents = sample_latents(
                        trainer.ddp,
                        self.text,
                        [s.prompts[p]],
                        sc,
                        shape,
                        [seed],
                        self._condition(p, seed),
                        self.groups,
                        None if sc.sampler == FLOW_SAMPLER else trainer.objective,
                    )
                    if self.groups.writer:
                        frames = video_to_uint8(self.vae.decode_latents(latents).clamp(-1, 1)[0])
                        write_video(folder / self.names[j], frames, sc.fps, layout="THWC")
                        mine[j] = frames
        finally:
            for c, mode in zip(chunks, modes):
                c.train(mode)
        shown = {j: f[evenly_spaced(len(f), s.frames_in_sheet)] for j, f in mine.items()}
        gathered = [shown]
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, shown)
        if rt.is_main:
            frames_of = {j: f for part in gathered for j, f in part.items()}
            self._write_summary(folder, step, frames_of, mine, log)
        log.pause(time.perf_counter() - start)
        return folder

    def _write_summary(self, folder: Path, step: int, frames_of: dict, mine: dict, log) -> None:
        """The contact sheet, the manifest and the TensorBoard entries (rank 0)."""
        s = self.cfg.training.samples
        rows = []
        for j, (p, k) in enumerate(self.jobs):
            condition = None
            if self.conditions is not None:
                condition = ((self.conditions[p][0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                condition = condition.permute(1, 2, 0)
            rows.append(
                SheetRow(s.prompts[p], frames_of[j], condition=condition, figures=f"seed {s.seeds[k]}")
            )
        sheet = write_contact_sheet(
            folder / "contact_sheet.png", rows, s.frames_in_sheet, title=f"step {step} (EMA weights)"
        )
        write_manifest(
            folder / "manifest.json",
            (
                {"file": self.names[j], "prompt": s.prompts[p], "index": k, "seed": s.seeds[k]}
                for j, (p, k) in enumerate(self.jobs)
            ),
        )
        log.add_image("samples/contact_sheet", np.array(Image.open(sheet).convert("RGB")), step)
        for j, frames in mine.items():
            p, k = self.jobs[j]
            log.add_video(
                f"samples/prompt{p}_seed{s.seeds[k]}", frames.permute(0, 3, 1, 2), step, self.sampling.fps
            )
        print(f"samples of step {step}: {len(self.jobs)} videos and a contact sheet in {folder}", flush=True)
