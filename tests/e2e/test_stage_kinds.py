"""Each stage kind of the demo curriculum runs through its entry script.

T2I (dense, TP=2) -> I2V (SUV re-staged from the dense export, inpainting conditioning, CP=2).
(Pre-emption by signals: test_preemption.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.e2e


def _cmd(script, config, stage_dir, data_list, port, extra):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        script, config, "vae.checkpoint=null", f"data.data_list={data_list}", "training.optimizer.warmup_steps=1",
        *extra, "--stage-dir", str(stage_dir),
    ]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _steps(stage_dir: Path) -> list[int]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_t2i_then_i2v_stage(demo_data, tmp_path):
    t2i = subprocess.run(
        _cmd("pretrain_t2v.py", "examples/tiny/t2i.yaml", tmp_path / "t2i", demo_data, 29631, ["training.steps=3"]),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert t2i.returncode == 0, t2i.stderr[-4000:]
    dense = load_file(tmp_path / "t2i" / "final_ema.safetensors")
    assert "stages.0.9.attn.linear_qkv.weight" in dense and not any(k.startswith("skip_") for k in dense)

    init = f"training.checkpoint.init_from={tmp_path / 't2i' / 'final_ema.safetensors'}"
    i2v = subprocess.run(
        _cmd("pretrain_i2v.py", "examples/tiny/i2v.yaml", tmp_path / "i2v", demo_data, 29632, ["training.steps=3", "parallel.context_parallel=2", init]),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert i2v.returncode == 0, i2v.stderr[-4000:]
    assert _steps(tmp_path / "i2v") == [1, 2, 3]
    suv = load_file(tmp_path / "i2v" / "final_model.safetensors")
    # Re-staged into U-stages with skips, plus the inpainting embeddings.
    assert "stages.4.1.attn.linear_qkv.weight" in suv and "skip_linears.1.weight" in suv
    assert "inpaint.mask_proj.weight" in suv
