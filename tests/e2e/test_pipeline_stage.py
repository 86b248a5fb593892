"""A training stage with pipeline_parallel=2 (through torchrun and pretrain_t2v.py), with and
without virtual pipelining, logs the same per-step losses as the same stage at tensor_parallel=2,
also across a checkpoint resume and across layouts, and exports the same weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.e2e
NUM_LAYERS = [1, 2, 2, 2, 1]  # 8 blocks: 2 pipeline ranks x 2 virtual chunks of 2 blocks
PP2 = ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false", "parallel.pipeline_parallel=2"]


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


@pytest.fixture(scope="module")
def reference(megatron_single, demo_data, tmp_path_factory):
    """Overrides every layout shares (the same initial weights: a fresh build initialises per
    layout) and the TP=2 stage trained 4 steps from them (checkpoints at steps 2 and 4)."""
    from megatron_video.testing.models import build_model, randomize, tiny_config
    from megatron_video.training.export import save_flat

    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(num_layers=NUM_LAYERS)
    init = save_flat(tmp / "init", randomize(build_model(cfg), seed=4, std=0.02), cfg.model)
    common = [f"training.checkpoint.init_from={init}", f"model.num_layers={NUM_LAYERS}"]
    tp = [*common, "parallel.tensor_parallel=2", "parallel.sequence_parallel=false"]
    _train(tmp / "tp", demo_data, 4, 29621, [*tp, "training.checkpoint.save_interval=2"])
    return common, tmp / "tp"


def _assert_matches(reference_dir: Path, stage_dir: Path, steps: list[int]) -> None:
    ref, got = _losses(reference_dir), _losses(stage_dir)
    assert sorted(got) == steps
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    for name in ("final_model.safetensors", "final_ema.safetensors"):
        a, b = load_file(reference_dir / name), load_file(stage_dir / name)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_pipeline_stage_matches_tensor_parallel_stage(reference, demo_data, tmp_path):
    common, ref_dir = reference
    pp = [*common, *PP2]
    _train(tmp_path / "pp", demo_data, 2, 29622, pp)  # checkpoint at step 2
    resumed = _train(tmp_path / "pp", demo_data, 4, 29623, pp)
    assert "resumed from" in resumed.stdout
    _assert_matches(ref_dir, tmp_path / "pp", [1, 2, 3, 4])


def test_virtual_pipeline_stage_resumes_across_layouts(reference, demo_data, tmp_path):
    """PP=2 x 2 virtual chunks: resumes the TP=2 checkpoint of step 2 (resharded), saves step 3,
    resumes that exactly; its last checkpoint loads into one unsplit model (resharded back)."""
    from megatron_video.testing.models import build_model, tiny_config
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.checkpoint_files import iteration_dir_name, write_latest
    from megatron_video.training.ema import ParamEMA

    common, ref_dir = reference
    vpp = [*common, *PP2, "parallel.virtual_pipeline=2"]
    save_dir = tmp_path / "vpp" / "checkpoints"
    shutil.copytree(ref_dir / "checkpoints" / iteration_dir_name(2), save_dir / iteration_dir_name(2))
    write_latest(save_dir, 2)
    for steps, port in ((3, 29624), (4, 29625)):
        resumed = _train(tmp_path / "vpp", demo_data, steps, port, vpp)
        assert f"at step {steps - 1}" in resumed.stdout
    _assert_matches(ref_dir, tmp_path / "vpp", [3, 4])
    assert ckpt.read_checkpoint_metadata(save_dir)["layout"]["virtual_pipeline"] == 2

    # Every chunk's weights and EMA, saved by two ranks x two chunks, load into one process.
    model = build_model(tiny_config(num_layers=NUM_LAYERS))
    ema = ParamEMA(model, decay=0.5)
    state = ckpt.load_checkpoint(save_dir, [model], ema=ema)
    assert state["step"] == 4 and not state["rng_restored"]
    for name, tensors in (("final_model", dict(model.named_parameters())), ("final_ema", ema.shadow)):
        exported = load_file(ref_dir / f"{name}.safetensors")
        assert set(tensors) == set(exported), name
        for key, t in tensors.items():
            torch.testing.assert_close(t.detach(), exported[key], rtol=1e-4, atol=1e-5)
