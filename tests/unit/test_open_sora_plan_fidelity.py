"""SUV output equals the released Open-Sora-Plan v1.5 code on the same weights (golden fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_video.models.suv.state_dict_adapter import from_open_sora_plan, to_open_sora_plan
from megatron_video.testing.models import build_model, randomize, tiny_config

FIXTURES = Path(__file__).parents[1] / "fixtures" / "open_sora_plan_v1_5"
CASES = json.loads((FIXTURES / "cases.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_released_code(megatron_single, name):
    case = CASES[name]
    cfg = tiny_config(**case["model"])
    model = build_model(cfg)
    state = randomize(model, seed=case["seed"])
    # Load through the released layout, as a released checkpoint would be.
    released = to_open_sora_plan(state, cfg.model)
    missing, unexpected = model.load_state_dict(from_open_sora_plan(released, cfg.model), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    data = load_file(FIXTURES / f"{name}.safetensors")
    expected = data.pop("expected")
    with torch.no_grad():
        out = model(**data)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5
