"""tools/eval_samples.py: PSNR, the nearest training clip over windows, and the sample manifest."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("eval_samples", ROOT / "tools" / "eval_samples.py")
tool = importlib.util.module_from_spec(spec)
sys.modules["eval_samples"] = tool  # dataclasses look their module up
spec.loader.exec_module(tool)


def test_frame_psnr_is_the_mean_of_per_frame_psnr():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    assert math.isclose(tool.frame_psnr(a, b), 30.0, abs_tol=1e-4)


def test_nearest_clip_takes_each_clip_s_best_window():
    gen = torch.Generator().manual_seed(0)
    sample = torch.rand(3, 3, 8, 8, generator=gen)
    other = torch.rand(4, 3, 3, 8, 8, generator=gen)
    own = torch.rand(5, 3, 3, 8, 8, generator=gen)
    own[3] = (sample + 0.02).clamp(0, 1)  # one window of the second clip is almost the sample
    refs = [tool.Reference("a.mp4", ("a",), other), tool.Reference("b.mp4", ("b",), own)]
    ranking = tool.nearest_clip(sample, refs)
    assert ranking[0][1] == 1 and ranking[0][0] > 30.0
    assert ranking[1][0] < 15.0


def test_t2v_samples_follow_the_manifest_and_name_what_is_missing(tmp_path):
    records = [
        {"file": "a cat-0.mp4", "prompt": "a cat", "index": 0, "seed": 0},
        {"file": "a cat-1.mp4", "prompt": "a cat", "index": 1, "seed": 1},
        {"file": "ein Hund, bellend-0.mp4", "prompt": "ein Hund, bellend", "index": 0, "seed": 2},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps(records), encoding="utf-8")
    for r in records:
        (tmp_path / r["file"]).write_bytes(b"")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("ein Hund, bellend\na cat\n", encoding="utf-8")
    assert tool.t2v_samples(tmp_path, str(prompts_file)) == (
        ["ein Hund, bellend", "a cat"],
        ["ein Hund, bellend-0.mp4", "a cat-0.mp4"],
    )
    prompts_file.write_text("a dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="a dog"):
        tool.t2v_samples(tmp_path, str(prompts_file))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json"):
        tool.t2v_samples(tmp_path, None)
