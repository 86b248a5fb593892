"""The Open-Sora-Plan v1.3 DiT family through the same entry scripts as SUV: a tiny T2V stage at
TP=2 + SP (pretrain_t2v.py), an I2V stage initialised from its export at Ulysses CP=2
(pretrain_i2v.py), then tools/sample_video.py (CP=2) writing an I2V mp4 from the I2V export.

(Exact resume after SIGKILL is generic and proven by test_resume.py; the T2V -> I2V initialisation
rule itself by tests/unit/test_denoisers.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
from safetensors.torch import load_file

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


def _stage(script: str, config: str, stage_dir: Path, data_list: Path, port: int, *extra: str) -> list[dict]:
    _torchrun(
        script, port, config, "vae.checkpoint=null", f"data.data_list={data_list}", "training.steps=2",
        "training.optimizer.warmup_steps=1", "training.checkpoint.save_interval=2", *extra,
        "--stage-dir", str(stage_dir),
    )  # fmt: skip
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_dit_t2v_then_i2v_stage_then_sample(demo_data, tmp_path):
    t2v = _stage("pretrain_t2v.py", "examples/tiny/dit_t2v.yaml", tmp_path / "t2v", demo_data, 29710)
    assert [m["step"] for m in t2v] == [1, 2] and all(0 < m["loss"] < 10 for m in t2v)
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

    image = next((demo_data.parent / "media" / "images").iterdir())
    out = _torchrun(
        "tools/sample_video.py", 29712, "--config", "examples/tiny/dit_i2v.yaml",
        "--weights", str(tmp_path / "i2v" / "final_ema.safetensors"), "--prompt", "grass in the wind",
        "--image", str(image), "--steps", "2", "--seed", "3", "--out-dir", str(tmp_path / "samples"),
        "vae.checkpoint=null",
    )  # fmt: skip
    assert "wrote" in out.stdout
    with av.open(str(tmp_path / "samples" / "sample_000.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
