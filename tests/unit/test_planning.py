"""The planner (megatron_video/planning/): FLOPs against hand counts and torch's FLOP counter,
parameters against built models, saved activations against what autograd keeps, the device table,
and MFU / HFU in the metrics.

Per-device memory of whole training steps is compared with measurement by benchmarks/memory.py
(not a test: it takes minutes); these tests hold the components to exact or near-exact numbers.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.config import SUVConfig
from megatron_video.planning import flops as F
from megatron_video.planning.devices import DEVICES, device_from_name, get_device
from megatron_video.planning.memory import FROZEN_ENCODER_PARAMS, Layout, block_activations
from megatron_video.planning.params import ParamCount, chunk_parameters, pipeline_chunks


def test_dense_suv_block_flops_by_hand():
    cfg = SUVConfig.from_flavor("tiny")
    d, e, n, lt = cfg.hidden_size, cfg.timestep_embed_dim, 40, 8
    linear = 2 * e * 12 * d + 2 * (n + lt) * 4 * d * d + 2 * 2 * (n + lt) * d * 4 * d  # AdaLN, q/k/v/out, FFN
    attention = 4 * (n + lt) ** 2 * d  # scores and values over the joint sequence
    b = F.suv_block_flops(cfg, n, lt, k=1)
    assert (b.linear, b.attention, b.attention_padded) == (linear, attention, attention)
    assert b.ffn == 2 * 2 * (n + lt) * d * 4 * d


def test_skiparse_suv_block_counts_n_squared_over_k_and_padding_as_hardware_only():
    cfg = SUVConfig.from_flavor("tiny")
    d, lt, k = cfg.hidden_size, 8, 4
    b = F.suv_block_flops(cfg, 64, lt, k)  # 64 = 4 k^2: no padding
    assert b.attention == b.attention_padded == 4 * k * (64 / k + lt) ** 2 * d
    video_only = F.suv_block_flops(cfg, 64, 0, k).attention
    assert video_only == 4 * 64**2 / k * d  # N^2 / k
    padded = F.suv_block_flops(cfg, 70, lt, k)  # padded to 80 tokens
    assert padded.attention == 4 * k * (70 / k + lt) ** 2 * d
    assert padded.attention_padded == 4 * k * (80 / k + lt) ** 2 * d
    assert padded.linear == F.suv_block_flops(cfg, 70, lt, 1).linear  # projections see the real tokens


def test_dit_block_flops_count_cross_attention():
    cfg = OpenSoraDiTConfig.from_flavor("tiny", version="v1.2")
    d, n, lt = cfg.hidden_size, 40, 8
    projections = 2 * (4 * n * d * d + 2 * n * d * d + 2 * lt * d * d + 2 * 4 * n * d * d)
    b = F.dit_block_flops(cfg, n, lt, k=1)
    assert b.linear == projections
    assert b.attention == 2 * (2 * n * n * d + 2 * n * lt * d)  # self + cross scores and values
    sparse = F.dit_block_flops(cfg, 64, lt, k=4)
    assert sparse.attention == 4 * 64**2 / 4 * d + 4 * 64 * lt * d  # cross-attention stays dense


def test_recompute_is_hardware_flops_only():
    cfg = SUVConfig.from_flavor("tiny")
    n, lt = 64, 8
    base = F.sample_flops(cfg, n, lt, "none")
    blocks = F.block_flops(cfg, n, lt)
    full = F.sample_flops(cfg, n, lt, "full")
    assert full.model == base.model == 3 * base.forward
    assert full.hardware == pytest.approx(base.hardware + sum(b.linear + b.attention_padded for b in blocks))
    ffn = F.sample_flops(cfg, n, lt, "ffn", recompute_num_layers=3)
    assert ffn.hardware == pytest.approx(base.hardware + sum(b.ffn for b in blocks[:3]))


@pytest.mark.parametrize("sparse_n", [[1, 1, 1, 1, 1], [1, 2, 4, 2, 1]])
def test_matmul_flops_equal_torch_flop_counter(megatron_single, sparse_n):
    """Every matmul of a real forward (torch's FlopCounterMode; it does not count CPU attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_video.testing.models import build_model, random_inputs, tiny_config

    cfg = tiny_config(sparse_n=sparse_n)
    model = build_model(cfg)
    batch, n, lt = 2, 2 * 3 * 5, 8
    inputs = random_inputs(cfg, batch, 2, 6, 10, lt, masks=False)
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    attention = sum(b.attention for b in F.block_flops(cfg.model, n, lt))
    assert counter.get_total_flops() == batch * (F.sample_flops(cfg.model, n, lt).forward - attention)


def _bytes_by_dtype(model) -> ParamCount:
    linear = sum(p.numel() for p in model.parameters() if p.dtype != torch.float32)
    fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
    return ParamCount(linear, fp32)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_parameter_inventory_equals_built_models(megatron_single, dtype):
    from megatron_video.testing.models import build_model, tiny_config
    from megatron_video.testing.opensora_dit import build_dit, tiny_dit_config

    cfg = tiny_config()
    cfg.runtime.dtype = dtype
    for blocks in (range(10), range(0, 4), range(4, 10)):  # whole model and two pipeline chunks
        model = build_model(cfg) if blocks == range(10) else _suv_chunk(cfg, blocks)
        predicted = chunk_parameters(cfg.model, 1, blocks)
        if dtype == "bf16":
            assert _bytes_by_dtype(model) == predicted
            assert sum(p.numel() * p.element_size() for p in model.parameters()) == predicted.nbytes(2)
        assert sum(p.numel() for p in model.parameters()) == predicted.total
    dit = tiny_dit_config(version="v1.3")
    dit.runtime.dtype = dtype
    built = build_dit(dit)
    assert (
        sum(p.numel() for p in built.parameters())
        == chunk_parameters(dit.model, 1, range(dit.model.num_layers)).total
    )
    if dtype == "bf16":
        assert _bytes_by_dtype(built) == chunk_parameters(dit.model, 1, range(dit.model.num_layers))


def _suv_chunk(cfg, blocks):
    from megatron_video.models.suv.model import SUVModel
    from megatron_video.parallel.setup import build_parallel_plan

    return SUVModel(cfg.model, build_parallel_plan(cfg), blocks=blocks)


def test_tensor_parallel_split_matches_megatron_shapes():
    """Column-parallel linears split weight and bias, row-parallel keep the bias whole: the TP=2
    count is exactly what the TP=1 count loses in the split tensors."""
    cfg = SUVConfig.from_flavor("tiny")
    one, two = chunk_parameters(cfg, 1, range(10)), chunk_parameters(cfg, 2, range(10))
    d, f, e = cfg.hidden_size, 4 * cfg.hidden_size, cfg.timestep_embed_dim
    split_per_block = 2 * (3 * d * d + 3 * d) + 2 * d * d + 2 * 2 * d * f + 2 * (6 * d * e + 6 * d)
    last_block = split_per_block - d * d - 2 * d * f  # no text output projection, no text FFN
    head = 2 * d * e + 2 * d
    split = 9 * split_per_block + last_block + head
    assert one.total - two.total == split // 2
    assert pipeline_chunks(10, 2, 2) == [[range(0, 3), range(6, 8)], [range(3, 6), range(8, 10)]]


def test_saved_activations_per_block_match_autograd(megatron_single):
    """What autograd saves inside each block (unique storages, parameters excluded) against the
    planner's per-block count, bf16, dense and Skiparse (Single and Group) blocks."""
    from megatron_video.planning.flops import video_tokens
    from megatron_video.planning.stage import layout_from_config
    from megatron_video.testing.models import build_model, tiny_config

    cfg = tiny_config()
    cfg.runtime.dtype = "bf16"
    model = build_model(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    b, t, h, w, lt = 2, 4, 16, 16, 16
    saved: dict[int, dict[int, int]] = {}
    current = [None]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in params:
            saved.setdefault(current[0], {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    for i, block in enumerate(model.blocks()):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(
            torch.randn(b, m.in_channels, t, h, w, generator=g),
            torch.rand(b, generator=g) * 1000,
            torch.randn(b, lt, m.caption_channels, generator=g),
            torch.randn(b, m.pooled_projection_dim, generator=g),
        )
    cfg.training.micro_batch_size = b
    layout = layout_from_config(cfg, 1)
    predicted = block_activations(m, layout, video_tokens(m, (t, h, w)), lt)
    for i, per in enumerate(predicted):
        measured = sum(saved[i].values())
        assert per.none == pytest.approx(measured, rel=0.06), i


def test_layout_from_config_and_optimizer_shards():
    from megatron_video.config import build_config
    from megatron_video.planning.memory import memory_breakdown

    cfg = build_config(
        {
            "model": {"flavor": "tiny"},
            "parallel": {"tensor_parallel": 2, "sequence_parallel": True, "context_parallel": 2},
            "runtime": {"dtype": "bf16"},
            "shape": {"num_frames": 9, "height": 64, "width": 64, "text_length": 8},
            "training": {"micro_batch_size": 1, "global_batch_size": 8},
        }
    )
    layout = layout_from_config_for(cfg, 16)
    assert (layout.dp, layout.micro_batches, layout.seq_split, layout.linear_bytes) == (4, 2, 2, 2)
    mem = memory_breakdown(cfg.model, layout, 2 * 4 * 4, 8)
    params = chunk_parameters(cfg.model, 2, range(10))
    assert mem.weights == params.nbytes(2)
    assert mem.gradients == 4 * params.total  # fp32 DDP buffer, whole on every rank
    assert mem.optimizer_states == pytest.approx(8 * params.total / 8)  # Adam moments over DP x CP = 8
    assert mem.main_params == pytest.approx(4 * params.linear / 8)
    assert mem.ema == 4 * params.total


def layout_from_config_for(cfg, devices: int) -> Layout:
    from megatron_video.planning.stage import layout_from_config

    return layout_from_config(cfg, devices)


def test_frozen_vae_parameter_count_is_the_built_module():
    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.model import WFVAE

    with torch.device("meta"):
        vae = WFVAE(WFVAEConfig.from_flavor("wfvae_8x8x8_d32"))
    assert sum(p.numel() for p in vae.parameters()) == FROZEN_ENCODER_PARAMS["wfvae:wfvae_8x8x8_d32"]


def test_device_table_and_names():
    assert device_from_name("NVIDIA H100 80GB HBM3").peak_tflops == 989
    assert device_from_name("NVIDIA H200").memory_gb == 141
    assert device_from_name("NVIDIA A100-SXM4-80GB").peak_tflops == 312
    assert device_from_name("Ascend910B2").peak_tflops == 354
    assert device_from_name("NVIDIA B200").peak_tflops == 2250
    assert device_from_name("Quadro RTX 5000") is None
    custom = get_device("910b", memory_gb=32, matmul_tflops=177)
    assert (custom.memory_gb, custom.matmul_tflops) == (32, pytest.approx(177))
    with pytest.raises(ValueError, match="unknown device"):
        get_device("tpu")
    assert set(DEVICES) == {"h100", "h200", "a100", "b200", "910b"}


def test_metrics_log_mfu_and_hfu_per_device(monkeypatch):
    from megatron_video.training import metrics

    log = metrics.MetricsLogger(enabled=True, log_interval=100)
    times = iter([10.0, 12.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(times))
    log._last = metrics.time.perf_counter()
    log.log(1, {"loss": 1.0}, samples=4, tokens=40, flops=2e15, peak_tflops=1000.0, hardware_flops=3e15)
    record = log.history[-1]
    assert record["mfu"] == pytest.approx(2e15 / 2.0 / 1e15)  # one process: world size 1
    assert record["hfu"] == pytest.approx(3e15 / 2.0 / 1e15)
    assert metrics.device_peak_tflops(torch.device("cpu")) is None
    assert metrics.device_peak_tflops(torch.device("cpu"), 312.0) == 312.0


def test_planner_on_a_released_stage():
    """video_s4 (121x576x1024, TP/SP 4, full recompute) on 512 devices: tokens, FLOP ratio, fit."""
    from megatron_video.config.schema import load_config
    from megatron_video.planning.stage import plan_stage

    cfg = load_config(
        "examples/opensoraplan1.5/video_s4.yaml", ["parallel.world_size=512"], check_files=False
    )
    plan = plan_stage(cfg, 512, DEVICES["h100"])
    assert (plan.video_tokens, plan.text_tokens) == (16 * 36 * 64, 512)
    assert plan.layout.dp == 128 and plan.layout.micro_batches == 4
    assert 1.2 < plan.step.hardware_flops / plan.step.model_flops < 4 / 3 + 1e-9  # full recompute
    assert plan.memory.frozen_encoders > 0  # encodes online
    assert plan.fits and 0 < plan.step.mfu < 1


def test_plan_tool_prints_the_breakdown_and_a_table(capsys, tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "plan.py"
    spec = importlib.util.spec_from_file_location("plan_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stage = "examples/opensoraplan1.5/video_s4.yaml"
    assert tool.main([stage, "--devices", "512", "--device", "910b"]) == 0
    out = capsys.readouterr().out
    assert "TP4+SP CP1 PP1 rc=full mbs=1, DP128" in out and "predicted step" in out
    assert "Adam moments" in out and "frozen VAE / text encoders" in out
    report = tmp_path / "plan.json"
    args = [stage, "examples/opensoraplan1.5/video_s5.yaml", "training.micro_batch_size=1"]
    assert tool.main([*args, "--devices", "512", "--device", "h100", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.count("| video_s") == 2
    assert json.loads(report.read_text())["video_s4"]["fits"] is True
