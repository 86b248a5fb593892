"""tools/convert_checkpoint.py: released layout -> flat -> released layout is exact, output unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from megatron_video.models.suv.state_dict_adapter import from_open_sora_plan, to_open_sora_plan
from megatron_video.testing.models import build_model, random_inputs, randomize, tiny_config

TOOL = Path(__file__).parents[2] / "tools" / "convert_checkpoint.py"


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_released_to_flat_to_released_round_trip(megatron_single, tmp_path):
    tool = _tool()
    cfg = tiny_config()
    model = build_model(cfg)
    state = randomize(model, seed=21)
    released = to_open_sora_plan(state, cfg.model)
    torch.save({"model": released}, tmp_path / "model_ema.pt")  # wrapped, as Megatron-era files are
    assert (
        tool.main(["osp-to-flat", str(tmp_path / "model_ema.pt"), str(tmp_path / "suv"), "--flavor", "tiny"])
        == 0
    )
    assert (
        tool.main(["flat-to-osp", str(tmp_path / "suv.safetensors"), str(tmp_path / "back.safetensors")]) == 0
    )
    back = tool.read_weights(tmp_path / "back.safetensors")
    assert set(back) == set(released) and all(torch.equal(back[k], released[k]) for k in released)

    # The model computes the same thing from the converted weights.
    inputs = random_inputs(cfg, 1, 2, 4, 6, 8, seed=3)
    with torch.no_grad():
        ref = model(**inputs)
        model.load_state_dict(from_open_sora_plan(back, cfg.model), strict=False)
        torch.testing.assert_close(model(**inputs), ref, rtol=0, atol=0)


def test_bad_key_is_named(megatron_single, tmp_path):
    import pytest

    from megatron_video.errors import CheckpointMismatch

    tool = _tool()
    cfg = tiny_config()
    released = to_open_sora_plan(randomize(build_model(cfg), seed=22), cfg.model)
    released.pop("proj_out.weight")
    torch.save(released, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatch, match="proj_out.weight"):
        tool.main(["osp-to-flat", str(tmp_path / "broken.pt"), str(tmp_path / "x"), "--flavor", "tiny"])
