"""A T2V stage (TP=2 + SP, 2 gloo processes) with validation and samples at checkpoints.

Validation runs on a held-out fraction of the demo data; samples are written under
samples/step_XXXXXXX/ with VBench names, a contact sheet and a manifest, at the interval and at the
end of a stage. A run stopped after step 2 and resumed to step 4 reports the uninterrupted run's
validation losses bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_video.testing.distributed import run_distributed

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.e2e

PROMPTS = ["A red car / a white post: 50% grey?", "Ünïcødé rabbit 🐇 yawns"]


def _stages(rank, world_size, runs, data_list, extra=(), config="t2v"):
    """run_stage of examples/tiny/<config>.yaml for each (stage dir, steps) in `runs`, in order, in
    this process group."""
    import os

    from megatron_video.config import load_config
    from megatron_video.training.stage import run_stage

    os.chdir(ROOT)
    for stage_dir, steps in runs:
        cfg = load_config(f"examples/tiny/{config}.yaml", [*_overrides(data_list, steps), *extra])
        run_stage(cfg, config, stage_dir)
    return rank


def _overrides(data_list, steps):
    return [
        "vae.checkpoint=null",
        f"data.data_list={data_list}",
        "data.validation_fraction=0.3",
        f"training.steps={steps}",
        "training.checkpoint.save_interval=2",
        "training.optimizer.warmup_steps=1",
        "training.validation.interval=2",
        "training.validation.num_samples=2",
        "training.validation.points=[0.25,0.75]",
        "training.samples.interval=4",
        f"training.samples.prompts={json.dumps(PROMPTS, ensure_ascii=False)}",
        "training.samples.seeds=[0,5]",
        "training.samples.steps=3",
        "training.samples.guidance_scale=1.0",
    ]


def _validation(stage_dir: Path) -> dict[int, tuple[float, float]]:
    """(val_loss, val_loss_ema) per evaluated step (a resumed run's line of a step wins)."""
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "val_loss" in m:
            out[m["step"]] = (m["val_loss"], m["val_loss_ema"])
    return out


def test_validation_and_samples_through_a_resume(demo_data, tmp_path):
    from megatron_video.inference.naming import prompt_from_file_name, video_file_name

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The second run stops after step 2, the third resumes it from its step-2 checkpoint to step 4.
    run_distributed(_stages, 2, [(straight, 4), (resumed, 2), (resumed, 4)], demo_data, timeout_s=900)
    reference = _validation(straight)
    assert sorted(reference) == [2, 4] and reference[2] != reference[4]
    assert _validation(resumed) == reference  # bitwise, step 2 before and step 4 after the resume

    # Samples: at the interval (step 4) and at the end of the 2-step stage, with the configured names.
    for stage, step in ((straight, 4), (resumed, 2), (resumed, 4)):
        folder = stage / "samples" / f"step_{step:07d}"
        names = sorted(p.name for p in folder.glob("*.mp4"))
        expected = sorted(video_file_name(p, k) for p in PROMPTS for k in (0, 1))
        assert names == expected, (folder, names)
        assert sorted(prompt_from_file_name(n) for n in names) == sorted(
            (p, k) for p in PROMPTS for k in (0, 1)
        )
        assert (folder / "contact_sheet.png").stat().st_size > 1000
        manifest = json.loads((folder / "manifest.json").read_text())
        assert {(m["prompt"], m["seed"]) for m in manifest} == {(p, s) for p in PROMPTS for s in (0, 5)}
    assert not (straight / "samples" / "step_0000002").exists()
    # The same weights and seeds give the same video, resumed or not.
    name = video_file_name(PROMPTS[0], 1)
    assert (straight / "samples/step_0000004" / name).read_bytes() == (
        resumed / "samples/step_0000004" / name
    ).read_bytes()
    assert any((straight / "tensorboard").iterdir())


def _sample_vbench(rank, world_size, argv):
    import os
    import sys

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "tools"))
    import sample_video

    return sample_video.main(argv)


def test_sample_video_writes_vbench_names(demo_data, tmp_path):
    """--prompts-file with --names vbench: {prompt}-{index}.mp4 per prompt and sample, seeds in the manifest."""
    from megatron_video.inference.naming import prompt_from_file_name

    stage = tmp_path / "stage"
    one_process = [
        "parallel.tensor_parallel=1",
        "parallel.sequence_parallel=false",
        "training.samples.interval=0",
    ]
    run_distributed(_stages, 1, [(stage, 1)], demo_data, one_process, timeout_s=600)
    prompts = ["a cat, playing! (50% off)", "a/b: Ünïcødé 猫 “quoted”", "plain prompt"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    out = tmp_path / "vbench"
    argv = [
        "--config", "examples/tiny/t2v.yaml", "--weights", str(stage / "final_ema.safetensors"),
        "vae.checkpoint=null", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        "--prompts-file", str(tmp_path / "prompts.txt"), "--samples-per-prompt", "2", "--names", "vbench",
        "--steps", "2", "--guidance-scale", "1", "--seed", "10", "--out-dir", str(out),
    ]  # fmt: skip
    assert run_distributed(_sample_vbench, 1, argv, timeout_s=600) == [0]
    names = sorted(p.name for p in out.glob("*.mp4"))
    assert "plain prompt-0.mp4" in names and "plain prompt-1.mp4" in names
    assert sorted(prompt_from_file_name(n) for n in names) == sorted((p, i) for p in prompts for i in (0, 1))
    manifest = {m["file"]: m for m in json.loads((out / "manifest.json").read_text(encoding="utf-8"))}
    assert sorted(m["seed"] for m in manifest.values()) == list(range(10, 16))  # seed + prompt * 2 + index
    assert manifest["plain prompt-1.mp4"]["seed"] == 15


def test_i2v_samples_under_context_parallel(demo_data, tmp_path):
    """CP = 2: the I2V stage samples with its condition image; the sheet shows the image first."""
    import numpy as np
    from PIL import Image

    image = demo_data.parent / "media" / "images" / "astronaut.jpg"
    extra = [
        "parallel.context_parallel=2",
        "training.validation.interval=0",
        "training.samples.interval=1",
        "training.samples.seeds=[0]",
        f"training.samples.condition_images={json.dumps([str(image), str(image)])}",
    ]
    run_distributed(_stages, 2, [(tmp_path / "i2v", 1)], demo_data, extra, "i2v", timeout_s=600)
    folder = tmp_path / "i2v" / "samples" / "step_0000001"
    assert len(list(folder.glob("*.mp4"))) == 2
    sheet = np.asarray(Image.open(folder / "contact_sheet.png").convert("RGB"))
    assert sheet.shape[0] > 2 * 64 and sheet.shape[1] >= 6 * 64  # 2 rows of condition + 5 frames, scaled
