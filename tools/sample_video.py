"""Generate videos from a trained denoiser (SUV, or the v1.2 / v1.3 DiT): text-to-video, image-to-video, transition, continuation.

    torchrun --nproc_per_node N tools/sample_video.py --config STAGE.yaml --weights final_ema.safetensors \
        --prompt "a red car drives down a street" [--prompts-file prompts.txt] \
        [--image first.jpg [--image last.jpg] | --video clip.mp4 --condition-frames 9] \
        [--num-frames 9 --height 64 --width 64 --steps 50 --guidance-scale 8 --seed 0] \
        [--cfg-parallel] --out-dir samples/

Layout: the stage config's tensor / context (Ulysses) parallel sizes split one video over the ranks
of a replica; the remaining processes are data-parallel replicas that take every n-th video, or,
with --cfg-parallel, pairs of replicas running the conditional and unconditional branches. One
rank per replica (pair) writes the mp4s of its videos.

Names: sample_<video index>.mp4 (default), or with --names vbench `{prompt}-{index}.mp4`, VBench's
layout (index 0 .. --samples-per-prompt - 1; VBench's standard suite wants 5, 25 for temporal
flickering), the prompt escaped only where a file name cannot hold it (megatron_video/inference/naming.py).
Video j of prompt i is seeded with seed + i * samples_per_prompt + j. manifest.json beside the videos
lists every file's prompt, index and seed. Then, with VBench installed (it downloads its own models):
    vbench evaluate --videos_path OUT_DIR --dimension subject_consistency      (VBench prompts)
    vbench evaluate --videos_path OUT_DIR --dimension subject_consistency --mode=custom_input

Weights: a flat export (final_ema.safetensors or final_model.safetensors beside its .json), a
training checkpoint directory (EMA weights unless --raw), or a released Open-Sora-Plan v1.2 / v1.3
folder (config.json + diffusion_pytorch_model.safetensors / .bin). The model is rebuilt from what the
weights record (the export's or checkpoint's model config with its `model.family`, the folder's
config.json); the stage config gives the VAE, text encoder, objective and layout. An I2V model sampled without
--image / --video generates from text alone, every frame masked (the t2iv mode it was trained with).

Samplers: flow_euler for rectified-flow models (static shift 7.0 or --linear-quadratic; CFG 8.0, rescale 0.7, template "high quality, {}" as
in v1.5); euler_ancestral (default), euler, ddim or ddpm for v-prediction / epsilon models
(training.objective.kind in the config; CFG 7.5, no rescale, "high quality, high aesthetic, {}" as in
v1.3; v1.2's defaults are the same: Euler ancestral, CFG 7.5, with its epsilon objective).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", required=True, help="stage config YAML (model, vae, text, parallel, objective)"
    )
    p.add_argument(
        "--weights", required=True, help="flat export (.safetensors) or a training checkpoint directory"
    )
    p.add_argument("--raw", action="store_true", help="checkpoint directory: raw weights instead of the EMA")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument(
        "--image",
        action="append",
        default=[],
        help="condition image(s): one = i2v, two = first/last transition",
    )
    cond.add_argument("--video", help="condition video: its first --condition-frames frames are continued")
    p.add_argument("--condition-frames", type=int, default=None, help="frames of --video kept (default: 1/4)")
    p.add_argument(
        "--noise-strength",
        type=float,
        default=0.0,
        help="noise on the condition frames, in [0, 1] (0 = none)",
    )
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default=None, help="flow_euler, or euler_ancestral / euler / ddim / ddpm")
    p.add_argument("--shift", type=float, default=7.0, help="flow: static sigma shift")
    p.add_argument("--linear-quadratic", action="store_true", help="flow: linear-quadratic schedule")
    p.add_argument("--guidance-scale", type=float, default=None, help="default 8.0 (flow) / 7.5 (DDPM)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="default 0.7 (flow) / 0 (DDPM)")
    p.add_argument("--prompt-template", default=None, help="default 'high quality, {}' (v1.5)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument(
        "--cfg-parallel", action="store_true", help="conditional / unconditional branch on two replicas"
    )
    p.add_argument("--batch-size", type=int, default=1, help="videos denoised together per replica")
    p.add_argument(
        "--seed", type=int, default=0, help="noise seed of video 0 (video j of prompt i: seed + i * N + j)"
    )
    p.add_argument(
        "--samples-per-prompt", type=int, default=1, help="N videos per prompt, each with its own seed"
    )
    p.add_argument(
        "--names",
        choices=("sample", "vbench"),
        default="sample",
        help="file names: sample_<video index>.mp4, or VBench's {prompt}-{index}.mp4",
    )
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--out-dir", default="samples")
    return p.parse_intermixed_args(argv)


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """An image as [3, H, W] in [-1, 1], centre-cropped to the aspect and resized."""
    from megatron_video.data.resolution import center_crop_resize
    from megatron_video.data.video_io import read_image

    img = torch.from_numpy(read_image(path)).permute(0, 3, 1, 2).float()
    return (center_crop_resize(img, (height, width))[0] / 127.5 - 1).clamp(-1, 1)


def load_video_start(path: str, frames: int, height: int, width: int, fps: float) -> torch.Tensor:
    """The first `frames` frames of a video at `fps` as [K, 3, H, W] in [-1, 1]."""
    from megatron_video.data.frames import frame_interval, resample_indices
    from megatron_video.data.resolution import center_crop_resize
    from megatron_video.data.video_io import probe_video, read_video_frames

    info = probe_video(path)
    interval = frame_interval(info.fps, fps)
    # Containers that state no frame count: ask for exactly the frames needed (decoding checks the end).
    available = info.num_frames or int(frames * interval) + 1
    indices = resample_indices(0, available, interval)[:frames]
    if len(indices) < frames:
        raise ValueError(
            f"{path} has {len(indices)} frames at {fps} fps; --condition-frames asks for {frames}"
        )
    video = torch.from_numpy(read_video_frames(path, indices)).permute(0, 3, 1, 2).float()
    return (center_crop_resize(video, (height, width)) / 127.5 - 1).clamp(-1, 1)


def _pick(given, flow_default, ddpm_default, flow: bool):
    """An argument's value, or the v1.5 (flow) / v1.3 (DDPM) default."""
    if given is not None:
        return given
    return flow_default if flow else ddpm_default


def _error(message: str) -> int:
    print(f"sample_video: {message}", file=sys.stderr)
    return 2


def is_released_folder(path: str) -> bool:
    """Whether `path` is a released diffusers-style folder (config.json + diffusion_pytorch_model.*)."""
    p = Path(path)
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    return (p / "config.json").is_file() and any((p / n).is_file() for n in names)


def weights_model_config(path: str):
    """The model config the weights record (None when they record none: the stage config's is used)."""
    from megatron_video.training.denoisers import saved_model_config

    if is_released_folder(path):
        import json

        from megatron_video.models.opensora_dit.state_dict_adapter import config_from_open_sora_plan

        return config_from_open_sora_plan(json.loads((Path(path) / "config.json").read_text()))[0]
    if Path(path).is_dir():
        from megatron_video.training.checkpoint import read_checkpoint_metadata

        model = read_checkpoint_metadata(path)["model"]
        return saved_model_config(model.get("config"), model.get("class"))
    from megatron_video.training.export import load_flat_config

    return saved_model_config(load_flat_config(path))


def has_inpainting_weights(path: str) -> bool:
    """Whether a flat export, a training checkpoint or a released folder holds an I2V model."""
    if is_released_folder(path):
        import json

        return "vae_scale_factor_t" in json.loads((Path(path) / "config.json").read_text())
    if Path(path).is_dir():
        from megatron.core import dist_checkpointing

        from megatron_video.training.checkpoint import read_checkpoint_metadata

        keys = dist_checkpointing.load_tensors_metadata(read_checkpoint_metadata(path)["path"])
    else:
        from safetensors import safe_open

        weights = (
            Path(path) if Path(path).suffix == ".safetensors" else Path(path).with_suffix(".safetensors")
        )
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    return any(k.startswith(("inpaint.", "ema.inpaint.")) for k in keys)


def load_weights(model, runtime, path: str, raw: bool) -> None:
    """Flat export, training checkpoint (EMA unless raw) or released folder into this rank's shard."""
    from megatron_video.training.export import load_flat, load_full_into

    if is_released_folder(path):
        from megatron_video.models.opensora_dit.state_dict_adapter import load_open_sora_plan

        missing = load_full_into(model, runtime.plan, load_open_sora_plan(path)[2])
        if missing:
            raise KeyError(f"{path} lacks {sorted(missing)}")
        return
    if Path(path).is_dir():
        from megatron_video.training import checkpoint as ckpt
        from megatron_video.training.ema import ParamEMA
        from megatron_video.training.loop import wrap_ddp

        ema = None if raw else ParamEMA(model, 0.0)
        state = ckpt.load_checkpoint(
            path, [wrap_ddp(model, runtime.plan, False)], None, None, ema=ema, load_optimizer=False
        )
        if state is None:
            raise FileNotFoundError(f"{path} holds no checkpoint (no `latest` and no iteration directory)")
        if ema is not None:
            ema.copy_to(model)
        return
    full, _ = load_flat(path)
    missing = load_full_into(model, runtime.plan, full)
    if missing:
        raise KeyError(f"{path} lacks {sorted(missing)} (an I2V sample needs I2V weights)")


def main(argv=None) -> int:
    from megatron_video.platform.megatron_import import import_megatron_core
    from megatron_video.platform.quiet import install_output_filters

    install_output_filters()  # before megatron is imported
    import_megatron_core()
    from megatron_video.config import load_config
    from megatron_video.inference.pipeline import (
        FLOW_SAMPLER,
        SamplingConfig,
        StepTimer,
        build_inference_groups,
        encode_condition,
        latent_shape,
        sample_latents,
        write_videos,
    )
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed
    from megatron_video.training.stage import build_denoiser, build_text_encoder, build_vae

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_video.training.checkpoint_files import weights_source_problem

    problem = weights_source_problem(args.weights, "--weights")  # before any process group starts
    if problem:
        return _error(problem)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        return _error("give --prompt or --prompts-file")
    if args.samples_per_prompt < 1:
        return _error(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    from megatron_video.inference.naming import video_file_name, write_manifest

    # Video k is sample j of prompt i, k = i * N + j, seeded seed + k (N = 1: prompt i gets seed + i).
    per = args.samples_per_prompt
    jobs = [(i, j) for i in range(len(prompts)) for j in range(per)]
    names = [
        video_file_name(prompts[i], j) if args.names == "vbench" else f"sample_{k:03d}.mp4"
        for k, (i, j) in enumerate(jobs)
    ]
    if len(set(names)) != len(names):
        return _error(
            "two videos would get the same file name: a prompt is listed twice (use distinct prompts)"
        )
    if cfg.parallel.pipeline_parallel > 1:
        return _error(
            "sampling splits one video with tensor and context parallel; set parallel.pipeline_parallel=1"
        )
    objective = cfg.training.objective
    sampler = args.sampler or (FLOW_SAMPLER if objective.kind == "flow" else "euler_ancestral")
    if (sampler == FLOW_SAMPLER) != (objective.kind == "flow"):
        return _error(
            f"sampler {sampler} does not fit a model trained with training.objective.kind={objective.kind}: "
            "use flow_euler for flow models and a DDPM sampler (euler_ancestral, euler, ddim, ddpm) otherwise"
        )
    flow = objective.kind == "flow"
    ddpm = None
    if not flow:
        from megatron_video.diffusion import DDPM_SAMPLERS, DDPMObjective

        if sampler not in DDPM_SAMPLERS:
            return _error(f"unknown sampler {sampler}; choose one of {', '.join(DDPM_SAMPLERS)}")
        ddpm = DDPMObjective(
            prediction=objective.kind, zero_terminal_snr=objective.zero_terminal_snr, snr_gamma=None
        )
    sc = SamplingConfig(
        num_frames=args.num_frames or cfg.data.num_frames,
        height=args.height or cfg.data.max_height,
        width=args.width or cfg.data.max_width,
        steps=args.steps,
        sampler=sampler,
        shift=args.shift,
        linear_quadratic=args.linear_quadratic,
        guidance_scale=_pick(args.guidance_scale, 8.0, 7.5, flow),
        guidance_rescale=_pick(args.guidance_rescale, 0.7, 0.0, flow),
        prompt_template=_pick(
            args.prompt_template, "high quality, {}", "high quality, high aesthetic, {}", flow
        ),
        seed=args.seed,
        fps=args.fps or cfg.data.train_fps,
        condition_noise=args.noise_strength,
    )
    if args.negative_prompt is not None:
        sc.negative_prompt = args.negative_prompt
    if args.cfg_parallel and not sc.use_cfg:
        return _error("--cfg-parallel needs classifier-free guidance (--guidance-scale != 1)")

    from megatron_video.platform.launch import launcher_env

    world = launcher_env()[1]
    replicas, rest = divmod(world, cfg.parallel.model_parallel_size)
    if rest or (args.cfg_parallel and replicas % 2):
        return _error(
            f"{world} process(es) with tensor x context parallel = {cfg.parallel.model_parallel_size} give "
            f"{world / cfg.parallel.model_parallel_size:g} replicas; "
            + (
                "--cfg-parallel needs an even number of replicas"
                if not rest
                else "it must divide the processes"
            )
        )
    runtime = setup_parallel(cfg, init_distributed(cfg.runtime))
    groups = build_inference_groups(runtime.plan, args.cfg_parallel)
    conditioned = bool(args.image or args.video)
    from megatron_video.training.checkpoint_files import CheckpointIntegrityError
    from megatron_video.training.safe_load import UnsafeCheckpointError

    try:  # a checkpoint folder is verified first: a corrupt or crafted one is refused here
        inpainting = has_inpainting_weights(args.weights)
        saved = weights_model_config(args.weights)
        if saved is not None:  # the weights' own model (and family) wins over the stage config's
            cfg.model = dataclasses.replace(saved, recompute="none", recompute_num_layers=None)
            cfg.validate()
        if conditioned and not inpainting:
            return _error(f"{args.weights} is a text-to-video model; --image / --video need I2V weights")
        model = build_denoiser(cfg, runtime, "i2v" if inpainting else "t2v").eval()
        load_weights(model, runtime, args.weights, args.raw)
    except (CheckpointIntegrityError, UnsafeCheckpointError) as exc:
        return _error(f"{type(exc).__name__}: {exc}")
    vae = build_vae(cfg.vae, runtime.device)
    text = build_text_encoder(cfg, runtime.device)
    shape = latent_shape(vae, sc)
    frames = None
    if args.image:
        frames = torch.stack([load_image(p, sc.height, sc.width) for p in args.image])
    elif args.video:
        k = args.condition_frames or max(1, sc.num_frames // 4)
        frames = load_video_start(args.video, k, sc.height, sc.width, sc.fps)
    elif inpainting:  # an I2V model without condition frames: every frame masked (the t2iv mode)
        frames = torch.empty(0, 3, sc.height, sc.width)

    mine = groups.prompt_indices(len(jobs))
    out = Path(args.out_dir)
    all_steps = StepTimer(sc.steps, False)
    for first in range(0, len(mine), args.batch_size):
        batch = mine[first : first + args.batch_size]
        timer = StepTimer(sc.steps, runtime.is_main, f"videos {batch[0]}-{batch[-1]}")
        condition = None
        if frames is not None:
            condition = encode_condition(
                vae,
                [frames] * len(batch),
                sc.num_frames,
                (sc.height, sc.width),
                sc.condition_noise,
                [sc.seed + k for k in batch],
            )
        latents = sample_latents(
            model,
            text,
            [prompts[jobs[k][0]] for k in batch],
            sc,
            shape,
            [sc.seed + k for k in batch],
            condition,
            groups,
            ddpm,
            timer,
        )
        all_steps.times += timer.times
        if groups.writer:
            videos = vae.decode_latents(latents).clamp(-1, 1)
            paths = write_videos(videos, [out / names[k] for k in batch], sc.fps)
            for path, k in zip(paths, batch):
                print(f"wrote {path}: {prompts[jobs[k][0]]}", flush=True)
    if runtime.is_main:
        write_manifest(
            out / "manifest.json",
            (
                {"file": names[k], "prompt": prompts[i], "index": j, "seed": sc.seed + k}
                for k, (i, j) in enumerate(jobs)
            ),
        )
        print(f"denoising ({runtime.world_size} process(es)): {all_steps.summary()}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
