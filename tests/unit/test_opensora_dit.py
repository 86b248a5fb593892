"""The v1.2 / v1.3 DiT: outputs equal the released code (golden fixtures), the released layout and
config.json round-trip, and mismatched checkpoints are refused with every key named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_video.errors import CheckpointMismatch, ConfigError
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.opensora_dit.model import v12_inpaint_mask_layout
from megatron_video.models.opensora_dit.state_dict_adapter import (
    config_from_open_sora_plan,
    config_to_open_sora_plan,
    expected_open_sora_plan_keys,
    from_open_sora_plan,
    init_i2v_from_t2v,
    load_open_sora_plan,
    save_open_sora_plan_folder,
    to_open_sora_plan,
)
from megatron_video.testing.models import randomize
from megatron_video.testing.opensora_dit import build_dit, random_dit_inputs, tiny_dit_config

FIXTURES = Path(__file__).parents[1] / "fixtures" / "open_sora_plan_v12_v13"
CASES = json.loads((FIXTURES / "cases.json").read_text())


def _golden_model(name: str, **changes):
    case = CASES[name]
    cfg = tiny_dit_config(**{**case["model"], **changes})
    inpaint = case["inpaint_mask_channels"]
    model = build_dit(cfg, inpaint_mask_channels=inpaint)
    state = randomize(model, seed=case["seed"], std=case["std"])
    return cfg, model, state, inpaint


def _load_released(model, cfg, state, inpaint):
    """Load `state` through the released layout, as a released checkpoint would be."""
    released = to_open_sora_plan(state, cfg.model, inpaint is not None)
    missing, unexpected = model.load_state_dict(from_open_sora_plan(released, cfg.model), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_released_code(megatron_single, name):
    cfg, model, state, inpaint = _golden_model(name)
    _load_released(model, cfg, state, inpaint)
    data = load_file(FIXTURES / f"{name}.safetensors")
    expected = data.pop("expected")
    with torch.no_grad():
        out = model(**data)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name, changes",
    [
        ("v12_rope_720p_scales", dict(interpolation_scale_h=1.0, interpolation_scale_w=1.0)),
        ("v12_rope_720p_scales", dict(interpolation_scale_h=2.0, interpolation_scale_w=1.5)),
        ("v13_k4_masked", dict(sparse_n=1)),
        ("v13_k4_masked", dict(sparse_stop=-2)),
        ("v13_k2", dict(sparse_n=4)),
    ],
)
def test_goldens_see_scales_and_sparsity(megatron_single, name, changes):
    """The fixtures would catch a wrong RoPE scale, a swapped axis, dense attention or a wrong block range."""
    cfg, model, state, inpaint = _golden_model(name, **changes)
    model.load_state_dict(state, strict=False)
    data = load_file(FIXTURES / f"{name}.safetensors")
    expected = data.pop("expected")
    with torch.no_grad():
        assert (model(**data) - expected).abs().max().item() > 1e-3


def test_fully_masked_sample_attends_every_key(megatron_single):
    """The release's uniform -10000 bias on a caption with no valid token equals no mask at all."""
    cfg = tiny_dit_config(version="v1.3", caption_channels=16)
    model = build_dit(cfg)
    randomize(model, seed=1)
    inputs = random_dit_inputs(cfg, 2, 2, 4, 6, 8, seed=2, masks=False)
    with torch.no_grad():
        free = model(**inputs)
        masked = model(**inputs, text_mask_BL=torch.tensor([[1.0] * 8, [0.0] * 8]))
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked, free, rtol=0, atol=1e-6)


@pytest.mark.parametrize("version", ["v1.2", "v1.3"])
@pytest.mark.parametrize("inpaint", [None, 4])
def test_released_round_trip_is_bitwise(megatron_single, tmp_path, version, inpaint):
    """released -> ours -> released (and through a folder with config.json) is bitwise identical."""
    # 6 blocks: the released config.json can only say "Skiparse on 1 < i < 30", i.e. blocks 2..5.
    cfg = tiny_dit_config(version=version, **(dict(sparse_stop=6) if version == "v1.3" else {}))
    model = build_dit(cfg, inpaint_mask_channels=inpaint)
    ours = randomize(model, seed=7)
    released = to_open_sora_plan(ours, cfg.model)
    assert set(released) == expected_open_sora_plan_keys(cfg.model, inpaint is not None)
    back = to_open_sora_plan(from_open_sora_plan(released, cfg.model), cfg.model)
    assert set(back) == set(released) and all(torch.equal(back[k], released[k]) for k in released)

    save_open_sora_plan_folder(tmp_path / "release", ours, cfg.model, inpaint)
    loaded_cfg, mask_channels, loaded = load_open_sora_plan(tmp_path / "release")
    assert mask_channels == inpaint
    assert dataclasses.replace(loaded_cfg, flavor="tiny") == cfg.model
    assert all(torch.equal(loaded[k], v) for k, v in ours.items() if not k.endswith("_extra_state"))
    # A `.bin` folder is read with weights_only=True.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "release" / "config.json").read_text())
    torch.save(released, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    _, _, from_bin = load_open_sora_plan(tmp_path / "bin")
    assert all(torch.equal(from_bin[k], loaded[k]) for k in loaded)


def test_mismatched_checkpoint_names_every_key(megatron_single):
    cfg = tiny_dit_config(version="v1.3")
    released = to_open_sora_plan(randomize(build_dit(cfg), seed=0), cfg.model)
    released.pop("transformer_blocks.3.attn2.to_k.bias")
    released.pop("adaln_single.linear.weight")
    released["transformer_blocks.3.attn1.norm_q.weight"] = torch.ones(24)
    released["pos_embed.temp_pos_embed"] = torch.ones(3)
    with pytest.raises(CheckpointMismatch) as err:
        from_open_sora_plan(released, cfg.model)
    text = str(err.value)
    for key in (
        "transformer_blocks.3.attn2.to_k.bias",
        "adaln_single.linear.weight",
        "transformer_blocks.3.attn1.norm_q.weight",
        "pos_embed.temp_pos_embed",
    ):
        assert key in text
    # A v1.2 I2V checkpoint read as v1.3 I2V: the masked-video embedding has v1.2's name.
    v12 = tiny_dit_config(version="v1.2")
    i2v = to_open_sora_plan(randomize(build_dit(v12, inpaint_mask_channels=4), seed=0), v12.model)
    with pytest.raises(CheckpointMismatch, match="pos_embed_masked_hidden_states.0.proj.weight"):
        from_open_sora_plan(i2v, dataclasses.replace(v12.model, version="v1.3"))
    ours = randomize(build_dit(cfg), seed=0)
    ours["blocks.9.ff.linear_fc1.weight"] = torch.ones(1)
    with pytest.raises(CheckpointMismatch, match=r"blocks\.9\.ff\.linear_fc1\.weight"):
        to_open_sora_plan(ours, cfg.model)


def test_released_2p7b_key_counts():
    """687 keys for the released T2V models, 693 for I2V, with v1.3's renamed masked-video embedding."""
    for version in ("v1.2", "v1.3"):
        cfg = OpenSoraDiTConfig.from_flavor("2.7B", version=version)
        assert len(expected_open_sora_plan_keys(cfg)) == 687
        keys = expected_open_sora_plan_keys(cfg, inpaint=True)
        assert len(keys) == 693
        name = "pos_embed_masked_video" if version == "v1.2" else "pos_embed_masked_hidden_states"
        assert f"{name}.1.weight" in keys and "pos_embed_mask.0.proj.bias" in keys
    v13 = OpenSoraDiTConfig.from_flavor("2.7B", version="v1.3")
    assert list(v13.sparse_blocks) == list(range(2, 30)) and v13.hidden_size == 2304


def _v12_release_config(**changes) -> dict:
    """config.json fields of the v1.2 93x720p release (reference section 1.7)."""
    return {
        "_class_name": "OpenSoraT2V",
        "num_layers": 32,
        "num_attention_heads": 24,
        "attention_head_dim": 96,
        "in_channels": 4,
        "out_channels": 4,
        "patch_size": 2,
        "patch_size_t": 1,
        "caption_channels": 4096,
        "cross_attention_dim": 2304,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
        "use_rope": True,
        "downsampler": None,
        "sample_size": [90, 160],
        "sample_size_t": 24,
        "interpolation_scale_t": 1.0,
        "interpolation_scale_h": 1.5,
        "interpolation_scale_w": 2.0,
        **changes,
    }


def test_config_json_translation():
    cfg, mask = config_from_open_sora_plan(_v12_release_config())
    assert mask is None and cfg.version == "v1.2" and cfg.sparse_blocks == range(0)
    assert (cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w) == (
        1.0,
        1.5,
        2.0,
    )
    assert cfg == config_from_open_sora_plan(config_to_open_sora_plan(cfg, sample_size=(90, 160)))[0]
    # Null scales follow the v1.2 rule from sample_size: t = (24 / 16), h = 90 / 30, w = 160 / 40.
    nulls = {f"interpolation_scale_{a}": None for a in "thw"}
    cfg, _ = config_from_open_sora_plan(_v12_release_config(**nulls))
    assert (cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w) == (
        1.5,
        3.0,
        4.0,
    )
    v13 = {
        **_v12_release_config(),
        "_class_name": "OpenSoraInpaint_v1_3",
        "in_channels": 8,
        "out_channels": 8,
        "sparse1d": True,
        "sparse_n": 4,
        "vae_scale_factor_t": 4,
    }
    cfg, mask = config_from_open_sora_plan(v13)
    assert mask == 4 and cfg.version == "v1.3" and list(cfg.sparse_blocks) == list(range(2, 30))
    assert config_from_open_sora_plan(config_to_open_sora_plan(cfg, mask)) == (cfg, mask)
    for bad in (dict(use_rope=False), dict(activation_fn="geglu"), dict(norm_elementwise_affine=True)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            config_from_open_sora_plan(_v12_release_config(**bad))
    with pytest.raises(ConfigError, match="_class_name"):
        config_from_open_sora_plan(_v12_release_config(_class_name="UDiTT2V"))
    with pytest.raises(ConfigError, match="no released config.json form"):
        config_to_open_sora_plan(dataclasses.replace(cfg, sparse_start=4))


def test_v12_mask_layout():
    """v1.3 gives step t the maps t*M..t*M+M-1; v1.2 splits the M*T' maps channel-major."""
    b, m, t, h, w = 1, 4, 3, 2, 2
    maps = torch.arange(m * t, dtype=torch.float32)[None, :, None, None].expand(b, m * t, h, w)
    v13 = maps.reshape(b, t, m, h, w).transpose(1, 2)
    v12 = maps.reshape(b, m, t, h, w)
    assert torch.equal(v12_inpaint_mask_layout(v13), v12)


def test_i2v_initialised_from_t2v_computes_t2v(megatron_single):
    """Zero-initialised conditioning projections: the I2V model starts as the T2V model."""
    cfg = tiny_dit_config(version="v1.3", caption_channels=16)
    t2v = build_dit(cfg)
    t2v_state = randomize(t2v, seed=4)
    i2v = build_dit(cfg, inpaint_mask_channels=4)
    state = init_i2v_from_t2v(t2v_state, i2v.state_dict())
    i2v.load_state_dict(state, strict=False)
    assert torch.equal(state["inpaint.masked_video_embed.proj.weight"], t2v_state["patch_embed.proj.weight"])
    inputs = random_dit_inputs(cfg, 2, 2, 4, 6, 8, seed=5, inpaint_mask_channels=4)
    with torch.no_grad():
        expected = t2v(
            **{k: v for k, v in inputs.items() if k not in ("masked_latents_BCTHW", "inpaint_mask_BMTHW")}
        )
        torch.testing.assert_close(i2v(**inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "ffn"])
def test_recompute_keeps_output_and_gradients(megatron_single, mode):
    cfg = tiny_dit_config(version="v1.3", caption_channels=16)
    plain, recomputed = build_dit(cfg), build_dit(cfg)
    state = randomize(plain, seed=8, std=0.1)
    recomputed.load_state_dict(state, strict=False)
    recomputed.set_recompute(mode)
    inputs = random_dit_inputs(cfg, 2, 2, 4, 6, 8, seed=9)
    outs = []
    for model in (plain, recomputed):
        out = model(**inputs)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_bf16_keeps_conditioning_norms_and_stream_fp32(megatron_single):
    """Under runtime.dtype=bf16 only the attention / FFN linears and inpainting projections are bf16;
    the output stays within bf16 rounding of the fp32 model on the same weights."""
    fp32 = tiny_dit_config(version="v1.3", caption_channels=16)
    bf16 = dataclasses.replace(fp32, runtime=dataclasses.replace(fp32.runtime, dtype="bf16"))
    ref, model = build_dit(fp32, inpaint_mask_channels=4), build_dit(bf16, inpaint_mask_channels=4)
    state = randomize(ref, seed=10, std=0.1)
    model.load_state_dict(state, strict=False)
    for name, p in model.named_parameters():
        low = (
            ".self_attn." in name or ".cross_attn." in name or ".ff." in name or name.endswith("_proj.weight")
        )
        assert p.dtype == (torch.bfloat16 if low else torch.float32), (name, p.dtype)
    inputs = random_dit_inputs(fp32, 2, 2, 4, 6, 8, seed=11, inpaint_mask_channels=4)
    with torch.no_grad():
        expected, out = ref(**inputs), model(**inputs)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max().item() < 0.05 * expected.abs().max().item()
