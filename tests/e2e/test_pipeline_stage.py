"""A training stage with pipeline_parallel=2 (through torchrun and pretrain_t2v.py) logs the same
per-step losses as the same stage at tensor_parallel=2, also across a checkpoint resume, and
exports the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run(
        [sys.executable, "tools/prepare_demo_data.py", str(out)], cwd=ROOT, check=True, capture_output=True
    )
    return out / "data.txt"


def _train(stage_dir: Path, data_list: Path, steps: int, port: int, layout: list[str]):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "pretrain_t2v.py", "examples/tiny/t2v.yaml", "vae.checkpoint=null", f"data.data_list={data_list}",
        f"training.steps={steps}", "training.optimizer.warmup_steps=1", *layout, "--stage-dir", str(stage_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _losses(stage_dir: Path) -> dict[int, float]:
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def test_pipeline_stage_matches_tensor_parallel_stage(megatron_single, demo_data, tmp_path):
    from megatron_video.testing.models import build_model, randomize, tiny_config
    from megatron_video.training.export import save_flat

    # Both layouts start from the same weights (a fresh build initialises per layout).
    cfg = tiny_config()
    init = save_flat(tmp_path / "init", randomize(build_model(cfg), seed=4, std=0.02), cfg.model)
    common = [f"training.checkpoint.init_from={init}"]
    tp = [*common, "parallel.tensor_parallel=2", "parallel.sequence_parallel=false"]
    pp = [
        *common,
        "parallel.tensor_parallel=1",
        "parallel.sequence_parallel=false",
        "parallel.pipeline_parallel=2",
    ]
    _train(tmp_path / "tp", demo_data, 4, 29621, tp)
    _train(tmp_path / "pp", demo_data, 2, 29622, pp)  # checkpoint at step 2
    resumed = _train(tmp_path / "pp", demo_data, 4, 29623, pp)
    assert "resumed from" in resumed.stdout
    ref, got = _losses(tmp_path / "tp"), _losses(tmp_path / "pp")
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    for name in ("final_model.safetensors", "final_ema.safetensors"):
        a, b = load_file(tmp_path / "tp" / name), load_file(tmp_path / "pp" / name)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
