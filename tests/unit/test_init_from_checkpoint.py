"""A stage can start from a training checkpoint folder (EMA or raw weights), not only a flat export."""

from __future__ import annotations

import pytest
import torch

from megatron_video.platform.launch import Runtime
from megatron_video.testing.models import build_model, randomize, tiny_config
from megatron_video.training import checkpoint as ckpt
from megatron_video.training.ema import ParamEMA
from megatron_video.training.loop import wrap_ddp
from megatron_video.training.stage import initialize_from

pytestmark = pytest.mark.usefixtures("megatron_single")


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg)
    raw = randomize(model, seed=1)
    ema = ParamEMA(model, 0.5)
    gen = torch.Generator().manual_seed(2)
    for tensor in ema.shadow.values():
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    ckpt.save_checkpoint(
        tmp_path / "ckpt", 3, [wrap_ddp(model, model.plan, False)], None, None, {"step": 3}, ema=ema
    )
    return tmp_path / "ckpt", raw, {k: v.clone() for k, v in ema.shadow.items()}


def test_checkpoint_weights_raw_and_ema(saved):
    path, raw, ema = saved
    weights, meta = ckpt.checkpoint_weights(path, use_ema=True)
    assert meta["iteration"] == 3 and set(ema) <= set(weights)
    for name, tensor in ema.items():
        assert torch.equal(weights[name], tensor), name
    weights, _ = ckpt.checkpoint_weights(path, use_ema=False)
    for name, tensor in raw.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.parametrize("use_ema", [True, False])
def test_i2v_stage_initialised_from_t2v_checkpoint(saved, use_ema):
    path, raw, ema = saved
    cfg = tiny_config()
    cfg.training.checkpoint.init_from_ema = use_ema
    i2v = build_model(cfg, inpaint_mask_channels=8)
    built = {k: v.clone() for k, v in i2v.state_dict().items() if k.startswith("inpaint.")}
    runtime = Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0, plan=i2v.plan)
    initialize_from(i2v, runtime, cfg, str(path))
    expected = ema if use_ema else raw
    state = i2v.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in built.items():  # the new inpainting embeddings stay as built
        assert torch.equal(state[name], tensor), name
