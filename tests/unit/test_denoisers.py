"""Family dispatch (training/denoisers.py): the DiT's T2V -> I2V initialisation as the release does
it (the I2V model starts equal to the T2V one), the v1.2 mask layout on entry, refused family
changes, and the FLOPs count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_video.errors import ConfigError
from megatron_video.models.opensora_dit.model import v12_inpaint_mask_layout
from megatron_video.parallel.setup import build_parallel_plan
from megatron_video.testing.models import randomize, tiny_config
from megatron_video.testing.opensora_dit import random_dit_inputs, tiny_dit_config
from megatron_video.training import denoisers

pytestmark = pytest.mark.usefixtures("megatron_single")


@pytest.mark.parametrize("version", ["v1.2", "v1.3"])
def test_i2v_starts_from_t2v_as_released_and_equals_it(version):
    cfg = tiny_dit_config(version=version)
    plan = build_parallel_plan(cfg)
    t2v = denoisers.build_model(cfg.model, plan, "sdpa")
    full = randomize(t2v, seed=1)
    i2v = denoisers.build_model(cfg.model, plan, "sdpa", mask_channels=4)
    weights, may_stay_new = denoisers.transition_weights(full, cfg.model, cfg, i2v.state_dict(), "t2v")
    missing, unexpected = i2v.load_state_dict(weights, strict=False)
    assert (
        not unexpected and not [k for k in missing if not k.endswith("_extra_state")] and may_stay_new == ()
    )
    assert torch.equal(i2v.inpaint.masked_video_embed.proj.weight, full["patch_embed.proj.weight"])
    copies_mask = torch.equal(i2v.inpaint.mask_embed.proj.weight, full["patch_embed.proj.weight"])
    assert copies_mask == (version == "v1.2")  # v1.2's mask embedding has the latent channel count
    assert not i2v.inpaint.masked_video_proj.weight.any() and not i2v.inpaint.mask_proj.weight.any()
    inputs = random_dit_inputs(cfg, 2, 2, 8, 8, 8, seed=3, inpaint_mask_channels=4)
    t2v_inputs = {k: v for k, v in inputs.items() if k not in ("masked_latents_BCTHW", "inpaint_mask_BMTHW")}
    with torch.no_grad():
        assert torch.equal(i2v(**inputs), t2v(**t2v_inputs))


def test_v12_i2v_takes_the_shared_mask_layout_and_converts_it():
    cfg = tiny_dit_config(version="v1.2")
    model = denoisers.build_model(cfg.model, build_parallel_plan(cfg), "sdpa", mask_channels=4)
    randomize(model, seed=2)
    inputs = random_dit_inputs(cfg, 1, 3, 8, 8, 8, seed=4, inpaint_mask_channels=4)
    converted = {**inputs, "inpaint_mask_BMTHW": v12_inpaint_mask_layout(inputs["inpaint_mask_BMTHW"])}
    with torch.no_grad():
        assert torch.equal(model(**inputs), model.forward(**converted))  # forward() skips the hook
        assert not torch.equal(model(**inputs), model.forward(**inputs))


def test_family_change_and_geometry_change_are_refused():
    dit, suv = tiny_dit_config(), tiny_config()
    with pytest.raises(
        ConfigError, match="model.family=suv model but this stage trains model.family=opensora_dit"
    ):
        denoisers.transition_weights({}, suv.model, dit, {}, "x.safetensors")
    wider = dataclasses.replace(dit.model, num_heads=8)
    with pytest.raises(ConfigError, match="model.num_heads: weights 8, this stage 4"):
        denoisers.transition_weights({}, wider, dit, {}, "x.safetensors")
    assert denoisers.saved_model_config({"flavor": "tiny"}).family == "suv"  # exports from before families
    assert denoisers.saved_model_config(dataclasses.asdict(dit.model)) == dit.model


def test_sample_video_rebuilds_the_model_a_released_folder_or_export_records(tmp_path):
    """tools/sample_video.py takes the model (family, geometry, I2V) from the weights: a released
    folder's config.json or a flat export's .json, and loads either into the rebuilt model."""
    import importlib.util
    from types import SimpleNamespace

    from megatron_video.models.opensora_dit.state_dict_adapter import save_open_sora_plan_folder
    from megatron_video.training.export import save_flat

    spec = importlib.util.spec_from_file_location("sample_video", "tools/sample_video.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = tiny_dit_config(version="v1.3", sparse_stop=6)  # the released Skiparse range for 6 blocks
    plan = build_parallel_plan(cfg)
    model = denoisers.build_model(cfg.model, plan, "sdpa", mask_channels=4)
    state = randomize(model, seed=5)
    save_open_sora_plan_folder(tmp_path / "released", state, cfg.model, 4)
    save_flat(tmp_path / "export", state, cfg.model)
    inputs = random_dit_inputs(cfg, 1, 2, 8, 8, 8, seed=6, inpaint_mask_channels=4)
    with torch.no_grad():
        expected = model(**inputs)
    for weights in (tmp_path / "released", tmp_path / "export.safetensors"):
        saved = tool.weights_model_config(str(weights))
        assert dataclasses.replace(saved, flavor="tiny") == cfg.model and tool.has_inpainting_weights(
            str(weights)
        )
        rebuilt = denoisers.build_model(saved, plan, "sdpa", mask_channels=4)
        tool.load_weights(rebuilt, SimpleNamespace(plan=plan), str(weights), raw=False)
        with torch.no_grad():
            assert torch.equal(rebuilt(**inputs), expected), weights


def test_v12_i2v_needs_a_vae_whose_temporal_stride_is_its_channel_count(capsys):
    """v1.2 embeds the I2V mask with its latent channel count; the entry scripts check the task's
    model against the VAE before launch (training/cli.py)."""
    from megatron_video.config import build_config
    from megatron_video.training.cli import main

    cfg = tiny_dit_config(version="v1.2")  # the default VAE: WF-VAE 8x8x8
    assert denoisers.inpaint_mask_channels(cfg, "t2v") is None
    with pytest.raises(ConfigError, match="VAE temporal stride .*: 8. must equal it"):
        denoisers.inpaint_mask_channels(cfg, "i2v")
    causal = build_config(
        {"model": {"family": "opensora_dit", "flavor": "tiny", "version": "v1.2"}, "vae": {"kind": "causal_vae",
         "flavor": "causal_vae_4x8x8_d4"}, "shape": {"height": 64, "width": 64, "text_length": 8}}
    )  # fmt: skip
    assert denoisers.inpaint_mask_channels(causal, "i2v") == 4
    args = ["examples/tiny/dit_i2v.yaml", "data.data_list=null", "vae.checkpoint=null", "model.version=v1.2"]
    assert main("i2v", args) == 2
    assert "model.version=v1.3" in capsys.readouterr().err
