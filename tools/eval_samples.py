"""How close generated videos are to the training clips they were prompted with.

    python tools/eval_samples.py --config examples/tiny/t2v.yaml \
        --t2v outputs/tiny/samples/t2v --prompts-file examples/tiny/demo_prompts.txt \
        --i2v outputs/tiny/samples/i2v/sample.mp4=outputs/tiny/data/media/videos/carphone_talk.mp4 \
        --vae-report outputs/tiny/vae/heldout.json --sheet outputs/tiny/samples/contact_sheet.png

A small model trained on a few clips should reproduce them; this tool measures whether it does.

* Text-to-video: each prompt is a caption of one training clip. Every training video of the config's
  data list is brought to the sample's size exactly as training does (frame-rate resampling, the
  aspect crop and resize of the data rules); the sample is compared, frame by frame, with every
  temporal window training could draw from each clip. The clip with the highest PSNR is the
  sample's nearest clip; a prompt counts as recognised when that is the clip it captions.
* Image-to-video: PSNR of the sample's first frame against the condition frame (the first frame of
  the given clip, centre-cropped and resized to the sample's size, as `tools/sample_video.py --video
  CLIP --condition-frames 1` conditions it).
* `--vae-report`: the JSON of `tools/eval_vae.py --json` (held-out reconstruction PSNR) is quoted.

PSNR is computed on [0, 1] pixels per frame and averaged over frames. Samples are read back from
their mp4 files (H.264 at crf 18 costs far less than a decibel at these sizes). `--json` writes every
figure; `--sheet` writes a contact sheet: per prompt, the reference clip's frames above the generated
ones (the condition frame first for image-to-video), labelled with the prompt and its figures.
Exit status 0 (figures computed) or 2 (bad arguments or inputs).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="stage config: data list and data rules of training")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--t2v", default=None, help="folder of text-to-video samples of --prompts-file")
    p.add_argument("--prompts-file", default=None, help="the prompts the --t2v samples were made from")
    p.add_argument(
        "--i2v", action="append", default=[], metavar="SAMPLE=CLIP", help="an I2V sample and its source clip"
    )
    p.add_argument("--vae-report", default=None, help="JSON of tools/eval_vae.py --json")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--sheet", default=None, help="write a contact sheet PNG here")
    return p.parse_args(argv)


@dataclass
class Reference:
    """One training video at sample size: every window training can draw, as [W, T, 3, H, W] in [0, 1]."""

    path: str
    captions: tuple[str, ...]
    windows: torch.Tensor


def frame_psnr(a_TCHW: torch.Tensor, b_TCHW: torch.Tensor) -> float:
    """Mean over frames of the per-frame PSNR (dB) of two [T, C, H, W] videos in [0, 1]."""
    mse = (a_TCHW - b_TCHW).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return float((10.0 * torch.log10(1.0 / mse)).mean())


def read_sample(path: str | Path) -> torch.Tensor:
    """An mp4 as float [T, 3, H, W] in [0, 1]."""
    from megatron_video.data.video_io import iter_video_frames

    frames = np.stack(list(iter_video_frames(path)))
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)


def training_references(cfg, size: tuple[int, int], num_frames: int) -> list[Reference]:
    """Every video of the config's data list at `size`, as training sees it, in all its windows."""
    from megatron_video.data.annotations import load_annotations
    from megatron_video.data.dataset import plan_samples
    from megatron_video.data.resolution import to_model_input
    from megatron_video.data.video_io import read_video_frames

    entries, _ = load_annotations(cfg.data.data_list)
    videos = [e for e in entries if not e.is_image]
    plans, _ = plan_samples(videos, cfg.data, cfg.sample_geometry)
    refs = []
    for plan in plans:
        entry, fp = plan.entry, plan.frames
        if fp is None or fp.length != num_frames:
            continue
        crop = entry.crop if cfg.data.use_crop else None
        frames = torch.from_numpy(read_video_frames(entry.path, fp.candidates.tolist(), crop=crop))
        video = to_model_input(frames.permute(0, 3, 1, 2), size, cfg.data).add(1.0).div(2.0)
        # The windows training draws from (frames.temporal_crop_start): begin in [0, len - window - 1].
        last = max(0, len(fp.candidates) - fp.window - 1)
        windows = torch.stack([video[b : b + fp.length] for b in range(last + 1)])
        refs.append(Reference(entry.path, entry.captions, windows))
    return refs


def best_window(sample_TCHW: torch.Tensor, ref: Reference) -> tuple[float, int]:
    """(PSNR, index) of the window of `ref` closest to the sample."""
    return max((frame_psnr(sample_TCHW, w), i) for i, w in enumerate(ref.windows))


def nearest_clip(sample_TCHW: torch.Tensor, refs: list[Reference]) -> list[tuple[float, int]]:
    """(best PSNR over windows, reference index) for every reference, best first."""
    scores = [(best_window(sample_TCHW, ref)[0], i) for i, ref in enumerate(refs)]
    return sorted(scores, reverse=True)


def evaluate_t2v(sample_dir: Path, prompts: list[str], refs: list[Reference], names) -> list[dict]:
    """Per prompt: the captioned clip, the nearest clip, and both PSNRs."""
    rows = []
    for prompt, path in zip(prompts, names):
        owners = [i for i, r in enumerate(refs) if prompt in r.captions]
        if not owners:
            raise ValueError(f"prompt {prompt!r} is not a caption of any training video of the data list")
        sample = read_sample(sample_dir / path)
        ranking = nearest_clip(sample, refs)
        best_psnr, best = ranking[0]
        own_psnr, own_window = best_window(sample, refs[owners[0]])
        rows.append(
            {
                "prompt": prompt,
                "sample": str(sample_dir / path),
                "clip": refs[owners[0]].path,
                "nearest_clip": refs[best].path,
                "recognised": best in owners,
                "psnr_to_clip": round(own_psnr, 2),
                "clip_window": own_window,
                "psnr_to_nearest": round(best_psnr, 2),
                "runner_up_psnr": round(ranking[1][0], 2) if len(ranking) > 1 else None,
            }
        )
    return rows


def condition_frame(clip: str, size: tuple[int, int]) -> torch.Tensor:
    """First frame of `clip` as [1, 3, H, W] in [0, 1], centre-cropped and resized like sample_video."""
    from megatron_video.data.resolution import center_crop_resize
    from megatron_video.data.video_io import read_video_frames

    frame = torch.from_numpy(read_video_frames(clip, [0])).permute(0, 3, 1, 2).float()
    return (center_crop_resize(frame, size) / 255.0).clamp(0.0, 1.0)


def evaluate_i2v(pairs: list[tuple[str, str]]) -> list[dict]:
    """Per I2V sample: PSNR of its first frame against its condition frame."""
    rows = []
    for sample_path, clip in pairs:
        sample = read_sample(sample_path)
        cond = condition_frame(clip, tuple(sample.shape[-2:]))
        manifest = Path(sample_path).parent / "manifest.json"
        prompt = None
        if manifest.is_file():
            records = json.loads(manifest.read_text(encoding="utf-8"))
            prompt = next((r["prompt"] for r in records if r["file"] == Path(sample_path).name), None)
        rows.append(
            {
                "prompt": prompt,
                "sample": sample_path,
                "condition_clip": clip,
                "first_frame_psnr": round(frame_psnr(sample[:1], cond), 2),
                "later_frames_psnr": round(frame_psnr(sample[1:], cond.expand_as(sample[1:])), 2),
            }
        )
    return rows


def _error(message: str) -> int:
    print(f"eval_samples: {message}", file=sys.stderr)
    return 2


def t2v_samples(folder: Path, prompts_file: str | None) -> tuple[list[str], list[str]]:
    """(prompts, file names) of a tools/sample_video.py output folder: the first sample of each prompt
    in its manifest.json, in the order of `prompts_file` when given (else the manifest's)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"--t2v {folder}: no manifest.json (written by tools/sample_video.py)")
    first = {}
    for record in json.loads(manifest.read_text(encoding="utf-8")):
        first.setdefault(record["prompt"], record["file"])
    prompts = list(first)
    if prompts_file:
        text = Path(prompts_file).read_text(encoding="utf-8")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    missing = [p for p in prompts if p not in first or not (folder / first[p]).is_file()]
    if missing or not prompts:
        raise ValueError(f"--t2v {folder}: no sample for prompt(s) {missing or 'any'}")
    return prompts, [first[p] for p in prompts]


def _uint8(video_TCHW: torch.Tensor) -> np.ndarray:
    return (video_TCHW.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_sheet(path: str, result: dict, refs: list[Reference]) -> Path:
    """Contact sheet: T2V rows (the captioned clip's best window above the sample), then I2V rows
    (the source clip above, the condition frame first in the generated strip)."""
    from megatron_video.inference.contact_sheet import SheetRow, write_contact_sheet

    rows = []
    by_path = {r.path: r for r in refs}
    for row in result.get("t2v", []):
        sample = read_sample(row["sample"])
        ref = by_path[row["clip"]]
        best = ref.windows[row["clip_window"]]
        verdict = (
            "nearest clip: its own" if row["recognised"] else f"nearest: {Path(row['nearest_clip']).name}"
        )
        rows.append(
            SheetRow(
                label=row["prompt"],
                generated=_uint8(sample),
                reference=_uint8(best),
                figures=f"T2V | PSNR {row['psnr_to_clip']:.1f} dB to its clip | {verdict}",
            )
        )
    for row in result.get("i2v", []):
        sample = read_sample(row["sample"])
        cond = condition_frame(row["condition_clip"], tuple(sample.shape[-2:]))
        rows.append(
            SheetRow(
                label=row.get("prompt") or Path(row["sample"]).name,
                generated=_uint8(sample),
                condition=_uint8(cond)[0],
                figures=f"I2V | first frame vs condition: PSNR {row['first_frame_psnr']:.1f} dB",
            )
        )
    title = None
    if "vae" in result:
        title = f"VAE: {result['vae']['psnr']:.1f} dB PSNR on {result['vae']['clips']} held-out clips"
    return write_contact_sheet(path, rows, frames_per_row=9, title=title)


def report(result: dict) -> str:
    """The figures as printed lines."""
    lines = []
    if "vae" in result:
        v = result["vae"]
        lines.append(f"VAE reconstruction of {v['clips']} held-out clip(s): PSNR {v['psnr']:.2f} dB")
    for row in result.get("i2v", []):
        lines.append(
            f"I2V first frame vs its condition frame: PSNR {row['first_frame_psnr']:.2f} dB ({row['sample']})"
        )
    if result.get("t2v"):
        rows = result["t2v"]
        hits = sum(r["recognised"] for r in rows)
        lines.append(f"T2V: {hits} of {len(rows)} samples are nearest to the training clip of their prompt")
        for r in rows:
            mark = "yes" if r["recognised"] else f"no, nearest {Path(r['nearest_clip']).name}"
            lines.append(
                f"  {Path(r['clip']).name}: {r['psnr_to_clip']:.2f} dB to its clip "
                f"(runner-up {r['runner_up_psnr']:.2f} dB) - {mark}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_video.platform.quiet import install_output_filters

    install_output_filters()  # known third-party fall-back notices, once per process
    from megatron_video.config import load_config
    from megatron_video.errors import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _error(str(exc))
    torch.set_grad_enabled(False)
    result: dict = {}
    if args.vae_report:
        vae = json.loads(Path(args.vae_report).read_text())
        result["vae"] = {"psnr": vae["summary"]["psnr"], "clips": vae["clips"], "report": args.vae_report}
    pairs = []
    for item in args.i2v:
        sample, sep, clip = item.partition("=")
        if not sep or not Path(sample).is_file() or not Path(clip).is_file():
            return _error(f"--i2v {item}: give SAMPLE.mp4=CLIP with both files present")
        pairs.append((sample, clip))
    result["i2v"] = evaluate_i2v(pairs)
    refs: list[Reference] = []
    if args.t2v:
        try:
            prompts, names = t2v_samples(Path(args.t2v), args.prompts_file)
        except ValueError as exc:
            return _error(str(exc))
        size = tuple(read_sample(Path(args.t2v) / names[0]).shape[-2:])
        refs = training_references(cfg, size, cfg.data.num_frames)
        try:
            result["t2v"] = evaluate_t2v(Path(args.t2v), prompts, refs, names)
        except ValueError as exc:
            return _error(str(exc))
    print(report(result), flush=True)
    if args.sheet:
        print(f"contact sheet: {write_sheet(args.sheet, result, refs)}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
