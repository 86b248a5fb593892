"""tools/convert_checkpoint.py in one process: released layout -> flat -> released layout is exact and
the output unchanged (SUV and WF-VAE); every mismatching key is named with its shapes.

The multi-process conversions (training checkpoints at TP = 2 and PP = 2) are in
tests/distributed/test_convert_roundtrip.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from megatron_video.models.suv.state_dict_adapter import from_open_sora_plan, to_open_sora_plan
from megatron_video.testing.models import build_model, random_inputs, randomize, tiny_config

TOOL = Path(__file__).parents[2] / "tools" / "convert_checkpoint.py"


@pytest.fixture
def keep_thread_count():
    """The tool's runtime set-up resizes this process's thread pool; put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def load_tool():
    """tools/convert_checkpoint.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_released_to_flat_to_released_round_trip(megatron_single, tmp_path):
    tool = load_tool()
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
    from megatron_video.errors import CheckpointMismatch

    tool = load_tool()
    cfg = tiny_config()
    released = to_open_sora_plan(randomize(build_model(cfg), seed=22), cfg.model)
    released.pop("proj_out.weight")
    torch.save(released, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatch, match="proj_out.weight"):
        tool.main(["osp-to-flat", str(tmp_path / "broken.pt"), str(tmp_path / "x"), "--flavor", "tiny"])


def test_flat_to_checkpoint_names_every_key_and_shape(megatron_single, keep_thread_count, tmp_path):
    from megatron_video.errors import CheckpointMismatch
    from megatron_video.training.export import save_flat

    tool = load_tool()
    cfg = tiny_config()
    state = randomize(build_model(cfg), seed=23)
    state.pop("proj_out.bias")
    state["caption_projection.weight"] = state["caption_projection.weight"][:, :-1]
    state["not_in_the_model.weight"] = torch.zeros(3)
    save_flat(tmp_path / "suv", state, cfg.model)
    config = tmp_path / "stage.yaml"
    shape = {"text_length": 8, "height": 64, "width": 64}
    config.write_text(
        yaml.safe_dump({"model": {"flavor": "tiny"}, "runtime": {"device": "cpu"}, "shape": shape})
    )
    command = ["flat-to-checkpoint", str(tmp_path / "suv.safetensors"), str(tmp_path / "ckpt")]
    with pytest.raises(CheckpointMismatch) as err:
        tool.main([*command, "--config", str(config)])
    message = str(err.value)
    assert "missing: proj_out.bias [" in message
    assert "unexpected: not_in_the_model.weight [3]" in message
    assert "shape: caption_projection.weight source [64, 383] vs model [64, 384]" in message
    assert not (tmp_path / "ckpt").exists()


def test_vae_released_to_flat_to_released_round_trip(tmp_path):
    """WF-VAE: released folder -> flat -> released folder is exact and decodes like the original code;
    a released training .ckpt gives its EMA weights, or with --raw its raw ones."""
    from megatron_video.models.wfvae import state_dict_adapter as adapter
    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.model import WFVAE
    from megatron_video.testing.vae import randomize_vae
    from megatron_video.training.export import load_flat

    tool = load_tool()
    fixtures = Path(__file__).parents[1] / "fixtures" / "open_sora_plan_vae"
    name = "v15_wfvae_888_T1"
    case = json.loads((fixtures / "cases.json").read_text())[name]
    cfg = WFVAEConfig.from_flavor("tiny", **case["model"])
    state = randomize_vae(WFVAE(cfg), seed=case["seed"])
    adapter.save_open_sora_plan_folder(tmp_path / "released", state, cfg)
    assert tool.main(["vae-osp-to-flat", str(tmp_path / "released"), str(tmp_path / "vae")]) == 0
    assert tool.main(["vae-flat-to-osp", str(tmp_path / "vae.safetensors"), str(tmp_path / "back")]) == 0
    released, back = adapter.read_folder(tmp_path / "released"), adapter.read_folder(tmp_path / "back")
    assert back[0] == released[0]  # config.json
    assert set(back[1]) == set(released[1]) and all(
        torch.equal(back[1][k], released[1][k]) for k in released[1]
    )

    # The flat export decodes what the original code decoded (fixture, fp32, max abs 1e-5).
    flat, flat_cfg = load_flat(tmp_path / "vae")
    vae = WFVAE(WFVAEConfig(**flat_cfg)).eval()
    vae.load_state_dict(flat)
    data = load_file(fixtures / f"{name}.safetensors")
    with torch.no_grad():
        decoded = vae.decode(data["expected.mean"])
        mean = vae.encode(data["input.video"]).mean
    assert (decoded - data["expected.decoded"]).abs().max().item() <= 1e-5
    assert (mean - data["expected.mean"]).abs().max().item() <= 1e-5

    # A training .ckpt holds raw and EMA weights: EMA by default, raw with --raw.
    tiny = WFVAEConfig.from_flavor("tiny")
    raw, ema = randomize_vae(WFVAE(tiny), seed=1), randomize_vae(WFVAE(tiny), seed=2)
    adapter.save_open_sora_plan_checkpoint(tmp_path / "w.ckpt", raw, tiny, ema_state=ema)
    for flag, expected in (([], ema), (["--raw"], raw)):
        tool.main(
            ["vae-osp-to-flat", str(tmp_path / "w.ckpt"), str(tmp_path / "w"), "--flavor", "tiny", *flag]
        )
        got, _ = load_flat(tmp_path / "w")
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), flag
