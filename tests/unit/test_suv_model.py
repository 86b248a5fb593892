"""SUV model: adapter round trips, TP shard rules, dense -> SUV conversion, recompute, init."""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.suv.state_dict_adapter import (
    CheckpointMismatch,
    check_against_model,
    convert_dense_to_suv,
    expected_open_sora_plan_keys,
    from_open_sora_plan,
    merge_open_sora_plan_tp,
    split_open_sora_plan_tp,
    to_open_sora_plan,
)
from megatron_video.parallel.tensor_parallel_state import merge_state_dicts, partition_dims, shard_state_dict
from megatron_video.testing.models import build_model, random_inputs, randomize, tiny_config


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def test_open_sora_plan_round_trip_exact(megatron_single):
    cfg = tiny_config()
    model = build_model(cfg)
    state = randomize(model, seed=1)
    released = to_open_sora_plan(state, cfg.model)
    assert "transformer_blocks.1.0.attn1.to_q.weight" in released
    assert "skip_norm_linear_enc.1.1.weight" in released
    assert not any(k.startswith("transformer_blocks.4.1.ff_enc") for k in released)  # context-pre-only
    back = from_open_sora_plan(released, cfg.model)
    assert set(back) == set(state)
    assert expected_open_sora_plan_keys(cfg.model) == set(released)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_released_tp_shards_merge_and_split(megatron_single):
    cfg = tiny_config()
    state = randomize(build_model(cfg), seed=2)
    released = to_open_sora_plan(state, cfg.model)
    shards = split_open_sora_plan_tp(released, 2)
    # q/k/v and AdaLN split on dim 0, attention output on dim 1, norms replicated.
    d = cfg.model.hidden_size
    assert shards[0]["transformer_blocks.0.0.attn1.to_q.weight"].shape == (d // 2, d)
    assert shards[0]["transformer_blocks.0.0.norm1.linear.weight"].shape[0] == 3 * d
    assert shards[1]["transformer_blocks.0.0.attn1.to_out.0.weight"].shape == (d, d // 2)
    assert torch.equal(shards[0]["norm_final.weight"], shards[1]["norm_final.weight"])
    merged = merge_open_sora_plan_tp(shards)
    assert all(torch.equal(merged[k], released[k]) for k in released)


def test_tp_built_release_extras_are_dropped_and_mismatch_named(megatron_single):
    cfg = tiny_config()
    state = randomize(build_model(cfg), seed=3)
    released = to_open_sora_plan(state, cfg.model)
    # A TP > 1 build of the release has these on the context-pre-only last block.
    extra = dict(released)
    extra["transformer_blocks.4.1.attn1.to_add_out.weight"] = torch.zeros(64, 64)
    extra["transformer_blocks.4.1.ff_enc.net.2.weight"] = torch.zeros(64, 256)
    back = from_open_sora_plan(extra, cfg.model)
    assert set(back) == set(state)
    broken = dict(released)
    broken.pop("transformer_blocks.2.1.attn1.add_k_proj.bias")
    broken["transformer_blocks.9.0.norm1.linear.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match=r"add_k_proj\.bias[\s\S]*transformer_blocks\.9\.0"):
        from_open_sora_plan(broken, cfg.model)


def test_shape_mismatch_reported_by_key(megatron_single):
    cfg = tiny_config()
    model = build_model(cfg)
    state = randomize(model, seed=4)
    state["proj_out.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatch, match=r"proj_out\.weight checkpoint \(3, 3\)"):
        check_against_model(state, model)


def test_our_tp_shards_follow_megatron_partition_dims(megatron_single):
    cfg = tiny_config()
    model = build_model(cfg)
    state = randomize(model, seed=5)
    dims = partition_dims(model)
    assert dims["stages.0.0.attn.linear_qkv.weight"] == 0
    assert dims["stages.0.0.attn.linear_proj.weight"] == 1
    assert dims["stages.0.0.ff.linear_fc2.weight"] == 1
    assert "stages.0.0.norm1_video.weight" not in dims
    shards = [shard_state_dict(state, dims, r, 2) for r in range(2)]
    merged = merge_state_dicts(shards, dims)
    assert all(torch.equal(merged[k], state[k]) for k in state)
    # A fused-qkv shard holds whole heads: rank 1's first rows are head 2's q rows.
    h, hd = cfg.model.num_heads, cfg.model.head_dim
    released = to_open_sora_plan(state, cfg.model)
    q = released["transformer_blocks.0.0.attn1.to_q.weight"]
    assert torch.equal(
        shards[1]["stages.0.0.attn.linear_qkv.weight"][:hd], q[(h // 2) * hd : (h // 2 + 1) * hd]
    )


def test_dense_to_suv_conversion_keeps_output(megatron_single):
    dense_cfg = tiny_config(num_layers=[10], sparse_n=[1], skip_connection=False)
    dense = build_model(dense_cfg)
    dense_state = randomize(dense, seed=6)
    suv_cfg = tiny_config()  # stages [2, 2, 2, 2, 2], k [1, 2, 4, 2, 1], zero-init skips
    suv = build_model(tiny_config(sparse_n=[1] * 5))
    converted = convert_dense_to_suv(dense_state, dense_cfg.model, suv_cfg.model, suv)
    check_against_model(converted, suv)
    suv.load_state_dict(converted, strict=False)
    inputs = random_inputs(dense_cfg, 2, 3, 6, 10, 8, seed=7)
    ref = _forward(dense, inputs)
    torch.testing.assert_close(_forward(suv, inputs), ref, rtol=1e-5, atol=1e-6)
    # The same weights with the Skiparse schedule switched on are a different function.
    sparse = build_model(suv_cfg)
    sparse.load_state_dict(converted, strict=False)
    assert (_forward(sparse, inputs) - ref).abs().max() > 1e-3


def test_skip_zero_init_is_identity_and_adaln_zero(megatron_single):
    cfg = tiny_config()
    model = build_model(cfg)
    d = cfg.model.hidden_size
    w = model.skip_linears[0].weight
    assert torch.equal(w[:, :d], torch.eye(d)) and not w[:, d:].any()
    assert not model.stages[0][0].norm1.linear.weight.any()
    out = _forward(model, random_inputs(cfg, 1, 1, 4, 4, 8))
    assert not out.any()  # AdaLN-Zero: a fresh model predicts exactly zero


@pytest.mark.parametrize("mode", ["full", "ffn"])
def test_recompute_matches_plain_gradients(megatron_single, mode):
    cfg = tiny_config()
    model = build_model(cfg)
    randomize(model, seed=8)
    inputs = random_inputs(cfg, 2, 2, 4, 6, 8, seed=9)

    def grads():
        model.zero_grad()
        model(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_recompute(mode, num_layers=6)
    recomputed = grads()
    model.set_recompute("none")
    assert set(plain) == set(recomputed)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-8)


def test_flavors_have_released_geometry():
    from megatron_video.models.suv.config import SUVConfig

    big = SUVConfig.from_flavor("8.5B")
    assert big.num_layers == [2, 4, 6, 8, 6, 4, 2] and big.sparse_n == [1, 2, 4, 8, 4, 2, 1]
    assert (big.num_heads, big.head_dim, big.hidden_size) == (24, 128, 3072)
    assert (big.in_channels, big.caption_channels, big.pooled_projection_dim) == (32, 2048, 1280)
    assert SUVConfig.from_flavor("2B").hidden_size == 24 * 64
    assert SUVConfig.from_flavor("tiny").dense().sparse_n == [1, 1, 1, 1, 1]


def test_i2v_model_starts_equal_to_t2v(megatron_single):
    cfg = tiny_config()
    t2v = build_model(cfg)
    state = randomize(t2v, seed=11)
    i2v = build_model(cfg, inpaint_mask_channels=8)
    missing, unexpected = i2v.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("inpaint.") or k.endswith("_extra_state") for k in missing)
    inputs = random_inputs(cfg, 2, 2, 4, 6, 8, seed=12, inpaint_mask_channels=8)
    plain = {k: v for k, v in inputs.items() if k not in ("masked_latents_BCTHW", "inpaint_mask_BMTHW")}
    torch.testing.assert_close(_forward(i2v, inputs), _forward(t2v, plain), rtol=0, atol=0)
    with torch.no_grad():
        i2v.inpaint.mask_proj.weight.normal_()
    assert (_forward(i2v, inputs) - _forward(t2v, plain)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs masked_latents_BCTHW"):
        _forward(i2v, plain)
