"""`bash benchmarks/gpu_check.sh` without CUDA: says so, prints the planner's predictions for its
cases, writes its JSON and exits 0 (the CI side of the prepared GPU check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here: dry run" in done.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda"] is False
    cases = {(r["case"], r["device"]): r for r in report["planner"]}
    assert len(cases) == 8
    dense, sparse = cases[("57x288x512 dense", "h100")], cases[("57x288x512 skiparse", "h100")]
    assert dense["video_tokens"] == sparse["video_tokens"] == 8 * 18 * 32
    assert sparse["predicted_step_s"] < dense["predicted_step_s"]  # Skiparse saves attention FLOPs
    assert all(r["fits"] for r in report["planner"])  # the 2B flavor fits one H100 at these sizes
    assert [s["seq"] for s in report["attention_shapes"]] == [4608 + 512, 4608 // 4 + 512]
