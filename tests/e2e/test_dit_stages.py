"""The Open-Sora-Plan v1.3 DiT family through the same entry scripts as SUV: a tiny T2V stage at
TP=2 + SP (pretrain_t2v.py) killed with SIGKILL (every process) after step 4 and resumed from its
step-2 checkpoint (steps 3 and 4 repeat bitwise), an I2V stage initialised from its export at
Ulysses CP=2 (pretrain_i2v.py), then tools/sample_video.py (CP=2) writing an I2V mp4 from the I2V
export. (The T2V -> I2V initialisation rule itself: tests/unit/test_denoisers.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from safetensors.torch import load_file

from tests.e2e.conftest import Launch, logged_losses

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.e2e


def _torchrun(script: str, port: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        script,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _stage_args(script: str, config: str, stage_dir: Path, data_list: Path, *extra: str) -> list[str]:
    return [
        script, config, "vae.checkpoint=null", f"data.data_list={data_list}", "training.steps=2",
        "training.optimizer.warmup_steps=1", "training.checkpoint.save_interval=2", *extra,
        "--stage-dir", str(stage_dir),
    ]  # fmt: skip


def _stage(script: str, config: str, stage_dir: Path, data_list: Path, port: int, *extra: str) -> list[dict]:
    args = _stage_args(script, config, stage_dir, data_list, *extra)
    _torchrun(args[0], port, *args[1:])
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_dit_t2v_then_i2v_stage_then_sample(demo_data, tmp_path):
    # T2V, saving every step, killed (every process) once step 4 is logged.
    killed_dir = tmp_path / "killed"
    args = _stage_args(
        "pretrain_t2v.py", "examples/tiny/dit_t2v.yaml", killed_dir, demo_data,
        "training.steps=50", "training.checkpoint.save_interval=1",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29713"]
    launch = Launch([*cmd, *args], tmp_path / "killed.log")
    try:
        launch.wait_for(lambda: 4 in logged_losses(killed_dir))
        launch.signal_all(signal.SIGKILL)
        launch.wait()
    finally:
        launch.kill_everything()
    killed = logged_losses(killed_dir)

    # Resumed from the step-2 checkpoint into a fresh stage: steps 3 and 4 repeat bitwise.
    resume_from = f"training.checkpoint.load_dir={killed_dir / 'checkpoints' / 'iter_0000002'}"
    t2v = _stage(
        "pretrain_t2v.py", "examples/tiny/dit_t2v.yaml", tmp_path / "t2v", demo_data, 29710,
        "training.steps=4", resume_from,
    )  # fmt: skip
    assert [m["step"] for m in t2v] == [3, 4] and all(0 < m["loss"] < 10 for m in t2v)
    assert [m["loss"] for m in t2v] == [killed[3], killed[4]]
    saved = json.loads((tmp_path / "t2v" / "final_ema.json").read_text())
    assert (saved["family"], saved["version"], saved["sparse_n"]) == ("opensora_dit", "v1.3", 4)
    t2v_weights = load_file(tmp_path / "t2v" / "final_ema.safetensors")
    assert any(k.startswith("blocks.5.") for k in t2v_weights) and not any(
        k.startswith("inpaint.") for k in t2v_weights
    )

    init = f"training.checkpoint.init_from={tmp_path / 't2v' / 'final_ema.safetensors'}"
    i2v = _stage("pretrain_i2v.py", "examples/tiny/dit_i2v.yaml", tmp_path / "i2v", demo_data, 29711, init)
    assert [m["step"] for m in i2v] == [1, 2] and all(0 < m["loss"] < 10 for m in i2v)
    i2v_weights = load_file(tmp_path / "i2v" / "final_ema.safetensors")
    assert {k for k in i2v_weights if not k.startswith("inpaint.")} == set(t2v_weights)
    assert json.loads((tmp_path / "i2v" / "final_ema.json").read_text())["family"] == "opensora_dit"

    # An I2V mp4 with the two CFG branches on two processes, and the same from one process.
    image = next((demo_data.parent / "media" / "images").iterdir())
    sample = [
        "--config", "examples/tiny/dit_i2v.yaml", "--weights", str(tmp_path / "i2v" / "final_ema.safetensors"),
        "--prompt", "grass in the wind", "--image", str(image), "--steps", "2", "--seed", "3",
        "vae.checkpoint=null", "parallel.context_parallel=1",
    ]  # fmt: skip
    out = _torchrun(
        "tools/sample_video.py", 29712, *sample, "--cfg-parallel", "--out-dir", str(tmp_path / "pair")
    )
    assert "wrote" in out.stdout
    serial = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        "29714",
    ]
    done = subprocess.run(
        [*serial, "tools/sample_video.py", *sample, "--out-dir", str(tmp_path / "serial")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    videos = {}
    for kind in ("pair", "serial"):
        with av.open(str(tmp_path / kind / "sample_000.mp4")) as container:
            videos[kind] = np.stack(
                [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
            )
    assert videos["pair"].shape == (9, 64, 64, 3)
    # Latents agree within 1e-5 (tests/distributed/test_dit_inference_parity.py); decoded frames may
    # differ by a rounding step here and there.
    assert np.abs(videos["pair"].astype(int) - videos["serial"].astype(int)).mean() < 0.5
