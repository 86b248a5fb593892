"""A runtime.dtype=bf16 training stage runs, resumes exactly, and exports fp32 weights.

The tiny T2V stage (SUV with U-skips) on 2 processes as DP = 2 with the distributed optimizer:
bf16 transformer weights, fp32 main parameters sharded over DP, both in the dist_checkpointing
checkpoint. The run saves after steps 3 and 4; a second run started from a copy of only the step-3
checkpoint must compute step 4's loss bitwise and export the same weights (CPU is deterministic).
The raw export holds the fp32 main parameters: the U-skip linears, bf16 in the model, hold values
bf16 cannot represent, from step 3 on (with AdaLN-Zero the output projection, then AdaLN, then the
skips and blocks get their first gradients, and step 1 has lr 0), so a resume that lost the fp32
main parameters would not export the same weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.e2e
# Video U-skip linears: bf16 in the model under runtime.dtype=bf16 (tests/unit/test_bf16.py).
SKIP_WEIGHTS = re.compile(r"^skip_linears\.\d+\.weight$")


def _run(stage_dir: Path, data_list: Path, port: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "pretrain_t2v.py", "examples/tiny/t2v.yaml", "vae.checkpoint=null", f"data.data_list={data_list}",
        "runtime.dtype=bf16", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
        "training.steps=4", "training.checkpoint.save_interval=3", "training.optimizer.warmup_steps=1",
        "--stage-dir", str(stage_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _metrics(stage_dir: Path) -> dict[int, dict]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


def test_bf16_stage_resumes_exactly_and_exports_fp32(demo_data, tmp_path):
    full = _run(tmp_path / "full", demo_data, 29641)
    assert full.returncode == 0, full.stderr[-4000:]
    reference = _metrics(tmp_path / "full")
    assert sorted(reference) == [1, 2, 3, 4]

    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "iter_0000003", resumed_dir / "iter_0000003")
    (resumed_dir / "latest").write_text("3\n")
    resumed = _run(tmp_path / "resumed", demo_data, 29642)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    after = _metrics(tmp_path / "resumed")
    assert sorted(after) == [4]
    for key in ("loss", "grad_norm"):
        assert after[4][key] == reference[4][key], (key, after[4], reference[4])  # bitwise on CPU

    for name in ("final_model", "final_ema"):
        a = load_file(tmp_path / "full" / f"{name}.safetensors")
        b = load_file(tmp_path / "resumed" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert {t.dtype for t in a.values()} == {torch.float32}, name
    raw = load_file(tmp_path / "full" / "final_model.safetensors")
    skips = [k for k in raw if SKIP_WEIGHTS.search(k)]
    assert skips and all(not torch.equal(raw[k], raw[k].bfloat16().float()) for k in skips)
