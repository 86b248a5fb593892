"""tools/sample_video.py end to end: CFG-parallel over two processes against one process, and a
continuation from a video, each written as H.264 mp4 and decoded back with PyAV.

The denoiser has seeded random weights saved as a flat export; the VAE is the tiny WF-VAE with
its initial weights (vae.checkpoint=null); the text encoder is the demo's real MiniLM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("megatron_single")]
COMMON = [
    "--steps",
    "3",
    "--guidance-scale",
    "4.0",
    "--seed",
    "5",
    "--height",
    "64",
    "--width",
    "64",
    "vae.checkpoint=null",
]
SERIAL = ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false", "parallel.context_parallel=1"]


def _export(path: Path, config: str, inpaint: bool) -> Path:
    from megatron_video.config import load_config
    from megatron_video.models.suv.model import SUVModel
    from megatron_video.parallel.setup import build_parallel_plan
    from megatron_video.testing.models import randomize
    from megatron_video.training.export import save_flat

    cfg = load_config(ROOT / config, SERIAL)
    model = SUVModel(cfg.model, build_parallel_plan(cfg), inpaint_mask_channels=8 if inpaint else None)
    return save_flat(path, randomize(model, seed=2), cfg.model)


def _run(nproc: int, args: list[str], port: int) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
        "tools/sample_video.py", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done.stdout


def _decode(path: Path) -> tuple[np.ndarray, str, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, stream.codec_context.name, float(stream.average_rate)


def test_cfg_parallel_matches_serial(tmp_path):
    weights = _export(tmp_path / "t2v", "examples/tiny/t2v.yaml", inpaint=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a street with parked bicycles\n\nwaves on a beach\na cat on a sofa\n")
    base = [
        "--config",
        "examples/tiny/t2v.yaml",
        "--weights",
        str(weights),
        "--prompts-file",
        str(prompts),
        *COMMON,
    ]
    out = _run(2, [*base, "--cfg-parallel", "--out-dir", str(tmp_path / "pair"), *SERIAL], 29661)
    assert "s/step" in out  # the timing summary
    _run(1, [*base, "--out-dir", str(tmp_path / "serial"), *SERIAL], 29662)
    for i in range(3):
        pair, codec, fps = _decode(tmp_path / "pair" / f"sample_{i:03d}.mp4")
        serial, _, _ = _decode(tmp_path / "serial" / f"sample_{i:03d}.mp4")
        assert pair.shape == (9, 64, 64, 3) and codec == "h264" and fps == 8.0
        # Latents agree within 1e-5 (tests/distributed/test_inference_parity.py); through the VAE and
        # the encoder the decoded frames may differ by a rounding step at most here and there.
        assert np.abs(pair.astype(int) - serial.astype(int)).mean() < 0.5
    written = sorted(p.name for p in (tmp_path / "pair").iterdir())
    assert written == ["manifest.json", *(f"sample_{i:03d}.mp4" for i in range(3))]


def test_continuation_from_video(tmp_path):
    from megatron_video.data.video_io import write_video

    weights = _export(tmp_path / "i2v", "examples/tiny/i2v.yaml", inpaint=True)
    ramp = torch.linspace(0, 255, 80).to(torch.uint8)
    clip = torch.stack([ramp.roll(3 * t)[None, :, None].expand(3, 80, 96) for t in range(24)])  # T C H W
    source = write_video(tmp_path / "source.mp4", clip.permute(0, 2, 3, 1).contiguous(), 8.0, layout="THWC")
    args = [
        "--config", "examples/tiny/i2v.yaml", "--weights", str(weights), "--prompt", "a gradient",
        "--video", str(source), "--condition-frames", "5", "--out-dir", str(tmp_path / "out"), *COMMON,
        "parallel.context_parallel=2",
    ]  # fmt: skip
    _run(2, args, 29663)  # Ulysses CP=2
    frames, codec, _ = _decode(tmp_path / "out" / "sample_000.mp4")
    assert frames.shape == (9, 64, 64, 3) and codec == "h264"


def test_i2v_model_without_condition_and_t2v_model_with_one(tmp_path):
    i2v = _export(tmp_path / "i2v", "examples/tiny/i2v.yaml", inpaint=True)
    args = ["--config", "examples/tiny/i2v.yaml", "--prompt", "a street", *COMMON, *SERIAL]
    _run(1, [*args, "--weights", str(i2v), "--out-dir", str(tmp_path / "t2iv")], 29664)
    frames, _, _ = _decode(tmp_path / "t2iv" / "sample_000.mp4")
    assert frames.shape == (9, 64, 64, 3)

    t2v = _export(tmp_path / "t2v", "examples/tiny/i2v.yaml", inpaint=False)
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
    cmd = [sys.executable, "tools/sample_video.py", *args, "--weights", str(t2v), "--image", str(image)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "need I2V weights" in done.stderr


def test_weights_that_are_not_weights_fail_before_launch(tmp_path):
    (tmp_path / "notes").mkdir()
    for weights, found in [
        (tmp_path / "missing.safetensors", "nothing"),
        (tmp_path / "notes", "an empty folder"),
    ]:
        cmd = [
            sys.executable,
            "tools/sample_video.py",
            "--config",
            "examples/tiny/t2v.yaml",
            "--weights",
            str(weights),
        ]
        done = subprocess.run([*cmd, "--prompt", "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"--weights={weights} is neither weights nor a checkpoint: found {found}" in done.stderr
